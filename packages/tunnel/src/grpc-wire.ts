import * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError } from './errors';

const { NGHTTP2_NO_ERROR } = http2.constants;

/**
 * gRPC over HTTP/2 as the raw data plane handles it (the gRPC "PROTOCOL-HTTP2" document): the
 * 5-byte message prefix, `grpc-timeout`, the status in trailers and trailers-only responses.
 * Messages are never decoded on the forwarding path; only their length prefixes are read.
 */

/** Bytes before each gRPC message: 1 compressed flag + 4 length (big endian). */
export const MESSAGE_PREFIX_BYTES = 5;

/** The request headers every gRPC call carries besides its metadata. */
export const GRPC_CONTENT_TYPE = 'application/grpc';

/** A 5-byte prefix plus `message`: one gRPC message as it travels in DATA frames. */
export function frameMessage(message: Buffer): Buffer {
  const out = Buffer.allocUnsafe(MESSAGE_PREFIX_BYTES + message.length);
  out[0] = 0;
  out.writeUInt32BE(message.length, 1);
  message.copy(out, MESSAGE_PREFIX_BYTES);
  return out;
}

/**
 * Follows the message boundaries of one direction of a call as DATA passes, without keeping the
 * data: only the prefix bytes of the message being read are held (at most 5). `check` returns the
 * declared length of the first message that is over `maxMessageBytes`, or undefined while every
 * prefix so far is within it. Used at each hop to refuse a message over the limit as soon as its
 * prefix arrives, before its body is buffered anywhere.
 */
export class MessageSizeGuard {
  /** Body bytes of the current message still to come; 0 at a message boundary. */
  private bodyLeft = 0;
  private readonly prefix = Buffer.alloc(MESSAGE_PREFIX_BYTES);
  private prefixHave = 0;
  /** Messages whose prefix was read (the last one may still be arriving). */
  messages = 0;

  constructor(private readonly maxMessageBytes: number) {}

  check(chunk: Buffer): number | undefined {
    let i = 0;
    while (i < chunk.length) {
      if (this.bodyLeft > 0) {
        const take = Math.min(this.bodyLeft, chunk.length - i);
        this.bodyLeft -= take;
        i += take;
        continue;
      }
      const take = Math.min(MESSAGE_PREFIX_BYTES - this.prefixHave, chunk.length - i);
      chunk.copy(this.prefix, this.prefixHave, i, i + take);
      this.prefixHave += take;
      i += take;
      if (this.prefixHave < MESSAGE_PREFIX_BYTES) break;
      this.prefixHave = 0;
      this.messages++;
      const length = this.prefix.readUInt32BE(1);
      if (length > this.maxMessageBytes) return length;
      this.bodyLeft = length;
    }
    return undefined;
  }

  /** True at a message boundary: a stream that ends elsewhere ended inside a message. */
  get atBoundary(): boolean {
    return this.bodyLeft === 0 && this.prefixHave === 0;
  }
}

/**
 * Collects whole gRPC messages from DATA chunks (control streams and built-in unary methods, whose
 * messages are small and decoded here). Throws a BurrowError with RESOURCE_EXHAUSTED from the
 * length prefix, before the body is read, when a message is over `maxMessageBytes`.
 */
export class MessageReader {
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  constructor(
    private readonly maxMessageBytes: number,
    private readonly tooLarge: (bytes: number) => BurrowError = (bytes) =>
      new BurrowError(Status.RESOURCE_EXHAUSTED, messageTooLarge(bytes, maxMessageBytes)),
  ) {}

  /** The messages completed by `chunk`, in order. */
  push(chunk: Buffer): Buffer[] {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    const out: Buffer[] = [];
    for (;;) {
      if (this.pendingBytes < MESSAGE_PREFIX_BYTES) return out;
      const head = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending);
      this.pending = [head];
      if (head[0] !== 0) throw new BurrowError(Status.INTERNAL, 'compressed messages are not accepted here');
      const length = head.readUInt32BE(1);
      if (length > this.maxMessageBytes) throw this.tooLarge(length);
      if (head.length < MESSAGE_PREFIX_BYTES + length) return out;
      out.push(head.subarray(MESSAGE_PREFIX_BYTES, MESSAGE_PREFIX_BYTES + length));
      const rest = head.subarray(MESSAGE_PREFIX_BYTES + length);
      this.pending = rest.length > 0 ? [rest] : [];
      this.pendingBytes = rest.length;
    }
  }

  /** True when no partial message is held. */
  get empty(): boolean {
    return this.pendingBytes === 0;
  }
}

/** The one wording of a message over the limit, at every hop. */
export function messageTooLarge(bytes: number, maxMessageBytes: number): string {
  return `message of ${bytes} bytes is larger than the limit of ${maxMessageBytes} bytes`;
}

