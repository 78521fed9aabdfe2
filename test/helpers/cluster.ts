import * as net from 'node:net';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import { ECHO, EchoUpstream } from './echo-upstream';
import { freePorts } from './free-port';
import { PkiFixture, type CertFiles } from './pki-fixture';
import {
  AGENT_CLI,
  BROKER_CLI,
  BurrowProcess,
  getJson,
  httpGet,
  killAll,
  type AgentListing,
  type BrokerPorts,
  tlsArgs,
} from './processes';
import { pollUntil } from './wait';
import { RawClient, mtlsCredentials } from './raw-grpc';
import { TestRedis } from './redis-server';

/**
 * A cluster of real `burrow-broker serve` processes sharing a test's own redis-server, with real
 * `burrow-agent run` processes and callers in the test process (see test/cluster-faults.test.ts).
 *
 *   const world = await ClusterWorld.create(['a', 'b', 'c']);   // PKI, Redis, echo upstream, ports
 *   await world.startBroker('a');                               // fixed ports: restarts reuse them
 *   await world.startAgent('site-x', ['a', 'b']);               // one tunnel per named broker
 *   await world.call('b', 'site-x');                            // caller -> b -> ... -> agent
 *   await world.close();                                        // SIGKILLs everything, removes the PKI
 *
 * Every broker keeps its agent, API, peer and admin ports for the life of the world, so that a
 * broker stopped and started again is the "same" broker to agents, callers and peers.
 */

/** One broker of the world: its fixed ports and, while it runs, its process. */
export interface BrokerSlot {
  name: string;
  brokerId: string;
  agentPort: number;
  apiPort: number;
  peerPort: number;
  adminPort: number;
  proc?: BurrowProcess;
}

/** The outcome of one unary call: never rejects. */
export interface CallResult {
  code: number;
  details: string;
  ms: number;
  response?: string;
}

const REGISTRY_TTL = '3s';
export const REGISTRY_TTL_MS = 3_000;
export const AGENT_WAIT_MS = 3_000;
const STARTUP_TIMEOUT_MS = 30_000;

let worldCounter = 0;

export class ClusterWorld {
  readonly brokers = new Map<string, BrokerSlot>();
  readonly agents = new Map<string, BurrowProcess>();
  /** Every process started in this world, in order (restarted brokers included), for diagnostics. */
  readonly history: BurrowProcess[] = [];
  readonly prefix: string;
  private readonly clients = new Map<string, RawClient>();
  private readonly agentCerts = new Map<string, CertFiles>();
  private readonly proxies: FailoverProxy[] = [];

  private constructor(
    readonly redis: TestRedis,
    readonly pki: PkiFixture,
    readonly echo: EchoUpstream,
    readonly brokerCert: CertFiles,
    readonly serviceCert: CertFiles,
  ) {
    this.prefix = `faults${process.pid}-${++worldCounter}:`;
  }

  /** Makes the PKI, Redis and the echo upstream, and reserves four ports per broker name. */
  static async create(
    names: string[],
    shared?: {
      redis?: TestRedis;
      pki?: PkiFixture;
      brokerCert?: CertFiles;
      serviceCert?: CertFiles;
      echo?: EchoUpstream;
    },
  ): Promise<ClusterWorld> {
    const redis = shared?.redis ?? (await TestRedis.start());
    const pki = shared?.pki ?? (await PkiFixture.create());
    const brokerCert = shared?.brokerCert ?? (await pki.issue('broker', 'cluster'));
    const serviceCert = shared?.serviceCert ?? (await pki.issue('service', 'platform-svc'));
    const echo = shared?.echo ?? (await new EchoUpstream().start());
    const w = new ClusterWorld(redis, pki, echo, brokerCert, serviceCert);
    const ports = await freePorts(names.length * 4);
    names.forEach((name, i) => {
      const [agentPort, apiPort, peerPort, adminPort] = ports.slice(i * 4, i * 4 + 4) as [
        number,
        number,
        number,
        number,
      ];
      w.brokers.set(name, { name, brokerId: `broker-${name}`, agentPort, apiPort, peerPort, adminPort });
    });
    return w;
  }

