import * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import { BurrowError, toBurrowError } from './errors';
import {
  GRPC_CONTENT_TYPE,
  MessageReader,
  atDeadline,
  endWithStatus,
  frameMessage,
  statusOfHeaders,
  statusOfHttp,
  statusOfReset,
  statusTrailers,
  timeoutHeader,
} from './grpc-wire';
import type { HeaderBlock } from './metadata-policy';

/** What a built-in unary method learns about its call. */
export interface LocalCallContext {
  /** Absolute deadline in epoch ms, or Infinity. */
  deadlineMs: number;
  /** Aborted when the caller cancels or the deadline passes. */
  signal: AbortSignal;
  callId: string;
  /** The platform caller's verified SPIFFE id, when the broker sent it. */
  caller?: string;
}

/**
 * A built-in unary method answered inside the process: request bytes in, response bytes out.
 * Rejects with a {@link BurrowError} (or anything {@link toBurrowError} understands) to fail the
 * call with that status.
 */
export type LocalUnaryHandler = (request: Buffer, ctx: LocalCallContext) => Promise<Buffer>;

/** How {@link answerUnary} takes a call. */
export interface UnaryAnswerOptions {
  method: string;
  maxMessageBytes: number;
  deadlineMs: number;
  callId: string;
  caller?: string;
}

/**
 * Answers one unary gRPC call on a raw HTTP/2 server stream with `handler`: reads the one request
 * message (refusing one over the limit from its prefix), runs the handler, and sends the response
 * and the status. A caller that resets the stream, or the deadline, aborts the handler's signal.
 * Resolves with the outcome once the stream has closed; never rejects.
 */
export function answerUnary(
  stream: http2.ServerHttp2Stream,
  handler: LocalUnaryHandler,
  opts: UnaryAnswerOptions,
): Promise<CallOutcome> {
  return new Promise((resolve) => {
    const reader = new MessageReader(opts.maxMessageBytes);
    const messages: Buffer[] = [];
    let requestBytes = 0;
    let responseBytes = 0;
    let outcome: { code: number; details: string } | undefined;
    // An abort builds an event and an exception: done only when the handler is still running.
    let handlerRunning = false;
    let abort: AbortController | undefined;
    let cancelTimer: (() => void) | undefined;
    const settle = (code: number, details: string): void => {
      if (outcome) return;
      outcome = { code, details };
      cancelTimer?.();
      if (handlerRunning) abort?.abort();
      if (stream.closed) resolve({ ...outcome, requestBytes, responseBytes });
    };
    const fail = (err: BurrowError): void => {
      if (outcome) return;
      endWithStatus(stream, err.code, err.message);
      settle(err.code, err.message);
    };
    cancelTimer = atDeadline(opts.deadlineMs, () =>
      fail(new BurrowError(Status.DEADLINE_EXCEEDED, `deadline exceeded while answering ${opts.method}`)),
    );
    stream.on('data', (chunk: Buffer) => {
      if (outcome) return;
      try {
        for (const m of reader.push(chunk)) {
          requestBytes += m.length;
          messages.push(m);
        }
      } catch (err) {
        fail(toBurrowError(err));
        return;
      }
      if (messages.length > 1) fail(new BurrowError(Status.INTERNAL, `${opts.method} is unary but got two requests`));
    });
    stream.on('end', () => {
      if (outcome) return;
      const request = messages[0];
      if (request === undefined || !reader.empty) {
        fail(new BurrowError(Status.INTERNAL, `${opts.method} is unary but the request had no whole message`));
        return;
      }
      abort = new AbortController();
      handlerRunning = true;
      const ctx: LocalCallContext = {
        deadlineMs: opts.deadlineMs,
        signal: abort.signal,
        callId: opts.callId,
        caller: opts.caller,
      };
      handler(request, ctx).then(
        (response) => {
          handlerRunning = false;
          if (outcome) return;
          if (stream.closed || stream.destroyed) {
            settle(Status.CANCELLED, 'the caller cancelled the call');
            return;
          }
          responseBytes = response.length;
          try {
            stream.respond({ ':status': 200, 'content-type': GRPC_CONTENT_TYPE }, {
              waitForTrailers: true,
              sendDate: false,
            } as http2.ServerStreamResponseOptions);
            stream.once('wantTrailers', () => stream.sendTrailers(statusTrailers(Status.OK, '')));
            stream.end(frameMessage(response));
          } catch {
            // Reset while answering: the close below settles it.
          }
          settle(Status.OK, '');
        },
        (err: unknown) => {
          handlerRunning = false;
          fail(toBurrowError(err, `${opts.method} failed`));
        },
      );
    });
    stream.on('error', () => {});
    stream.on('close', () => {
      if (!outcome) settle(Status.CANCELLED, 'the caller cancelled the call');
      resolve({ ...outcome!, requestBytes, responseBytes });
    });
  });
}

/** The result of a unary call made by {@link unaryCall}. */
export interface UnaryCallResult extends CallOutcome {
  response?: Buffer;
  /** The response's headers and trailers as received (status details, metadata). */
  trailers: http2.IncomingHttpHeaders;
}

