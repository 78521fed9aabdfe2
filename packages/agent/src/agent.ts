import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import type * as http from 'node:http';
import * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  CredentialStore,
  HealthService,
  H2_SESSION_OPTIONS,
  deadlineFromTimeout,
  endWithStatus,
  UpstreamTable,
  createAdminServer,
  identityOfCertificate,
  statusName,
  type BrokerEndpoint,
  type IssuedAgentCertificate,
  type JsonObject,
  type Logger,
  recordCallFinished,
  listenOn,
  SpanKind,
  endRpcSpan,
  remoteParent,
  startRpcSpan,
  traceLogFields,
} from '@burrow/tunnel';
import { CertificateRenewer, SYSTEM_CLOCK, type Clock } from './certificate-renewer';
import { readState, writeFileAtomic, writeState } from './state-dir';
import type { AgentConfig } from './agent-config';
import { AgentMetrics } from './agent-metrics';
import { Backoff } from './backoff';
import { PolicyEngine } from '@burrow/policy';
import { describeTightened, securePrivateDir } from '@burrow/pki';
import { TokenVerifier } from './authn/token-verifier';
import { BuiltinServices } from './builtin-services';
import { BrokerConnection } from './broker-connection';
import { AgentTelemetry } from './agent-telemetry';
import { connectHint } from './connect-hint';
import { chooseTargets, expandConfigured, systemResolver, type HostResolver, type TargetSpec } from './broker-targets';

/** A session that lasted this long counts as healthy: the reconnect backoff starts over. */
const HEALTHY_SESSION_MS = 10_000;

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d+$/;

/** How often configured broker names are resolved again. */
export const DEFAULT_RESOLVE_INTERVAL_MS = 30_000;

/** The ports a started agent listens on (useful with port 0). */
export interface AgentPorts {
  localPort?: number;
  adminPort?: number;
}

/** What an agent needs besides its config; tests pass fakes. */
export interface AgentOptions {
  /** Resolves configured broker names (default: the system resolver, all addresses). */
  resolveHost?: HostResolver;
  /** How often configured broker names are resolved again (default 30 s). */
  resolveIntervalMs?: number;
}

/** One broker address the agent keeps a tunnel to, and its connect loop. */
interface Target extends TargetSpec {
  /** Broker id from the last Welcome on this address. */
  brokerId?: string;
  /** The loop's current connection (connecting, up or draining). */
  conn?: BrokerConnection;
  /** Set when the target left the wanted set: its loop ends and its tunnel drains. */
  removed: boolean;
  /** Ends the loop's backoff sleep early. */
  wake?: () => void;
}

/** One entry of the admin listener's /brokers. */
export interface BrokerTargetStatus {
  broker: string;
  source: 'configured' | 'learned';
  configuredAs?: string;
  brokerId: string;
  usable: boolean;
  protocolVersion: number;
  callsInFlight: number;
}

/**
 * A Burrow agent: keeps a tunnel to every configured broker and to brokers it learns from the
 * replica set (up to `maxBrokers` distinct ones; see broker-targets.ts), reconnecting with backoff,
 * answers the calls brokers carry down them with its upstreams, and carries site clients' calls
 * from its local listener up to a broker.
 */
