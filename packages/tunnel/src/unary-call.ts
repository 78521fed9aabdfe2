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
import type { Span } from './tracing';

/** What a built-in unary method learns about its call. */
export interface LocalCallContext {
  /** Absolute deadline in epoch ms, or Infinity. */
  deadlineMs: number;
  /** Aborted when the caller cancels or the deadline passes. */
  signal: AbortSignal;
  callId: string;
  /** The platform caller's verified SPIFFE id, when the broker sent it. */
  caller?: string;
  /** The call's span, when it is traced: a handler's own spans are its children. */
  span?: Span;
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
  span?: Span;
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
  return new Promise((resolve) => new UnaryAnswer(stream, handler, opts, resolve).start());
}

/** One unary call answered here: the request read so far, the handler's run, the status. */
class UnaryAnswer {
  private readonly reader: MessageReader;
  private readonly messages: Buffer[] = [];
  private requestBytes = 0;
  private responseBytes = 0;
  private outcome: { code: number; details: string } | undefined;
  private settledAt: number | undefined;
  // An abort builds an event and an exception: done only when the handler is still running.
  private handlerRunning = false;
  private abort: AbortController | undefined;
  private cancelTimer: (() => void) | undefined;

  constructor(
    private readonly stream: http2.ServerHttp2Stream,
    private readonly handler: LocalUnaryHandler,
    private readonly opts: UnaryAnswerOptions,
    private readonly resolve: (outcome: CallOutcome) => void,
  ) {
    this.reader = new MessageReader(opts.maxMessageBytes);
  }

  start(): void {
    const { stream, opts } = this;
    this.cancelTimer = atDeadline(opts.deadlineMs, () =>
      this.fail(new BurrowError(Status.DEADLINE_EXCEEDED, `deadline exceeded while answering ${opts.method}`)),
    );
    stream.on('data', (chunk: Buffer) => this.onData(chunk));
    stream.on('end', () => this.onEnd());
    stream.on('error', () => {});
    stream.on('close', () => {
      this.settle(Status.CANCELLED, 'the caller cancelled the call');
      this.done();
    });
  }

  private done(): void {
    const { requestBytes, responseBytes } = this;
    if (this.outcome) this.resolve({ ...this.outcome, requestBytes, responseBytes, settledAt: this.settledAt });
  }

  /** The status is decided (the first call wins); resolves once the stream has closed too. */
  private settle(code: number, details: string): void {
    if (this.outcome) return;
    this.outcome = { code, details };
    this.settledAt = performance.now();
    this.cancelTimer?.();
    if (this.handlerRunning) this.abort?.abort();
    if (this.stream.closed) this.done();
  }

  private fail(err: BurrowError): void {
    if (this.outcome) return;
    endWithStatus(this.stream, err.code, err.message);
    this.settle(err.code, err.message);
  }

  private onData(chunk: Buffer): void {
    if (this.outcome) return;
    try {
      for (const m of this.reader.push(chunk)) {
        this.requestBytes += m.length;
        this.messages.push(m);
      }
    } catch (err) {
      this.fail(toBurrowError(err));
      return;
    }
    if (this.messages.length > 1)
      this.fail(new BurrowError(Status.INTERNAL, `${this.opts.method} is unary but got two requests`));
  }

  /** The whole request is in: runs the handler on its one message. */
  private onEnd(): void {
    if (this.outcome) return;
    const { opts } = this;
    const request = this.messages[0];
    if (request === undefined || !this.reader.empty) {
      this.fail(new BurrowError(Status.INTERNAL, `${opts.method} is unary but the request had no whole message`));
      return;
    }
    this.abort = new AbortController();
    this.handlerRunning = true;
    const ctx: LocalCallContext = {
      deadlineMs: opts.deadlineMs,
      signal: this.abort.signal,
      callId: opts.callId,
      caller: opts.caller,
      span: opts.span,
    };
    this.handler(request, ctx).then(
      (response) => this.respond(response),
      (err: unknown) => {
        this.handlerRunning = false;
        this.fail(toBurrowError(err, `${opts.method} failed`));
      },
    );
  }

  private respond(response: Buffer): void {
    this.handlerRunning = false;
    const { stream } = this;
    if (this.outcome) return;
    if (stream.closed || stream.destroyed) {
      this.settle(Status.CANCELLED, 'the caller cancelled the call');
      return;
    }
    this.responseBytes = response.length;
    try {
      stream.respond({ ':status': 200, 'content-type': GRPC_CONTENT_TYPE }, {
        waitForTrailers: true,
        sendDate: false,
      } as http2.ServerStreamResponseOptions);
      stream.once('wantTrailers', () => stream.sendTrailers(statusTrailers(Status.OK, '')));
      stream.end(frameMessage(response));
    } catch {
      // Reset while answering: the close settles it.
    }
    this.settle(Status.OK, '');
  }
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
  opts: UnaryStreamOptions,
): Promise<UnaryCallResult> {
  return new Promise((resolve) => new UnaryCaller(stream, message, opts, resolve).start());
}

