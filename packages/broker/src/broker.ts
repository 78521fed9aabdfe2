import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type * as http from 'node:http';
import type * as https from 'node:https';
import { hostname } from 'node:os';
import * as tlsModule from 'node:tls';
import type { TLSSocket } from 'node:tls';
import type * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  CredentialStore,
  MAX_REPLICA_SET_SIZE,
  PROTOCOL_VERSIONS,
  TUNNEL_ALPN,
  checkReplicaSet,
  type BrokerEndpoint,
  HealthService,
  createAdminServer,
  UpstreamTable,
  certificateIdentityProblem,
  guardConnections,
  identityOfCertificate,
  type ConnectionGuard,
  type GuardedClose,
  type UnauthenticatedLimits,
  type Logger,
  listenOn,
  splitHostPort,
  ENROLLMENT_NOT_ENABLED,
} from '@burrow/tunnel';
import { BrokerPki, defaultBrokerName, type BrokerPkiStatus } from './broker-pki';
import { brokerAdminRoutes, type DisconnectResult } from './broker-admin';

export type { DisconnectResult } from './broker-admin';

import { AgentListener } from './agent-listener';
import { SessionSet, createSecureH2Server, followCredentialStore, serverTlsOptions } from './tls-listeners';
import type { BrokerConfig, ClusterConfig } from './broker-config';
import { BrokerMetrics } from './broker-metrics';
import { createAuthzenServer } from './authzen-http';
import { ExtAuthzListener } from './ext-authz';
import { createForwardAuthServer } from './forward-auth';
import { CallLimiter } from './call-limiter';
import { CallerApi } from './caller-api';
import { CredentialWatch } from './credential-watch';
import { ALLOW_ALL_CALLERS, type CallerAuthorizer } from './caller-authorizer';
import { PolicyCallerAuthorizer } from './policy-caller-authorizer';
import { TunnelRegistry } from './tunnel-registry';
import {
  AgentDirectory,
  findBrokerIdClash,
  redactUrl,
  type BrokerRecord,
  type DirectoryStatus,
} from './agent-directory';
import { PeerForwarder } from './peer-forwarder';
import { PeerListener, type PeerListenerDeps } from './peer-listener';
import { BrokerTelemetry } from './broker-telemetry';

/** While a call waits for an agent connected nowhere yet, how often the directory is asked again. */
const CLUSTER_RETRY_INTERVAL_MS = 250;

/** The ports a started broker listens on (useful with port 0). */
export interface BrokerPorts {
  agentPort: number;
  apiPort: number;
  adminPort?: number;
  authzenPort?: number;
  extAuthzPort?: number;
  forwardAuthPort?: number;
}

/** The broker package version (reported by /status and `burrow-broker --version`). */
export const BROKER_VERSION: string = (require('../package.json') as { version: string }).version;

/** What `/status` reports (and `burrow-broker status` prints). */
export interface BrokerStatus {
  brokerId: string;
  version: string;
  protocolVersions: readonly number[];
  startedAt: string;
  uptimeSeconds: number;
  /** Taking new calls (false while starting or draining). */
  ready: boolean;
  draining: boolean;
  trustDomain: string;
  listeners: {
    agent: string;
    api: string;
    admin?: string;
    authzen?: string;
    extAuthz?: string;
    forwardAuth?: string;
  };
  agents: number;
  sessions: number;
  callsInFlight: number;
  callsWaiting: number;
  /** The certificate the broker serves now. */
  servingCertificate: { spiffeId: string; serial: string; notAfter: string; secondsLeft: number };
  /** PKI directory state; `{ enabled: false }` without --pki-dir, `error` when it cannot be read. */
  pki: BrokerPkiStatus | { enabled: false } | { enabled: true; error: string };
  /** Cluster state; `{ enabled: false }` without --redis-url. */
  cluster: ({ enabled: true; advertise: string } & DirectoryStatus) | { enabled: false };
}

// How often the broker looks for expired agent certificates; how often it sweeps idle limiter entries.
const EXPIRY_CHECK_INTERVAL_MS = 1_000;
const IDLE_SWEEP_INTERVAL_MS = 10_000;
/** Errors of a TLS handshake the peer walked away from (closed or reset its connection). */
const PEER_HANG_UPS = new Set(['ECONNRESET', 'EPIPE']);
/**
 * Limits of an agent-listener connection without a valid client certificate (with --pki-dir): it
 * can only enroll, one unary call of a join token and a CSR (~2 KiB), so two streams and 64 KiB
 * per request leave room for retries and larger keys while bounding what it can make the broker
 * hold (2 x 64 KiB per connection, plus HTTP/2 buffers).
 */
const UNAUTHENTICATED_MAX_STREAMS = 2;
const UNAUTHENTICATED_MAX_REQUEST_BYTES = 64 * 1024;
/** At shutdown, how long connections whose calls are all over may take to close before they are cut. */
const STATUS_FLUSH_GRACE_MS = 1_000;

/** The log line of each reason a listener's guard closes a connection for. */
const GUARD_MESSAGES: Record<GuardedClose, string> = {
  pending_cap: 'agent connections shed: too many TLS handshakes in progress',
  address_cap: 'connections refused: too many from one address without a client certificate',
  handshake_timeout: 'connections closed: TLS handshake not finished in time',
  unauthenticated_cap: 'connections closed: too many open without a client certificate',
  unauthenticated_timeout: 'connections closed: open without a client certificate for too long',
};

