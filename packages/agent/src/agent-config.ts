import type { TokenVerifierSettings } from './authn/token-verifier';
import type { GatewayMapping } from './gateway/gateway-mapping';
import { DEFAULT_TELEMETRY_BUFFER_BYTES, type AgentTelemetryConfig } from './agent-telemetry';
import { SHARED_CONFIG_DEFAULTS, type KeepaliveSettings, type LogFormat, type UpstreamRoute } from '@burrow/tunnel';

/** TLS material for the local listener, when site clients must use TLS. */
export interface LocalTlsConfig {
  certFile: string;
  keyFile: string;
  caFile?: string;
}

/** Everything an agent needs to run; built by cli.ts from flags, env and the config file. */
export interface AgentConfig {
  /**
   * Broker agent listeners (HOST:PORT); the agent keeps a tunnel to each, and to every address a
   * name resolves to.
   */
  brokers: string[];
  tlsCertFile: string;
  tlsKeyFile: string;
  caFile: string;
  /**
   * The enrolled agent's state directory (burrow-agent enroll). When set, the TLS files above are
   * its tls.crt, tls.key and ca.crt, and the agent renews its certificate and keeps the trust
   * bundle current there.
   */
  stateDir?: string;
  /**
   * TLS server name to expect from brokers, when it differs from the host in `brokers` (for
   * brokers learned from the replica set: the host of their advertised address).
   */
  brokerServerName?: string;
  /**
   * Most distinct brokers to keep tunnels to: the configured ones (always kept, each name expanded
   * to every address it resolves to), then brokers learned from the replica set. At least 1.
   */
  maxBrokers: number;
  /** Site upstreams answering calls from the platform, by service (`*` = default). */
  upstreams: UpstreamRoute[];
  /** HOST:PORT where site clients call platform services; off when unset. */
  localListen?: string;
  /** TLS for the local listener; required when it is not bound to loopback. */
  localTls?: LocalTlsConfig;
  /** HOST:PORT of the plain-HTTP admin listener (/metrics, /healthz, /readyz); off when unset. */
  adminListen?: string;
  /**
   * Host names the admin listener answers to besides `localhost`, IP addresses and its own address
   * (--admin-allowed-host); any other `Host` or `Origin` is refused with 403. Default none.
   */
  adminAllowedHosts?: string[];
  /**
   * Most calls a broker may run on one tunnel at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS of
   * the agent's side): the agent's concurrency limit per broker connection.
   */
  maxConcurrentCalls: number;
  maxMessageBytes: number;
  reconnectBaseMs: number;
  reconnectMaxMs: number;
  /** How long a site client's call waits for a broker connection, capped by its deadline. */
  brokerWaitMs: number;
  drainTimeoutMs: number;
  keepalive: KeepaliveSettings;
  logLevel: string;
  logFormat: LogFormat;
  /** Token verification for the built-in AuthenticationService; undefined when no key source is configured. */
  authn?: TokenVerifierSettings;
  /** The built-in policy decision service's sources; undefined without --policies. */
  policy?: AgentPolicyConfig;
  /**
   * How gateway Check requests become evaluations (--gateway-mapping FILE, parsed and validated at
   * load with loadGatewayMapping); Check is FAILED_PRECONDITION without it.
   */
  gatewayMapping?: GatewayMapping;
  /** Tracing and where the agent's spans go (up the tunnel by default). */
  telemetry: AgentTelemetryConfig;
}

/** Where the built-in policy decision service reads its policies and writes its audit log. */
export interface AgentPolicyConfig {
  policiesDir: string;
  entitiesFile?: string;
  schemaFile?: string;
  /** How long a decision is served from the cache; 0 = off. */
  cacheTtlMs: number;
  /** File for the audit log (JSON lines), or `-` for stdout. */
  auditLog: string;
}

export const AGENT_DEFAULTS = {
  upstreams: [] as UpstreamRoute[],
  maxBrokers: 3,
  maxConcurrentCalls: 4096,
  reconnectBaseMs: 500,
  reconnectMaxMs: 30_000,
  brokerWaitMs: 5_000,
  drainTimeoutMs: 30_000,
  telemetry: {
    tracing: { sampleRatio: 1 },
    upload: true,
    bufferBytes: DEFAULT_TELEMETRY_BUFFER_BYTES,
    includeContext: false,
  } as AgentTelemetryConfig,
  ...SHARED_CONFIG_DEFAULTS,
};