export class Agent {
  readonly metrics = new AgentMetrics(() => ({
    connected: this.distinctUsableBrokers(),
    known: this.replicaSet.length,
  }));
  readonly agentId: string;
  /** The trust domain of this agent's certificate: the only one its brokers may belong to. */
  private readonly trustDomain: string;
  private readonly upstreams: UpstreamTable;
  /** Tracing, and the upload of the agent's spans through its tunnels. */
  readonly telemetry: AgentTelemetry;
  private builtins = new BuiltinServices({});
  private policyEngine: PolicyEngine | undefined;
  private tokenVerifier: TokenVerifier | undefined;
  private readonly connections = new Set<BrokerConnection>();
  /** Connect loops still running, of targets current and removed (stop() waits for all). */
  private readonly loops = new Set<Promise<void>>();
  /** Wanted targets by address (`#n` appended for a configured address repeated n times). */
  private readonly targets = new Map<string, Target>();
  /** Each `--broker` entry's targets (by its index: an entry may be repeated), as DNS last expanded it. */
  private readonly expansions = new Map<number, TargetSpec[]>();
  /** Broker id each address last reached; outlives the target so a reconnect does not reshuffle. */
  private readonly knownIds = new Map<string, string>();
  /** The replica set most recently received from any broker. */
  private replicaSet: BrokerEndpoint[] = [];
  private resolveTimer: NodeJS.Timeout | undefined;
  private readonly resolveHost: HostResolver;
  private readonly health = new HealthService();
  private localServer: http2.Http2Server | http2.Http2SecureServer | undefined;
  private readonly localSessions = new Set<http2.ServerHttp2Session>();
  private admin: http.Server | undefined;
  /** The agent's certificate, key and trust bundle; swapped on renewal and bundle updates. */
  private tls: CredentialStore | undefined;
  private renewer: CertificateRenewer | undefined;
  private bundleVersion = 0;
  private stateWatch: NodeJS.Timeout | undefined;
  private certFileMtimeMs = 0;
  private stopped = false;
  private wakeLoops = new Set<() => void>();
  private connectionWaiters = new Set<() => void>();
  private stopping: Promise<void> | undefined;

  constructor(
    private readonly config: AgentConfig,
    private readonly logger: Logger,
    private readonly version = '0.0.0',
    private readonly clock: Clock = SYSTEM_CLOCK,
    private readonly options: AgentOptions = {},
  ) {
    this.resolveHost = options.resolveHost ?? systemResolver;
    const own = identityOfCertificate(readFileSync(config.tlsCertFile));
    if (own?.role !== 'agent')
      throw new BurrowError(
        Status.INVALID_ARGUMENT,
        `${config.tlsCertFile} is not an agent certificate (URI SAN spiffe://<td>/agent/<id>)`,
      );
    this.agentId = own.name;
    this.trustDomain = own.trustDomain;
    this.upstreams = new UpstreamTable(config.upstreams);
    const tunnels = { send: (bytes: Buffer) => [...this.connections].some((c) => c.sendTelemetry(bytes)) };
    this.telemetry = new AgentTelemetry(config.telemetry, tunnels, this.metrics.registry, this.agentId, version);
  }

  /** A tunnel came up or went: tracing (with upload) is on while some broker takes telemetry. */
  private tunnelsChanged(): void {
    this.telemetry.tunnelsChanged([...this.connections].some((c) => c.takesTelemetry));
  }

  /** Starts the listeners and the broker connection loops; resolves once listeners are bound. */
  async start(): Promise<AgentPorts> {
    this.tls = new CredentialStore({
      caPem: readFileSync(this.config.caFile),
      certPem: readFileSync(this.config.tlsCertFile),
      keyPem: readFileSync(this.config.tlsKeyFile),
    });
    this.updateExpiryMetric();
    if (this.config.stateDir) {
      // The state directory holds the agent's key: one left group/world accessible is made 0700
      // (or the start refused, naming it, when another user owns it).
      const outcome = await securePrivateDir(this.config.stateDir, 'state-dir');
      const tightened = describeTightened(outcome);
      if (tightened) this.logger.warn(tightened, { dir: outcome.dir });
      this.startStateDir(this.config.stateDir);
    }
    await this.startBuiltins();
    const ports: AgentPorts = {};
    if (this.config.localListen) ports.localPort = await this.startLocalListener(this.config.localListen);
    if (this.config.adminListen) ports.adminPort = await this.startAdmin(this.config.adminListen);
    await this.resolveConfigured();
    this.reconcileTargets();
    let resolving = false; // a slow resolver never has two rounds in flight
    this.resolveTimer = setInterval(() => {
      if (resolving) return;
      resolving = true;
      void this.resolveConfigured().then((changed) => {
        resolving = false;
        if (changed) this.reconcileTargets();
      });
    }, this.options.resolveIntervalMs ?? DEFAULT_RESOLVE_INTERVAL_MS);
    this.resolveTimer.unref();
    this.logger.info('agent started', {
      agentId: this.agentId,
      brokers: this.config.brokers,
      targets: [...this.targets.values()].map((t) => t.address),
      maxBrokers: this.config.maxBrokers,
      upstreams: this.config.upstreams.length,
      gatewayMapping: this.config.gatewayMapping?.file,
      ...ports,
    });
    return ports;
  }