/**
 * The replica set as agents get it: each broker's agent address, one entry per broker id (a
 * duplicate id is a misconfiguration; the first one read wins), entries a Brokers frame could not
 * carry left out, at most {@link MAX_REPLICA_SET_SIZE}.
 */
function replicaEndpoints(brokers: readonly BrokerRecord[]): BrokerEndpoint[] {
  const out: BrokerEndpoint[] = [];
  for (const b of brokers) {
    const e = { brokerId: b.brokerId, address: b.agent };
    try {
      checkReplicaSet([...out, e]);
    } catch {
      continue;
    }
    out.push(e);
    if (out.length === MAX_REPLICA_SET_SIZE) break;
  }
  return out;
}

/**
 * A Burrow broker: the agent listener (tunnels), the caller API and the admin listener, wired to
 * one tunnel registry. Construct, `start()`, and `stop()` to drain and shut down.
 */
export class Broker {
  readonly registry = new TunnelRegistry();
  readonly metrics = new BrokerMetrics(
    () => this.registry.counts(),
    () => this.registry.summaries(),
  );
  private agentServer!: tlsModule.Server;
  private apiServer!: http2.Http2SecureServer;
  private readonly apiSessions = new SessionSet();
  private readonly peerSessions = new SessionSet();
  private readonly agentCallSessions = new SessionSet();
  private callerApi!: CallerApi;
  private agentListener!: AgentListener;
  private readonly health = new HealthService();
  private readonly platformUpstreams: UpstreamTable;
  private readonly pki: BrokerPki | undefined;
  private tls: CredentialStore | undefined;
  private trustDomain = '';
  /** The name in our certificate's SPIFFE id (set by start()). */
  private brokerId = '';
  private admin: http.Server | undefined;
  private authzen: https.Server | undefined;
  private extAuthz: ExtAuthzListener | undefined;
  private forwardAuth: https.Server | undefined;
  private readonly limiter: CallLimiter;
  private readonly watch: CredentialWatch;
  private authorizer: CallerAuthorizer = ALLOW_ALL_CALLERS;
  private timers: NodeJS.Timeout[] = [];
  private draining = false;
  private started = false;
  private stopped = false;
  private stopping: Promise<void> | undefined;
  private startedAtMs = 0;
  private ports: BrokerPorts | undefined;
  /** The caller API's bound port, set as soon as it listens (the agent listener names it). */
  private apiPort: number | undefined;
  private peerServer: http2.Http2SecureServer | undefined;
  private directory: AgentDirectory | undefined;
  private forwarder: PeerForwarder | undefined;
  /** TCP sockets a listener guard closed (its handshake timed out): counted there, not as abandoned. */
  private readonly guardClosed = new WeakSet<import('node:net').Socket>();
  /** What the listeners ask while admitting calls and sessions. */
  private readonly drainingNow = (): boolean => this.draining;
  private readonly isRevoked: BrokerPki['isRevoked'];
  /** Tracing (off without --otlp-endpoint) and the export of agents' telemetry; set by start(). */
  private telemetry!: BrokerTelemetry;

  constructor(
    private readonly config: BrokerConfig,
    private readonly logger: Logger,
  ) {
    if (!config.pkiDir && !(config.tlsCertFile && config.tlsKeyFile && config.caFile)) {
      throw new BurrowError(Status.INVALID_ARGUMENT, 'tls-cert, tls-key and ca are required without pki-dir');
    }
    this.limiter = new CallLimiter(config.limits);
    this.watch = new CredentialWatch({ logger, metrics: this.metrics });
    this.platformUpstreams = new UpstreamTable(config.upstreams);
    if (config.pkiDir) {
      const defaultIps = ['127.0.0.1', '::1'];
      this.pki = new BrokerPki({
        dir: config.pkiDir,
        logger,
        metrics: this.metrics,
        issueOwnCertificate: !config.tlsCertFile,
        name: config.brokerId ?? defaultBrokerName(hostname(), config.agentListen),
        // The given names add to the defaults (local tools and health checks keep working) unless
        // --no-default-names: then the certificate names exactly what was given (issueCertificate drops repeats).
        dns: [...(config.defaultNames ? [hostname(), 'localhost'] : []), ...config.tlsDns],
        ip: [...(config.defaultNames ? defaultIps : []), ...config.tlsIp],
        leafTtlMs: config.leafTtlMs,
        enrollPerMinute: config.enrollPerMinute,
      });
    }
    this.isRevoked = this.pki ? this.pki.isRevoked.bind(this.pki) : () => false;
  }

  /** The broker's current TLS material (tests, status). */
  get credentials(): CredentialStore | undefined {
    return this.tls;
  }

