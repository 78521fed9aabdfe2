import {
  OtlpHttpExporter,
  TRACING_OFF,
  otlpExporterOptions,
  restampResource,
  startTracing,
  type Logger,
  type Tracing,
  type TracingConfig,
  type TracingRuntime,
} from '@burrow/tunnel';
import { Counter, Gauge, type Registry } from 'prom-client';

/** The broker's telemetry budgets (`--telemetry-max-bytes-per-agent`, `--telemetry-queue-bytes`). */
export interface TelemetryBudgets {
  /** Bytes of Telemetry frames one agent session may send per second (a burst of one second's worth). */
  maxBytesPerAgentPerSecond: number;
  /** Encoded spans (the broker's and its agents') waiting for the collector, at most. */
  queueBytes: number;
}

export const DEFAULT_TELEMETRY_BUDGETS: TelemetryBudgets = {
  maxBytesPerAgentPerSecond: 256 * 1024,
  queueBytes: 16 * 1024 * 1024,
};

/** Why the broker dropped telemetry bytes (`burrow_broker_telemetry_dropped_bytes_total{reason}`). */
export type TelemetryDropReason =
  | 'not_accepted'
  | 'agent_budget'
  | 'malformed'
  | 'queue_full'
  | 'export_failed'
  | 'rejected';

/**
 * One agent session's allowance of Telemetry bytes: a token bucket refilled at the per-agent rate,
 * holding at most one second's worth.
 */
export class TelemetryAllowance {
  private tokens: number;
  private lastMs: number;

  constructor(
    private readonly bytesPerSecond: number,
    private readonly now: () => number = Date.now,
  ) {
    this.tokens = bytesPerSecond;
    this.lastMs = now();
  }

  /** Takes `bytes` from the allowance; false (nothing taken) when they are over it. */
  take(bytes: number): boolean {
    const nowMs = this.now();
    this.tokens = Math.min(this.bytesPerSecond, this.tokens + ((nowMs - this.lastMs) * this.bytesPerSecond) / 1000);
    this.lastMs = nowMs;
    if (bytes > this.tokens) return false;
    this.tokens -= bytes;
    return true;
  }
}

/**
 * The broker's tracing (off without --otlp-endpoint) and the export of its agents' telemetry: the
 * broker's spans and the agents' re-stamped batches share one OTLP/HTTP exporter and its queue.
 */
export class BrokerTelemetry {
  readonly tracing: Tracing;
  private readonly runtime: TracingRuntime | undefined;
  private readonly exporter: OtlpHttpExporter | undefined;
  private readonly droppedBytes: Counter;
  private readonly frames: Counter;
  private readonly exportedBytes: Counter;
  /** Set from an export's failure to the next success: one warning per outage, not one per batch. */
  private exportFailing = false;

  constructor(
    config: TracingConfig,
    readonly budgets: TelemetryBudgets,
    registry: Registry,
    private readonly logger: Logger,
    resource: { brokerId: string; version: string },
  ) {
    this.droppedBytes = new Counter({
      name: 'burrow_broker_telemetry_dropped_bytes_total',
      help:
        'Encoded trace bytes dropped, by reason (not_accepted, agent_budget, malformed, queue_full, export_failed, ' +
        'rejected).',
      labelNames: ['reason'],
      registers: [registry],
    });
    this.frames = new Counter({
      name: 'burrow_broker_telemetry_frames_total',
      help: "Telemetry frames received from agents' tunnels, by result (accepted, dropped).",
      labelNames: ['result'],
      registers: [registry],
    });
    this.exportedBytes = new Counter({
      name: 'burrow_broker_telemetry_exported_bytes_total',
      help: 'Encoded trace bytes the OTLP endpoint accepted.',
      registers: [registry],
    });
    const queued = (): number => this.exporter?.queuedBytes ?? 0;
    new Gauge({
      name: 'burrow_broker_telemetry_queue_bytes',
      help: 'Encoded trace bytes waiting for (or in flight to) the OTLP endpoint.',
      registers: [registry],
      collect() {
        this.set(queued());
      },
    });
    if (!config.otlp) {
      this.tracing = TRACING_OFF;
      return;
    }
    const exporter = new OtlpHttpExporter({
      ...otlpExporterOptions(config.otlp),
      maxQueueBytes: budgets.queueBytes,
      onDropped: (bytes, spans, reason, error) => this.dropped(bytes, reason, spans, error),
      onExported: (bytes) => {
        this.exportedBytes.inc(bytes);
        if (this.exportFailing) this.logger.info('trace export works again', { endpoint: config.otlp?.endpoint });
        this.exportFailing = false;
      },
    });
    this.exporter = exporter;
    this.runtime = startTracing({
      serviceName: 'burrow-broker',
      serviceVersion: resource.version,
      resource: { 'burrow.broker_id': resource.brokerId },
      sampleRatio: config.sampleRatio,
      sink: exporter,
    });
    this.tracing = this.runtime.tracing;
  }

  /** True when agents may send Telemetry frames (Welcome `accepts_telemetry`). */
  get acceptsAgentTelemetry(): boolean {
    return this.exporter !== undefined;
  }

  /**
   * One Telemetry frame of `agentId`'s session: within the session's allowance it is re-stamped
   * with the agent's id and queued for export; otherwise dropped and counted. Never throws.
   */
  acceptAgentBatch(agentId: string, allowance: TelemetryAllowance | undefined, otlpTraces: Buffer): void {
    const exporter = this.exporter;
    let reason: TelemetryDropReason | undefined;
    // Sent although Welcome said no: an agent's mistake, not worth its tunnel.
    if (!exporter || !allowance) reason = 'not_accepted';
    else if (!allowance.take(otlpTraces.length)) reason = 'agent_budget';
    else {
      let restamped: { bytes: Buffer; spans: number };
      try {
        restamped = restampResource(otlpTraces, agentId);
      } catch (err) {
        this.logger.debug('malformed telemetry from an agent dropped', { agentId, error: (err as Error).message });
        reason = 'malformed';
        restamped = { bytes: otlpTraces, spans: 0 };
      }
      if (!reason) exporter.accept(restamped);
    }
    this.frames.inc({ result: reason ? 'dropped' : 'accepted' });
    if (reason) this.dropped(otlpTraces.length, reason);
  }

  private dropped(bytes: number, reason: TelemetryDropReason, spans = 0, error?: string): void {
    this.droppedBytes.inc({ reason }, bytes);
    if (reason !== 'export_failed' && reason !== 'rejected') return;
    const fields = { reason, bytes, spans, error };
    if (this.exportFailing) this.logger.debug('trace export failed; spans dropped', fields);
    else this.logger.warn('trace export failed; spans dropped (counted) until it works again', fields);
    this.exportFailing = true;
  }

  /** Exports what is queued (bounded by the export timeout and retries), then stops. */
  async stop(): Promise<void> {
    await this.runtime?.shutdown();
    await this.exporter?.shutdown();
  }
}