  /**
   * Expands every `--broker` entry through DNS (one target per address; see expandConfigured).
   * A name that fails to resolve keeps its previous expansion. Resolves to whether anything changed.
   */
  private async resolveConfigured(): Promise<boolean> {
    let changed = false;
    await Promise.all(
      this.config.brokers.map(async (configured, i) => {
        const { specs, error } = await expandConfigured(configured, this.resolveHost, this.config.brokerServerName);
        const before = this.expansions.get(i);
        if (error) {
          this.logger.warn('cannot resolve broker name; keeping its last addresses', {
            broker: configured,
            error: error.message,
            addresses: (before ?? specs).map((t) => t.address),
          });
          if (before) return;
        }
        if (before && before.map((t) => t.address).join() === specs.map((t) => t.address).join()) return;
        this.expansions.set(i, specs);
        changed = true;
      }),
    );
    return changed;
  }

  /**
   * Brings the running connect loops in line with {@link chooseTargets}: starts loops for new
   * targets, and drains and ends those of targets no longer wanted (calls in flight finish).
   * Runs whenever DNS, a Welcome or a replica set changes what is wanted.
   */
  private reconcileTargets(): void {
    if (this.stopped) return;
    const wanted = chooseTargets({
      agentId: this.agentId,
      configured: [...this.expansions].sort(([a], [b]) => a - b).flatMap(([, specs]) => specs),
      knownIds: this.knownIds,
      replicaSet: this.replicaSet,
      maxBrokers: this.config.maxBrokers,
      serverNameOverride: this.config.brokerServerName,
    });
    // Keyed by address, plus `#n` for the n-th repeat: `--broker X --broker X` is two tunnels to X.
    const seen = new Map<string, number>();
    const wantedByKey = new Map(
      wanted.map((t) => {
        const n = seen.get(t.address) ?? 0;
        seen.set(t.address, n + 1);
        return [n === 0 ? t.address : `${t.address}#${n}`, t];
      }),
    );
    for (const [key, target] of this.targets) {
      const spec = wantedByKey.get(key);
      if (spec) {
        // An address can move between configured and learned (DNS now names a learned broker).
        Object.assign(target, {
          source: spec.source,
          configuredAs: spec.configuredAs,
          advertisedId: spec.advertisedId,
        });
        continue;
      }
      this.targets.delete(key);
      target.removed = true;
      target.wake?.();
      this.logger.info('broker no longer wanted; draining its tunnel', {
        broker: target.address,
        brokerId: target.brokerId,
        source: target.source,
      });
      void target.conn?.drainAndClose(this.config.drainTimeoutMs, false, 'broker left the replica set');
    }
    for (const [key, spec] of wantedByKey) {
      if (this.targets.has(key)) continue;
      const target: Target = { ...spec, brokerId: this.knownIds.get(spec.address), removed: false };
      this.targets.set(key, target);
      if (spec.source === 'learned')
        this.logger.info('opening a tunnel to a broker from the replica set', {
          broker: spec.address,
          brokerId: spec.advertisedId,
        });
      const loop = this.connectLoop(target).finally(() => this.loops.delete(loop));
      this.loops.add(loop);
    }
  }

  /** A Brokers frame from `from`: it replaces the replica set (the newest set wins). */
  private onReplicaSet(set: BrokerEndpoint[], from: Target): void {
    this.noteBrokerId(from);
    this.replicaSet = set;
    this.logger.info('broker replica set received', {
      from: from.address,
      brokerId: from.brokerId,
      brokers: set.map((b) => `${b.brokerId}=${b.address}`),
    });
    this.reconcileTargets();
  }

  /** Records which broker `target`'s address reached; a new id may make a learned tunnel redundant. */
  private noteBrokerId(target: Target): void {
    const id = target.conn?.brokerId;
    if (!id || target.brokerId === id) return;
    target.brokerId = id;
    this.knownIds.set(target.address, id);
    if (!target.removed) this.reconcileTargets();
  }

  /** Distinct broker ids with a usable tunnel (burrow_agent_brokers_connected). */
  private distinctUsableBrokers(): number {
    return new Set([...this.connections].filter((c) => c.usable).map((c) => c.brokerId || c.address)).size;
  }