  /** Loads credentials and binds all listeners. Rejects with a message naming what failed. */
  async start(): Promise<BrokerPorts> {
    const { tls, certPem } = await this.loadIdentity();
    this.telemetry = new BrokerTelemetry(
      this.config.tracing,
      this.config.telemetry,
      this.metrics.registry,
      this.logger,
      {
        brokerId: this.brokerId,
        version: BROKER_VERSION,
      },
    );
    const cluster = this.config.cluster;
    if (cluster) await this.refuseDuplicateBrokerId(cluster);
    await this.loadCallerPolicy();
    this.wireAgentListener(tls);
    if (cluster) this.wireCluster(cluster, tls);
    const api = this.createCallerApi();
    const { agentPort, apiPort } = await this.bindTunnelListeners(tls);
    const peerPort =
      cluster && this.directory ? await this.startPeerListener(cluster, this.directory, tls, agentPort) : undefined;
    const authzenPort = await this.startAuthzen(api, tls);
    const { extAuthzPort, forwardAuthPort } = await this.startGateways(api, tls);
    const exportFileCertExpiry = this.fileCertExpiryExporter(certPem);
    exportFileCertExpiry();
    const adminPort = await this.startAdmin();
    this.startTimers(exportFileCertExpiry);
    this.startPki(tls);
    this.started = true;
    this.startedAtMs = Date.now();
    this.ports = { agentPort, apiPort, adminPort, authzenPort, extAuthzPort, forwardAuthPort };
    this.logStarted(this.ports, peerPort);
    return { ...this.ports };
  }

  /**
   * Identity: loads the serving certificate, checks that it is a broker's, and takes the broker id
   * and trust domain from it (unless the config names them).
   */
  private async loadIdentity(): Promise<{ tls: CredentialStore; certPem: string }> {
    const material = await this.loadTlsMaterial();
    const tls = new CredentialStore(material);
    this.tls = tls;
    const ownRaw = new X509Certificate(material.certPem).raw;
    const own = identityOfCertificate(ownRaw);
    if (own?.role !== 'broker') {
      const presented = own ? `it is ${own.spiffeId}` : certificateIdentityProblem(ownRaw);
      const expected = 'URI SAN spiffe://<trust-domain>/broker/<name>';
      throw new BurrowError(Status.INVALID_ARGUMENT, `tls-cert: not a broker certificate (${expected}): ${presented}`);
    }
    // Default: the name agents and peers see in the certificate. A given --broker-id names a
    // self-issued certificate; with --tls-cert it may differ (replicas sharing one certificate).
    this.brokerId = this.config.brokerId ?? own.name;
    this.trustDomain = this.config.trustDomain ?? own.trustDomain;
    return { tls, certPem: material.certPem };
  }

  /**
   * Two brokers with one id break failover (agents keep one tunnel per broker id): refuse to be
   * the second, before anything listens.
   */
  private async refuseDuplicateBrokerId(cluster: ClusterConfig): Promise<void> {
    const clash = await findBrokerIdClash({
      redisUrl: cluster.redisUrl,
      keyPrefix: cluster.redisKeyPrefix,
      brokerId: this.brokerId,
      peer: cluster.advertise,
    });
    if (clash) {
      throw new BurrowError(
        Status.FAILED_PRECONDITION,
        `broker id "${this.brokerId}" is already live in the cluster directory at ${clash.peer} ` +
          `(agents at ${clash.agent}); ` +
          `this broker would be at ${cluster.advertise}: give each broker its own --broker-id (or certificate name)`,
      );
    }
  }

  /** Opens the caller policy, or warns loudly that every caller of the trust domain may call anything. */
  private async loadCallerPolicy(): Promise<void> {
    if (this.config.callerPolicy) {
      const cp = this.config.callerPolicy;
      const authorizer = await PolicyCallerAuthorizer.open({
        ...cp,
        logger: this.logger,
        registry: this.metrics.registry,
      });
      this.authorizer = authorizer;
      this.logger.info('caller policy loaded', { policiesDir: cp.policiesDir, policies: authorizer.policyCount });
    } else {
      this.logger.warn(
        'NO CALLER POLICY: every service certificate of the trust domain may call every method on every agent; ' +
          'set --caller-policies to restrict callers',
      );
    }
  }

  /** The agent listener's tunnels, enrollment (with a PKI directory) and the agents' platform calls. */
  private wireAgentListener(tls: CredentialStore): void {
    this.agentListener = new AgentListener({
      registry: this.registry,
      metrics: this.metrics,
      logger: this.logger,
      platformUpstreams: this.platformUpstreams,
      trustDomain: this.trustDomain,
      brokerId: this.brokerId,
      maxMessageBytes: this.config.maxMessageBytes,
      keepalive: this.config.keepalive,
      isDraining: this.drainingNow,
      maxSessionsPerAgent: this.config.maxSessionsPerAgent,
      isRevoked: this.isRevoked,
      trustBundlePem: () => tls.caPem,
      pki: this.pki,
      unauthenticated: this.unauthenticatedLimits(),
      replicaSet: this.config.cluster ? () => replicaEndpoints(this.directory?.replicaSet ?? []) : undefined,
      callerApiPort: () => this.apiPort,
      telemetry: this.telemetry,
    });
    this.agentCallSessions.track(this.agentListener.grpcServer);
  }

  /** With enrollment on: the limits of agent-listener connections without a valid client certificate. */
  private unauthenticatedLimits(): UnauthenticatedLimits | undefined {
    if (!this.pki) return undefined;
    return {
      timeoutMs: this.config.unauthenticatedTimeoutMs,
      maxConnections: this.config.maxPendingHandshakes || 256,
      maxConcurrentStreams: UNAUTHENTICATED_MAX_STREAMS,
      maxRequestBytes: UNAUTHENTICATED_MAX_REQUEST_BYTES,
    };
  }