const TIMEOUT_UNITS_MS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 0.001, n: 0.000001 };

/**
 * The deadline a `grpc-timeout` header gives, as epoch ms from `nowMs`; Infinity when the header
 * is absent; undefined when it is malformed (1-8 digits and a unit, says the gRPC spec).
 */
export function deadlineFromTimeout(value: string | string[] | undefined, nowMs: number): number | undefined {
  if (value === undefined) return Number.POSITIVE_INFINITY;
  const text = Array.isArray(value) ? value[0] : value;
  const m = text === undefined ? null : /^(\d{1,8})([HMSmun])$/.exec(text);
  if (!m) return undefined;
  return nowMs + Number(m[1]) * TIMEOUT_UNITS_MS[m[2]!]!;
}

/**
 * The `grpc-timeout` header value for the time left until `deadlineMs`, rounded up to whole
 * milliseconds (never more time than is left, and never 0 for time that is left), or undefined
 * when there is no deadline.
 */
export function timeoutHeader(deadlineMs: number, nowMs: number): string | undefined {
  if (!Number.isFinite(deadlineMs)) return undefined;
  const leftMs = Math.max(1, Math.ceil(deadlineMs - nowMs));
  // 8 digits at most: 99,999,999 ms is 27 hours; longer deadlines travel in seconds.
  return leftMs < 100_000_000 ? `${leftMs}m` : `${Math.min(99_999_999, Math.ceil(leftMs / 1000))}S`;
}

/**
 * `grpc-message` is percent-encoded: bytes outside printable ASCII and `%` itself (gRPC spec),
 * so any Unicode status message crosses HTTP/2 unchanged.
 */
