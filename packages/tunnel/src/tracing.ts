import {
  type Attributes,
  type Context,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  TraceFlags,
  type Tracer,
  createTraceState,
  trace,
} from '@opentelemetry/api';
import { status as Status } from '@grpc/grpc-js';
import { statusName } from './errors';

/**
 * Spans of Burrow's calls with `@opentelemetry/api` (the SDK is wired by tracing-sdk.ts, in the
 * binaries only). Every function here is cheap to skip: the per-call code checks
 * {@link Tracing.enabled} first and does no tracing work at all when it is false.
 *
 * Context travels explicitly (a parent span passed along with the call), not through a global
 * context manager: an AsyncLocalStorage context manager would cost every async step of every call.
 */

/** W3C trace context header; each hop replaces it with its own span's context when tracing is on. */
export const TRACEPARENT_KEY = 'traceparent';
export const TRACESTATE_KEY = 'tracestate';

/**
 * Every span of this process starts and ends on one clock, given explicitly: the SDK's own start
 * time is Date.now() (whole milliseconds) shifted by a per-span offset, so a child started within
 * the same millisecond as its parent could seem to start before it or end after it.
 * `perfNow`: a performance.now() value (default now).
 */
function epochMs(perfNow = performance.now()): number {
  return performance.timeOrigin + perfNow;
}

/** Ends a span now, or at `at` (a performance.now() value), on the clock of {@link epochMs}. */
export function endSpan(span: Span, at?: number): void {
  span.end(epochMs(at));
}

/** Attribute keys Burrow sets on its spans besides the RPC semantic conventions. */
export const BURROW_ATTRIBUTES = {
  agentId: 'burrow.agent_id',
  callId: 'burrow.call_id',
  brokerId: 'burrow.broker_id',
  decision: 'burrow.decision',
  decisionId: 'burrow.decision_id',
  policies: 'burrow.policies',
  context: 'burrow.request.context',
} as const;

/** A side's tracing: `enabled` false means every span call is skipped by its caller. */
export interface Tracing {
  /** Read on the per-call path before any span work; the agent turns it on when a broker takes telemetry. */
  enabled: boolean;
  readonly tracer: Tracer;
  /** The agent's `--trace-include-context`: request context values may go into policy spans. */
  readonly includeContext?: boolean;
}

/** Where an engine's own spans go: under a call's span, with its side's tracer. */
export interface TraceParent {
  tracing: Tracing;
  span: Span;
}

/** Tracing off: the API's no-op tracer, never called because `enabled` is false. */
export const TRACING_OFF: Tracing = { enabled: false, tracer: trace.getTracer('burrow') };

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

/**
 * The context a call's first span continues: the remote parent named by `traceparent` (a header
 * value, or the first of several), with its `tracestate`; the root context when there is none or it
 * is malformed (W3C: a bad traceparent starts a new trace).
 */
export function remoteParent(traceparent: unknown, tracestate?: unknown): Context {
  const value = Array.isArray(traceparent) ? traceparent[0] : traceparent;
  if (typeof value !== 'string') return ROOT_CONTEXT;
  const m = TRACEPARENT.exec(value.trim());
  if (!m || m[1] === 'ff' || /^0+$/.test(m[2]!) || /^0+$/.test(m[3]!)) return ROOT_CONTEXT;
  const state = Array.isArray(tracestate) ? tracestate.join(',') : tracestate;
  return trace.setSpanContext(ROOT_CONTEXT, {
    traceId: m[2]!,
    spanId: m[3]!,
    traceFlags: Number.parseInt(m[4]!, 16) & 1,
    isRemote: true,
    traceState: typeof state === 'string' && state !== '' ? createTraceState(state) : undefined,
  });
}

/** The `traceparent` value naming `span` as the parent of the next hop's span. */
export function traceparentOf(span: Span): string {
  const c = span.spanContext();
  return `00-${c.traceId}-${c.spanId}-0${c.traceFlags & 1}`;
}

/** Most characters of a method path a span name or attribute takes (it comes from a caller). */
const METHOD_MAX_CHARS = 256;

/**
 * Starts the span of one gRPC call (`rpc.service/rpc.method` as its name, the RPC semantic
 * conventions as attributes) under `parent` (a span of this process or a remote parent context).
 */
export function startRpcSpan(
  tracing: Tracing,
  kind: SpanKind,
  method: string,
  parent: Context | Span,
  attributes?: Attributes,
): Span {
  const path = method.length > METHOD_MAX_CHARS ? method.slice(0, METHOD_MAX_CHARS) : method;
  const slash = path.lastIndexOf('/');
  const service = path.slice(path.startsWith('/') ? 1 : 0, Math.max(slash, 0));
  const name = slash >= 0 ? path.slice(slash + 1) : path;
  const ctx = 'spanContext' in parent ? trace.setSpan(ROOT_CONTEXT, parent) : parent;
  // Given at the start, in one object: the SDK checks a span's attributes once instead of per call.
  const all: Attributes = { 'rpc.system': 'grpc', 'rpc.service': service, 'rpc.method': name, ...attributes };
  return tracing.tracer.startSpan(`${service}/${name}`, { kind, startTime: epochMs(), attributes: all }, ctx);
}

/** Starts a span of this process under `parent` (INTERNAL unless `kind` says otherwise). */
export function startChildSpan(
  tracing: Tracing,
  name: string,
  parent: Span,
  kind: SpanKind = SpanKind.INTERNAL,
  attributes?: Attributes,
): Span {
  return tracing.tracer.startSpan(
    name,
    { kind, attributes, startTime: epochMs() },
    trace.setSpan(ROOT_CONTEXT, parent),
  );
}

/**
 * Ends an RPC span with the call's gRPC status (an error status for anything but OK), at `endTime`
 * (a performance.now() value: a relayed call's `settledAt`, see call-outcome.ts) or now.
 */
export function endRpcSpan(span: Span, code: number, details?: string, endTime?: number): void {
  span.setAttribute('rpc.grpc.status_code', code);
  if (code !== Status.OK) span.setStatus({ code: SpanStatusCode.ERROR, message: `${statusName(code)}: ${details}` });
  endSpan(span, endTime);
}

/** `trace_id` and `span_id` of a call's log line (a search for the trace id finds the trace). */
export function traceLogFields(span: Span | undefined): { trace_id: string; span_id: string } | undefined {
  // The sampled flag, not isRecording(): a span already ended records no more, yet was traced.
  const c = span?.spanContext();
  if (!c || (c.traceFlags & TraceFlags.SAMPLED) === 0) return undefined;
  return { trace_id: c.traceId, span_id: c.spanId };
}

export { ROOT_CONTEXT, SpanKind, type Span };
