import { Metadata, status as Status } from '@grpc/grpc-js';

/**
 * The one error type of Burrow: a gRPC status code, a message for the peer, and the cause that
 * produced it (kept for logs, never sent). Everything that fails a call or a tunnel is turned into
 * one of these by {@link toBurrowError} before it is reported.
 */
export class BurrowError extends Error {
  override readonly name = 'BurrowError';
  constructor(
    readonly code: Status,
    message: string,
    override readonly cause?: unknown,
    readonly metadata?: Metadata,
  ) {
    super(message);
  }

  /** The shape grpc-js expects when a server handler fails a call. */
  toServiceError(): { code: Status; details: string; metadata: Metadata } {
    return { code: this.code, details: this.message, metadata: this.metadata ?? new Metadata() };
  }
}

/**
 * A peer broke the tunnel protocol (proto/burrow/tunnel/v1/tunnel.proto, "Errors"). The side that
 * detects it closes the whole session, not just the call.
 */
export class ProtocolError extends BurrowError {
  constructor(message: string, cause?: unknown) {
    super(Status.INTERNAL, `tunnel protocol error: ${message}`, cause);
  }
}

// Node errno codes that mean "the other side is not there (any more)"; all map to UNAVAILABLE so
// that callers retry, as gRPC itself does for connection failures.
const UNAVAILABLE_ERRNOS = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ERR_HTTP2_STREAM_CANCEL',
  'ERR_HTTP2_GOAWAY_SESSION',
  'ERR_HTTP2_SESSION_ERROR',
  'ERR_HTTP2_INVALID_SESSION',
  'ERR_STREAM_PREMATURE_CLOSE',
  'ERR_STREAM_DESTROYED',
]);

/** Maps a Node errno / error code to the gRPC status it means for a forwarded call. */
export function errnoToStatus(errno: string | undefined): Status {
  if (errno === undefined) return Status.UNKNOWN;
  if (UNAVAILABLE_ERRNOS.has(errno)) return Status.UNAVAILABLE;
  if (errno === 'ERR_OUT_OF_RANGE' || errno === 'ERR_BUFFER_TOO_LARGE') return Status.RESOURCE_EXHAUSTED;
  return Status.UNKNOWN;
}

/** Turns anything thrown or emitted into a {@link BurrowError}, keeping the original as `cause`. */
export function toBurrowError(err: unknown, fallbackMessage = 'internal error'): BurrowError {
  if (err instanceof BurrowError) return err;
  if (err && typeof err === 'object') {
    const e = err as { code?: unknown; details?: unknown; message?: unknown; metadata?: unknown };
    if (typeof e.code === 'number' && Number.isInteger(e.code) && e.code >= 0 && e.code <= 16) {
      const details = typeof e.details === 'string' ? e.details : String(e.message ?? fallbackMessage);
      return new BurrowError(e.code, details, err, e.metadata instanceof Metadata ? e.metadata : undefined);
    }
    if (typeof e.code === 'string') {
      return new BurrowError(errnoToStatus(e.code), `${fallbackMessage}: ${String(e.message ?? e.code)}`, err);
    }
    if (typeof e.message === 'string') return new BurrowError(Status.UNKNOWN, `${fallbackMessage}: ${e.message}`, err);
  }
  return new BurrowError(Status.UNKNOWN, fallbackMessage, err);
}

/** The canonical name of a status code, e.g. `UNAVAILABLE`, for logs and metric labels. */
export function statusName(code: number): string {
  return (Status as unknown as Record<number, string>)[code] ?? `CODE_${code}`;
}
