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
let types: { request: protobuf.Type; resource: protobuf.Type; scope: protobuf.Type } | undefined;
function otlpTypes() {
  if (!types) {
    const r = otlpRoot();
    types = {
      request: r.lookupType('opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest'),
      resource: r.lookupType('opentelemetry.proto.resource.v1.Resource'),
      scope: r.lookupType('opentelemetry.proto.common.v1.InstrumentationScope'),
    };
  }
  return types;
}

/** An OTLP `KeyValue` as protobufjs objects carry it (resources, decoded requests). */
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

// Wire types and tags of the OTLP fields written by hand below (field numbers: trace.proto, common.proto).
const VARINT = 0;
const FIXED64 = 1;
const LENGTH_DELIMITED = 2;
const FIXED32 = 5;
const tagOf = (field: number, wire = LENGTH_DELIMITED): number => (field << 3) | wire;

/**
 * Writes a fixed64 of nanoseconds since the epoch: exact (a double holds them only to ~256 ns),
 * from the two 32-bit halves, without the decimal string a Long would be parsed from.
 */
function writeUnixNanos(w: protobuf.Writer, field: number, time: HrTime): void {
  const ns = BigInt(time[0]) * 1_000_000_000n + BigInt(time[1]);
  w.uint32(tagOf(field, FIXED64)).fixed64({ low: Number(ns & 0xffffffffn), high: Number(ns >> 32n) } as never);
}

/** An `AnyValue` message (common.proto) of one attribute value, written in place. */
function writeAnyValue(w: protobuf.Writer, value: AttributeValue): void {
  if (typeof value === 'string') w.uint32(tagOf(1)).string(value);
  else if (typeof value === 'boolean') w.uint32(tagOf(2, VARINT)).bool(value);
  else if (typeof value === 'number') {
    if (Number.isSafeInteger(value)) w.uint32(tagOf(3, VARINT)).int64(value);
    else w.uint32(tagOf(4, FIXED64)).double(value);
  } else {
    w.uint32(tagOf(5)).fork();
    for (const v of value) {
      if (v === null || v === undefined) continue;
      w.uint32(tagOf(1)).fork();
      writeAnyValue(w, v);
      w.ldelim();
    }
    w.ldelim();
  }
}

/** `KeyValue`s (common.proto) as repeated field `field`; undefined values left out. */
function writeAttributes(w: protobuf.Writer, field: number, attributes: Attributes): void {
  for (const key in attributes) {
    const value = attributes[key];
    if (value === undefined) continue;
    w.uint32(tagOf(field)).fork();
    w.uint32(tagOf(1)).string(key);
    w.uint32(tagOf(2)).fork();
    writeAnyValue(w, value);
    w.ldelim().ldelim();
  }
}

// api SpanKind counts from INTERNAL = 0; OTLP from UNSPECIFIED = 0, INTERNAL = 1.
const OTLP_KIND: Record<SpanKind, number> = {
  [SpanKind.INTERNAL]: 1,
  [SpanKind.SERVER]: 2,
  [SpanKind.CLIENT]: 3,
  [SpanKind.PRODUCER]: 4,
  [SpanKind.CONSUMER]: 5,
};

/**
 * One finished SDK span as an encoded OTLP `Span` message, written field by field (no message
 * objects in between: this runs once per span, on the per-call path's heels).
 */
