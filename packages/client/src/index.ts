/**
 * @burrow/client: what a platform service needs to ask sites questions through a Burrow broker.
 */
export * from './burrow-client';
