import { type Attributes, type AttributeValue, type HrTime, SpanKind } from '@opentelemetry/api';
import type { ReadableSpan } from '@opentelemetry/sdk-trace-base';
import * as protobuf from 'protobufjs';
import { loadProto } from './frames';

/**
 * OTLP trace export, protobuf encoding (proto/opentelemetry, vendored): the one converter from SDK
 * spans to `ExportTraceServiceRequest` bytes, the broker's re-stamping of an agent's batch, and the
 * decoder tests use. Written here rather than taken from the SDK's otlp-transformer, whose encoders
 * are internal API.
 */

/** Resource attribute naming the agent a batch came from; the broker sets it (see {@link restampResource}). */
export const AGENT_ID_ATTRIBUTE = 'burrow.agent_id';

let root: protobuf.Root | undefined;
function otlpRoot(): protobuf.Root {
  root ??= loadProto('opentelemetry/proto/collector/trace/v1/trace_service.proto');
  return root;
}
let types: { request: protobuf.Type; span: protobuf.Type; resource: protobuf.Type; scope: protobuf.Type } | undefined;
function otlpTypes() {
  if (!types) {
    const r = otlpRoot();
    types = {
      request: r.lookupType('opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest'),
      span: r.lookupType('opentelemetry.proto.trace.v1.Span'),
      resource: r.lookupType('opentelemetry.proto.resource.v1.Resource'),
      scope: r.lookupType('opentelemetry.proto.common.v1.InstrumentationScope'),
    };
  }
  return types;
}

/** An OTLP `KeyValue` as protobufjs objects carry it. */
interface KeyValue {
  key: string;
  value: Record<string, unknown>;
}

function anyValue(value: AttributeValue): Record<string, unknown> {
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (typeof value === 'number') return Number.isInteger(value) ? { intValue: value } : { doubleValue: value };
  return { arrayValue: { values: value.filter((v) => v !== null && v !== undefined).map((v) => anyValue(v!)) } };
}

/** Attributes as OTLP `KeyValue`s (undefined values left out). */
export function keyValues(attributes: Attributes): KeyValue[] {
  const out: KeyValue[] = [];
  for (const key of Object.keys(attributes)) {
    const value = attributes[key];
    if (value !== undefined) out.push({ key, value: anyValue(value) });
  }
  return out;
}

/**
 * Nanoseconds since the epoch as the two 32-bit halves protobufjs writes a fixed64 from: exact (a
 * double holds them only to ~256 ns), and without the decimal string a Long would be parsed from.
 */
function unixNanos(time: HrTime): { low: number; high: number } {
  const ns = BigInt(time[0]) * 1_000_000_000n + BigInt(time[1]);
  return { low: Number(ns & 0xffffffffn), high: Number(ns >> 32n) };
}

// api SpanKind counts from INTERNAL = 0; OTLP from UNSPECIFIED = 0, INTERNAL = 1.
const OTLP_KIND: Record<SpanKind, number> = {
  [SpanKind.INTERNAL]: 1,
  [SpanKind.SERVER]: 2,
  [SpanKind.CLIENT]: 3,
  [SpanKind.PRODUCER]: 4,
  [SpanKind.CONSUMER]: 5,
};

/** One finished SDK span as an encoded OTLP `Span` message. */
export function encodeSpan(span: ReadableSpan): Uint8Array {
  const ctx = span.spanContext();
  const parent = span.parentSpanContext?.spanId;
  const message: Record<string, unknown> = {
    traceId: Buffer.from(ctx.traceId, 'hex'),
    spanId: Buffer.from(ctx.spanId, 'hex'),
    flags: ctx.traceFlags,
    name: span.name,
    kind: OTLP_KIND[span.kind],
    startTimeUnixNano: unixNanos(span.startTime),
    endTimeUnixNano: unixNanos(span.endTime),
    attributes: keyValues(span.attributes),
    droppedAttributesCount: span.droppedAttributesCount,
    status: { code: span.status.code, message: span.status.message ?? '' },
  };
  if (parent) message.parentSpanId = Buffer.from(parent, 'hex');
  const traceState = ctx.traceState?.serialize();
  if (traceState) message.traceState = traceState;
  if (span.events.length > 0)
    message.events = span.events.map((e) => ({
      timeUnixNano: unixNanos(e.time),
      name: e.name,
      attributes: keyValues(e.attributes ?? {}),
    }));
  return otlpTypes().span.encode(message).finish();
}

/** Bytes an `ExportTraceServiceRequest` adds around its spans besides the resource and scope. */
const ENVELOPE_BYTES = 3 * 6;

/** One export request's bytes and how many spans it holds. */
export interface OtlpChunk {
  bytes: Buffer;
  spans: number;
}

/**
 * Spans as `ExportTraceServiceRequest`s of at most `maxBytes` each (one resource and one scope
 * per request, each span encoded once and the envelope written around the encoded spans). A span
 * that alone would not fit is left out and counted in `oversized`.
 */
