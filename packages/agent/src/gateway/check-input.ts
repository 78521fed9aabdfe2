import { status as Status } from '@grpc/grpc-js';
import { BurrowError, type JsonObject } from '@burrow/tunnel';

/** Bounds of a Check request (proto/burrow/policy/v1/policy.proto, docs/gateways.md). */
export const CHECK_LIMITS = {
  /** The encoded request, checked before decoding. */
  maxMessageBytes: 128 * 1024,
  /** Names and values of `headers` and `context_extensions`, together. */
  maxHeaderBytes: 64 * 1024,
  /** `path`, query included. */
  maxPathBytes: 8 * 1024,
} as const;

/** A Check request with its fields typed and bounded. */
export interface CheckInput {
  method: string;
  /** As sent: path and query, not decoded. */
  target: string;
  host: string;
  scheme: string;
  headers: Readonly<Record<string, string>>;
  token: string;
  sourcePrincipal: string;
  requestId: string;
  extensions: Readonly<Record<string, string>>;
  sourceAddress: string;
}

const METHOD = /^[A-Z][A-Z0-9_-]*$/;

function invalid(message: string): BurrowError {
  return new BurrowError(Status.INVALID_ARGUMENT, `check request: ${message}`);
}

function stringMap(v: unknown): Record<string, string> {
  return typeof v === 'object' && v !== null ? (v as Record<string, string>) : {};
}

/**
 * Header names as the contract has them, lower case; a caller that sent others gets them lowered
 * (values of names that meet joined with ","). Copies only when a name needs it.
 */
function lowerCaseNames(m: Record<string, string>): Record<string, string> {
  let upper = false;
  for (const k in m) if (k !== k.toLowerCase()) upper = true;
  if (!upper) return m;
  const out: Record<string, string> = {};
  for (const k in m) {
    const name = k.toLowerCase();
    out[name] = name in out ? `${out[name]},${m[k]}` : m[k]!;
  }
  return out;
}

function mapBytes(m: Record<string, string>): number {
  let n = 0;
  for (const k in m) n += Buffer.byteLength(k) + Buffer.byteLength(m[k]!);
  return n;
}

/**
 * Types a decoded CheckRequest and applies its bounds: INVALID_ARGUMENT without method or path, for
 * a method that is not an HTTP token, a path not starting with "/", or over {@link CHECK_LIMITS}.
 */
export function checkInputOf(req: JsonObject): CheckInput {
  const s = (k: string): string => (typeof req[k] === 'string' ? (req[k] as string) : '');
  const method = s('method').toUpperCase();
  const target = s('path');
  if (!method) throw invalid('method is required');
  if (!METHOD.test(method)) throw invalid(`method ${JSON.stringify(method)} is not an HTTP method`);
  if (!target) throw invalid('path is required');
  if (Buffer.byteLength(target) > CHECK_LIMITS.maxPathBytes)
    throw invalid(`path is ${Buffer.byteLength(target)} bytes; at most ${CHECK_LIMITS.maxPathBytes} bytes`);
  if (!target.startsWith('/')) throw invalid(`path ${JSON.stringify(target.slice(0, 64))} does not start with "/"`);
  const headers = lowerCaseNames(stringMap(req.headers));
  const extensions = stringMap(req.context_extensions);
  const headerBytes = mapBytes(headers) + mapBytes(extensions);
  if (headerBytes > CHECK_LIMITS.maxHeaderBytes)
    throw invalid(
      `headers and context extensions are ${headerBytes} bytes; at most ${CHECK_LIMITS.maxHeaderBytes} bytes`,
    );
  return {
    method,
    target,
    host: s('host'),
    scheme: s('scheme'),
    headers,
    token: s('token'),
    sourcePrincipal: s('source_principal'),
    requestId: s('request_id'),
    extensions,
    sourceAddress: s('source_address'),
  };
}

/** The request target split and decoded, or why it cannot be judged. */
export type ParsedTarget =
  | { ok: true; segments: string[]; path: string; query: string }
  | { ok: false; reason: string };

/**
 * Splits the target at "?" and the path at "/", then percent-decodes each segment (so an encoded
 * "/" stays inside its segment). A target that is not valid percent-encoding or that has "." or
 * ".." segments (raw or decoded) is not judged: the gateway should have normalized it, and a
 * policy about "/admin" must not be passed by "/public/../admin".
 */
export function parseTarget(target: string): ParsedTarget {
  const q = target.indexOf('?');
  const rawPath = q < 0 ? target : target.slice(0, q);
  const query = q < 0 ? '' : target.slice(q + 1);
  const segments = rawPath.slice(1).split('/');
  for (let i = 0; i < segments.length; i++) {
    let decoded: string;
    try {
      decoded = decodeURIComponent(segments[i]!);
    } catch {
      return { ok: false, reason: `path ${JSON.stringify(rawPath.slice(0, 256))} is not valid percent-encoding` };
    }
    if (decoded === '.' || decoded === '..')
      return { ok: false, reason: `path ${JSON.stringify(rawPath.slice(0, 256))} has "." or ".." segments` };
    segments[i] = decoded;
  }
  return { ok: true, segments, path: `/${segments.join('/')}`, query };
}