  /** Cluster wiring: the forwarder to peer brokers and the agent directory in Redis. */
  private wireCluster(cluster: ClusterConfig, tls: CredentialStore): void {
    this.metrics.enableClusterMetrics();
    this.forwarder = new PeerForwarder({
      tls,
      brokerId: this.brokerId,
      trustDomain: this.trustDomain,
      keepalive: this.config.keepalive,
      metrics: this.metrics,
    });
    const directory = new AgentDirectory({
      redisUrl: cluster.redisUrl,
      keyPrefix: cluster.redisKeyPrefix,
      self: { brokerId: this.brokerId, peer: cluster.advertise },
      entryTtlMs: cluster.registryTtlMs,
      lookupCacheMs: cluster.lookupCacheMs,
      localAgents: () => this.registry.connectedAgentIds(),
      // Agents learn the replicas (tunnel.proto, "Brokers").
      onReplicaSet: (brokers) => this.agentListener.broadcastReplicaSet(replicaEndpoints(brokers)),
      metrics: this.metrics,
      logger: this.logger,
    });
    this.directory = directory;
    this.registry.onPresence = (agentId, connected) =>
      connected ? directory.agentConnected(agentId) : directory.agentDisconnected(agentId);
  }

  /** What the caller API and the peer listener share to admit and run a call for an agent. */
  private callAdmission(): PeerListenerDeps {
    return {
      registry: this.registry,
      metrics: this.metrics,
      logger: this.logger,
      trustDomain: this.trustDomain,
      agentWaitMs: this.config.agentWaitMs,
      isDraining: this.drainingNow,
      isRevoked: this.isRevoked,
      authorizer: this.authorizer,
      limiter: this.limiter,
      watch: this.watch,
      maxMessageBytes: this.config.maxMessageBytes,
      tracing: this.telemetry.tracing,
      brokerId: this.brokerId,
    };
  }

  /** The caller API, serving every method on the API server. */
  private createCallerApi(): CallerApi {
    const api = new CallerApi({
      ...this.callAdmission(),
      cluster:
        this.directory && this.forwarder
          ? { directory: this.directory, forwarder: this.forwarder, retryIntervalMs: CLUSTER_RETRY_INTERVAL_MS }
          : undefined,
      health: this.health,
    });
    this.callerApi = api;
    return api;
  }

  /** Binds the agent and API listeners and puts their guards and TLS hooks on them. */
  private async bindTunnelListeners(tls: CredentialStore): Promise<{ agentPort: number; apiPort: number }> {
    // With enrollment on, the agent listener asks for a client certificate without requiring one:
    // Enroll is the only method that works without (every other stream checks the identity).
    const agentOptions = (): tlsModule.TlsOptions => serverTlsOptions(tls, !this.pki, [TUNNEL_ALPN, 'h2']);
    this.agentServer = tlsModule.createServer(agentOptions());
    followCredentialStore(this.agentServer, tls, agentOptions);
    this.agentServer.on('secureConnection', (socket: TLSSocket) => this.agentListener.accept(socket));
    this.apiServer = createSecureH2Server(tls);
    this.apiServer.on('stream', this.callerApi.handle);
    this.apiSessions.track(this.apiServer);
    const handshakes = this.guardListener('agent', [this.agentServer], this.unauthenticatedLimits());
    this.metrics.pendingHandshakes = handshakes.pending;
    this.metrics.openUnauthenticated = handshakes.unauthenticated;
    this.guardListener('api', [this.apiServer]);
    this.agentServer.on('tlsClientError', this.tlsErrorObserver('agent'));
    this.apiServer.on('tlsClientError', this.tlsErrorObserver('api'));
    this.watch.watchHttp2Server(this.apiServer, 'api');
    const agentPort = await listenOn(this.agentServer, this.config.agentListen);
    const apiPort = await listenOn(this.apiServer, this.config.apiListen);
    this.apiPort = apiPort;
    return { agentPort, apiPort };
  }

  /** Counts and logs a listener's failed TLS handshakes: refused ones as warnings, abandoned ones quietly. */
  private tlsErrorObserver(listener: string): (err: Error & { code?: string }, socket?: TLSSocket) => void {
    return (err, socket) => {
      // Connections shed by the handshake cap never get here: they are never wrapped in TLS.
      const parent = (socket as { _parent?: import('node:net').Socket } | undefined)?._parent;
      if (parent && this.guardClosed.has(parent)) return;
      // Node reports a refused client certificate as a reset; the reason is on the socket.
      const reason = (socket as { authorizationError?: Error } | undefined)?.authorizationError;
      if (!reason && PEER_HANG_UPS.has(err.code ?? '')) {
        // The peer went away mid-handshake (an agent that gave up on a busy broker, a port
        // scanner): nothing was refused, and a reconnect storm must not look like an attack.
        this.metrics.abandonedHandshakes.inc({ listener });
        this.logger.debug('TLS handshake abandoned by the peer', {
          listener,
          peer: socket?.remoteAddress,
          error: err.code,
        });
        return;
      }
      this.metrics.rejectedHandshakes.inc({ listener, reason: 'tls' });
      // A client without a certificate on the agent listener of a broker without a PKI directory
      // is most likely `burrow-agent enroll`: say why it cannot work here.
      const noEnrollment =
        listener === 'agent' && !this.pki && err.code === 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE'
          ? `${ENROLLMENT_NOT_ENABLED} (a client without a certificate, e.g. burrow-agent enroll)`
          : undefined;
      this.logger.warn('TLS handshake refused', {
        listener,
        peer: socket?.remoteAddress,
        error: reason ? String(reason) : (err.code ?? err.message),
        hint: noEnrollment,
      });
    };
  }