export function encodeSpan(span: ReadableSpan): Uint8Array {
  const ctx = span.spanContext();
  const w = protobuf.Writer.create();
  w.uint32(tagOf(1)).bytes(Buffer.from(ctx.traceId, 'hex'));
  w.uint32(tagOf(2)).bytes(Buffer.from(ctx.spanId, 'hex'));
  const traceState = ctx.traceState?.serialize();
  if (traceState) w.uint32(tagOf(3)).string(traceState);
  const parent = span.parentSpanContext?.spanId;
  if (parent) w.uint32(tagOf(4)).bytes(Buffer.from(parent, 'hex'));
  w.uint32(tagOf(5)).string(span.name);
  w.uint32(tagOf(6, VARINT)).uint32(OTLP_KIND[span.kind]);
  writeUnixNanos(w, 7, span.startTime);
  writeUnixNanos(w, 8, span.endTime);
  writeAttributes(w, 9, span.attributes);
  if (span.droppedAttributesCount) w.uint32(tagOf(10, VARINT)).uint32(span.droppedAttributesCount);
  for (const e of span.events) {
    w.uint32(tagOf(11)).fork();
    writeUnixNanos(w, 1, e.time);
    w.uint32(tagOf(2)).string(e.name);
    if (e.attributes) writeAttributes(w, 3, e.attributes);
    w.ldelim();
  }
  if (span.status.code !== 0) {
    w.uint32(tagOf(15)).fork();
    if (span.status.message) w.uint32(tagOf(2)).string(span.status.message);
    w.uint32(tagOf(3, VARINT)).uint32(span.status.code);
    w.ldelim();
  }
  w.uint32(tagOf(16, FIXED32)).fixed32(ctx.traceFlags);
  return w.finish();
}

/** Bytes an `ExportTraceServiceRequest` adds around its spans besides the resource and scope. */
const ENVELOPE_BYTES = 3 * 6;

/** One export request's bytes and how many spans it holds. */
export interface OtlpChunk {
  bytes: Buffer;
  spans: number;
}

/** The parts every request of one process shares: its resource and scope, encoded once. */
export interface OtlpEnvelope {
  resource: Uint8Array;
  scope: Uint8Array;
}

/** The envelope of a process's requests: `resource` attributes and the instrumentation scope's name. */
export function otlpEnvelope(resource: Attributes, scopeName: string): OtlpEnvelope {
  const t = otlpTypes();
  return {
    resource: t.resource.encode({ attributes: keyValues(resource) }).finish(),
    scope: t.scope.encode({ name: scopeName }).finish(),
  };
}

/** True when one span of `spanBytes` encoded bytes fits a request of at most `maxBytes` alone. */
export function spanFits(envelope: OtlpEnvelope, spanBytes: number, maxBytes: number): boolean {
  return envelope.resource.length + envelope.scope.length + ENVELOPE_BYTES + spanBytes + 6 <= maxBytes;
}

/**
 * Encoded spans as `ExportTraceServiceRequest`s of at most `maxBytes` each (one resource and one
 * scope per request, the envelope written around the encoded spans). Every span must fit alone
 * ({@link spanFits}).
 */
export function assembleRequests(envelope: OtlpEnvelope, spans: readonly Uint8Array[], maxBytes: number): OtlpChunk[] {
  const fixed = envelope.resource.length + envelope.scope.length + ENVELOPE_BYTES;
  const chunks: OtlpChunk[] = [];
  let batch: Uint8Array[] = [];
  let batchBytes = fixed;
  for (const encoded of spans) {
    const cost = encoded.length + 6;
    if (batch.length > 0 && batchBytes + cost > maxBytes) {
      chunks.push(assemble(envelope, batch));
      batch = [];
      batchBytes = fixed;
    }
    batch.push(encoded);
    batchBytes += cost;
  }
  if (batch.length > 0) chunks.push(assemble(envelope, batch));
  return chunks;
}

/** `ExportTraceServiceRequest{resource_spans: [{resource, scope_spans: [{scope, spans}]}]}`, by hand. */
function assemble(envelope: OtlpEnvelope, spans: Uint8Array[]): OtlpChunk {
  const w = protobuf.Writer.create();
  w.uint32(tagOf(1)).fork();
  w.uint32(tagOf(1)).bytes(envelope.resource);
  w.uint32(tagOf(2)).fork();
  w.uint32(tagOf(1)).bytes(envelope.scope);
  for (const s of spans) w.uint32(tagOf(2)).bytes(s);
  w.ldelim().ldelim();
  const bytes = w.finish();
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
