import {
  MAX_TELEMETRY_BYTES,
  OtlpHttpExporter,
  TRACING_OFF,
  otlpExporterOptions,
  startTracing,
  type OtlpChunk,
  type SpanSink,
  type Tracing,
  type TracingConfig,
  type TracingRuntime,
} from '@burrow/tunnel';
import { Counter, type Registry } from 'prom-client';

/** The agent's telemetry settings (its CLI flags). */
export interface AgentTelemetryConfig {
  tracing: TracingConfig;
  /** `--no-telemetry-upload` sets it false: spans never go up the tunnel. */
  upload: boolean;
  /** `--telemetry-buffer-bytes`: encoded spans held for the tunnel at most. */
  bufferBytes: number;
  /** `--trace-include-context`: policy spans may carry request context values. */
  includeContext: boolean;
}

export const DEFAULT_TELEMETRY_BUFFER_BYTES = 1024 * 1024;

/** Why the agent dropped spans (`burrow_agent_telemetry_dropped_spans_total{reason}`). */
type DropReason = 'buffer_full' | 'too_large' | 'queue_full' | 'export_failed' | 'rejected';

/** Where the agent's Telemetry frames go: its broker connections that take them. */
export interface TelemetryTunnels {
  /** Sends one frame on a connection that can take it now; false when none can. */
  send(otlpTraces: Buffer): boolean;
}

/**
 * Finished spans waiting for a tunnel: sent as Telemetry frames whenever a connection can take one
 * at once, held within a byte budget otherwise (the oldest dropped first: the newest say the most
 * about now). Never blocks: {@link accept} only queues and tries to send.
 */
export class TelemetryUploader implements SpanSink {
  private readonly queue: OtlpChunk[] = [];
  private queuedBytes = 0;

  constructor(
    private readonly tunnels: TelemetryTunnels,
    private readonly budgetBytes: number,
    private readonly onDropped: (spans: number, reason: DropReason) => void,
    private readonly onSent: () => void,
  ) {}

  accept(chunk: OtlpChunk): void {
    this.queue.push(chunk);
    this.queuedBytes += chunk.bytes.length;
    while (this.queuedBytes > this.budgetBytes) {
      const oldest = this.queue.shift()!;
      this.queuedBytes -= oldest.bytes.length;
      this.onDropped(oldest.spans, 'buffer_full');
    }
    this.pump();
  }

  dropped(spans: number, reason: 'too_large' | 'queue_full'): void {
    this.onDropped(spans, reason);
  }

  /** Sends queued frames while a tunnel takes them (called on new spans and when a tunnel comes up). */
  pump(): void {
    while (this.queue.length > 0 && this.tunnels.send(this.queue[0]!.bytes)) {
      const sent = this.queue.shift()!;
      this.queuedBytes -= sent.bytes.length;
      this.onSent();
    }
  }

  /** Bytes waiting for a tunnel. */
  get bufferedBytes(): number {
    return this.queuedBytes;
  }
}

/**
 * The agent's tracing and where its spans go. With upload (the default) spans go up the tunnels
 * as Telemetry frames, and tracing is on only while some broker takes them (Welcome
 * `accepts_telemetry`: its operator configured an endpoint); without upload, to the agent's own
 * --otlp-endpoint when given, else nowhere (tracing off; traceparent still crosses the agent).
 */
export class AgentTelemetry {
  readonly tracing: Tracing;
  private readonly runtime: TracingRuntime | undefined;
  private readonly uploader: TelemetryUploader | undefined;
  private readonly exporter: OtlpHttpExporter | undefined;

  constructor(
    config: AgentTelemetryConfig,
    tunnels: TelemetryTunnels,
    registry: Registry,
    agentId: string,
    version: string,
  ) {
    const dropped = new Counter({
      name: 'burrow_agent_telemetry_dropped_spans_total',
      help: 'Finished spans dropped, by reason (buffer_full, too_large, queue_full, export_failed, rejected).',
      labelNames: ['reason'],
      registers: [registry],
    });
    const frames = new Counter({
      name: 'burrow_agent_telemetry_frames_total',
      help: 'Telemetry frames sent up the tunnel.',
      registers: [registry],
    });
    const onDropped = (spans: number, reason: DropReason): void => {
      if (spans > 0) dropped.inc({ reason }, spans);
    };
    let sink: SpanSink;
    if (config.upload) {
      this.uploader = new TelemetryUploader(tunnels, config.bufferBytes, onDropped, () => frames.inc());
      sink = this.uploader;
    } else if (config.tracing.otlp) {
      this.exporter = new OtlpHttpExporter({
        ...otlpExporterOptions(config.tracing.otlp),
        maxQueueBytes: config.bufferBytes,
        onDropped: (_bytes, spans, reason) => onDropped(spans, reason),
      });
      sink = this.exporter;
    } else {
      this.tracing = TRACING_OFF;
      return;
    }
    this.runtime = startTracing({
      serviceName: 'burrow-agent',
      serviceVersion: version,
      resource: { 'burrow.agent_id': agentId },
      sampleRatio: config.tracing.sampleRatio,
      sink,
      maxRequestBytes: config.upload ? MAX_TELEMETRY_BYTES : undefined,
      includeContext: config.includeContext,
      startDisabled: config.upload,
    });
    this.tracing = this.runtime.tracing;
  }

  /**
   * A tunnel came up or went away: with upload, tracing is on while at least one broker takes
   * telemetry (`anyTakes`), and what waits is sent now.
   */
  tunnelsChanged(anyTakes: boolean): void {
    if (!this.uploader) return;
    this.tracing.enabled = anyTakes;
    if (anyTakes) this.uploader.pump();
  }

  /** Exports what is queued now (tests, shutdown). */
  async flush(): Promise<void> {
    await this.runtime?.flush();
    await this.exporter?.flush();
  }

  /** Hands the last spans on (to a tunnel still open, or the endpoint), then stops. */
  async stop(): Promise<void> {
    await this.runtime?.shutdown();
    await this.exporter?.shutdown();
  }
}
