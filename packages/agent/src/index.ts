/** @burrow/agent: the agent as a library (tests, embedding); the CLI is cli.ts. */
export * from './agent';
export * from './agent-config';
export * from './agent-metrics';
export * from './authn';
export * from './backoff';
export * from './broker-connection';
export * from './broker-targets';
export { agentConfigFromArgs } from './cli';
export * from './certificate-renewer';
export * from './enroll';
export * from './state-dir';
