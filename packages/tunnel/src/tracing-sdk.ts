import type { Attributes } from '@opentelemetry/api';
import { ExportResultCode, type ExportResult } from '@opentelemetry/core';
import { resourceFromAttributes } from '@opentelemetry/resources';
import {
  BasicTracerProvider,
  BatchSpanProcessor,
  ParentBasedSampler,
  type ReadableSpan,
  type SpanExporter,
  TraceIdRatioBasedSampler,
} from '@opentelemetry/sdk-trace-base';
import { ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION } from '@opentelemetry/semantic-conventions';
import { encodeExportRequests, type OtlpChunk } from './otlp';
import type { Tracing } from './tracing';

/** Where finished spans go, already encoded as OTLP export requests. */
export interface SpanSink {
  /** Takes one encoded request; must not block (it queues, sends later or drops and counts). */
  accept(chunk: OtlpChunk): void;
  /** Spans dropped before they reached the sink (one too large to encode within `maxRequestBytes`). */
  dropped?(spans: number, reason: string): void;
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
  /** Finished spans held before export at most; more are dropped by the SDK (bounded memory). */
  maxQueuedSpans?: number;
  /** How often queued spans are exported. */
  exportIntervalMs?: number;
  /** `--trace-include-context` (agent). */
  includeContext?: boolean;
  /** Starts with `enabled` false (the agent: until a broker takes its telemetry). */
  startDisabled?: boolean;
}

/** Default `maxQueuedSpans`: about 2 MiB of spans at most while the exporter is behind. */
export const DEFAULT_MAX_QUEUED_SPANS = 4096;
/** Default export interval. */
export const DEFAULT_TRACE_EXPORT_INTERVAL_MS = 1000;

/** Encodes the SDK's batches to OTLP with the converter (otlp.ts) and hands them to the sink. */
class EncodingExporter implements SpanExporter {
  constructor(
    private readonly sink: SpanSink,
    private readonly scopeName: string,
    private readonly maxRequestBytes: number,
  ) {}

  export(spans: ReadableSpan[], done: (result: ExportResult) => void): void {
    try {
      const resource = spans[0]?.resource.attributes ?? {};
      const { chunks, oversized } = encodeExportRequests(spans, resource, this.scopeName, this.maxRequestBytes);
      for (const chunk of chunks) this.sink.accept(chunk);
      if (oversized > 0) this.sink.dropped?.(oversized, 'too_large');
      done({ code: ExportResultCode.SUCCESS });
    } catch (error) {
      done({ code: ExportResultCode.FAILED, error: error as Error });
    }
  }

  shutdown(): Promise<void> {
    return Promise.resolve();
  }
}

/** A running tracer: {@link Tracing} for the code that makes spans, plus its flush and shutdown. */
export interface TracingRuntime {
  tracing: Tracing;
  /** Exports what is queued now (tests, shutdown). */
  flush(): Promise<void>;
  shutdown(): Promise<void>;
}

/**
 * The SDK behind a binary's {@link Tracing}: ParentBased(TraceIdRatioBased(sampleRatio)) sampling,
 * a batch processor with a bounded queue, and the OTLP encoder in front of `setup.sink`. No global
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
      new BatchSpanProcessor(
        new EncodingExporter(setup.sink, setup.serviceName, setup.maxRequestBytes ?? Number.POSITIVE_INFINITY),
        {
          maxQueueSize: setup.maxQueuedSpans ?? DEFAULT_MAX_QUEUED_SPANS,
          maxExportBatchSize: 512,
          scheduledDelayMillis: setup.exportIntervalMs ?? DEFAULT_TRACE_EXPORT_INTERVAL_MS,
        },
      ),
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
