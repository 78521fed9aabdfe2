import type { Attributes } from '@opentelemetry/api';
import { resourceFromAttributes } from '@opentelemetry/resources';
import {
  BasicTracerProvider,
  ParentBasedSampler,
  type ReadableSpan,
  type SpanProcessor,
  TraceIdRatioBasedSampler,
} from '@opentelemetry/sdk-trace-base';
import { ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION } from '@opentelemetry/semantic-conventions';
import { assembleRequests, encodeSpan, otlpEnvelope, spanFits, type OtlpChunk, type OtlpEnvelope } from './otlp';
import type { Tracing } from './tracing';

/** Where finished spans go, already encoded as OTLP export requests. */
export interface SpanSink {
  /** Takes one encoded request; must not block (it queues, sends later or drops and counts). */
  accept(chunk: OtlpChunk): void;
  /**
   * Spans dropped before they reached the sink, with their encoded bytes: `too_large` (one span
   * over `maxRequestBytes`), `queue_full` (over `maxQueuedBytes` between exports).
   */
  dropped?(spans: number, reason: 'too_large' | 'queue_full', bytes: number): void;
}

/** How a binary's tracing is set up (its CLI flags). */
export interface TracingSetup {
  /** `service.name` of the resource: `burrow-broker`, `burrow-agent`. */
  serviceName: string;
  serviceVersion: string;
  /** More resource attributes (`burrow.broker_id`, `burrow.agent_id`). */
  resource?: Attributes;
  /** `--trace-sample-ratio`: the share of new traces recorded; a caller's sampled flag decides for its own. */
  sampleRatio: number;
  sink: SpanSink;
  /** Largest encoded request handed to the sink (the agent: one Telemetry frame). */
  maxRequestBytes?: number;
  /** Encoded spans held between exports at most; more are dropped and counted (`queue_full`). */
  maxQueuedBytes?: number;
  /** How often queued spans are exported. */
  exportIntervalMs?: number;
  /** `--trace-include-context` (agent). */
  includeContext?: boolean;
  /** Starts with `enabled` false (the agent: until a broker takes its telemetry). */
  startDisabled?: boolean;
}

/** Default `maxQueuedBytes`: encoded spans held between exports. */
export const DEFAULT_MAX_QUEUED_SPAN_BYTES = 4 * 1024 * 1024;
/** Default export interval. */
export const DEFAULT_TRACE_EXPORT_INTERVAL_MS = 1000;

/**
 * Batching like the SDK's BatchSpanProcessor, but each span is encoded (otlp.ts) the moment it
 * ends and only its bytes are kept: span objects die young instead of waiting a second in a queue
 * and costing the old-generation GC. Every `exportIntervalMs`, or as soon as a full request's worth
 * is queued, the bytes go to the sink as requests of at most `maxRequestBytes`. Bounded by
 * `maxQueuedBytes`; past it a span is dropped and counted (`queue_full`).
 */
class EncodingSpanProcessor implements SpanProcessor {
  private encoded: Uint8Array[] = [];
  private queuedBytes = 0;
  private timer: NodeJS.Timeout | undefined;
  private envelope: OtlpEnvelope | undefined;

  constructor(
    private readonly sink: SpanSink,
    private readonly scopeName: string,
    private readonly limits: { maxRequestBytes: number; maxQueuedBytes: number; exportIntervalMs: number },
  ) {}

  onStart(): void {}

  onEnd(span: ReadableSpan): void {
    // The resource is the provider's, the same for every span: encoded once.
    this.envelope ??= otlpEnvelope(span.resource.attributes, this.scopeName);
    const bytes = encodeSpan(span);
    if (!spanFits(this.envelope, bytes.length, this.limits.maxRequestBytes)) {
      this.sink.dropped?.(1, 'too_large', bytes.length);
      return;
    }
    if (this.queuedBytes + bytes.length > this.limits.maxQueuedBytes) {
      this.sink.dropped?.(1, 'queue_full', bytes.length);
      return;
    }
    this.encoded.push(bytes);
    this.queuedBytes += bytes.length;
    if (this.queuedBytes >= Math.min(this.limits.maxRequestBytes, MAX_BATCH_BYTES)) this.exportNow();
    else if (!this.timer) this.timer = setTimeout(() => this.exportNow(), this.limits.exportIntervalMs).unref();
  }

  private exportNow(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.encoded.length === 0 || !this.envelope) return;
    const spans = this.encoded;
    this.encoded = [];
    this.queuedBytes = 0;
    for (const chunk of assembleRequests(this.envelope, spans, this.limits.maxRequestBytes)) this.sink.accept(chunk);
  }

  forceFlush(): Promise<void> {
    this.exportNow();
    return Promise.resolve();
  }

  shutdown(): Promise<void> {
    this.exportNow();
    return Promise.resolve();
  }
}

/** A batch is handed on once this many encoded bytes are queued, before the interval is up. */
const MAX_BATCH_BYTES = 256 * 1024;

/** A running tracer: {@link Tracing} for the code that makes spans, plus its flush and shutdown. */
export interface TracingRuntime {
  tracing: Tracing;
  /** Exports what is queued now (tests, shutdown). */
  flush(): Promise<void>;
  shutdown(): Promise<void>;
}

/**
 * The SDK behind a binary's {@link Tracing}: ParentBased(TraceIdRatioBased(sampleRatio)) sampling,
 * and {@link EncodingSpanProcessor} (encode at the end, batch, bounded) in front of `setup.sink`. No global
 * provider or context manager is registered: Burrow passes parents explicitly.
 */
export function startTracing(setup: TracingSetup): TracingRuntime {
  const provider = new BasicTracerProvider({
    sampler: new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(setup.sampleRatio) }),
    resource: resourceFromAttributes({
      [ATTR_SERVICE_NAME]: setup.serviceName,
      [ATTR_SERVICE_VERSION]: setup.serviceVersion,
      ...setup.resource,
    }),
    spanProcessors: [
      new EncodingSpanProcessor(setup.sink, setup.serviceName, {
        maxRequestBytes: setup.maxRequestBytes ?? Number.POSITIVE_INFINITY,
        maxQueuedBytes: setup.maxQueuedBytes ?? DEFAULT_MAX_QUEUED_SPAN_BYTES,
        exportIntervalMs: setup.exportIntervalMs ?? DEFAULT_TRACE_EXPORT_INTERVAL_MS,
      }),
    ],
  });
  const tracing: Tracing = {
    enabled: !setup.startDisabled,
    tracer: provider.getTracer(setup.serviceName, setup.serviceVersion),
    includeContext: setup.includeContext,
  };
  return {
    tracing,
    flush: () => provider.forceFlush(),
    shutdown: () => provider.shutdown(),
  };
}