  /** Every target and the state of its tunnel (the admin listener's /brokers). */
  brokerTargets(): BrokerTargetStatus[] {
    return [...this.targets.values()].map((t) => ({
      broker: t.address,
      source: t.source,
      ...(t.configuredAs ? { configuredAs: t.configuredAs } : {}),
      brokerId: t.conn?.brokerId || t.brokerId || '',
      usable: t.conn?.usable ?? false,
      protocolVersion: t.conn?.protocolVersion ?? 0,
      callsInFlight: t.conn?.callsInFlight ?? 0,
    }));
  }

  /** The replica set most recently received (a copy). */
  get knownReplicaSet(): BrokerEndpoint[] {
    return this.replicaSet.map((b) => ({ ...b }));
  }

  /**
   * Opens the engines of the built-in services that are configured. A policy set or key source
   * that does not load is a start-up error naming the file, before any tunnel opens.
   */
  private async startBuiltins(): Promise<void> {
    const { policy, authn } = this.config;
    if (policy) {
      this.policyEngine = await PolicyEngine.open({
        policiesDir: policy.policiesDir,
        entitiesFile: policy.entitiesFile,
        schemaFile: policy.schemaFile,
        cacheTtlMs: policy.cacheTtlMs,
        auditLog: policy.auditLog === '-' ? process.stdout : policy.auditLog,
        watch: true,
        logger: this.logger,
        registry: this.metrics.registry,
        metricsPrefix: 'burrow_agent_policy',
      });
    }
    if (authn)
      this.tokenVerifier = await TokenVerifier.create({
        ...authn,
        logger: this.logger,
        registry: this.metrics.registry,
      });
    const engine = this.policyEngine;
    this.builtins = new BuiltinServices({
      tracing: this.telemetry.tracing,
      authenticator: this.tokenVerifier,
      gatewayMapping: this.config.gatewayMapping,
      logger: this.logger,
      policy: engine && {
        evaluate: (request, opts) => engine.evaluate(request, opts) as unknown as JsonObject,
        evaluations: (request, opts) => engine.evaluations(request, opts) as unknown as JsonObject,
      },
    });
  }

  /** Broker connections with a live session. */
  get connectedBrokers(): number {
    return [...this.connections].filter((c) => c.usable).length;
  }

