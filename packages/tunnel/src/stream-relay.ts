import * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import { type CallState, INITIAL_CALL_STATE, isSettled, transition } from './call-state';
import { BurrowError } from './errors';
import {
  GRPC_CONTENT_TYPE,
  MESSAGE_PREFIX_BYTES,
  MessageSizeGuard,
  atDeadline,
  endWithStatus,
  messageTooLarge,
  statusOfHeaders,
  statusOfHttp,
  statusOfReset,
  statusTrailers,
  stopRequestAfterStatus,
  stopRequestAfterTrailers,
  timeoutHeader,
} from './grpc-wire';
import { forwardedRequestMetadata, forwardedResponseMetadata, type HeaderBlock } from './metadata-policy';

const { NGHTTP2_CANCEL, NGHTTP2_NO_ERROR } = http2.constants;
const END_STREAM_FLAG = 0x1;
const NEVER_INDEXED = ['traceparent'];

/** Lets the owner of a call end it while it is carried (a revoked or expired credential). */
export interface CallCutter {
  cut?: (error: BurrowError) => void;
}

/** How a relayed call goes on to the next hop. */
export interface RelayOptions {
  /** Who is behind `outbound`, for status messages: `agent "site-a"`, `upstream 127.0.0.1:50051`. */
  peerName: string;
  /** Largest message either way, read from the 5-byte prefixes as DATA passes. */
  maxMessageBytes: number;
  /** The caller's deadline (epoch ms, Infinity for none): the call ends with DEADLINE_EXCEEDED there. */
  deadlineMs: number;
  cutter?: CallCutter;
  /**
   * How the next hop is named when its connection never came up (refused, no route, DNS), in the
   * UNAVAILABLE `<name> is unreachable (ECONNREFUSED)`; default `peerName`. Distinct from a
   * connection lost during the call, after which the next hop may have run it.
   */
  unreachableName?: string;
}

/**
 * The headers of the stream a relay opens towards the next hop: the call's method, the caller's
 * metadata after the crossing rules (metadata-policy.ts), the deadline re-based to what is left
 * now, and `owned` (identity keys this side sets, replacing any value a peer sent).
 */
export function nextHopHeaders(
  method: string,
  authority: string,
  rawHeaders: readonly string[],
  deadlineMs: number,
  owned?: Record<string, string>,
  contentType?: string | string[],
): HeaderBlock {
  const headers: HeaderBlock = forwardedRequestMetadata(rawHeaders, owned);
  headers[':method'] = 'POST';
  headers[':path'] = method;
  headers[':authority'] = authority;
  headers['content-type'] = typeof contentType === 'string' ? contentType : GRPC_CONTENT_TYPE;
  headers.te = 'trailers';
  const timeout = timeoutHeader(deadlineMs, Date.now());
  if (timeout) headers['grpc-timeout'] = timeout;
  // A traceparent is new on every call: indexed by HPACK, each one would push the headers every
  // call repeats out of the connection's table. Sent as a literal that is never indexed instead.
  if (headers.traceparent !== undefined)
    (headers as unknown as Record<symbol, unknown>)[http2.sensitiveHeaders] = NEVER_INDEXED;
  return headers;
}

/**
 * Trailer fields going back to the caller with the `grpc-status` this relay read from them: a
 * peer's value that is not a status code (`abc`, `17`, two values) would otherwise reach the
 * caller as it is, and grpc clients read it as NaN or an unknown code. It becomes the UNKNOWN
 * that {@link statusOfHeaders} made of it, its grpc-message naming the value received.
 */
function withReadStatus(fields: HeaderBlock, status: { code: number; details: string }): HeaderBlock {
  if (fields['grpc-status'] === String(status.code)) return fields;
  return statusTrailers(status.code, status.details, fields as http2.OutgoingHttpHeaders) as HeaderBlock;
}

/**
 * Opens the next hop's stream on `session`, or throws UNAVAILABLE when the session cannot take one
 * (it received GOAWAY or is closing: callers pick another session or fail the call).
 */
