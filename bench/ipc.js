'use strict';
// Request/answer over Node's fork() IPC channel, shared by the bench's helper processes
// (caller, upstream, agent swarm) and the orchestrator (run.js) that drives them.
const { fork } = require('node:child_process');

/**
 * In a forked child: answers {id, op, args} messages with handlers[op](args), then says it is
 * ready. The child exits when its parent goes away (the IPC channel closes), so a crashed or
 * killed orchestrator leaves no load generator running.
 */
function serveIpc(handlers) {
  process.on('message', async ({ id, op, args }) => {
    try {
      if (!handlers[op]) throw new Error(`unknown op ${op}`);
      process.send({ id, result: await handlers[op](args) });
    } catch (err) {
      process.send({ id, error: err instanceof Error ? err.stack : String(err) });
    }
  });
  process.on('disconnect', () => process.exit(0));
  process.send({ ready: true });
}

/** A forked bench helper: `call(op, args)` resolves with its handler's result. */
class IpcChild {
  constructor(script, args = [], opts = {}) {
    this.name = opts.name ?? script;
    this.proc = fork(script, args, {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      execArgv: opts.execArgv ?? [],
      env: opts.env ?? process.env,
    });
    this.pending = new Map();
    this.nextId = 0;
    this.exited = new Promise((resolve) =>
      this.proc.once('exit', (code, signal) => {
        for (const { reject } of this.pending.values())
          reject(new Error(`${this.name} exited (${code ?? signal}) during a request`));
        this.pending.clear();
        resolve({ code, signal });
      }),
    );
    this.ready = new Promise((resolve, reject) => {
      this.proc.on('message', (msg) => {
        if (msg.ready) return resolve();
        const p = this.pending.get(msg.id);
        if (!p) return;
        this.pending.delete(msg.id);
        if (msg.error) p.reject(new Error(`${this.name}: ${msg.error}`));
        else p.resolve(msg.result);
      });
      this.exited.then(({ code, signal }) =>
        reject(new Error(`${this.name} exited (${code ?? signal}) before it was ready`)),
      );
    });
  }

  async call(op, args) {
    await this.ready;
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      this.pending.set(id, { resolve, reject });
      this.proc.send({ id, op, args });
    });
  }

  /** Closes the IPC channel (the child exits by itself, writing a --cpu-prof profile); SIGKILL after `graceMs`. */
  async close(graceMs = 10_000) {
    if (this.proc.connected) this.proc.disconnect();
    const timer = setTimeout(() => this.kill(), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  /** SIGKILL unless gone; resolves once reaped. */
  kill() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
    return this.exited;
  }
}

module.exports = { serveIpc, IpcChild };