  /** Resolves once at least one broker session is up (tests, readiness). */
  waitConnected(timeoutMs = 10_000): Promise<void> {
    if (this.connectedBrokers > 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.connectionWaiters.delete(done);
        reject(new Error(`agent not connected within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        this.connectionWaiters.delete(done);
        resolve();
      };
      this.connectionWaiters.add(done);
    });
  }

  /**
   * Graceful shutdown: stop taking calls, let calls in flight finish for up to `drainTimeoutMs`,
   * close every connection and listener. Idempotent.
   */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  /** The certificate currently in use (PEM). */
  get certificatePem(): string {
    return this.tls?.certPem ?? '';
  }

  /** Renews the certificate now (tests; normally the renewer's schedule does it). */
  renewNow(): Promise<void> {
    if (!this.renewer) return Promise.reject(new Error('renewal needs --state-dir'));
    return this.renewer.renewNow();
  }

  private async doStop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.resolveTimer);
    this.renewer?.stop();
    clearInterval(this.stateWatch);
    this.health.setStatus('NOT_SERVING');
    this.health.close();
    for (const wake of this.wakeLoops) wake();
    // The spans so far go up while the tunnels are still open.
    await this.telemetry.flush();
    const local = this.localServer;
    local?.close();
    const localDone = Promise.all(
      [...this.localSessions].map(
        (session) =>
          new Promise<void>((resolve) => {
            session.once('close', () => resolve());
            session.close();
          }),
      ),
    );
    await Promise.all(
      [...this.connections].map((c) => c.drainAndClose(this.config.drainTimeoutMs, false, 'agent shutting down')),
    );
    await Promise.all([...this.loops]);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      localDone,
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, this.config.drainTimeoutMs);
      }),
    ]);
    clearTimeout(timer);
    for (const session of this.localSessions) session.destroy();
    this.upstreams.close();
    this.tokenVerifier?.close();
    await this.policyEngine?.close();
    await this.telemetry.stop();
    if (this.admin) {
      const admin = this.admin;
      admin.closeAllConnections();
      await new Promise<void>((resolve) => admin.close(() => resolve()));
    }
    this.logger.info('agent stopped', { agentId: this.agentId });
  }

  /** Keeps a tunnel to `target` until the agent stops or the target is removed. */
  private async connectLoop(target: Target): Promise<void> {
    const { address } = target;
    const backoff = new Backoff(this.config.reconnectBaseMs, this.config.reconnectMaxMs);
    let everConnected = false;
    while (!this.stopped && !target.removed) {
      const conn = this.connectionTo(target);
      const ended = new Promise<'closed' | 'drain'>((resolve) => {
        conn.once('closed', () => resolve('closed'));
        conn.once('drain', () => resolve('drain'));
      });
      const sessionStartMs = await this.openSession(conn, target, everConnected, backoff.ceilingMs);
      if (sessionStartMs !== undefined) everConnected = true;
      const why = await ended;
      // A removed target (a learned broker that left the replica set, an address DNS no longer
      // gives) is not dialled again; its connection drains on its own.
      if (this.stopped || target.removed) break;
      if (why === 'drain') {
        // The broker is going away on purpose: reconnect at once (to a replacement behind the same
        // address, or another broker); the draining connection finishes its calls on its own and
        // leaves `connections` when it closes, so stop() still waits for it. A learned broker
        // gets here only while it is still in the replica set.
        backoff.reset();
        continue;
      }
      if (sessionStartMs !== undefined) {
        if (Date.now() - sessionStartMs >= HEALTHY_SESSION_MS) backoff.reset();
        this.logger.warn('tunnel session lost', {
          broker: address,
          error: conn.closeReason?.message,
          retryWithinMs: backoff.ceilingMs,
        });
      }
      await this.sleep(backoff.nextDelayMs(), target);
    }
  }

  /** A new connection to `target`'s broker, tracked and listened to (not dialled yet). */
  private connectionTo(target: Target): BrokerConnection {
    const conn = new BrokerConnection({
      address: target.address,
      // Read from the store at each dial: a renewed certificate or a rotated bundle applies to
      // every new connection without a restart; open connections carry on.
      tls: this.tls!,
      trustDomain: this.trustDomain,
      agentId: this.agentId,
      agentVersion: this.version,
      maxConcurrentCalls: this.config.maxConcurrentCalls,
      maxMessageBytes: this.config.maxMessageBytes,
      drainTimeoutMs: this.config.drainTimeoutMs,
      keepalive: this.config.keepalive,
      serverNameOverride: target.serverName,
      upstreams: this.upstreams,
      builtins: this.builtins,
      health: this.health,
      metrics: this.metrics,
      logger: this.logger,
      tracing: this.telemetry.tracing,
    });
    target.conn = conn;
    this.connections.add(conn);
    conn.on('trust-bundle', (pem: string, version: number) => {
      void this.installTrustBundle(pem, version);
    });
    conn.on('brokers', (set: BrokerEndpoint[]) => this.onReplicaSet(set, target));
    conn.once('closed', () => {
      this.connections.delete(conn);
      this.tunnelsChanged();
    });
    conn.once('welcome', () => this.tunnelsChanged());
    return conn;
  }

  /**
   * Dials and opens the tunnel session; resolves to when it started, or undefined after logging why
   * it could not be opened, with the hint for its cause (connect-hint.ts).
   */
  private async openSession(
    conn: BrokerConnection,
    target: Target,
    reconnect: boolean,
    retryWithinMs: number,
  ): Promise<number | undefined> {
    try {
      await conn.open();
      this.noteBrokerId(target);
      this.metrics.connects.inc({ result: 'ok' });
      if (reconnect) this.metrics.reconnects.inc();
      for (const w of [...this.connectionWaiters]) w();
      return Date.now();
    } catch (err) {
      this.metrics.connects.inc({ result: 'failed' });
      const message = (err as Error).message;
      const code = (err as { code?: number }).code;
      const hint = connectHint({ address: target.address, message, code, caFile: this.config.caFile });
      this.logger.warn('cannot establish tunnel session', {
        broker: target.address,
        error: message,
        hint,
        retryWithinMs,
      });
      return undefined;
    }
  }

  private startStateDir(dir: string): void {
    this.bundleVersion = readState(dir)?.bundleVersion ?? 0;
    this.certFileMtimeMs = statSync(this.config.tlsCertFile).mtimeMs;
    this.renewer = new CertificateRenewer({
      clock: this.clock,
      logger: this.logger,
      currentCertPem: () => this.tls!.certPem,
      bundleVersion: () => this.bundleVersion,
      renew: (csrPem, bundleVersion) => {
        const conns = [...this.connections].filter((c) => c.usable);
        if (conns.length === 0) return Promise.reject(new Error('no broker connection to renew over'));
        return conns[0]!.renew(csrPem, bundleVersion);
      },
      install: (issued, keyPem) => this.installCertificate(issued, keyPem),
      onResult: (result) => this.metrics.renewals.inc({ result }),
    });
    this.renewer.start();
    // Picks up files replaced from outside, e.g. `burrow-agent enroll` run again after the
    // certificate expired while the agent was offline.
    this.stateWatch = setInterval(() => this.reloadIfReplaced(), 1_000);
    this.stateWatch.unref();
  }

  private reloadIfReplaced(): void {
    let mtimeMs: number;
    try {
      mtimeMs = statSync(this.config.tlsCertFile).mtimeMs;
    } catch {
      return;
    }
    if (mtimeMs === this.certFileMtimeMs) return;
    this.certFileMtimeMs = mtimeMs;
    const certPem = readFileSync(this.config.tlsCertFile, 'utf8');
    if (certPem === this.tls!.certPem) return;
    this.tls!.update({
      certPem,
      keyPem: readFileSync(this.config.tlsKeyFile),
      caPem: readFileSync(this.config.caFile),
    });
    this.bundleVersion = readState(this.config.stateDir!)?.bundleVersion ?? this.bundleVersion;
    this.updateExpiryMetric();
    this.renewer?.reschedule();
    this.logger.info('certificate files replaced; using the new certificate for new connections', {
      notAfter: new X509Certificate(certPem).validTo,
    });
    for (const w of this.wakeLoops) w(); // reconnect now rather than after the backoff
  }

  private async installCertificate(issued: IssuedAgentCertificate, keyPem: string): Promise<void> {
    const dir = this.config.stateDir!;
    // Key first: a crash between the writes leaves a new key with the old certificate, which the
    // next renewal repairs; never a certificate without its key.
    await writeFileAtomic(this.config.tlsKeyFile, keyPem, 0o600);
    await writeFileAtomic(this.config.tlsCertFile, issued.certificateChainPem, 0o644);
    await writeFileAtomic(this.config.caFile, issued.trustBundlePem, 0o644);
    this.certFileMtimeMs = statSync(this.config.tlsCertFile).mtimeMs;
    this.bundleVersion = issued.bundleVersion;
    const state = readState(dir);
    if (state) await writeState(dir, { ...state, bundleVersion: issued.bundleVersion });
    this.tls!.update({ certPem: issued.certificateChainPem, keyPem, caPem: issued.trustBundlePem });
    this.updateExpiryMetric();
    for (const c of this.connections) c.presentCredentials(issued.certificateChainPem);
  }

  private async installTrustBundle(pem: string, version: number): Promise<void> {
    if (version <= this.bundleVersion && pem === this.tls!.caPem) return;
    this.bundleVersion = version;
    this.tls!.update({ caPem: pem });
    this.logger.info('trust bundle updated by the broker', { version });
    if (!this.config.stateDir) return;
    try {
      await writeFileAtomic(this.config.caFile, pem, 0o644);
      const state = readState(this.config.stateDir);
      if (state) await writeState(this.config.stateDir, { ...state, bundleVersion: version });
    } catch (err) {
      this.logger.error('cannot write the trust bundle to the state directory', { error: (err as Error).message });
    }
  }

  private updateExpiryMetric(): void {
    const cert = new X509Certificate(this.tls!.certPem);
    this.metrics.certificateExpiry.set((Date.parse(cert.validTo) - this.clock.now()) / 1000);
  }

  /** Waits `ms`, or less when the agent stops, the certificate files change or `target` is removed. */
  private sleep(ms: number, target?: Target): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        this.wakeLoops.delete(wake);
        if (target?.wake === wake) target.wake = undefined;
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.wakeLoops.add(wake);
      if (target) target.wake = wake;
    });
  }

  /** The least busy usable connection, waiting up to brokerWaitMs (capped by `deadlineMs`). */
  private async pickConnection(deadlineMs: number): Promise<BrokerConnection | undefined> {
    const best = (): BrokerConnection | undefined => {
      let pick: BrokerConnection | undefined;
      for (const c of this.connections) if (c.usable && (!pick || c.callsInFlight < pick.callsInFlight)) pick = c;
      return pick;
    };
    const now = best();
    if (now || this.stopped) return now;
    const waitMs = Math.max(0, Math.min(this.config.brokerWaitMs, deadlineMs - Date.now()));
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.connectionWaiters.delete(done);
        resolve();
      }, waitMs);
      const done = (): void => {
        clearTimeout(timer);
        this.connectionWaiters.delete(done);
        resolve();
      };
      this.connectionWaiters.add(done);
    });
    return best();
  }

  /** A site client's call on the local listener: carried up to the least busy broker. */
  private async onLocalCall(
    stream: http2.ServerHttp2Stream,
    headers: http2.IncomingHttpHeaders,
    raw: string[],
  ): Promise<void> {
    const startedMs = Date.now();
    const method = String(headers[':path'] ?? '');
    const deadlineMs = deadlineFromTimeout(headers['grpc-timeout'], startedMs) ?? Number.POSITIVE_INFINITY;
    if (HealthService.handles(method)) {
      this.health.answer(stream, method, deadlineMs);
      return;
    }
    const conn = await this.pickConnection(deadlineMs);
    if (!conn || stream.closed) {
      const err = new BurrowError(
        Status.UNAVAILABLE,
        this.stopped ? 'agent is shutting down' : `agent "${this.agentId}" has no broker connection`,
      );
      if (!stream.closed) endWithStatus(stream, err.code, err.message);
      this.metrics.calls.inc({ direction: 'to_broker', code: statusName(stream.closed ? Status.CANCELLED : err.code) });
      return;
    }
    const { tracing } = this.telemetry;
    // A site client's call: its traceparent continued, the broker's hop a CLIENT span (BrokerConnection.forward).
    const span = tracing.enabled
      ? startRpcSpan(tracing, SpanKind.SERVER, method, remoteParent(headers.traceparent, headers.tracestate))
      : undefined;
    const outcome = await conn.forward(stream, headers, raw, deadlineMs, span);
    if (span) endRpcSpan(span, outcome.code, outcome.details, outcome.settledAt);
    recordCallFinished(this.logger, this.metrics, {
      direction: 'to_broker',
      code: outcome.code,
      details: outcome.details,
      startedMs,
      requestBytes: outcome.requestBytes,
      responseBytes: outcome.responseBytes,
      log: { broker: conn.address, method, ...traceLogFields(span) },
    });
  }

  private async startLocalListener(address: string): Promise<number> {
    const tls = this.config.localTls;
    if (!tls && !LOOPBACK.test(address)) {
      throw new BurrowError(
        Status.INVALID_ARGUMENT,
        `local-listen ${address} is not loopback; configure local-tls-cert and local-tls-key`,
      );
    }
    const server = tls
      ? http2.createSecureServer({
          ...H2_SESSION_OPTIONS,
          cert: readFileSync(tls.certFile),
          key: readFileSync(tls.keyFile),
          ...(tls.caFile ? { ca: readFileSync(tls.caFile), requestCert: true, rejectUnauthorized: true } : {}),
          ALPNProtocols: ['h2'],
        })
      : http2.createServer(H2_SESSION_OPTIONS);
    server.on('session', (session: http2.ServerHttp2Session) => {
      this.localSessions.add(session);
      session.on('error', () => {});
      session.once('close', () => this.localSessions.delete(session));
    });
    server.on(
      'stream',
      (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, _flags: number, raw: string[]) => {
        stream.on('error', () => {});
        void this.onLocalCall(stream, headers, raw);
      },
    );
    this.localServer = server;
    return listenOn(server, address);
  }

  private async startAdmin(address: string): Promise<number> {
    const admin = createAdminServer({
      metrics: this.metrics.registry,
      json: { '/brokers': () => this.brokerTargets() },
      isReady: () => !this.stopped && this.connectedBrokers > 0,
      allowedHosts: this.config.adminAllowedHosts,
    });
    this.admin = admin;
    return listenOn(admin, address);
  }
}
