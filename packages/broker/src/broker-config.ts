import type { CallLimits } from './call-limiter';
import {
  SHARED_CONFIG_DEFAULTS,
  type KeepaliveSettings,
  type LogFormat,
  type TracingConfig,
  type UpstreamRoute,
} from '@burrow/tunnel';
import { DEFAULT_TELEMETRY_BUDGETS, type TelemetryBudgets } from './broker-telemetry';

/** Everything a broker needs to run; built by cli.ts from flags, env and the config file. */
export interface BrokerConfig {
  /** HOST:PORT where agents connect (mTLS, Tunnel service). */
  agentListen: string;
  /** HOST:PORT where callers send calls for agents (mTLS, any method + grpc.health.v1). */
  apiListen: string;
  /**
   * HOST:PORT of the plain-HTTP admin listener (/metrics, /healthz, /readyz, /agents, /agents/<id>, /status); off when
   * unset.
   */
  adminListen?: string;
  /**
   * Shared secret for mutating admin requests (POST /agents/<id>/disconnect), read from
   * --admin-token-file. Without it they are served only on a loopback admin listener.
   */
  adminToken?: string;
  /**
   * Host names the admin listener answers to besides `localhost`, IP addresses and its own address
   * (--admin-allowed-host); any other `Host` or `Origin` is refused with 403. Default none.
   */
  adminAllowedHosts?: string[];
  /** Serving certificate and key; unset with `pkiDir`: the broker issues and renews its own. */
  tlsCertFile?: string;
  tlsKeyFile?: string;
  /** CAs of agents and callers; unset with `pkiDir`: the directory's trust bundle. */
  caFile?: string;
  /** A PKI directory (burrow-pki init): enables enrollment, renewal, revocation and rotation. */
  pkiDir?: string;
  /** DNS names and IPs for the self-issued serving certificate. */
  tlsDns: string[];
  tlsIp: string[];
  /**
   * Whether the self-issued certificate also names the host name, `localhost`, 127.0.0.1 and ::1
   * besides `tlsDns`/`tlsIp` (default true; false: only what they give).
   */
  defaultNames: boolean;
  /** Lifetime of certificates this broker issues (agents' and its own). */
  leafTtlMs?: number;
  /** Enrollment attempts per source address per minute. */
  enrollPerMinute: number;
  /** Platform services that site clients reach through agents. */
  upstreams: UpstreamRoute[];
  /** Trust domain peers must belong to; default: the one in the broker's own certificate. */
  trustDomain?: string;
  /**
   * Id in logs, Welcome frames and the cluster directory: the name in the broker certificate's
   * SPIFFE id (`spiffe://<td>/broker/<name>`) unless set. When set, it also names a self-issued
   * certificate (--pki-dir); replicas sharing one --tls-cert each set their own. A self-issued
   * certificate without it is named by defaultBrokerName (broker-pki.ts).
   */
  brokerId?: string;
  maxMessageBytes: number;
  /** How long a call waits for its agent to connect, capped by its deadline. */
  agentWaitMs: number;
  /** How long SIGTERM waits for calls in flight before cutting them off. */
  drainTimeoutMs: number;
  /**
   * Most TLS handshakes the agent listener runs at once; connections past it are closed at accept
   * so that a reconnecting fleet backs off instead of swamping the broker (0 = no cap).
   */
  maxPendingHandshakes: number;
  /**
   * Most connections of one source address, on each TLS listener (agent, API, peer, AuthZEN), that
   * have not proven a valid client certificate: in their handshake, or on the agent listener with
   * enrollment open without one. One past it is reset at accept, so one address cannot fill
   * `maxPendingHandshakes` (0 = no cap).
   */
  maxPendingHandshakesPerAddress: number;
  /** A connection to any TLS listener whose handshake has not finished this long after accept is closed. */
  handshakeTimeoutMs: number;
  /**
   * With `pkiDir`: a connection to the agent listener without a valid client certificate (it can
   * only enroll) is closed this long after its handshake, whatever it does.
   */
  unauthenticatedTimeoutMs: number;
  /**
   * Most session streams one agent certificate identity may hold here at once (those still before
   * Hello included): a tunnel per broker, plus an old one lingering across a reconnect (0 = no cap).
   */
  maxSessionsPerAgent: number;
  keepalive: KeepaliveSettings;
  /** HOST:PORT of the AuthZEN HTTP/JSON binding (HTTPS, mTLS with service certificates); off when unset. */
  authzenListen?: string;
  /** Deadline of an AuthZEN HTTP request carried through the tunnel. */
  authzenTimeoutMs: number;
  /** HOST:PORT of the Envoy ext_authz gRPC service (HTTP/2, mTLS with service certificates); off when unset. */
  extAuthzListen?: string;
  /** Longest an ext_authz check may take (Envoy's grpc-timeout applies when shorter). */
  extAuthzTimeoutMs: number;
  /** Lower-case header that names the site when the route has no `burrow_agent` context extension. */
  extAuthzAgentHeader?: string;
  /** HOST:PORT of forward auth for nginx auth_request / Traefik ForwardAuth (HTTPS, mTLS); off when unset. */
  forwardAuthListen?: string;
  /** Longest a forward-auth check may take. */
  forwardAuthTimeoutMs: number;
  /** Lower-case header that names the site when the path is not /agents/<id>/check. */
  forwardAuthAgentHeader?: string;
  /** Caller authorization as Cedar policy; unset: every service may call everything (logged loudly). */
  callerPolicy?: { policiesDir: string; entitiesFile?: string; schemaFile?: string; auditLog?: string };
  /** Per-caller and per-agent limits on calls in flight and calls per second (0 = off). */
  limits: CallLimits;
  /** Set with --redis-url: the broker is one replica of a cluster (agent directory, peer API). */
  cluster?: ClusterConfig;
  /** Spans and where they go (--otlp-endpoint, --trace-sample-ratio): off without an endpoint. */
  tracing: TracingConfig;
  /** Budgets of the agents' telemetry and of the export queue. */
  telemetry: TelemetryBudgets;
  logLevel: string;
  logFormat: LogFormat;
}

