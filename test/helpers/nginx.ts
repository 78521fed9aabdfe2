import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { accepts } from './free-port';
import { makeTempDir } from './pki-fixture';
import { pollUntil } from './wait';

/** Debian's nginx binary (package nginx-core, which has the auth_request module). */
export const NGINX = '/usr/sbin/nginx';

/** The shipped auth_request configuration the tests run (templated by {@link templateBurrowAuthConf}). */
export const BURROW_AUTH_CONF = path.resolve(__dirname, '..', '..', '..', 'deploy', 'nginx', 'burrow-auth.conf');

/**
 * Installs nginx-core with apt-get when /usr/sbin/nginx is missing (the tests run as root on
 * Debian, like the bench's sshd), updating the package lists once if the first install fails.
 */
export function ensureNginx(): void {
  if (existsSync(NGINX)) return;
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const install = (): void => {
    execFileSync('apt-get', ['install', '-y', 'nginx-core'], { stdio: 'ignore', env, timeout: 300_000 });
  };
  try {
    install();
  } catch {
    execFileSync('apt-get', ['update'], { stdio: 'ignore', env, timeout: 300_000 });
    install();
  }
}

/** What the shipped burrow-auth.conf names, replaced by the test's own (each must be found once or more). */
export interface BurrowAuthValues {
  listenPort: number;
  /** host:port of the broker's forward-auth listener. */
  broker: string;
  /** The name nginx checks in the broker's certificate. */
  brokerName: string;
  app: string;
  serviceCert: string;
  serviceKey: string;
  ca: string;
  agentId: string;
}

/**
 * deploy/nginx/burrow-auth.conf with the test's addresses, certificates and site: the shipped text
 * is what runs, so a value the file stops naming fails the test here instead of going untested.
 */
export function templateBurrowAuthConf(v: BurrowAuthValues): string {
  const replacements: [string, string][] = [
    ['listen 80;', `listen 127.0.0.1:${v.listenPort};`],
    ['server broker.example.internal:8448;', `server ${v.broker};`],
    ['proxy_ssl_name broker.example.internal;', `proxy_ssl_name ${v.brokerName};`],
    ['server 127.0.0.1:3000;', `server ${v.app};`],
    ['/etc/nginx/burrow/service.crt', v.serviceCert],
    ['/etc/nginx/burrow/service.key', v.serviceKey],
    ['/etc/nginx/burrow/ca.crt', v.ca],
    ['/agents/site-a/check', `/agents/${encodeURIComponent(v.agentId)}/check`],
  ];
  let text = readFileSync(BURROW_AUTH_CONF, 'utf8');
  for (const [from, to] of replacements) {
    if (!text.includes(from)) throw new Error(`${BURROW_AUTH_CONF} no longer contains "${from}"`);
    text = text.split(from).join(to);
  }
  return text;
}

/**
 * nginx as a child process with a prefix directory of its own (config, pid, logs, temp paths),
 * in the foreground (`daemon off`) and in its own process group, so that stopping it ends the
 * master and its worker together.
 */
export class TestNginx {
  private constructor(
    readonly dir: string,
    readonly port: number,
    private readonly child: ChildProcess,
    private readonly exited: Promise<void>,
  ) {}

  /** Starts nginx with `httpConf` inside its http {} block; resolves once `port` accepts. */
  static async start(httpConf: string, port: number): Promise<TestNginx> {
    const dir = makeTempDir('burrow-nginx-');
    writeFileSync(path.join(dir, 'burrow-auth.conf'), httpConf);
    writeFileSync(path.join(dir, 'nginx.conf'), mainConf(dir));
    const child = spawn(NGINX, ['-p', dir, '-e', path.join(dir, 'error.log'), '-c', path.join(dir, 'nginx.conf')], {
      detached: true,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr?.on('data', (c: Buffer) => {
      stderr += c.toString();
    });
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const nginx = new TestNginx(dir, port, child, exited);
    let gone = false;
    void exited.then(() => {
      gone = true;
    });
    try {
      await pollUntil(`nginx accepting on 127.0.0.1:${port}`, async () => {
        if (gone) throw new Error(`nginx exited: ${stderr.trim() || nginx.errorLog()}`);
        return accepts(port);
      });
    } catch (err) {
      await nginx.stop();
      throw err;
    }
    return nginx;
  }

  /** nginx's error log (for failure messages). */
  errorLog(): string {
    try {
      return readFileSync(path.join(this.dir, 'error.log'), 'utf8').slice(-4000);
    } catch {
      return '';
    }
  }

  /** Ends the process group (fast shutdown, then SIGKILL after 5 s), checks the port is closed, removes the dir. */
  async stop(): Promise<void> {
    const pgid = this.child.pid;
    if (pgid !== undefined && this.child.exitCode === null && this.child.signalCode === null) {
      try {
        process.kill(-pgid, 'SIGTERM');
      } catch {
        // Already gone.
      }
      const killer = setTimeout(() => {
        try {
          process.kill(-pgid, 'SIGKILL');
        } catch {
          // Already gone.
        }
      }, 5_000);
      await this.exited;
      clearTimeout(killer);
    }
    // The worker may outlive the master by a moment: the port is closed once both are gone.
    await pollUntil(`nginx's port ${this.port} closed`, async () => !(await accepts(this.port)));
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The main nginx.conf: everything nginx writes stays in `dir`. */
function mainConf(dir: string): string {
  const at = (name: string): string => path.join(dir, name);
  // As root, workers would switch to `nobody`, who cannot enter the 0700 temp dir.
  const user = process.getuid?.() === 0 ? 'user root;\n' : '';
  return `${user}daemon off;
worker_processes 1;
pid ${at('nginx.pid')};
error_log ${at('error.log')} info;
events { worker_connections 256; }
http {
    access_log ${at('access.log')};
    client_body_temp_path ${at('client_body')};
    proxy_temp_path ${at('proxy')};
    fastcgi_temp_path ${at('fastcgi')};
    uwsgi_temp_path ${at('uwsgi')};
    scgi_temp_path ${at('scgi')};
    include ${at('burrow-auth.conf')};
}
`;
}