  slot(name: string): BrokerSlot {
    const s = this.brokers.get(name);
    if (!s) throw new Error(`no broker "${name}" in this world`);
    return s;
  }

  agentAddress(name: string): string {
    return `127.0.0.1:${this.slot(name).agentPort}`;
  }
  peerAddress(name: string): string {
    return `127.0.0.1:${this.slot(name).peerPort}`;
  }
  adminUrl(name: string, route: string): string {
    return `http://127.0.0.1:${this.slot(name).adminPort}${route}`;
  }

  /** Starts `burrow-broker serve` for `name` on its fixed ports; resolves at "broker started". */
  async startBroker(name: string, extra: string[] = []): Promise<BurrowProcess> {
    const s = this.slot(name);
    if (s.proc && !s.proc.exit) throw new Error(`broker ${name} is already running`);
    const proc = new BurrowProcess(`broker-${name}`, BROKER_CLI, [
      'serve',
      '--agent-listen',
      `127.0.0.1:${s.agentPort}`,
      '--api-listen',
      `127.0.0.1:${s.apiPort}`,
      '--admin-listen',
      `127.0.0.1:${s.adminPort}`,
      ...tlsArgs(this.brokerCert),
      '--broker-id',
      s.brokerId,
      '--redis-url',
      this.redis.url,
      '--redis-key-prefix',
      this.prefix,
      '--advertise',
      `127.0.0.1:${s.peerPort}`,
      '--registry-ttl',
      REGISTRY_TTL,
      '--agent-wait',
      '3s',
      '--drain-timeout',
      '10s',
      ...(process.env.BURROW_TEST_LOG ? ['--log-level', 'debug'] : []),
      ...extra,
    ]);
    s.proc = proc;
    this.history.push(proc);
    // Longer than processes.ts' 10 s: three brokers starting at once on a busy 2-CPU machine.
    const started = await proc.waitForLog('broker started', undefined, { timeoutMs: STARTUP_TIMEOUT_MS });
    if (Number(started.agentPort) !== s.agentPort || Number(started.apiPort) !== s.apiPort)
      throw new Error(`broker ${name} did not bind its fixed ports: ${JSON.stringify(started)}`);
    return proc;
  }

  /** Signals the broker and waits until it exited. */
  async stopBroker(
    name: string,
    signal: NodeJS.Signals,
    timeoutMs = 15_000,
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    const proc = this.slot(name).proc;
    if (!proc) throw new Error(`broker ${name} was never started`);
    proc.signal(signal);
    return proc.waitExit(timeoutMs);
  }

  brokerProc(name: string): BurrowProcess {
    const p = this.slot(name).proc;
    if (!p) throw new Error(`broker ${name} was never started`);
    return p;
  }

  async agentCert(agentId: string): Promise<CertFiles> {
    let c = this.agentCerts.get(agentId);
    if (!c) {
      c = await this.pki.issue('agent', agentId);
      this.agentCerts.set(agentId, c);
    }
    return c;
  }