  /**
   * Cluster wiring: the peer listener (brokers only: it requires a client certificate, and
   * PeerListener its role), then this broker's entry in the directory. Resolves to the peer port.
   */
  private async startPeerListener(
    cluster: ClusterConfig,
    directory: AgentDirectory,
    tls: CredentialStore,
    agentPort: number,
  ): Promise<number> {
    const peerServer = createSecureH2Server(tls);
    peerServer.on('stream', new PeerListener(this.callAdmission()).handle);
    this.peerServer = peerServer;
    this.peerSessions.track(peerServer);
    peerServer.on('tlsClientError', this.tlsErrorObserver('peer'));
    this.guardListener('peer', [peerServer]);
    this.watch.watchHttp2Server(peerServer, 'peer');
    const peerPort = await listenOn(peerServer, cluster.peerListen);
    await directory.start(cluster.agentAdvertise ?? `${splitHostPort(cluster.advertise).host}:${agentPort}`);
    return peerPort;
  }

  /** The AuthZEN listener, when configured; resolves to its port. */
  private async startAuthzen(api: CallerApi, tls: CredentialStore): Promise<number | undefined> {
    if (!this.config.authzenListen) return undefined;
    const server = createAuthzenServer({
      api,
      tls,
      metrics: this.metrics,
      logger: this.logger,
      maxBodyBytes: this.config.maxMessageBytes,
      timeoutMs: this.config.authzenTimeoutMs,
      watch: this.watch,
    });
    this.authzen = server;
    this.guardListener('authzen', [server]);
    return listenOn(server, this.config.authzenListen);
  }

  /**
   * The gateway listeners, those configured: Envoy ext_authz (HTTP/2) and forward auth for nginx /
   * Traefik (HTTPS). Both carry their checks through the caller API; resolves to their ports.
   */
  private async startGateways(
    api: CallerApi,
    tls: CredentialStore,
  ): Promise<{ extAuthzPort?: number; forwardAuthPort?: number }> {
    const { config } = this;
    const common = { api, tls, metrics: this.metrics, logger: this.logger, watch: this.watch };
    let extAuthzPort: number | undefined;
    let forwardAuthPort: number | undefined;
    if (config.extAuthzListen) {
      const listener = new ExtAuthzListener({
        ...common,
        timeoutMs: config.extAuthzTimeoutMs,
        agentHeader: config.extAuthzAgentHeader,
        maxMessageBytes: config.maxMessageBytes,
      });
      this.extAuthz = listener;
      listener.server.on('tlsClientError', this.tlsErrorObserver('ext_authz'));
      this.guardListener('ext_authz', [listener.server]);
      extAuthzPort = await listenOn(listener.server, config.extAuthzListen);
    }
    if (config.forwardAuthListen) {
      const server = createForwardAuthServer({
        ...common,
        timeoutMs: config.forwardAuthTimeoutMs,
        agentHeader: config.forwardAuthAgentHeader,
      });
      this.forwardAuth = server;
      server.on('tlsClientError', this.tlsErrorObserver('forward_auth'));
      this.guardListener('forward_auth', [server]);
      forwardAuthPort = await listenOn(server, config.forwardAuthListen);
    }
    return { extAuthzPort, forwardAuthPort };
  }

  /**
   * A serving certificate from files is never renewed by the broker: what exports its expiry
   * (self-issued ones are exported by the PKI side, which renews them; then this does nothing).
   */
  private fileCertExpiryExporter(certPem: string): () => void {
    const fileCertNotAfterMs = this.config.tlsCertFile ? Date.parse(new X509Certificate(certPem).validTo) : undefined;
    return (): void => {
      if (fileCertNotAfterMs !== undefined)
        this.metrics.certificateExpiry.set({ role: 'broker' }, (fileCertNotAfterMs - Date.now()) / 1000);
    };
  }

  /** The plain-HTTP admin listener, when configured; resolves to its port. */
  private async startAdmin(): Promise<number | undefined> {
    if (!this.config.adminListen) return undefined;
    const admin = createAdminServer({
      metrics: this.metrics.registry,
      json: { '/agents': () => this.registry.summaries() },
      isReady: () => this.started && !this.draining,
      routes: brokerAdminRoutes(this, this.logger),
      mutations: { token: this.config.adminToken },
      allowedHosts: this.config.adminAllowedHosts,
    });
    this.admin = admin;
    return listenOn(admin, this.config.adminListen);
  }

