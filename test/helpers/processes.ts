import { spawn, type ChildProcess } from 'node:child_process';
import * as http from 'node:http';
import * as path from 'node:path';
import type { CertFiles } from './pki-fixture';

/**
 * Real burrow-broker / burrow-agent processes for end-to-end tests.
 *
 *   const broker = await startBroker([...certArgs, '--agent-listen', '127.0.0.1:0']);
 *   broker.ports.apiPort;                      // parsed from the "broker started" log line
 *   await broker.proc.waitForLog('agent connected');
 *   afterEach(() => killAll());                // SIGKILLs whatever is left and checks the pids are gone
 *
 * Ports: the CLIs accept port 0 and print the ports they got only in their JSON logs on stderr
 * ("broker started": agentPort, apiPort, adminPort; "agent started": localPort, adminPort), so the
 * helpers parse stderr for those lines.
 */

// Compiled to test/dist/helpers/processes.js: the repository root is three levels up.
const ROOT = path.resolve(__dirname, '..', '..', '..');
export const BROKER_CLI = path.join(ROOT, 'packages', 'broker', 'dist', 'cli.js');
export const AGENT_CLI = path.join(ROOT, 'packages', 'agent', 'dist', 'cli.js');
export const PKI_CLI = path.join(ROOT, 'packages', 'pki', 'dist', 'cli.js');
/** burrow-call as the @burrow/client tarball ships it: the bundle scripts/bundle-client.js builds. */
export const CALL_CLI = path.join(ROOT, 'packages', 'client', 'bundle', 'burrow-call.js');

/** One JSON log line of a Burrow binary. */
export interface LogLine {
  message?: string;
  level?: string;
  [key: string]: unknown;
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Every process spawned here and not yet reaped; {@link killAll} ends them. */
const live = new Set<BurrowProcess>();
/** Every pid ever spawned here, for the leak check. */
const spawnedPids = new Set<number>();

/** The parent's environment without any BURROW_* variable, so the host cannot change a test. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BURROW_')) env[k] = v;
  return { ...env, ...extra };
}

/**
 * Runs a single executable (the agent binary) instead of `node CLI`: `cli` is then ignored, the
 * process starts in `cwd` with exactly `env` (nothing inherited).
 */
export interface ExecutableSpawn {
  executable: string;
  cwd: string;
  env: Record<string, string>;
}

/** A spawned Burrow binary: its stderr split into lines, JSON lines parsed as logs. */
export class BurrowProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly stderrLines: string[] = [];
  readonly logs: LogLine[] = [];
  stdout = '';
  readonly exited: Promise<Exit>;
  exit: Exit | undefined;
  private partial = '';
  private readonly lineWatchers = new Set<() => void>();

  /**
   * `stdin`: text written to the process's stdin, which is then closed (default: no stdin). `exe`: run a standalone
   * executable instead of `node cli`.
   */
  constructor(
    readonly name: string,
    cli: string,
    args: string[],
    env: Record<string, string> = {},
    exe?: ExecutableSpawn,
    stdin?: string,
  ) {
    const stdio: ['ignore' | 'pipe', 'pipe', 'pipe'] = [stdin === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'];
    this.child = exe
      ? spawn(exe.executable, args, { env: exe.env, cwd: exe.cwd, stdio })
      : spawn(process.execPath, [cli, ...args], { env: cleanEnv(env), stdio });
    if (stdin !== undefined) this.child.stdin!.end(stdin);
    if (this.child.pid === undefined) throw new Error(`${name}: spawn failed`);
    this.pid = this.child.pid;
    live.add(this);
    spawnedPids.add(this.pid);
    this.child.stdout!.setEncoding('utf8').on('data', (s: string) => {
      this.stdout += s;
    });
    this.child.stderr!.setEncoding('utf8').on('data', (s: string) => this.onStderr(s));
    this.exited = new Promise((resolve) => {
      // 'close' (not 'exit'): every byte of stderr has been read by then.
      this.child.once('close', (code, signal) => {
        if (this.partial) this.addLine(this.partial);
        this.partial = '';
        this.exit = { code, signal };
        live.delete(this);
        for (const w of [...this.lineWatchers]) w();
        resolve(this.exit);
      });
    });
  }

  private onStderr(s: string): void {
    const parts = (this.partial + s).split('\n');
    this.partial = parts.pop()!;
    for (const line of parts) this.addLine(line);
  }

  private addLine(line: string): void {
    if (process.env.BURROW_TEST_LOG) process.stderr.write(`[${this.name}] ${line}\n`);
    this.stderrLines.push(line);
    if (line.startsWith('{')) {
      try {
        this.logs.push(JSON.parse(line) as LogLine);
      } catch {
        /* not a log line */
      }
    }
    for (const w of [...this.lineWatchers]) w();
  }

  /**
   * Resolves with the first log line (already seen or still to come, from index `from` of
   * {@link logs}) whose message is `message` and that `where` accepts. Rejects when the process
   * exits first or after `timeoutMs`, quoting its stderr.
   */
  waitForLog(
    message: string,
    where: (l: LogLine) => boolean = () => true,
    opts: { timeoutMs?: number; from?: number } = {},
  ): Promise<LogLine> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const from = opts.from ?? 0;
    return new Promise((resolve, reject) => {
      const check = (): void => {
        const hit = this.logs.slice(from).find((l) => l.message === message && where(l));
        if (hit) {
          cleanup();
          resolve(hit);
          return;
        }
        if (this.exit) {
          cleanup();
          reject(
            new Error(
              `${this.name} exited (${JSON.stringify(this.exit)}) before logging "${message}"; ` +
                `stderr:\n${this.stderrTail()}`,
            ),
          );
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new Error(`${this.name} did not log "${message}" within ${timeoutMs} ms; stderr:\n${this.stderrTail()}`),
        );
      }, timeoutMs);
      const cleanup = (): void => {
        clearTimeout(timer);
        this.lineWatchers.delete(check);
      };
      this.lineWatchers.add(check);
      check();
    });
  }

  /** Resolves with the exit status, or rejects after `timeoutMs` (the process is left running). */
  async waitExit(timeoutMs = 10_000): Promise<Exit> {
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        this.exited,
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () =>
              reject(
                new Error(
                  `${this.name} (pid ${this.pid}) did not exit within ${timeoutMs} ms; stderr:\n${this.stderrTail()}`,
                ),
              ),
            timeoutMs,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Sends `signal` if the process still runs. */
  signal(signal: NodeJS.Signals): void {
    if (!this.exit) this.child.kill(signal);
  }

  stderrTail(lines = 30): string {
    return this.stderrLines.slice(-lines).join('\n');
  }
}

