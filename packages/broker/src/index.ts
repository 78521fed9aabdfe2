/** @burrow/broker: the broker as a library (tests, embedding); the CLI is cli.ts. */
export * from './broker';
export * from './broker-config';
export * from './broker-metrics';
export * from './caller-api';
export * from './tunnel-registry';
export { brokerConfigFromArgs, serveDefaults } from './cli';
export * from './call-limiter';
export * from './caller-authorizer';
export * from './authzen-http';
export * from './policy-caller-authorizer';
export * from './agent-directory';
export * from './peer-forwarder';
export * from './peer-listener';
export * from './peer-protocol';
