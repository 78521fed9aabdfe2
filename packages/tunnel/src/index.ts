/**
 * @burrow/tunnel: the protocol code the agent and the broker share. No process state: the binaries pass their
 * configuration, logger and clock in. The helpers both CLIs share are in their own section at the end.
 *
 * Every consumer is another Burrow package; exports marked `@internal` are there only for the tests.
 */

// Wire format: session frames, protocol versions, the tunnel's paths and ALPN.
export {
  checkReplicaSet,
  encodeSessionFrame,
  decodeSessionFrame,
  sessionFrameTooLarge,
  negotiateVersion,
  describeVersions,
  PROTOCOL_VERSIONS,
  MAX_REPLICA_SET_SIZE,
  MAX_SESSION_FRAME_BYTES,
  MAX_TELEMETRY_BYTES,
  DEFAULT_MAX_MESSAGE_BYTES,
  TUNNEL_ALPN,
  CONTROL_PATH,
  SESSION_HANDSHAKE_TIMEOUT_MS,
  CALL_ID_KEY,
  LEGACY_TUNNEL_SERVICE,
  LEGACY_SESSION_PATH,
  PROTO_DIR,
  loadProto,
  type WelcomeFrame,
  type BrokerEndpoint,
} from './frames';
/** @internal Tests build and check raw frames with these. */
export { PROTOCOL_VERSION, type HelloFrame, type SessionFrame } from './frames';
export { ControlChannel, type ControlHandlers } from './control-channel';

// gRPC over raw HTTP/2: message prefixes, deadlines, statuses; one call relayed stream to stream.
export {
  GRPC_CONTENT_TYPE,
  MessageSizeGuard,
  MessageReader,
  frameMessage,
  messageTooLarge,
  deadlineFromTimeout,
  timeoutHeader,
  encodeGrpcMessage,
  decodeGrpcMessage,
  statusOfHeaders,
  statusTrailers,
  endWithStatus,
  refuseStream,
  stopRequestAfterStatus,
  stopRequestAfterTrailers,
  atDeadline,
  statusOfReset,
} from './grpc-wire';
export { relayCall, nextHopHeaders, openStream, type RelayOptions, type CallCutter } from './stream-relay';
export {
  answerUnary,
  unaryCall,
  unaryOnStream,
  type LocalCallContext,
  type LocalUnaryHandler,
  type UnaryAnswerOptions,
  type UnaryCallResult,
} from './unary-call';
export type { CallOutcome } from './call-outcome';
export { CallIds, type StreamListener } from './call-ids';
/** @internal The relayed call's state machine, exported for its unit tests. */
export {
  transition,
  isSettled,
  INITIAL_CALL_STATE,
  type CallState,
  type CallEvent,
  type CallPhase,
  type CallStatus,
} from './call-state';

// Which metadata crosses the tunnel, and the keys Burrow owns.
export {
  AGENT_ID_KEY,
  CALLING_AGENT_KEY,
  CALLER_ID_KEY,
  forwardedRequestMetadata,
  forwardedResponseMetadata,
  type HeaderBlock,
} from './metadata-policy';

// Upstream routing and the API codecs (the JSON shapes of the policy and auth services).
export {
  parseUpstreamRoute,
  serviceOfMethod,
  UpstreamTable,
  type UpstreamRoute,
  type UpstreamSession,
} from './upstream-table';
export { AUTH_METHODS, POLICY_METHODS, ApiCodec, API_CODECS, type JsonValue, type JsonObject } from './api-codec';
export {
  ENROLLMENT_NOT_ENABLED,
  ENROLLMENT_SERVICE,
  type EnrollRequest,
  type RenewRequest,
  type IssuedAgentCertificate,
} from './enrollment-service';

// Identities: SPIFFE ids from certificates, chain checks, the id grammar.
export {
  parseSpiffeId,
  certificateIdentityProblem,
  identityOfCertificate,
  identityOfPeerCertificate,
  splitPemCertificates,
  verifyCertificateChain,
  type PeerRole,
  type PeerIdentity,
  type PeerCertificateLike,
} from './identity';
export { brokerIdentityCheck, NOT_A_BROKER } from './broker-identity-check';
export { isValidId, idProblem, ID_PATTERN, ID_GRAMMAR } from './ids';
export { CredentialStore, type TlsMaterial } from './credential-store';

