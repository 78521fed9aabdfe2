import { Metadata } from '@grpc/grpc-js';
import type { WireMetadataEntry } from './frames';

/**
 * Which metadata crosses the tunnel. This is an explicit denylist of hop keys, applied by both
 * sides, so that a caller's broker credential never reaches a site and nothing a caller sends can
 * pose as routing or identity data that Burrow sets itself. The proto's `MetadataEntry` comment
 * documents the same rules for implementers.
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
  'authorization', 'user-agent', 'host', 'te', 'content-type', 'connection', 'keep-alive',
  'transfer-encoding', 'upgrade',
]);
const RESPONSE_HOP_KEYS = new Set(['content-type', 'te', 'connection', 'transfer-encoding']);
const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

function crossesAsRequest(key: string): boolean {
  return !(key.startsWith(BURROW_PREFIX) || key.startsWith('grpc-') || key.startsWith('proxy-') || key.startsWith(':') || REQUEST_HOP_KEYS.has(key));
}

function crossesAsResponse(key: string): boolean {
  if (key === STATUS_DETAILS_KEY) return true;
  return !(key.startsWith(BURROW_PREFIX) || key.startsWith('grpc-') || key.startsWith(':') || RESPONSE_HOP_KEYS.has(key));
}

function toWire(md: Metadata, crosses: (key: string) => boolean): WireMetadataEntry[] {
  const out: WireMetadataEntry[] = [];
  const map = md.getMap(); // only used for key order; values come from get() to keep repeats
  for (const key of Object.keys(map)) {
    if (!crosses(key)) continue;
    for (const value of md.get(key)) {
      out.push({ key, value: typeof value === 'string' ? Buffer.from(value, 'latin1') : value });
    }
  }
  return out;
}

function fromWire(entries: readonly WireMetadataEntry[], crosses: (key: string) => boolean): Metadata {
  const md = new Metadata();
  for (const { key, value } of entries) {
    // Applied on receipt too: an older or misbehaving peer must not inject hop keys either.
    if (!crosses(key)) continue;
    const buf = Buffer.from(value.buffer, value.byteOffset, value.byteLength);
    try {
      if (key.endsWith('-bin')) md.add(key, buf);
      else md.add(key, buf.toString('latin1'));
    } catch {
      // grpc-js rejects keys/values that are not legal metadata; dropping one entry is the
      // conservative choice over failing a call for a header the upstream probably ignores.
    }
  }
  return md;
}

/** Request metadata of an incoming call, as it crosses the tunnel. */
export function requestMetadataToWire(md: Metadata): WireMetadataEntry[] {
  return toWire(md, crossesAsRequest);
}
/** Request metadata received from the tunnel, for the upstream call. */
export function requestMetadataFromWire(entries: readonly WireMetadataEntry[]): Metadata {
  return fromWire(entries, crossesAsRequest);
}
/** Response headers or trailers of an upstream call, as they cross the tunnel. */
export function responseMetadataToWire(md: Metadata): WireMetadataEntry[] {
  return toWire(md, crossesAsResponse);
}
/** Response headers or trailers received from the tunnel, for the caller. */
export function responseMetadataFromWire(entries: readonly WireMetadataEntry[]): Metadata {
  return fromWire(entries, crossesAsResponse);
}