export function encodeExportRequests(
  spans: readonly ReadableSpan[],
  resource: Attributes,
  scopeName: string,
  maxBytes = Number.POSITIVE_INFINITY,
): { chunks: OtlpChunk[]; oversized: number } {
  const t = otlpTypes();
  const resourceBytes = t.resource.encode({ attributes: keyValues(resource) }).finish();
  const scopeBytes = t.scope.encode({ name: scopeName }).finish();
  const fixed = resourceBytes.length + scopeBytes.length + ENVELOPE_BYTES;
  const chunks: OtlpChunk[] = [];
  let oversized = 0;
  let batch: Uint8Array[] = [];
  let batchBytes = fixed;
  for (const span of spans) {
    const encoded = encodeSpan(span);
    const cost = encoded.length + 6;
    if (fixed + cost > maxBytes) {
      oversized++;
      continue;
    }
    if (batchBytes + cost > maxBytes) {
      chunks.push(assemble(resourceBytes, scopeBytes, batch));
      batch = [];
      batchBytes = fixed;
    }
    batch.push(encoded);
    batchBytes += cost;
  }
  if (batch.length > 0) chunks.push(assemble(resourceBytes, scopeBytes, batch));
  return { chunks, oversized };
}

/** `ExportTraceServiceRequest{resource_spans: [{resource, scope_spans: [{scope, spans}]}]}`, by hand. */
function assemble(resource: Uint8Array, scope: Uint8Array, spans: Uint8Array[]): OtlpChunk {
  const scopeSpans = protobuf.Writer.create();
  scopeSpans.uint32((1 << 3) | 2).bytes(scope);
  for (const s of spans) scopeSpans.uint32((2 << 3) | 2).bytes(s);
  const resourceSpans = protobuf.Writer.create();
  resourceSpans.uint32((1 << 3) | 2).bytes(resource);
  resourceSpans.uint32((2 << 3) | 2).bytes(scopeSpans.finish());
  const request = protobuf.Writer.create();
  request.uint32((1 << 3) | 2).bytes(resourceSpans.finish());
  const bytes = request.finish();
  return { bytes: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), spans: spans.length };
}

/** A decoded `ExportTraceServiceRequest` (protobufjs plain object: ids as Buffers, times as strings). */
export interface ExportTraceRequest {
  resourceSpans?: {
    resource?: { attributes?: KeyValue[] };
    scopeSpans?: { scope?: { name?: string }; spans?: Record<string, unknown>[] }[];
  }[];
}

/** Decodes an OTLP trace export request; throws (protobufjs) on malformed bytes. */
export function decodeExportRequest(bytes: Uint8Array): ExportTraceRequest {
  const t = otlpTypes().request;
  return t.toObject(t.decode(bytes), { longs: String, bytes: Buffer, enums: Number }) as ExportTraceRequest;
}

const LENGTH_DELIMITED = 2;
const tagOf = (field: number): number => (field << 3) | LENGTH_DELIMITED;

/**
 * An agent's export request with every resource's `burrow.agent_id` set to `agentId` (whatever the
 * agent wrote is replaced: an agent cannot pose as another), and its span count. Only the resources
 * are decoded and re-encoded; the spans are checked to be well-formed protobuf (every field's wire
 * type and length) and copied as they are, so the broker's work per agent span stays small. Fields
 * it does not know are left out. Throws on bytes that are not such a request.
 */
export function restampResource(bytes: Uint8Array, agentId: string): { bytes: Buffer; spans: number } {
  const reader = protobuf.Reader.create(bytes);
  const out = protobuf.Writer.create();
  let spans = 0;
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    if (tag !== tagOf(1)) {
      reader.skipType(tag & 7);
      continue;
    }
    const restamped = restampResourceSpans(reader.bytes(), agentId);
    spans += restamped.spans;
    out.uint32(tag).bytes(restamped.bytes);
  }
  const encoded = out.finish();
  return { bytes: Buffer.from(encoded.buffer, encoded.byteOffset, encoded.byteLength), spans };
}

/** One `ResourceSpans`: its resource re-stamped, its `scope_spans` checked and copied. */
function restampResourceSpans(bytes: Uint8Array, agentId: string): { bytes: Uint8Array; spans: number } {
  const reader = protobuf.Reader.create(bytes);
  const copied = protobuf.Writer.create();
  let resource: { attributes?: KeyValue[] } = {};
  let spans = 0;
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    if (tag === tagOf(1)) resource = otlpTypes().resource.decode(reader.bytes()) as typeof resource;
    else if (tag === tagOf(2)) {
      const scopeSpans = reader.bytes();
      spans += checkedSpanCount(scopeSpans);
      copied.uint32(tag).bytes(scopeSpans);
    } else if (tag === tagOf(3)) copied.uint32(tag).bytes(reader.bytes());
    else reader.skipType(tag & 7);
  }
  const attributes = (resource.attributes ?? []).filter((kv) => kv.key !== AGENT_ID_ATTRIBUTE);
  attributes.push({ key: AGENT_ID_ATTRIBUTE, value: { stringValue: agentId } });
  const out = protobuf.Writer.create();
  out.uint32(tagOf(1)).bytes(
    otlpTypes()
      .resource.encode({ ...resource, attributes })
      .finish(),
  );
  const rest = copied.finish();
  return { bytes: Buffer.concat([out.finish(), rest]), spans };
}

/** The spans of one `ScopeSpans`, each walked field by field (throws on malformed protobuf). */
function checkedSpanCount(scopeSpans: Uint8Array): number {
  const reader = protobuf.Reader.create(scopeSpans);
  let spans = 0;
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    if (tag !== tagOf(2)) {
      reader.skipType(tag & 7);
      continue;
    }
    const span = protobuf.Reader.create(reader.bytes());
    while (span.pos < span.len) span.skipType(span.uint32() & 7);
    spans++;
  }
  return spans;
}