  /**
   * Starts `burrow-agent run` for `agentId` with one `--broker` per entry of `brokers` (a broker
   * name of this world, or a HOST:PORT such as a proxy's). Resolves at "agent started" (not yet
   * connected: see {@link waitListed}).
   */
  /**
   * Starts `burrow-agent run` with a tunnel to each of `brokers` (names of this world or
   * addresses). Unless `learn` is set, `--max-brokers` keeps it to those: the fault tests decide
   * which broker holds which tunnel; with `learn` it also opens tunnels to the replicas it learns.
   */
  async startAgent(agentId: string, brokers: string[], extra: string[] = [], learn = false): Promise<BurrowProcess> {
    const cert = await this.agentCert(agentId);
    const addresses = brokers.map((b) => (this.brokers.has(b) ? this.agentAddress(b) : b));
    const proc = new BurrowProcess(`agent-${agentId}`, AGENT_CLI, [
      'run',
      ...addresses.flatMap((a) => ['--broker', a]),
      ...(learn ? [] : ['--max-brokers', String(addresses.length)]),
      ...tlsArgs(cert),
      '--upstream',
      `*=${this.echo.address}`,
      '--reconnect-base',
      '100ms',
      '--reconnect-max',
      '500ms',
      '--drain-timeout',
      '5s',
      ...(process.env.BURROW_TEST_LOG ? ['--log-level', 'debug'] : []),
      ...extra,
    ]);
    this.agents.set(agentId, proc);
    this.history.push(proc);
    await proc.waitForLog('agent started', undefined, { timeoutMs: STARTUP_TIMEOUT_MS });
    return proc;
  }

  /** Every log line of every process of this world that `where` accepts, as `[name] json` lines in time order. */
  logLines(where: (l: import('./processes').LogLine) => boolean): string[] {
    const out: { t: string; line: string }[] = [];
    for (const p of this.history)
      for (const l of p.logs)
        if (where(l)) out.push({ t: String(l.timestamp ?? ''), line: `[${p.name} ${p.pid}] ${JSON.stringify(l)}` });
    return out.sort((a, b) => a.t.localeCompare(b.t)).map((o) => o.line);
  }

  /** The agents the broker's admin listener lists as connected. */
  async listed(name: string): Promise<string[]> {
    const agents = await getJson<AgentListing[]>(this.adminUrl(name, '/agents'));
    return agents.map((a) => a.id);
  }

  /** Polls the broker's /agents until `agentId` is listed (connected there). */
  async waitListed(name: string, agentId: string, timeoutMs = 10_000): Promise<void> {
    await pollUntil(
      `agent ${agentId} listed by broker ${name}`,
      async () => (await this.listed(name)).includes(agentId),
      timeoutMs,
    );
  }

  /** The brokers (peer addresses) whose claim on `agentId` in Redis has not expired. */
  async liveClaims(agentId: string): Promise<string[]> {
    return parseRespArray(
      await this.redis.command('ZRANGEBYSCORE', `${this.prefix}agent:${agentId}`, `(${Date.now()}`, '+inf'),
    );
  }

  /** Every member of the agent's claim set, expired or not. */
  async allClaims(agentId: string): Promise<string[]> {
    return parseRespArray(await this.redis.command('ZRANGE', `${this.prefix}agent:${agentId}`, '0', '-1'));
  }

  /** A caller (service certificate) of the broker's API port; one per broker, reused. */
  client(name: string): RawClient {
    let c = this.clients.get(name);
    if (!c) {
      c = new RawClient(`127.0.0.1:${this.slot(name).apiPort}`, mtlsCredentials(this.serviceCert), {
        'grpc.initial_reconnect_backoff_ms': 100,
        'grpc.max_reconnect_backoff_ms': 500,
      });
      this.clients.set(name, c);
    }
    return c;
  }

  /** One unary echo call at broker `name` for `agentId`; resolves with its status, never rejects. */
  async call(name: string, agentId: string, deadlineMs = 5_000, payload = 'ping'): Promise<CallResult> {
    const md = new Metadata();
    md.set('burrow-agent-id', agentId);
    const started = Date.now();
    try {
      const r = await this.client(name).unary(ECHO.unary, Buffer.from(payload), md, {
        deadline: Date.now() + deadlineMs,
      });
      return { code: Status.OK, details: '', ms: Date.now() - started, response: r.response.toString() };
    } catch (err) {
      const e = err as ServiceError;
      if (typeof e.code !== 'number') throw err;
      return { code: e.code, details: e.details, ms: Date.now() - started };
    }
  }

