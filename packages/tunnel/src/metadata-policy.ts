/**
 * Which metadata crosses the tunnel. This is an explicit denylist of hop keys, applied by both
 * sides, so that a caller's broker credential never reaches a site and nothing a caller sends can
 * pose as routing or identity data that Burrow sets itself. The proto's `MetadataEntry` comment
 * documents the same rules for implementers.
 *
 * Keys are compared after ASCII lowercasing, and a key that is not a legal gRPC metadata name
 * even then is dropped: grpc-js and HTTP/2 lowercase names on the far side, so a check on the
 * spelling a peer sent (`Burrow-Agent-Id`) would let the key through and it would arrive as the
 * very key the check was meant to stop.
 */

/** Routing and identity keys are all in this namespace; Burrow sets them, callers cannot. */
export const BURROW_PREFIX = 'burrow-';
/** The metadata key a caller uses to name the agent. */
export const AGENT_ID_KEY = 'burrow-agent-id';
/** The metadata key the broker sets on site -> platform calls: the calling agent's verified id. */
export const CALLING_AGENT_KEY = 'burrow-agent-id';
/** The metadata key the agent sets on platform -> site calls to upstreams: the caller's verified SPIFFE id. */
export const CALLER_ID_KEY = 'burrow-caller-id';

const REQUEST_HOP_KEYS = new Set([
  'authorization',
  'user-agent',
  'host',
  'te',
  'content-type',
  'connection',
  'keep-alive',
  'transfer-encoding',
  'upgrade',
]);
const RESPONSE_HOP_KEYS = new Set(['content-type', 'te', 'connection', 'transfer-encoding']);
const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

/**
 * A legal gRPC metadata key before lowercasing: ASCII letters, digits, `_`, `-`, `.`. Checked on
 * the spelling received, so that no non-ASCII letter can lowercase into an ASCII one (U+212A, the
 * Kelvin sign, lowercases to `k`) and pass as a key it was not.
 */
const LEGAL_KEY = /^[0-9A-Za-z_.-]+$/;

/**
 * The key as it crosses: lowercased, or undefined when it is not a legal metadata key (pseudo
 * headers such as `:authority`, spaces, non-ASCII), which is then dropped.
 */
export function normalizeMetadataKey(key: string): string | undefined {
  return LEGAL_KEY.test(key) ? key.toLowerCase() : undefined;
}

function crossesAsRequest(key: string): boolean {
  return !(
    key.startsWith(BURROW_PREFIX) ||
    key.startsWith('grpc-') ||
    key.startsWith('proxy-') ||
    key.startsWith(':') ||
    REQUEST_HOP_KEYS.has(key)
  );
}

function crossesAsResponse(key: string): boolean {
  if (key === STATUS_DETAILS_KEY) return true;
  return !(
    key.startsWith(BURROW_PREFIX) ||
    key.startsWith('grpc-') ||
    key.startsWith(':') ||
    RESPONSE_HOP_KEYS.has(key)
  );
}

/**
 * Transport headers the raw data plane passes on unchanged besides the metadata: messages cross
 * without being re-encoded, so their compression must stay named (`grpc-encoding`) and the encodings
 * a side accepts must reach the far side (`grpc-accept-encoding`).
 */
const PASSED_TRANSPORT_KEYS = new Set(['grpc-encoding', 'grpc-accept-encoding']);

/** Headers as they travel on one hop: values of a repeated key in order. */
export type HeaderBlock = Record<string, string | string[]>;

function addHeader(out: HeaderBlock, key: string, value: string): void {
  const had = out[key];
  if (had === undefined) out[key] = value;
  else if (Array.isArray(had)) had.push(value);
  else out[key] = [had, value];
}

/**
 * The request metadata of a call arriving in `rawHeaders` (Node's flat `[key, value, ...]` list,
 * which keeps repeated keys apart), as it goes on to the next hop: hop keys removed, keys
 * lowercased, illegal keys dropped (the request rules above), plus the
 * compression headers. `owned` is set last, replacing anything of the same key.
 */
export function forwardedRequestMetadata(rawHeaders: readonly string[], owned?: Record<string, string>): HeaderBlock {
  const out: HeaderBlock = {};
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const key = normalizeMetadataKey(rawHeaders[i]!);
    if (key === undefined) continue;
    if (crossesAsRequest(key) || PASSED_TRANSPORT_KEYS.has(key)) addHeader(out, key, rawHeaders[i + 1]!);
  }
  if (owned) for (const [key, value] of Object.entries(owned)) out[key] = value;
  return out;
}

/**
 * Response headers or trailers (`rawHeaders`) as they go back towards the caller: the response
 * rules of {@link responseMetadataToWire}, plus the compression headers, plus `grpc-status` and
 * `grpc-message` when `withStatus` (trailers, trailers-only responses).
 */
export function forwardedResponseMetadata(rawHeaders: readonly string[], withStatus: boolean): HeaderBlock {
  const out: HeaderBlock = {};
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const key = normalizeMetadataKey(rawHeaders[i]!);
    if (key === undefined) continue;
    const passes =
      crossesAsResponse(key) ||
      PASSED_TRANSPORT_KEYS.has(key) ||
      (withStatus && (key === 'grpc-status' || key === 'grpc-message'));
    if (passes && key !== 'date') addHeader(out, key, rawHeaders[i + 1]!);
  }
  return out;
}