/** How a broker joins a cluster of replicas. */
export interface ClusterConfig {
  /** redis:// or rediss:// URL of the agent directory. */
  redisUrl: string;
  /** Prefix of every Redis key and channel the cluster uses. */
  redisKeyPrefix: string;
  /** HOST:PORT other brokers reach this one's peer listener at. */
  advertise: string;
  /** HOST:PORT the peer listener binds. */
  peerListen: string;
  /** HOST:PORT agents should dial for this broker; default: the advertise host with the agent listener's port. */
  agentAdvertise?: string;
  /** How long a directory entry lives without a refresh (refreshed every third of it). */
  registryTtlMs: number;
  /** How long a directory answer is reused for calls to one agent. */
  lookupCacheMs: number;
}

/**
 * Where `burrow-broker agents|status` look for the admin listener by default. `serve` has no admin
 * listener unless --admin-listen is given; this is the address the documentation uses for it.
 */
export const DEFAULT_ADMIN_ADDRESS = '127.0.0.1:9090';

export const BROKER_DEFAULTS = {
  upstreams: [] as UpstreamRoute[],
  tlsDns: [] as string[],
  tlsIp: [] as string[],
  defaultNames: true,
  enrollPerMinute: 30,
  agentWaitMs: 5_000,
  drainTimeoutMs: 30_000,
  maxPendingHandshakes: 256,
  maxPendingHandshakesPerAddress: 32,
  handshakeTimeoutMs: 5_000,
  unauthenticatedTimeoutMs: 10_000,
  maxSessionsPerAgent: 4,
  authzenTimeoutMs: 10_000,
  extAuthzTimeoutMs: 2_000,
  forwardAuthTimeoutMs: 2_000,
  limits: {
    caller: { maxConcurrent: 4096, ratePerSecond: 0 },
    agent: { maxConcurrent: 2048, ratePerSecond: 0 },
  } as CallLimits,
  tracing: { sampleRatio: 1 } as TracingConfig,
  telemetry: DEFAULT_TELEMETRY_BUDGETS,
  ...SHARED_CONFIG_DEFAULTS,
};