  /** The broker's /metrics as `name{labels}` → value. */
  async metrics(name: string): Promise<Map<string, number>> {
    const res = await httpGet(this.adminUrl(name, '/metrics'));
    if (res.status !== 200) throw new Error(`GET /metrics of ${name}: HTTP ${res.status}`);
    return parseMetrics(res.body);
  }

  /** A failover proxy in front of the named brokers' agent ports (first that accepts wins). */
  async failoverProxy(names: string[]): Promise<FailoverProxy> {
    const p = await new FailoverProxy(names.map((n) => this.slot(n).agentPort)).start();
    this.proxies.push(p);
    return p;
  }

  /** Ends every process, client, proxy and the redis-server of this world; `keepShared` leaves the PKI and upstream. */
  async close(keepShared = false): Promise<void> {
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
    try {
      await killAll();
    } finally {
      for (const p of this.proxies.splice(0)) await p.stop();
      await this.redis.kill();
    }
    if (!keepShared) {
      await this.echo.stop();
      this.pki.cleanup();
    }
  }
}

/** Sum of every series of `metric` (all label values), or of those whose labels include `labelMatch`. */
export function metricSum(m: Map<string, number>, metric: string, labelMatch = ''): number {
  let sum = 0;
  for (const [k, v] of m) {
    const name = k.includes('{') ? k.slice(0, k.indexOf('{')) : k;
    if (name === metric && k.includes(labelMatch)) sum += v;
  }
  return sum;
}

/** Prometheus text format → `name{labels}` → value (comments skipped). */
export function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return out;
}

/** The bulk strings of a RESP array reply (`*N\r\n$len\r\nvalue\r\n...`); an error reply throws. */
export function parseRespArray(reply: string): string[] {
  if (reply.startsWith('-')) throw new Error(`redis: ${reply.trim()}`);
  if (!reply.startsWith('*')) throw new Error(`redis: not an array reply: ${JSON.stringify(reply)}`);
  const lines = reply.split('\r\n');
  const n = Number(lines[0]!.slice(1));
  const out: string[] = [];
  for (let i = 0; i < n; i++) out.push(lines[2 + i * 2]!);
  return out;
}

/** p-th percentile (0..100) of `values` (nearest rank). */
export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}

/**
 * A loopback TCP "load balancer" for agents that dial one address: each new connection goes to the
 * first backend port (in order) that accepts it; a connection whose backend dies is reset, so the
 * agent reconnects and lands on the next live backend. Stands in for the DNS name or L4 balancer an
 * agent fleet is given when it is not told every broker's address.
 */
export class FailoverProxy {
  private server: net.Server | undefined;
  private readonly sockets = new Set<net.Socket>();
  port = 0;

  constructor(private readonly backendPorts: number[]) {}

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  async start(): Promise<this> {
    this.server = net.createServer((client) => {
      this.sockets.add(client);
      client.on('close', () => this.sockets.delete(client));
      client.on('error', () => client.destroy());
      client.pause();
      const tryBackend = (i: number): void => {
        if (client.destroyed) return;
        if (i >= this.backendPorts.length) {
          client.resetAndDestroy();
          return;
        }
        const upstream = net.connect(this.backendPorts[i]!, '127.0.0.1');
        this.sockets.add(upstream);
        upstream.on('close', () => this.sockets.delete(upstream));
        let connected = false;
        upstream.on('error', () => {
          upstream.destroy();
          if (!connected) tryBackend(i + 1);
          else if (!client.destroyed) client.resetAndDestroy();
        });
        upstream.once('connect', () => {
          connected = true;
          client.pipe(upstream);
          upstream.pipe(client);
          client.resume();
          client.on('close', () => upstream.destroy());
          upstream.on('close', () => {
            if (!client.destroyed) client.resetAndDestroy();
          });
        });
      };
      tryBackend(0);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.port = (this.server!.address() as net.AddressInfo).port;
    return this;
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}

export type { BrokerPorts };
