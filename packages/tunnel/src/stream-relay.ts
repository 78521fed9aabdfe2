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
  return new Promise((resolve) => {
    // Kept now: a closed stream no longer names its session, and a reset must not read as a lost connection.
    const session = outbound.session;
    const requestGuard = new MessageSizeGuard(opts.maxMessageBytes);
    const responseGuard = new MessageSizeGuard(opts.maxMessageBytes);
    let requestBytes = 0;
    let responseBytes = 0;
    let state: CallState = INITIAL_CALL_STATE;
    const settled = (): boolean => isSettled(state);
    let trailersRaw: string[] | undefined;
    let trailerStatus: { code: number; details: string } | undefined;
    let cancelTimer: (() => void) | undefined;
    let resolved = false;

    const finishIfDone = (): void => {
      if (resolved || !settled() || !inbound.closed) return;
      resolved = true;
      state = transition(state, { kind: 'caller-closed' });
      cancelTimer?.();
      // A next hop that answered in full closes its stream by itself once our request has ended:
      // a reset then would be one more frame each way per call for nothing.
      const answered = trailerStatus !== undefined && outbound.readableEnded;
      if (!outbound.closed && !(answered && outbound.writableFinished))
        outbound.close(answered ? NGHTTP2_NO_ERROR : NGHTTP2_CANCEL);
      resolve({
        ...state.outcome!,
        requestBytes: Math.max(0, requestBytes - MESSAGE_PREFIX_BYTES * requestGuard.messages),
        responseBytes: Math.max(0, responseBytes - MESSAGE_PREFIX_BYTES * responseGuard.messages),
      });
    };
    const settle = (code: number, details: string): void => {
      state = transition(state, { kind: 'status', status: { code, details } });
      finishIfDone();
    };
    /** Ends the call from this side: the caller gets `error`, the next hop a CANCEL. */
    const fail = (error: BurrowError): void => {
      if (settled()) return;
      endWithStatus(inbound, error.code, error.message);
      if (!outbound.closed) outbound.close(NGHTTP2_CANCEL);
      state = transition(state, { kind: 'failed', status: { code: error.code, details: error.message } });
      finishIfDone();
    };
    if (opts.cutter) opts.cutter.cut = fail;
    cancelTimer = atDeadline(opts.deadlineMs, () =>
      fail(new BurrowError(Status.DEADLINE_EXCEEDED, `deadline exceeded waiting for ${opts.peerName}`)),
    );

    // Caller -> next hop.
    inbound.on('data', (chunk: Buffer) => {
      if (settled()) return;
      requestBytes += chunk.length;
      const tooLarge = requestGuard.check(chunk);
      if (tooLarge !== undefined) {
        fail(new BurrowError(Status.RESOURCE_EXHAUSTED, `request ${messageTooLarge(tooLarge, opts.maxMessageBytes)}`));
        return;
      }
      if (!outbound.write(chunk)) inbound.pause();
    });
    outbound.on('drain', () => inbound.resume());
    inbound.on('end', () => {
      if (!outbound.closed && !outbound.writableEnded) outbound.end();
    });
    inbound.on('error', () => {});
    inbound.on('close', () => {
      // The caller reset its stream (cancelled, deadline at the caller, connection gone).
      if (!settled()) {
        if (!outbound.closed) outbound.close(NGHTTP2_CANCEL);
        state = transition(state, { kind: 'caller-gone' });
      }
      finishIfDone();
    });

    // Next hop -> caller.
    outbound.on('response', (headers: http2.IncomingHttpHeaders, flags: number, rawHeaders: string[]) => {
      if (settled()) return;
      const httpStatus = Number(headers[':status']);
      const status = statusOfHeaders(headers);
      if (flags & END_STREAM_FLAG || httpStatus !== 200) {
        // Trailers-only (an error before any message), or not a gRPC answer at all.
        const code = status?.code ?? (httpStatus === 200 ? Status.INTERNAL : statusOfHttp(httpStatus));
        const details = status?.details ?? `${opts.peerName} answered HTTP ${httpStatus} without a gRPC status`;
        if (status && httpStatus === 200) {
          try {
            const fields = withReadStatus(forwardedResponseMetadata(rawHeaders, true), status);
            inbound.respond({ ...fields, ':status': 200, 'content-type': GRPC_CONTENT_TYPE }, {
              endStream: true,
              sendDate: false,
            } as http2.ServerStreamResponseOptions);
            stopRequestAfterStatus(inbound);
          } catch {
            // The caller's stream is gone; its close settles nothing more.
          }
          if (!outbound.closed) outbound.close(NGHTTP2_NO_ERROR);
          settle(code, details);
        } else fail(new BurrowError(code, details));
        return;
      }
      try {
        const fields = forwardedResponseMetadata(rawHeaders, false);
        const contentType = headers['content-type'];
        inbound.respond(
          {
            ...fields,
            ':status': 200,
            'content-type': typeof contentType === 'string' ? contentType : GRPC_CONTENT_TYPE,
          },
          { waitForTrailers: true, sendDate: false } as http2.ServerStreamResponseOptions,
        );
        state = transition(state, { kind: 'response-headers' });
      } catch {
        fail(new BurrowError(Status.CANCELLED, 'the caller cancelled the call'));
      }
    });
    outbound.on('data', (chunk: Buffer) => {
      if (settled()) return;
      responseBytes += chunk.length;
      const tooLarge = responseGuard.check(chunk);
      if (tooLarge !== undefined) {
        fail(new BurrowError(Status.RESOURCE_EXHAUSTED, `response ${messageTooLarge(tooLarge, opts.maxMessageBytes)}`));
        return;
      }
      if (!inbound.write(chunk)) outbound.pause();
    });
    inbound.on('drain', () => outbound.resume());
    outbound.on('trailers', (headers: http2.IncomingHttpHeaders, _flags: number, rawHeaders: string[]) => {
      trailersRaw = rawHeaders;
      trailerStatus = statusOfHeaders(headers);
    });
    outbound.on('end', () => {
      // Node ends the readable side on a reset too (CANCEL included): without trailers, the
      // close below says how the stream ended.
      if (settled() || state.phase !== 'responding' || !trailerStatus) return;
      const status = trailerStatus;
      const trailers = withReadStatus(forwardedResponseMetadata(trailersRaw ?? [], true), status);
      inbound.once('wantTrailers', () => {
        try {
          inbound.sendTrailers(trailers);
          stopRequestAfterTrailers(inbound);
        } catch {
          inbound.close();
        }
      });
      inbound.end();
      settle(status.code, status.details);
    });
    // Node cancels a stream whose session failed to connect with the connect error as the cause;
    // the session's own 'error' (with the same code) comes only after this stream has closed.
    let connectError: string | undefined;
    outbound.on('error', (err: Error) => {
      const cause = err.cause as NodeJS.ErrnoException | undefined;
      connectError = cause ? (cause.code ?? cause.message) : undefined;
    });
    outbound.on('close', () => {
      if (!settled()) {
        const sessionGone = session === undefined || session.destroyed || session.closed;
        const rstCode = outbound.rstCode ?? NGHTTP2_CANCEL;
        // A session still `connecting` when it is gone never reached the next hop: nothing ran.
        const neverConnected = session !== undefined && sessionGone && session.connecting;
        fail(
          neverConnected
            ? new BurrowError(
                Status.UNAVAILABLE,
                `${opts.unreachableName ?? opts.peerName} is unreachable (${connectError ?? 'connection failed'})`,
              )
            : rstCode === NGHTTP2_NO_ERROR && !sessionGone
              ? new BurrowError(Status.INTERNAL, `${opts.peerName} ended the call without a status`)
              : statusOfReset(rstCode, sessionGone, opts.peerName),
        );
      }
      finishIfDone();
    });
  });
}