export function openStream(session: http2.ClientHttp2Session, headers: HeaderBlock, peerName: string) {
  if (session.closed || session.destroyed)
    throw new BurrowError(Status.UNAVAILABLE, `connection to ${peerName} is closing`);
  try {
    return session.request(headers as http2.OutgoingHttpHeaders, { endStream: false });
  } catch (err) {
    throw new BurrowError(Status.UNAVAILABLE, `cannot open a stream to ${peerName}: ${(err as Error).message}`, err);
  }
}

/**
 * Carries one gRPC call from `inbound` (the stream it arrived on; this side answers it) to
 * `outbound` (the stream this side opened to the next hop) as bytes: DATA is piped both ways and
 * never reassembled into messages, headers and trailers pass after the crossing rules, resets map
 * to statuses. Backpressure holds end to end: a side that cannot take more pauses the other, so a
 * stalled call holds at most its stream windows. Resolves with the outcome once the caller's
 * stream has closed and the next hop's stream is closed or reset; never rejects.
 *
 * A message over `maxMessageBytes` either way ends the call with RESOURCE_EXHAUSTED as soon as
 * its length prefix passes; the deadline ends it with DEADLINE_EXCEEDED; `cutter.cut` with the
 * status given. Whatever ends the call, the other stream is cancelled (RST_STREAM CANCEL).
 */
export function relayCall(
  inbound: http2.ServerHttp2Stream,
  outbound: http2.ClientHttp2Stream,
  opts: RelayOptions,
): Promise<CallOutcome> {
  return new Promise((resolve) => new CallRelay(inbound, outbound, opts, resolve).start());
}

/** One relayed call: the two streams, its state (call-state.ts) and what it counted. */
class CallRelay {
  // Kept now: a closed stream no longer names its session, and a reset must not read as a lost connection.
  private readonly session: http2.Http2Session | undefined;
  private readonly requestGuard: MessageSizeGuard;
  private readonly responseGuard: MessageSizeGuard;
  private requestBytes = 0;
  private responseBytes = 0;
  private state: CallState = INITIAL_CALL_STATE;
  private trailersRaw: string[] | undefined;
  private trailerStatus: { code: number; details: string } | undefined;
  private cancelTimer: (() => void) | undefined;
  private resolved = false;
  /** Why the next hop's connection failed, when it never came up (its error's cause). */
  private lostCause: string | undefined;
  /** See {@link CallOutcome.settledAt}. */
  private settledAt: number | undefined;

  constructor(
    private readonly inbound: http2.ServerHttp2Stream,
    private readonly outbound: http2.ClientHttp2Stream,
    private readonly opts: RelayOptions,
    private readonly resolve: (outcome: CallOutcome) => void,
  ) {
    this.session = outbound.session;
    this.requestGuard = new MessageSizeGuard(opts.maxMessageBytes);
    this.responseGuard = new MessageSizeGuard(opts.maxMessageBytes);
  }

  start(): void {
    const { inbound, outbound, opts } = this;
    if (opts.cutter) opts.cutter.cut = (error) => this.fail(error);
    this.cancelTimer = atDeadline(opts.deadlineMs, () =>
      this.fail(new BurrowError(Status.DEADLINE_EXCEEDED, `deadline exceeded waiting for ${opts.peerName}`)),
    );
    // Caller -> next hop.
    inbound.on('data', (chunk: Buffer) => this.onRequestData(chunk));
    outbound.on('drain', () => inbound.resume());
    inbound.on('end', () => {
      if (!outbound.closed && !outbound.writableEnded) outbound.end();
    });
    inbound.on('error', () => {});
    inbound.on('close', () => this.onCallerClosed());
    // Next hop -> caller.
    outbound.on('response', (headers: http2.IncomingHttpHeaders, flags: number, raw: string[]) =>
      this.onResponse(headers, flags, raw),
    );
    outbound.on('data', (chunk: Buffer) => this.onResponseData(chunk));
    inbound.on('drain', () => outbound.resume());
    outbound.on('trailers', (headers: http2.IncomingHttpHeaders, _flags: number, raw: string[]) => {
      this.trailersRaw = raw;
      this.trailerStatus = statusOfHeaders(headers);
    });
    outbound.on('end', () => this.onResponseEnd());
    // Node cancels the streams of a session that failed (to connect, or later) with the session's
    // error as the cause; the session's own 'error' comes only after this stream has closed.
    outbound.on('error', (err: Error) => {
      const cause = err.cause as NodeJS.ErrnoException | undefined;
      this.lostCause = cause ? (cause.code ?? cause.message) : undefined;
    });
    outbound.on('close', () => this.onNextHopClosed());
  }

