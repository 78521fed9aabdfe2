import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

/**
 * One bash that lives for a whole sequence of commands, the way a user's terminal does: an `export` or
 * a variable set by one step is there for the next. Each step is written to a file in `scriptDir` and
 * sourced (`source FILE </dev/null 2>&1`), so no command can read the following steps from the shell's
 * stdin, and its stderr lands in the output with its stdout. The shell runs with `set -e -o pipefail`:
 * the first failing command ends it, and {@link run} rejects with the step's output.
 */
export class ShellTerminal {
  private readonly child: ChildProcess;
  private output = '';
  private exitCode: number | null | undefined;
  private readonly watchers = new Set<() => void>();
  private readonly nonce = randomBytes(8).toString('hex');
  private steps = 0;

  constructor(
    readonly cwd: string,
    env: NodeJS.ProcessEnv,
    private readonly scriptDir: string,
  ) {
    // detached: its own process group, so close() also ends whatever a step left running.
    this.child = spawn('bash', ['--noprofile', '--norc'], {
      cwd,
      env,
      stdio: ['pipe', 'pipe', 'pipe'],
      detached: true,
    });
    const take = (d: Buffer) => {
      this.output += d.toString('utf8');
      for (const w of this.watchers) w();
    };
    this.child.stdout?.on('data', take);
    this.child.stderr?.on('data', take);
    this.child.on('close', (code) => {
      this.exitCode = code;
      for (const w of this.watchers) w();
    });
    this.child.stdin?.on('error', () => {}); // EPIPE after the shell died: run() reports the exit instead
    this.child.stdin?.write('set -e -o pipefail\n');
  }

  /** Runs `script` in the shell; resolves with what it printed (stdout and stderr), rejects if it fails. */
  run(script: string, timeoutMs: number): Promise<string> {
    const n = ++this.steps;
    const file = path.join(this.scriptDir, `step-${n}.sh`);
    fs.writeFileSync(file, `${script}\n`);
    const from = this.output.length;
    const doneLine = `@@quick-start ${this.nonce} ${n} done`;
    const done = `${doneLine}\n`;
    return new Promise((resolve, reject) => {
      const finish = (err?: Error) => {
        clearTimeout(timer);
        this.watchers.delete(check);
        if (err) reject(err);
      };
      const check = () => {
        const out = this.output.slice(from);
        const at = out.indexOf(done);
        if (at >= 0) {
          finish();
          resolve(out.slice(0, at));
        } else if (this.exitCode !== undefined)
          finish(new Error(`the step failed (its shell exited with code ${this.exitCode}); it printed:\n${out}`));
      };
      const timer = setTimeout(
        () => finish(new Error(`the step did not finish in ${timeoutMs} ms; it printed:\n${this.output.slice(from)}`)),
        timeoutMs,
      );
      this.watchers.add(check);
      this.child.stdin?.write(`source ${JSON.stringify(file)} </dev/null 2>&1\nprintf '%s\\n' '${doneLine}'\n`);
      check();
    });
  }

  /** Ends the shell and anything it started (SIGKILL to its process group); resolves once the shell is gone. */
  close(): Promise<void> {
    if (this.exitCode !== undefined || this.child.pid === undefined) return Promise.resolve();
    const exited = new Promise<void>((resolve) => this.child.once('close', () => resolve()));
    try {
      process.kill(-this.child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
    return exited;
  }
}