/** How {@link unaryOnStream} makes its call. */
interface UnaryStreamOptions {
  peerName: string;
  deadlineMs: number;
  maxMessageBytes: number;
  signal?: AbortSignal;
}

/** One unary call made on a stream this side opened: the response read so far and the status. */
class UnaryCaller {
  // Kept now: a closed stream no longer names its session.
  private readonly session: http2.Http2Session;
  private readonly reader: MessageReader;
  private response: Buffer | undefined;
  private done: UnaryCallResult | undefined;
  private trailers: http2.IncomingHttpHeaders = {};
  private cancelTimer: () => void = () => {};
  private readonly onAbort = (): void => this.finish(Status.CANCELLED, 'cancelled');

  constructor(
    private readonly stream: http2.ClientHttp2Stream,
    private readonly message: Buffer,
    private readonly opts: UnaryStreamOptions,
    private readonly resolve: (result: UnaryCallResult) => void,
  ) {
    this.session = stream.session!;
    this.reader = new MessageReader(opts.maxMessageBytes);
  }

  start(): void {
    const { stream, opts } = this;
    opts.signal?.addEventListener('abort', this.onAbort, { once: true });
    this.cancelTimer = atDeadline(opts.deadlineMs, () =>
      this.finish(Status.DEADLINE_EXCEEDED, `deadline exceeded waiting for ${opts.peerName}`),
    );
    stream.on('response', (h, flags) => this.onResponse(h, flags));
    stream.on('data', (chunk: Buffer) => this.onData(chunk));
    stream.on('trailers', (h) => {
      this.trailers = h;
    });
    stream.on('end', () => {
      const status = statusOfHeaders(this.trailers);
      // Node ends the readable side on a reset too: without a status, the close says why.
      if (status) this.finish(status.code, status.details, true);
    });
    stream.on('error', () => {});
    stream.on('close', () => this.onClose());
    stream.end(frameMessage(this.message));
  }

  /** `answered`: the server sent its status, so the call is over for it and is not cancelled. */
  private finish(code: number, details: string, answered = false): void {
    if (this.done) return;
    const { stream, response } = this;
    const responseBytes = response?.length ?? 0;
    const requestBytes = this.message.length;
    this.done = { code, details, requestBytes, responseBytes, response, trailers: this.trailers };
    this.cancelTimer();
    this.opts.signal?.removeEventListener('abort', this.onAbort);
    if (!stream.closed) {
      // A CANCEL after the answer would show the server a finished call as cancelled.
      if (!answered) stream.close(http2.constants.NGHTTP2_CANCEL);
      else if (!stream.writableFinished) stream.close(http2.constants.NGHTTP2_NO_ERROR);
    }
    this.resolve(this.done);
  }

  private onResponse(h: http2.IncomingHttpHeaders, flags: number): void {
    const status = statusOfHeaders(h);
    const httpStatus = Number(h[':status']);
    if (!(flags & 0x1 || status || httpStatus !== 200)) return;
    this.trailers = h;
    const code = status?.code ?? (httpStatus === 200 ? Status.INTERNAL : statusOfHttp(httpStatus));
    const details = status?.details ?? `${this.opts.peerName} answered HTTP ${httpStatus} without a gRPC status`;
    this.finish(code, details, flags & 0x1 ? true : httpStatus !== 200);
  }

  private onData(chunk: Buffer): void {
    try {
      const got = this.reader.push(chunk);
      if (got.length > 0) this.response = got[0];
    } catch (err) {
      const e = toBurrowError(err);
      this.finish(e.code, `response from ${this.opts.peerName}: ${e.message}`);
    }
  }

  private onClose(): void {
    const sessionGone = this.session.destroyed || this.session.closed;
    const rstCode = this.stream.rstCode ?? http2.constants.NGHTTP2_CANCEL;
    if (rstCode === http2.constants.NGHTTP2_NO_ERROR && !sessionGone) {
      this.finish(Status.INTERNAL, `${this.opts.peerName} ended the call without a status`);
      return;
    }
    const e = statusOfReset(rstCode, sessionGone, this.opts.peerName);
    this.finish(e.code, e.message);
  }
}