export function encodeGrpcMessage(message: string): string {
  let out = '';
  for (const byte of Buffer.from(message, 'utf8')) {
    if (byte >= 0x20 && byte <= 0x7e && byte !== 0x25) out += String.fromCharCode(byte);
    else out += `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** Undoes {@link encodeGrpcMessage}; a malformed escape is kept as it is. */
export function decodeGrpcMessage(value: string | string[] | undefined): string {
  const text = Array.isArray(value) ? value.join(',') : (value ?? '');
  if (!text.includes('%')) return text;
  const bytes: number[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x25 && /^[0-9A-Fa-f]{2}$/.test(text.slice(i + 1, i + 3))) {
      bytes.push(Number.parseInt(text.slice(i + 1, i + 3), 16));
      i += 2;
    } else bytes.push(c & 0xff);
  }
  return Buffer.from(bytes).toString('utf8');
}

/** The status a header block carries (`grpc-status`, `grpc-message`), or undefined without one. */
export function statusOfHeaders(
  headers: http2.IncomingHttpHeaders | undefined,
): { code: number; details: string } | undefined {
  const raw = headers?.['grpc-status'];
  if (raw === undefined) return undefined;
  const text = Array.isArray(raw) ? raw[0] : raw;
  // Digits only (the spec's 1*DIGIT): Number() would read "", " " and "+0" as 0, that is OK.
  const code = text !== undefined && /^\d{1,2}$/.test(text) ? Number(text) : Number.NaN;
  const valid = code >= 0 && code <= 16;
  return {
    code: valid ? code : Status.UNKNOWN,
    details: valid ? decodeGrpcMessage(headers?.['grpc-message']) : `invalid grpc-status "${String(raw)}"`,
  };
}

/** The trailer fields of a status (merged into `extra`, which may hold trailing metadata). */
export function statusTrailers(code: number, details: string, extra?: http2.OutgoingHttpHeaders) {
  const out: http2.OutgoingHttpHeaders = { ...extra, 'grpc-status': String(code) };
  if (details) out['grpc-message'] = encodeGrpcMessage(details);
  return out;
}

/**
 * Ends a server stream with `code` and `details`: a trailers-only response when nothing was sent
 * yet (one HEADERS frame with END_STREAM, as gRPC answers an error before any message), else the
 * trailers after what was sent. A stream already closed is left alone. Never throws.
 */
export function endWithStatus(
  stream: http2.ServerHttp2Stream,
  code: number,
  details: string,
  extra?: http2.OutgoingHttpHeaders,
): void {
  if (stream.destroyed || stream.closed) return;
  try {
    if (!stream.headersSent) {
      stream.respond(
        { ':status': 200, 'content-type': GRPC_CONTENT_TYPE, ...statusTrailers(code, details, extra) },
        { endStream: true },
      );
      stopRequestAfterStatus(stream);
      return;
    }
    // Responded with waitForTrailers: the trailers go out in the wantTrailers event after end().
    const trailers = statusTrailers(code, details, extra);
    if (stream.writableEnded) {
      // end() was called already; the wantTrailers listener (if any) sends its own.
      return;
    }
    stream.once('wantTrailers', () => {
      try {
        stream.sendTrailers(trailers);
        stopRequestAfterTrailers(stream);
      } catch {
        stream.close();
      }
    });
    stream.end();
  } catch {
    stream.close();
  }
}

/**
 * Refuses a call before any handler saw it: a trailers-only answer with `code`, `details` and
 * `extra` fields, and the caller's request stopped (RST_STREAM NO_ERROR) so it sends no more body. A
 * stream that already answered is only reset.
 */
export function refuseStream(
  stream: http2.ServerHttp2Stream,
  code: number,
  details: string,
  extra?: http2.OutgoingHttpHeaders,
): void {
  if (!stream.headersSent) endWithStatus(stream, code, details, extra);
  else if (!stream.closed && !stream.destroyed) stream.close(NGHTTP2_NO_ERROR);
}

/**
 * Called once a server stream's final status has been sent: a caller still sending (it has not
 * half-closed) is told to stop with RST_STREAM NO_ERROR (RFC 9113 section 8.1), as grpc-go and
 * grpc-js servers do. Without it the stream stays open, and what it holds on every hop with it,
 * for as long as the caller keeps its half open. Node flushes the status before the reset.
 */
export function stopRequestAfterStatus(stream: http2.ServerHttp2Stream): void {
  if (!stream.readableEnded && !stream.closed && !stream.destroyed) stream.close(NGHTTP2_NO_ERROR);
}

/**
 * {@link stopRequestAfterStatus} for a status sent as trailers, from the `wantTrailers` listener
 * right after `sendTrailers`. Node sends a reset made in that listener (or on the next tick) before
 * the trailers, and the caller then sees a call without a status (measured on Node 20: 300 of 300);
 * after its own write of the trailers (setImmediate) the order holds.
 */
export function stopRequestAfterTrailers(stream: http2.ServerHttp2Stream): void {
  // The usual call has sent all of its request by now: nothing to stop, no extra turn of the loop.
  if (stream.readableEnded || stream.closed || stream.destroyed) return;
  setImmediate(() => stopRequestAfterStatus(stream));
}

/**
 * Runs `fn` at `deadlineMs` (epoch ms). setTimeout fires at once for delays past 2^31-1 ms (24.8
 * days, while grpc-timeout allows years): such a timer is re-armed until the deadline is near.
 * Returns the function that cancels it.
 */
export function atDeadline(deadlineMs: number, fn: () => void): () => void {
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    const left = deadlineMs - Date.now();
    timer = left > MAX_TIMER_MS ? setTimeout(arm, MAX_TIMER_MS) : setTimeout(fn, Math.max(0, left));
  };
  if (Number.isFinite(deadlineMs)) arm();
  return () => {
    if (timer) clearTimeout(timer);
  };
}

/** The longest delay setTimeout takes as it is. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The gRPC status an HTTP status means when a hop answers without grpc-status (gRPC spec). */
export function statusOfHttp(httpStatus: number): number {
  if (httpStatus === 400) return Status.INTERNAL;
  if (httpStatus === 401) return Status.UNAUTHENTICATED;
  if (httpStatus === 403) return Status.PERMISSION_DENIED;
  if (httpStatus === 404) return Status.UNIMPLEMENTED;
  if ([429, 502, 503, 504].includes(httpStatus)) return Status.UNAVAILABLE;
  return Status.UNKNOWN;
}

/** How a peer's RST_STREAM (or a lost connection) ends a forwarded call, as a gRPC status. */
export function statusOfReset(rstCode: number, sessionGone: boolean, peerName: string): BurrowError {
  if (sessionGone) return new BurrowError(Status.UNAVAILABLE, `connection to ${peerName} lost during the call`);
  switch (rstCode) {
    case 8: // CANCEL
      return new BurrowError(Status.CANCELLED, `${peerName} cancelled the call`);
    case 7: // REFUSED_STREAM: nothing was processed, retry is safe
      return new BurrowError(Status.UNAVAILABLE, `${peerName} refused the stream`);
    case 11: // ENHANCE_YOUR_CALM
      return new BurrowError(Status.RESOURCE_EXHAUSTED, `${peerName} reset the stream: too much load`);
    case 12: // INADEQUATE_SECURITY
      return new BurrowError(Status.PERMISSION_DENIED, `${peerName} reset the stream: inadequate security`);
    default:
      return new BurrowError(Status.INTERNAL, `${peerName} reset the stream (HTTP/2 error ${rstCode})`);
  }
}