  private get settled(): boolean {
    return isSettled(this.state);
  }

  /** Resolves once the status is decided and the caller's stream has closed. */
  private finishIfDone(): void {
    const { outbound } = this;
    if (this.resolved || !this.settled || !this.inbound.closed) return;
    this.resolved = true;
    this.state = transition(this.state, { kind: 'caller-closed' });
    this.cancelTimer?.();
    // A next hop that answered in full closes its stream by itself once our request has ended:
    // a reset then would be one more frame each way per call for nothing.
    const answered = this.trailerStatus !== undefined && outbound.readableEnded;
    if (!outbound.closed && !(answered && outbound.writableFinished))
      outbound.close(answered ? NGHTTP2_NO_ERROR : NGHTTP2_CANCEL);
    this.resolve({
      ...this.state.outcome!,
      settledAt: this.settledAt,
      requestBytes: Math.max(0, this.requestBytes - MESSAGE_PREFIX_BYTES * this.requestGuard.messages),
      responseBytes: Math.max(0, this.responseBytes - MESSAGE_PREFIX_BYTES * this.responseGuard.messages),
    });
  }

  /** The next hop's status went on to the caller. */
  private settle(code: number, details: string): void {
    this.settledAt = performance.now();
    this.state = transition(this.state, { kind: 'status', status: { code, details } });
    this.finishIfDone();
  }

  /** Ends the call from this side: the caller gets `error`, the next hop a CANCEL. */
  private fail(error: BurrowError): void {
    if (this.settled) return;
    this.settledAt = performance.now();
    endWithStatus(this.inbound, error.code, error.message);
    if (!this.outbound.closed) this.outbound.close(NGHTTP2_CANCEL);
    this.state = transition(this.state, { kind: 'failed', status: { code: error.code, details: error.message } });
    this.finishIfDone();
  }

  private onRequestData(chunk: Buffer): void {
    if (this.settled) return;
    this.requestBytes += chunk.length;
    const tooLarge = this.requestGuard.check(chunk);
    if (tooLarge !== undefined) {
      const why = `request ${messageTooLarge(tooLarge, this.opts.maxMessageBytes)}`;
      this.fail(new BurrowError(Status.RESOURCE_EXHAUSTED, why));
      return;
    }
    if (!this.outbound.write(chunk)) this.inbound.pause();
  }

  /** The caller's stream closed: after its status, or reset (cancelled, its deadline, connection gone). */
  private onCallerClosed(): void {
    if (!this.settled) {
      if (!this.outbound.closed) this.outbound.close(NGHTTP2_CANCEL);
      this.state = transition(this.state, { kind: 'caller-gone' });
    }
    this.finishIfDone();
  }

  private onResponse(headers: http2.IncomingHttpHeaders, flags: number, rawHeaders: string[]): void {
    if (this.settled) return;
    const httpStatus = Number(headers[':status']);
    if (flags & END_STREAM_FLAG || httpStatus !== 200) {
      this.onTrailersOnly(headers, httpStatus, rawHeaders);
      return;
    }
    try {
      const fields = forwardedResponseMetadata(rawHeaders, false);
      const contentType = headers['content-type'];
      this.inbound.respond(
        {
          ...fields,
          ':status': 200,
          'content-type': typeof contentType === 'string' ? contentType : GRPC_CONTENT_TYPE,
        },
        { waitForTrailers: true, sendDate: false } as http2.ServerStreamResponseOptions,
      );
      this.state = transition(this.state, { kind: 'response-headers' });
    } catch {
      this.fail(new BurrowError(Status.CANCELLED, 'the caller cancelled the call'));
    }
  }

