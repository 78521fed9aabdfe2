import { statusName } from './errors';
import { type Logger, logCallFinished } from './logger';

/**
 * The per-call metrics both binaries keep (their prom-client counters and histogram, seen
 * structurally so that each side keeps its own metric names and help texts).
 */
export interface CallMetrics {
  readonly calls: { inc(labels: Record<string, string>): void };
  readonly callDuration: { observe(labels: Record<string, string>, seconds: number): void };
  readonly messageBytes: { inc(labels: Record<string, string>, bytes: number): void };
}

/** A call that has its status, as {@link recordCallFinished} accounts for it. */
export interface FinishedCall {
  /** The metric and log direction (`to_agent`, `from_agent`, `from_broker`, `to_broker`). */
  direction: string;
  code: number;
  details: string;
  /** When the call arrived (ms since epoch): the duration is measured from here. */
  startedMs: number;
  /** Message bytes each way; left out, the byte counter is not touched for that flow. */
  requestBytes?: number;
  responseBytes?: number;
  /** Labels of the calls counter besides direction and code (the broker's bounded method label). */
  callLabels?: Record<string, string>;
  /**
   * The log line's own fields (who, which call, which method), in the order they are logged,
   * between the direction and the duration; peer-chosen method and call ids are cut there.
   */
  log: Record<string, unknown>;
}

/**
 * The accounting of one finished call, the same on every side: the calls counter, the duration
 * histogram, the byte counters, then the one log line (see {@link logCallFinished}). `metrics`
 * undefined logs only (a forwarded call is counted at the broker where it entered). Never throws.
 */
export function recordCallFinished(logger: Logger, metrics: CallMetrics | undefined, call: FinishedCall): void {
  const { direction, code } = call;
  const durationMs = Date.now() - call.startedMs;
  if (metrics) {
    metrics.calls.inc({ direction, ...call.callLabels, code: statusName(code) });
    metrics.callDuration.observe({ direction }, durationMs / 1000);
    if (call.requestBytes !== undefined) metrics.messageBytes.inc({ direction, flow: 'request' }, call.requestBytes);
    if (call.responseBytes !== undefined) metrics.messageBytes.inc({ direction, flow: 'response' }, call.responseBytes);
  }
  // A call that ended OK is logged at debug only: no log fields are built for it otherwise (per call).
  if (code === 0 && !logger.isLevelEnabled('debug')) return;
  logCallFinished(logger, { direction, ...call.log, code, details: call.details, durationMs });
}