export interface BrokerPorts {
  agentPort: number;
  apiPort: number;
  adminPort?: number;
}
export interface AgentPorts {
  localPort?: number;
  adminPort?: number;
}

/** `--tls-cert`, `--tls-key` and `--ca` of a broker or agent holding the certificate files `c`. */
export function tlsArgs(c: CertFiles): string[] {
  return ['--tls-cert', c.cert, '--tls-key', c.key, '--ca', c.ca];
}

/** Starts `burrow-broker serve ARGS` and waits for its "broker started" line. */
export async function startBroker(
  args: string[],
  env: Record<string, string> = {},
  name = 'broker',
): Promise<{ proc: BurrowProcess; ports: BrokerPorts; started: LogLine }> {
  const proc = new BurrowProcess(name, BROKER_CLI, ['serve', ...args], env);
  const started = await proc.waitForLog('broker started');
  return {
    proc,
    started,
    ports: {
      agentPort: Number(started.agentPort),
      apiPort: Number(started.apiPort),
      adminPort: started.adminPort === undefined ? undefined : Number(started.adminPort),
    },
  };
}

/** Starts `burrow-agent run ARGS` and waits for its "agent started" line. */
export async function startAgent(
  args: string[],
  env: Record<string, string> = {},
  name = 'agent',
): Promise<{ proc: BurrowProcess; ports: AgentPorts; started: LogLine }> {
  const proc = new BurrowProcess(name, AGENT_CLI, ['run', ...args], env);
  const started = await proc.waitForLog('agent started');
  return {
    proc,
    started,
    ports: {
      localPort: started.localPort === undefined ? undefined : Number(started.localPort),
      adminPort: started.adminPort === undefined ? undefined : Number(started.adminPort),
    },
  };
}

/** Runs a CLI to completion (for --help, --version and config errors). */
export async function runCli(
  cli: string,
  args: string[],
  env: Record<string, string> = {},
  timeoutMs = 10_000,
  stdin?: string,
): Promise<{ proc: BurrowProcess; exit: Exit; stdout: string; stderrLines: string[] }> {
  const proc = new BurrowProcess(path.basename(path.dirname(path.dirname(cli))), cli, args, env, undefined, stdin);
  const exit = await proc.waitExit(timeoutMs);
  return { proc, exit, stdout: proc.stdout, stderrLines: proc.stderrLines.filter((l) => l !== '') };
}

/** True while a process with this pid exists (signal 0 only checks). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * SIGKILLs every process still running and waits until each is reaped, then checks that no pid
 * spawned here is alive. Call from after/afterEach; it never throws for a process that is already gone.
 */
export async function killAll(): Promise<void> {
  const procs = [...live];
  for (const p of procs) p.signal('SIGKILL');
  await Promise.all(procs.map((p) => p.exited));
  const alive = [...spawnedPids].filter(pidAlive);
  if (alive.length) throw new Error(`child processes still alive after killAll: ${alive.join(', ')}`);
}

/** Number of spawned processes not yet reaped. */
export function liveProcessCount(): number {
  return live.size;
}

// Last resort if mocha itself dies: never leave a broker behind.
process.on('exit', () => {
  for (const p of live) {
    try {
      p.child.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
});

/** A plain HTTP request to an admin listener, with any method and headers (`host` included). */
export function httpRequest(
  url: string,
  method: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers, agent: false, timeout: 5_000 }, (res) => {
      let body = '';
      res
        .setEncoding('utf8')
        .on('data', (c: string) => {
          body += c;
        })
        .on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${url} timed out`)));
    req.on('error', reject);
    req.end();
  });
}

/** GET on a plain-HTTP admin listener: status and body. */
export function httpGet(url: string, timeoutMs = 5_000): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        body += c;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url} timed out`)));
    req.on('error', reject);
  });
}

/** GET a JSON route. */
export async function getJson<T>(url: string): Promise<T> {
  const res = await httpGet(url);
  if (res.status !== 200) throw new Error(`GET ${url}: HTTP ${res.status}: ${res.body}`);
  return JSON.parse(res.body) as T;
}

/** The /agents entry of the broker admin listener. */
export interface AgentListing {
  id: string;
  connections: number;
  connectedSince: string;
  callsInFlight: number;
  idleOffers: number;
  sessions: unknown[];
}
