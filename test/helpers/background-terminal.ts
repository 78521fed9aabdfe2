import { type ChildProcess, spawn } from 'node:child_process';
import * as http from 'node:http';

/** How a background terminal's shell ended. */
export interface TerminalExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/**
 * A long-running command the README runs "in a second terminal": `bash -c SCRIPT` in its own process
 * group, as a terminal's foreground job is, so {@link interrupt} is what Ctrl-C does there (SIGINT to
 * the whole group) and {@link kill} leaves nothing behind.
 */
export class BackgroundTerminal {
  private readonly child: ChildProcess;
  /** Everything it printed, stdout and stderr interleaved as they arrived. */
  output = '';
  exit: TerminalExit | undefined;
  readonly exited: Promise<TerminalExit>;
  private readonly watchers = new Set<() => void>();

  constructor(
    readonly name: string,
    script: string,
    cwd: string,
    env: NodeJS.ProcessEnv,
  ) {
    this.child = spawn('bash', ['--noprofile', '--norc', '-c', script], {
      cwd,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    const take = (d: Buffer) => {
      this.output += d.toString('utf8');
      for (const w of this.watchers) w();
    };
    this.child.stdout?.on('data', take);
    this.child.stderr?.on('data', take);
    // 'close', not 'exit': by then every byte it printed has been read.
    this.exited = new Promise((resolve) =>
      this.child.on('close', (code, signal) => {
        this.exit = { code, signal };
        for (const w of this.watchers) w();
        resolve(this.exit);
      }),
    );
  }

  /** Resolves when the output matches `pattern`; rejects if the process ends first or after `timeoutMs`. */
  waitForOutput(pattern: RegExp, timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const done = (err?: Error) => {
        clearTimeout(timer);
        this.watchers.delete(check);
        if (err) reject(err);
        else resolve();
      };
      const check = () => {
        if (pattern.test(this.output)) done();
        else if (this.exit) done(this.endedEarly(`printing ${pattern}`));
      };
      const timer = setTimeout(() => done(this.timedOut(`${pattern} in its output`, timeoutMs)), timeoutMs);
      this.watchers.add(check);
      check();
    });
  }

  /**
   * Resolves when `url` answers 200. An HTTP endpoint has no event to wait on, so it is asked again every
   * 50 ms; the process ending first rejects at once.
   */
  async waitForUrl(url: string, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.exit) throw this.endedEarly(`${url} answering 200`);
      if ((await httpStatus(url)) === 200) return;
      if (Date.now() > deadline) throw this.timedOut(`${url} to answer 200`, timeoutMs);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Ctrl-C: SIGINT to its process group. */
  interrupt(): void {
    this.signal('SIGINT');
  }

  /** SIGKILL to its process group; resolves once the shell is gone. */
  async kill(): Promise<void> {
    if (this.exit) return;
    this.signal('SIGKILL');
    await this.exited;
  }

  private signal(sig: NodeJS.Signals): void {
    if (this.exit || this.child.pid === undefined) return;
    try {
      process.kill(-this.child.pid, sig);
    } catch {
      // the group is already gone
    }
  }

  private endedEarly(what: string): Error {
    return new Error(
      `${this.name} exited (code ${this.exit?.code}, signal ${this.exit?.signal}) before ${what}; it printed:\n` +
        this.output,
    );
  }

  private timedOut(what: string, timeoutMs: number): Error {
    return new Error(`${this.name}: waited ${timeoutMs} ms for ${what}; it printed:\n${this.output}`);
  }
}

/** The status code of GET `url`, or 0 when nothing answers. */
function httpStatus(url: string): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get(url, { agent: false, timeout: 1_000 }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(0));
  });
}
