/**
 * @burrow/broker: the broker as a library (tests, embedding); the CLI is cli.ts. Exports marked `@internal` are
 * parts of the broker exported only so the tests and benchmarks can drive them alone.
 */

// The broker and its configuration.
export { Broker, BROKER_VERSION, type BrokerPorts, type BrokerStatus, type DisconnectResult } from './broker';
export { BROKER_DEFAULTS, DEFAULT_ADMIN_ADDRESS, type BrokerConfig, type ClusterConfig } from './broker-config';
/** Builds a {@link BrokerConfig} from parsed `burrow-broker serve` options (what the CLI does). */
export { brokerConfigFromArgs, serveDefaults } from './cli';
/** What the broker reports about its agents (admin API, {@link Broker} status). */
export type { RegistryCounts, AgentSummary, AgentDetail } from './tunnel-registry';

// Caller authorization: the hook an embedder implements, and the Cedar-backed one the CLI uses.
export {
  ALLOW_ALL_CALLERS,
  type CallerAuthorizer,
  type CallerDecision,
  type ForwardedCall,
} from './caller-authorizer';
export { PolicyCallerAuthorizer, type PolicyCallerAuthorizerOptions } from './policy-caller-authorizer';

// The gateway listeners (docs/gateways.md): the Envoy ext_authz method they serve.
export { EXT_AUTHZ_CHECK_METHOD } from './ext-authz';

/** @internal The broker's parts, driven alone by tests and benchmarks. */
export { BrokerMetrics } from './broker-metrics';
/** @internal */
export { CallLimiter, LimitExceededError, type CallLimits, type KeyLimits, type LimitName } from './call-limiter';
/** @internal */
export { PeerForwarder, type PeerForwarderOptions, type PeerAttempt } from './peer-forwarder';
/** @internal Tests drive the telemetry budgets alone. */
export { BrokerTelemetry, TelemetryAllowance, type TelemetryBudgets } from './broker-telemetry';