/**
 * One unary gRPC call on a raw HTTP/2 client session (the AuthZEN binding's call down a tunnel, the
 * control plane's small calls): `headers` are the request metadata. Resolves with the status,
 * never rejects; an `abort` of `signal` cancels the call (CANCELLED).
 */
export function unaryCall(
  session: http2.ClientHttp2Session,
  method: string,
  message: Buffer,
  opts: {
    authority: string;
    peerName: string;
    deadlineMs: number;
    maxMessageBytes: number;
    headers?: HeaderBlock;
    signal?: AbortSignal;
  },
): Promise<UnaryCallResult> {
  return new Promise((resolve) => {
    const headers: HeaderBlock = {
      ...opts.headers,
      ':method': 'POST',
      ':path': method,
      ':authority': opts.authority,
      'content-type': GRPC_CONTENT_TYPE,
      te: 'trailers',
    };
    const timeout = timeoutHeader(opts.deadlineMs, Date.now());
    if (timeout) headers['grpc-timeout'] = timeout;
    let stream: http2.ClientHttp2Stream;
    if (opts.signal?.aborted) {
      // An abort event never comes for a signal aborted already.
      resolve({ code: Status.CANCELLED, details: 'cancelled', requestBytes: 0, responseBytes: 0, trailers: {} });
      return;
    }
    try {
      if (session.closed || session.destroyed) throw new Error('the connection is closing');
      stream = session.request(headers as http2.OutgoingHttpHeaders);
    } catch (err) {
      const details = `cannot reach ${opts.peerName}: ${(err as Error).message}`;
      resolve({ code: Status.UNAVAILABLE, details, requestBytes: 0, responseBytes: 0, trailers: {} });
      return;
    }
    resolve(unaryOnStream(stream, message, opts));
  });
}

/**
 * The rest of a unary call on a stream already opened (its request headers sent): sends `message`,
 * reads the response and the status. Resolves with the status, never rejects.
 */
export function unaryOnStream(
  stream: http2.ClientHttp2Stream,
  message: Buffer,
  opts: { peerName: string; deadlineMs: number; maxMessageBytes: number; signal?: AbortSignal },
): Promise<UnaryCallResult> {
  return new Promise((resolve) => {
    const requestBytes = message.length;
    // Kept now: a closed stream no longer names its session.
    const session = stream.session!;
    const reader = new MessageReader(opts.maxMessageBytes);
    let response: Buffer | undefined;
    let done: UnaryCallResult | undefined;
    let trailers: http2.IncomingHttpHeaders = {};
    /** `answered`: the server sent its status, so the call is over for it and is not cancelled. */
    const finish = (code: number, details: string, answered = false): void => {
      if (done) return;
      done = { code, details, requestBytes, responseBytes: response?.length ?? 0, response, trailers };
      cancelTimer();
      opts.signal?.removeEventListener('abort', onAbort);
      if (!stream.closed) {
        // A CANCEL after the answer would show the server a finished call as cancelled.
        if (!answered) stream.close(http2.constants.NGHTTP2_CANCEL);
        else if (!stream.writableFinished) stream.close(http2.constants.NGHTTP2_NO_ERROR);
      }
      resolve(done);
    };
    const onAbort = (): void => finish(Status.CANCELLED, 'cancelled');
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const cancelTimer = atDeadline(opts.deadlineMs, () =>
      finish(Status.DEADLINE_EXCEEDED, `deadline exceeded waiting for ${opts.peerName}`),
    );
    stream.on('response', (h, flags) => {
      const status = statusOfHeaders(h);
      const httpStatus = Number(h[':status']);
      if (flags & 0x1 || status || httpStatus !== 200) {
        trailers = h;
        const code = status?.code ?? (httpStatus === 200 ? Status.INTERNAL : statusOfHttp(httpStatus));
        const details = status?.details ?? `${opts.peerName} answered HTTP ${httpStatus} without a gRPC status`;
        finish(code, details, flags & 0x1 ? true : httpStatus !== 200);
      }
    });
    stream.on('data', (chunk: Buffer) => {
      try {
        const got = reader.push(chunk);
        if (got.length > 0) response = got[0];
      } catch (err) {
        const e = toBurrowError(err);
        finish(e.code, `response from ${opts.peerName}: ${e.message}`);
      }
    });
    stream.on('trailers', (h) => {
      trailers = h;
    });
    stream.on('end', () => {
      const status = statusOfHeaders(trailers);
      // Node ends the readable side on a reset too: without a status, the close below says why.
      if (status) finish(status.code, status.details, true);
    });
    stream.on('error', () => {});
    stream.on('close', () => {
      // `session`, not stream.session: a closed stream no longer names its session.
      const sessionGone = session.destroyed || session.closed;
      const rstCode = stream.rstCode ?? http2.constants.NGHTTP2_CANCEL;
      if (rstCode === http2.constants.NGHTTP2_NO_ERROR && !sessionGone) {
        finish(Status.INTERNAL, `${opts.peerName} ended the call without a status`);
        return;
      }
      const e = statusOfReset(rstCode, sessionGone, opts.peerName);
      finish(e.code, e.message);
    });
    stream.end(frameMessage(message));
  });
}
