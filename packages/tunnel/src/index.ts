/**
 * @burrow/tunnel: the protocol code the agent and the broker share. No CLI, no process state: the
 * binaries pass their configuration, logger and clock in.
 */
export * from './answerer';
export * from './call-outcome';
export * from './call-accounting';
export * from './answer-unimplemented';
export * from './cancellable-wait';
export * from './deadline';
export * from './raw-bidi-method';
export * from './call-relay';
export * from './call-state';
export * from './call-stream';
export * from './grpc-server-hooks';
export * from './connection-guard';
export * from './grpc-client-hooks';
export * from './errors';
export * from './frames';
export * from './grpc-options';
export * from './identity';
export * from './ids';
export * from './broker-identity-check';
export * from './logger';
export * from './metadata-policy';
export * from './originator';
export * from './upstream-table';
export * from './health-service';
export * from './cli-options';
export * from './admin-server';
export * from './credential-store';
export * from './enrollment-service';
export * from './api-codec';
export * from './local-answerer';
export * from './embedded-protos';
export * from './signals';
