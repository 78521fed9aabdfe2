/** How one forwarded call ended, for logs and metrics. */
export interface CallOutcome {
  /** gRPC status code the call ended with, as the caller saw it. */
  code: number;
  details: string;
  /** Message bytes that went from the caller towards the upstream. */
  requestBytes: number;
  /** Message bytes that went from the upstream back to the caller. */
  responseBytes: number;
}