  /** Timers: certificate expiry (agents, callers, our own from files) and the limiter's sweep. */
  private startTimers(exportFileCertExpiry: () => void): void {
    this.timers.push(
      setInterval(() => {
        const closed = this.agentListener.closeExpired();
        if (closed) this.logger.warn('closed tunnels of agents whose certificate expired', { sessions: closed });
        const cut = this.watch.cutExpired();
        if (cut) this.logger.warn('cut calls of callers or peer brokers whose certificate expired', { calls: cut });
        exportFileCertExpiry();
        const earliest = this.agentListener.earliestAgentExpiryMs();
        // With no agent connected there is no earliest expiry: drop the series rather than leave a
        // frozen value that would look like a healthy certificate.
        if (earliest !== undefined)
          this.metrics.certificateExpiry.set({ role: 'agent' }, (earliest - Date.now()) / 1000);
        else this.metrics.certificateExpiry.remove({ role: 'agent' });
      }, EXPIRY_CHECK_INTERVAL_MS),
    );
    this.timers.push(setInterval(() => this.limiter.sweep(), IDLE_SWEEP_INTERVAL_MS));

    for (const t of this.timers) t.unref();
  }

  /** Starts the PKI side's polls (revocations, trust bundle, own renewal), acting on what they find. */
  private startPki(tls: CredentialStore): void {
    this.pki?.start(tls, {
      onRevocationsChanged: () => {
        const closed = this.agentListener.closeRevoked();
        if (closed) this.logger.warn('closed tunnels of revoked agents', { sessions: closed });
        // Services and peer brokers too: TLS checked their certificates only at the handshake.
        const cut = this.watch.cutRevoked(this.isRevoked);
        if (cut) this.logger.warn('cut calls of revoked callers or peer brokers', { calls: cut });
      },
      onTrustBundleChanged: (pem, version) => this.agentListener.broadcastTrustBundle(pem, version),
    });
  }

  /** The one line that says the broker is up, with what it listens on. */
  private logStarted(ports: BrokerPorts, peerPort: number | undefined): void {
    const cluster = this.config.cluster;
    this.logger.info('broker started', {
      cluster: cluster ? { advertise: cluster.advertise, peerPort, redis: redactUrl(cluster.redisUrl) } : undefined,
      pkiDir: this.config.pkiDir,
      enrollment: Boolean(this.pki),
      brokerId: this.brokerId,
      agentListen: this.config.agentListen,
      agentPort: ports.agentPort,
      apiListen: this.config.apiListen,
      apiPort: ports.apiPort,
      adminPort: ports.adminPort,
      authzenPort: ports.authzenPort,
      extAuthzPort: ports.extAuthzPort,
      forwardAuthPort: ports.forwardAuthPort,
      trustDomain: this.trustDomain,
      platformUpstreams: this.config.upstreams.length,
    });
  }

  /**
   * Puts the per-address cap and the handshake timeout (and, on the agent listener, the global
   * handshake cap and the limits of `unauthenticated` connections) on a TLS listener, counting
   * and logging what they close (one line per listener and reason per second at most: a
   * slowloris or a reconnect storm closes thousands).
   */
  private guardListener(
    listener: string,
    servers: import('node:tls').Server[],
    unauthenticated?: UnauthenticatedLimits,
  ): ConnectionGuard {
    const lastLogged = new Map<GuardedClose, number>();
    const guard: ConnectionGuard = guardConnections(servers, {
      maxPending: listener === 'agent' ? this.config.maxPendingHandshakes : 0,
      maxUnprovenPerAddress: this.config.maxPendingHandshakesPerAddress,
      handshakeTimeoutMs: this.config.handshakeTimeoutMs,
      unauthenticated,
      onClose: (socket, why) => {
        this.guardClosed.add(socket);
        if (why === 'pending_cap') this.metrics.handshakesShed.inc();
        else this.metrics.connectionsGuarded.inc({ listener, reason: why });
        if (Date.now() - (lastLogged.get(why) ?? 0) < 1_000) return;
        lastLogged.set(why, Date.now());
        const { maxPendingHandshakes, maxPendingHandshakesPerAddress } = this.config;
        const { handshakeTimeoutMs, unauthenticatedTimeoutMs } = this.config;
        this.logger.warn(GUARD_MESSAGES[why], {
          listener,
          peer: socket.remoteAddress,
          reason: why,
          shedSoFar: guard.shed(),
          maxPendingHandshakes,
          maxPendingHandshakesPerAddress,
          handshakeTimeoutMs,
          unauthenticatedTimeoutMs,
        });
      },
    });
    return guard;
  }

  /** Reads the TLS material from files, or from the PKI directory (issuing our own certificate). */
  private async loadTlsMaterial(): Promise<{ caPem: string; certPem: string; keyPem: string }> {
    const read = (file: string): string => readFileSync(file, 'utf8');
    if (!this.pki)
      return {
        caPem: read(this.config.caFile!),
        certPem: read(this.config.tlsCertFile!),
        keyPem: read(this.config.tlsKeyFile!),
      };
    const fromPki = await this.pki.load();
    const caPem = this.config.caFile ? read(this.config.caFile) : fromPki.caPem;
    if (this.config.tlsCertFile) {
      // An operator-supplied certificate: serve it with the bundle's roots appended, so that an
      // enrolling agent finds the CA its join token pins.
      return {
        caPem,
        certPem: `${read(this.config.tlsCertFile).trimEnd()}\n${fromPki.caPem}`,
        keyPem: read(this.config.tlsKeyFile!),
      };
    }
    return { caPem, certPem: fromPki.certPem!, keyPem: fromPki.keyPem! };
  }