  /** A trailers-only answer (an error before any message), or not a gRPC answer at all. */
  private onTrailersOnly(headers: http2.IncomingHttpHeaders, httpStatus: number, rawHeaders: string[]): void {
    const status = statusOfHeaders(headers);
    const code = status?.code ?? (httpStatus === 200 ? Status.INTERNAL : statusOfHttp(httpStatus));
    const details = status?.details ?? `${this.opts.peerName} answered HTTP ${httpStatus} without a gRPC status`;
    if (!status || httpStatus !== 200) {
      this.fail(new BurrowError(code, details));
      return;
    }
    try {
      const fields = withReadStatus(forwardedResponseMetadata(rawHeaders, true), status);
      this.inbound.respond({ ...fields, ':status': 200, 'content-type': GRPC_CONTENT_TYPE }, {
        endStream: true,
        sendDate: false,
      } as http2.ServerStreamResponseOptions);
      stopRequestAfterStatus(this.inbound);
    } catch {
      // The caller's stream is gone; its close settles nothing more.
    }
    if (!this.outbound.closed) this.outbound.close(NGHTTP2_NO_ERROR);
    this.settle(code, details);
  }

  private onResponseData(chunk: Buffer): void {
    if (this.settled) return;
    this.responseBytes += chunk.length;
    const tooLarge = this.responseGuard.check(chunk);
    if (tooLarge !== undefined) {
      const why = `response ${messageTooLarge(tooLarge, this.opts.maxMessageBytes)}`;
      this.fail(new BurrowError(Status.RESOURCE_EXHAUSTED, why));
      return;
    }
    if (!this.inbound.write(chunk)) this.outbound.pause();
  }

  private onResponseEnd(): void {
    // Node ends the readable side on a reset too (CANCEL included): without trailers, the close
    // (onNextHopClosed) says how the stream ended.
    const status = this.trailerStatus;
    if (this.settled || this.state.phase !== 'responding' || !status) return;
    const { inbound } = this;
    const trailers = withReadStatus(forwardedResponseMetadata(this.trailersRaw ?? [], true), status);
    inbound.once('wantTrailers', () => {
      try {
        inbound.sendTrailers(trailers);
        stopRequestAfterTrailers(inbound);
      } catch {
        inbound.close();
      }
    });
    inbound.end();
    this.settle(status.code, status.details);
  }

  /** The next hop's stream closed: after its status, or reset, or its connection lost. */
  private onNextHopClosed(): void {
    if (!this.settled) {
      const { session, outbound, opts } = this;
      const sessionGone = session === undefined || session.destroyed || session.closed;
      const rstCode = outbound.rstCode ?? NGHTTP2_CANCEL;
      // A session still `connecting` when it is gone never reached the next hop: nothing ran.
      const neverConnected = session !== undefined && sessionGone && session.connecting;
      const cause = this.lostCause;
      const unreachable = `${opts.unreachableName ?? opts.peerName} is unreachable`;
      let error: BurrowError;
      if (neverConnected)
        error = new BurrowError(Status.UNAVAILABLE, `${unreachable} (${cause ?? 'connection failed'})`);
      else if (rstCode === NGHTTP2_NO_ERROR && !sessionGone)
        error = new BurrowError(Status.INTERNAL, `${opts.peerName} ended the call without a status`);
      else {
        error = statusOfReset(rstCode, sessionGone, opts.peerName);
        if (sessionGone && cause) error = new BurrowError(error.code, `${error.message} (${cause})`);
      }
      this.fail(error);
    }
    this.finishIfDone();
  }
}
