import { spawn, type ChildProcess } from 'node:child_process';
import { createConnection } from 'node:net';
import { freePort } from './free-port';

/**
 * A redis-server of the test's own on a free loopback port, so that a test can kill it and start
 * it again on the same port (the machine's shared Redis must not be touched). Keeps nothing on disk.
 */
export class TestRedis {
  private proc: ChildProcess | undefined;
  private constructor(readonly port: number) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  static async start(): Promise<TestRedis> {
    const r = new TestRedis(await freePort());
    await r.restart();
    return r;
  }

  /** Starts the server (again) on its port; resolves once it answers PING. */
  async restart(): Promise<void> {
    if (this.proc) throw new Error('redis-server already running');
    const proc = spawn(
      'redis-server',
      ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    this.proc = proc;
    const exited = new Promise<never>((_, reject) =>
      proc.once('exit', (code) => reject(new Error(`redis-server exited with ${code}`))),
    );
    // "Ready to accept connections" is the server's own signal that it listens.
    await Promise.race([
      exited,
      new Promise<void>((resolve) => {
        let seen = '';
        proc.stdout!.on('data', (chunk: Buffer) => {
          seen += chunk.toString();
          if (seen.includes('Ready to accept connections')) resolve();
        });
      }),
    ]);
    proc.stdout!.resume();
    proc.stderr!.resume();
  }

  /** One command over RESP, for tests that inspect or damage the directory. */
  command(...args: string[]): Promise<string> {
    return new Promise((resolve, reject) => {
      const sock = createConnection(this.port, '127.0.0.1');
      let out = '';
      sock.on('data', (d) => {
        out += d.toString();
        if (out.endsWith('\r\n')) {
          sock.end();
        }
      });
      sock.on('end', () => resolve(out));
      sock.on('error', reject);
      sock.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`);
    });
  }

  /** Kills the server at once (SIGKILL) and waits for it to be gone. */
  async kill(): Promise<void> {
    const proc = this.proc;
    if (!proc) return;
    this.proc = undefined;
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      proc.once('exit', () => resolve());
      proc.kill('SIGKILL');
    });
  }

  get running(): boolean {
    return this.proc !== undefined;
  }
}