  /**
   * What the broker tells its agents' sessions (replica set, trust bundle) and how many it holds:
   * the cluster directory and the PKI poll drive these; tests drive them directly.
   */
  get agentSessions(): Pick<AgentListener, 'broadcastReplicaSet' | 'broadcastTrustBundle' | 'sessionCount'> {
    return this.agentListener;
  }

  /** The trust bundle version the broker serves (with a PKI directory; undefined without). */
  get trustBundleVersion(): number | undefined {
    return this.pki?.bundleVersion;
  }

  get isDraining(): boolean {
    return this.draining;
  }

  /** The broker's state for `/status`. Never rejects: an unreadable PKI directory is reported. */
  async status(): Promise<BrokerStatus> {
    const counts = this.registry.counts();
    const own = new X509Certificate(this.tls!.certPem);
    const id = identityOfCertificate(own.raw);
    const notAfterMs = Date.parse(own.validTo);
    const listen = (configured: string, port: number | undefined): string =>
      `${splitHostPort(configured).host}:${port ?? splitHostPort(configured).port}`;
    let pki: BrokerStatus['pki'] = { enabled: false };
    if (this.pki) pki = await this.pki.status().catch((err: Error) => ({ enabled: true as const, error: err.message }));
    return {
      brokerId: this.brokerId,
      version: BROKER_VERSION,
      protocolVersions: PROTOCOL_VERSIONS,
      startedAt: new Date(this.startedAtMs).toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.startedAtMs) / 1000),
      ready: this.started && !this.draining,
      draining: this.draining,
      trustDomain: this.trustDomain,
      listeners: {
        agent: listen(this.config.agentListen, this.ports?.agentPort),
        api: listen(this.config.apiListen, this.ports?.apiPort),
        ...(this.config.adminListen ? { admin: listen(this.config.adminListen, this.ports?.adminPort) } : {}),
        ...(this.config.authzenListen ? { authzen: listen(this.config.authzenListen, this.ports?.authzenPort) } : {}),
        ...(this.config.extAuthzListen
          ? { extAuthz: listen(this.config.extAuthzListen, this.ports?.extAuthzPort) }
          : {}),
        ...(this.config.forwardAuthListen
          ? { forwardAuth: listen(this.config.forwardAuthListen, this.ports?.forwardAuthPort) }
          : {}),
      },
      agents: counts.agents,
      sessions: counts.sessions,
      callsInFlight: counts.activeCalls,
      callsWaiting: counts.waiters,
      servingCertificate: {
        spiffeId: id?.spiffeId ?? '',
        serial: own.serialNumber.toLowerCase(),
        notAfter: new Date(notAfterMs).toISOString(),
        secondsLeft: Math.round((notAfterMs - Date.now()) / 1000),
      },
      pki,
      cluster:
        this.directory && this.config.cluster
          ? { enabled: true, advertise: this.config.cluster.advertise, ...this.directory.status() }
          : { enabled: false },
    };
  }

  /**
   * An operator cuts off every tunnel of `agentId` (admin POST /agents/<id>/disconnect): calls in
   * flight on them fail with UNAVAILABLE naming the reason. The agent reconnects after its
   * backoff unless its certificate is revoked. Undefined when the agent is not connected here.
   */
  disconnectByOperator(agentId: string, reason: string): DisconnectResult | undefined {
    const sessions = this.registry.sessionsOf(agentId);
    if (sessions.length === 0) return undefined;
    const revoked = this.pki ? sessions.some((s) => this.pki!.isRevoked(s.identity)) : false;
    const callsAborted = sessions.reduce((n, s) => n + s.activeCalls, 0);
    const closed = this.agentListener.disconnectAgent(
      agentId,
      new BurrowError(Status.UNAVAILABLE, `disconnected by an operator: ${reason}`),
    );
    return { agentId, sessionsClosed: closed, callsAborted, reason, revoked, willReconnect: !revoked };
  }

  /** Cuts off every tunnel of `agentId` at once (used by revocation). */
  disconnectAgent(agentId: string, reason: string): number {
    return this.agentListener.disconnectAgent(agentId, new BurrowError(Status.PERMISSION_DENIED, reason));
  }

  /**
   * Graceful shutdown: stop taking calls, tell agents to reconnect elsewhere, let calls in flight
   * finish for up to `drainTimeoutMs`, then close everything. Idempotent.
   */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    await this.stopTakingWork();
    // No new AuthZEN or forward-auth connections; requests in flight finish like gRPC calls do.
    const httpsListeners = [this.authzen, this.forwardAuth].filter((s): s is https.Server => s !== undefined);
    const authzenClosed = Promise.all(
      httpsListeners.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))),
    ).then(() => undefined);
    const inFlight = this.registry.counts().activeCalls;
    this.logger.info('broker draining', { callsInFlight: inFlight, drainTimeoutMs: this.config.drainTimeoutMs });
    const timedOut = await this.timedOut(this.drainListeners(), this.config.drainTimeoutMs);
    if (timedOut) this.cutOffCallsInFlight();
    await this.closeTheRest(authzenClosed);
    this.logger.info('broker stopped', { drained: !timedOut });
  }

  /** The drain's first step: not ready, no timers or PKI polls, out of the replica set, agents told. */
  private async stopTakingWork(): Promise<void> {
    this.draining = true;
    this.health.setStatus('NOT_SERVING');
    this.health.close();
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    this.pki?.stop();
    // Leave the replica set first, so that peers stop forwarding here and agents learn it.
    await this.directory?.drain();
    this.agentListener.drainAll('broker shutting down');
  }

  /** Waits for the calls in flight, then closes the API, peer and agent listeners. */
  private async drainListeners(): Promise<void> {
    // No new connections, and GOAWAY on every open one: clients send new calls elsewhere, a call
    // that crossed the GOAWAY is refused by HTTP/2, one that arrived before it is refused
    // (draining). The drain waits for the calls that were admitted, not for every connection to
    // close: a client that never closes its end must not hold it.
    // A listener's close completes once its last connection has closed: that includes one accepted
    // before the drain whose handshake ends after it (its session gets GOAWAY as it starts).
    const callerListeners = [
      this.apiServer,
      ...(this.peerServer ? [this.peerServer] : []),
      ...(this.extAuthz ? [this.extAuthz.server] : []),
    ];
    const listenersClosed = callerListeners.map((l) => new Promise<void>((resolve) => l.close(() => resolve())));
    this.agentServer.close();
    const closed = Promise.all([
      ...listenersClosed,
      this.apiSessions.closeGracefully(),
      this.peerSessions.closeGracefully(),
      ...(this.extAuthz ? [this.extAuthz.sessions.closeGracefully()] : []),
    ]);
    // Calls from agents (site -> platform) finish before the sessions go away.
    this.agentListener.closeCallConnections();
    await this.waitFor(
      () =>
        this.metrics.toAgentInFlight === 0 &&
        this.registry.counts().activeCalls === 0 &&
        this.agentCallSessions.size === 0,
    );
    // The last statuses may still sit in send buffers: let the connections close by themselves
    // for a moment before cutting them.
    const sessions = [this.apiSessions, this.peerSessions, ...(this.extAuthz ? [this.extAuthz.sessions] : [])];
    await this.graceThenCut(closed, sessions, this.peerServer ? 'api, peer, ext_authz' : 'api, ext_authz');
    this.logger.debug('drain: no call in flight; closing tunnel sessions');
    this.agentListener.closeAll(new BurrowError(Status.UNAVAILABLE, 'broker shut down'));
    this.logger.debug('drain: agent listener closed');
  }

  /** Resolves to true when `work` did not finish within `ms` (false when it did). */
  private async timedOut(work: Promise<void>, ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      work.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), ms);
      }),
    ]);
    clearTimeout(timer);
    return timedOut;
  }

  /** At the drain timeout: fails the calls still in flight and cuts every gRPC connection. */
  private cutOffCallsInFlight(): void {
    this.logger.warn('drain timeout reached; cutting off calls still in flight', {
      callsInFlight: this.registry.counts().activeCalls,
    });
    this.agentListener.closeAll(new BurrowError(Status.UNAVAILABLE, 'broker shut down before the call finished'));
    this.apiSessions.destroyAll();
    this.peerSessions.destroyAll();
    this.extAuthz?.sessions.destroyAll();
    this.agentCallSessions.destroyAll();
  }

  /** After the drain: the directory, peer channels, upstreams, AuthZEN, caller policy and admin listener. */
  private async closeTheRest(authzenClosed: Promise<void>): Promise<void> {
    await this.directory?.stop();
    this.forwarder?.close();
    this.watch.stop();
    this.stopped = true;
    this.platformUpstreams.close();
    this.authzen?.closeAllConnections();
    this.forwardAuth?.closeAllConnections();
    await authzenClosed;
    await this.authorizer.close();
    // Unset when start() failed before it got this far.
    await this.telemetry?.stop();
    if (this.admin) {
      const admin = this.admin;
      admin.closeAllConnections();
      await new Promise<void>((resolve) => admin.close(() => resolve()));
    }
  }

  /**
   * Waits for `closed` at most {@link STATUS_FLUSH_GRACE_MS}, then cuts what is left of `servers`
   * (`listeners` names them in the log line that says a cut happened: after the GOAWAY, only a
   * client that never closes its end should need one).
   */
  private async graceThenCut(closed: Promise<unknown>, sessions: SessionSet[], listeners: string): Promise<void> {
    let grace: NodeJS.Timeout | undefined;
    const cut = await Promise.race([
      closed.then(() => false),
      new Promise<boolean>((resolve) => {
        grace = setTimeout(() => resolve(true), STATUS_FLUSH_GRACE_MS);
      }),
    ]);
    clearTimeout(grace);
    if (cut)
      this.logger.warn('connections still open after the drain grace; cutting them', {
        listeners,
        graceMs: STATUS_FLUSH_GRACE_MS,
      });
    for (const set of sessions) set.destroyAll();
  }

  // Only for the drain, where "no call in flight" has no event of its own; stops with the broker.
  private waitFor(condition: () => boolean): Promise<void> {
    return new Promise((resolve) => {
      if (condition()) return resolve();
      const t = setInterval(() => {
        if (condition() || this.stopped) {
          clearInterval(t);
          resolve();
        }
      }, 20);
    });
  }
}