// gRPC server and channel plumbing: options, hooks into grpc-js, connection limits, health.
export { H2_SESSION_OPTIONS, keepSessionAlive, DEFAULT_KEEPALIVE, type KeepaliveSettings } from './grpc-options';
export {
  guardConnections,
  limitUnauthenticatedSession,
  type GuardedClose,
  type UnauthenticatedLimits,
  type ConnectionGuardOptions,
  type ConnectionGuard,
} from './connection-guard';
export { HealthService, type ServingStatus } from './health-service';

// Errors and logging.
export { toBurrowError, statusName, BurrowError, ProtocolError } from './errors';
/** A setting the operator gave is wrong: thrown by CLI parsing and by library code that checks its settings. */
export { ConfigError } from './cli-options';
export {
  createLogger,
  silentLogger,
  logCallFinished,
  boundedForLog,
  type Logger,
  type LogFormat,
  type CallLogFields,
} from './logger';

// The admin HTTP server (status, metrics, mutations) both binaries run.
export {
  createAdminServer,
  type AdminResponse,
  type AdminRoute,
  type AdminMutationPolicy,
  type AdminSources,
} from './admin-server';
/** @internal Tests check the loopback rule with it. */
export { isLoopbackAddress } from './admin-server';

// Protos embedded in the agent's single executable.
export { seaAssets, listProtoFiles, type AssetSource } from './embedded-protos';
/** @internal Tests serve protos from fake assets with these. */
export { serveProtosFromAssets, EMBEDDED_PROTO_DIR } from './embedded-protos';

// ---------------------------------------------------------------------------------------------------------------
// For the two CLIs (burrow-agent, burrow-broker) only: option parsing, config files, signal handling. Library
// code takes its settings already parsed and does not use these.
// ---------------------------------------------------------------------------------------------------------------
export {
  loadYamlConfig,
  parseListenAddress,
  parseAllowedHosts,
  parseDurationMs,
  parseBytes,
  parseIntInRange,
  requireReadableFile,
  requireCertificatePair,
  asList,
  silenceIpServerNameWarning,
} from './cli-options';
export {
  stringOption,
  LOG_OPTIONS,
  KEEPALIVE_OPTIONS,
  MAX_MESSAGE_BYTES_OPTION,
  DRAIN_TIMEOUT_OPTION,
  ADMIN_ALLOWED_HOST_OPTION,
  CONFIG_FILE_OPTION,
  SHARED_CONFIG_DEFAULTS,
  withEnvAndConfigFile,
  parseCommandLine,
  runDaemon,
  type CliFailure,
  type Daemon,
  logSettingsFromArgs,
  upstreamsFromArgs,
  maxMessageBytesFromArgs,
  keepaliveFromArgs,
} from './cli-common';
export { explainUsageError } from './explain-usage-error';
export { runUntilSignalled } from './signals';

// Listening: one listen helper for every server, with the error message both binaries print.
export { listenOn, splitHostPort } from './listen';

// One place for each rule a listener or a side applies to every call.
export { recordCallFinished, type CallMetrics, type FinishedCall } from './call-accounting';
export { answerUnimplemented } from './answer-unimplemented';

// Tracing: spans of calls (api only), the SDK set-up the binaries call, OTLP encoding and export.
export {
  type Tracing,
  type TraceParent,
  TRACING_OFF,
  TRACEPARENT_KEY,
  BURROW_ATTRIBUTES,
  remoteParent,
  traceparentOf,
  startRpcSpan,
  startChildSpan,
  endRpcSpan,
  endSpan,
  traceLogFields,
  SpanKind,
  ROOT_CONTEXT,
  type Span,
} from './tracing';
export {
  startTracing,
  type TracingRuntime,
  type TracingSetup,
  type SpanSink,
  DEFAULT_TRACE_EXPORT_INTERVAL_MS,
} from './tracing-sdk';
export {
  AGENT_ID_ATTRIBUTE,
  decodeExportRequest,
  restampResource,
  type OtlpChunk,
  type ExportTraceRequest,
} from './otlp';
export { OtlpHttpExporter, type OtlpHttpOptions, DEFAULT_OTLP_TIMEOUT_MS } from './otlp-http-exporter';
export {
  TRACING_OPTIONS,
  tracingFromArgs,
  telemetryBytesFromArgs,
  otlpExporterOptions,
  type TracingConfig,
  type OtlpEndpointConfig,
} from './tracing-options';
