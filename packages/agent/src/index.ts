/**
 * @burrow/agent: the agent as a library (tests, embedding); the CLI is cli.ts. Exports marked `@internal` are
 * parts of the agent exported only so the tests and benchmarks can drive them alone.
 */

// The agent and its configuration.
export {
  Agent,
  DEFAULT_RESOLVE_INTERVAL_MS,
  type AgentPorts,
  type AgentOptions,
  type BrokerTargetStatus,
} from './agent';
export { AGENT_DEFAULTS, type AgentConfig, type LocalTlsConfig, type AgentPolicyConfig } from './agent-config';
/** Builds an {@link AgentConfig} from parsed `burrow-agent run` options (what the CLI does). */
export { agentConfigFromArgs } from './cli';

// Gateway decisions (PolicyDecisionService/Check) and their mapping file (docs/gateways.md).
export {
  loadGatewayMapping,
  parseGatewayMapping,
  GatewayMappingError,
  type GatewayMapping,
  type MappingSource,
  type MappedValue,
  type MappingRoute,
  type MappingTarget,
  type TokenMode,
} from './gateway/gateway-mapping';
export { CHECK_LIMITS } from './gateway/check-input';
/** @internal Check's memory of verified tokens (unit-tested alone). */
export { VerifiedTokens, VERIFIED_TOKEN_CACHE } from './authn/verified-tokens';
/** @internal The built-in services' dispatcher, driven alone by tests and benchmarks. */
export {
  BuiltinServices,
  type BuiltinServicesOptions,
  type PolicyDecider,
  type TokenAuthenticator,
} from './builtin-services';

/** @internal The hint of `cannot establish tunnel session`, per cause (tests). */
export { connectHint, type ConnectFailure } from './connect-hint';

// Token verification for the built-in burrow.auth.v1.AuthenticationService.
export {
  TokenVerifier,
  TOKEN_VERIFIER_DEFAULTS,
  type TokenVerifierSettings,
  type TokenVerifierOptions,
  type AuthenticationResult,
} from './authn/token-verifier';
export { AuthnMetrics, type AuthnResult } from './authn/authn-metrics';
/** @internal Tests parse authn options and load jose with these. */
export { authnConfigFromArgs } from './authn/authn-config';
/** @internal */
export { loadJose, type JoseModule } from './authn/jose-loader';

/** @internal The agent's parts, driven alone by tests and benchmarks. */
export { AgentMetrics, type BrokerCounts } from './agent-metrics';
/** @internal */
export { Backoff } from './backoff';
/** @internal */
export { BrokerConnection, type BrokerConnectionEvents, type BrokerConnectionOptions } from './broker-connection';
/** @internal Which brokers the agent connects to (unit-tested pure functions). */
export {
  expandConfigured,
  rendezvousScore,
  chooseTargets,
  type HostResolver,
  type TargetSpec,
  type TargetInputs,
} from './broker-targets';
/** @internal When the agent renews its certificate. */
export {
  CertificateRenewer,
  renewalTimeMs,
  renewalRetryDelayMs,
  type Clock,
  type RenewerDeps,
} from './certificate-renewer';
/** @internal Enrollment and the state directory's file names. */
export { enroll, prepareStateDir, stateFiles, PENDING_KEY_FILE, type EnrollOptions, type EnrollResult } from './enroll';
export {
  install,
  uninstall,
  defaultInstallPaths,
  agentYaml,
  unitText,
  type InstallOptions,
  type InstallPaths,
  type UninstallOptions,
} from './install';
export { SYSTEMD_UNIT } from './systemd-unit';
/** @internal Tests drive the telemetry upload alone. */
export { TelemetryUploader, type TelemetryTunnels } from './agent-telemetry';
/** @internal */
export { telemetryConfigFromArgs } from './telemetry-config';
