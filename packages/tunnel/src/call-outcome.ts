/** How one forwarded call ended, for logs and metrics. */
export interface CallOutcome {
  /** gRPC status code the call ended with, as the caller saw it. */
  code: number;
  details: string;
  /** Message bytes that went from the caller towards the upstream. */
  requestBytes: number;
  /** Message bytes that went from the upstream back to the caller. */
  responseBytes: number;
  /**
   * When this side decided the status and sent it (performance.now()); unset when the caller went
   * first. A SERVER span ends here: before its caller can have seen the status, so it nests inside
   * the caller's CLIENT span, which ends only once the stream has closed.
   */
  settledAt?: number;
}
