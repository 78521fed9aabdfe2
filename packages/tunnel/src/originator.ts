import { Metadata, status as Status, type ServerDuplexStream } from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import type { CallStream } from './call-stream';
import { deadlineMsOf } from './deadline';
import type { BurrowError } from './errors';
import { requestMetadataToWire, responseMetadataFromWire } from './metadata-policy';

export interface OriginateOptions {
  /** Id of the call, sent in Start for the far side's logs. */
  callId: string;
  /** Name of the far side for error messages, e.g. `agent "site-a"` or `broker`. */
  peerName: string;
  /** Verified SPIFFE id of the platform caller, sent in Start (broker -> agent calls only). */
  caller?: string;
  /** Filled in with a way to end the call early (see {@link CallCutter}). */
  cutter?: CallCutter;
}

/**
 * Filled in by {@link originate} and {@link originateUnary}: `cut` ends the call at once with
 * `error`, as the client's status and as Cancel towards the far side. The broker cuts a caller's
 * calls when the caller's certificate is revoked or expires mid-call. A no-op once the call is over.
 */
export interface CallCutter {
  cut?: (error: BurrowError) => void;
}

/**
 * Drives the originator end of one forwarded call: `client` is the call Burrow received from a real
 * gRPC client, `stream` the tunnel stream it travels on. Resolves when the client has its status;
 * never rejects. Backpressure runs both ways: the client is paused while the tunnel is full and the
 * tunnel is paused while the client is not reading.
 */
export function originate(
  client: ServerDuplexStream<Buffer, Buffer>,
  stream: CallStream,
  opts: OriginateOptions,
): Promise<CallOutcome> {
  return new Promise((resolve) => {
    let requestBytes = 0;
    let responseBytes = 0;
    let settled = false;

    const deadlineMs = deadlineMsOf(client);

    const settle = (code: number, details: string): void => {
      if (settled) return;
      settled = true;
      client.removeListener('data', onClientData);
      resolve({ code, details, requestBytes, responseBytes });
    };

    // Reports a status to the client (which may already be gone) and ends the tunnel stream.
    const complete = (code: number, details: string, trailers: Metadata): void => {
      if (settled) return;
      if (!client.cancelled && !client.destroyed) {
        if (code === Status.OK) client.end(trailers);
        else client.emit('error', { code, details, metadata: trailers });
      }
      stream.endCall();
      settle(code, details);
    };

    const onClientData = (message: Buffer): void => {
      requestBytes += message.length;
      if (!stream.send({ kind: 'message', data: message })) client.pause();
    };

    stream.attach({
      onFrame(frame) {
        switch (frame.kind) {
          case 'headers':
            client.sendMetadata(responseMetadataFromWire(frame.metadata));
            return;
          case 'message':
            responseBytes += frame.data.length;
            if (!client.write(frame.data)) {
              stream.pause();
              client.once('drain', () => stream.resume());
            }
            return;
          case 'trailers':
            complete(frame.trailers.code, frame.trailers.message, responseMetadataFromWire(frame.trailers.metadata));
            return;
          default:
            return; // originator frames never arrive here: CallStream rejects them
        }
      },
      onDrain() {
        client.resume();
      },
      onClosed(error) {
        if (error)
          complete(
            Status.UNAVAILABLE,
            `connection to ${opts.peerName} lost during the call: ${error.message}`,
            new Metadata(),
          );
      },
      onProtocolError(error) {
        complete(Status.UNAVAILABLE, `${opts.peerName} broke the tunnel protocol: ${error.message}`, new Metadata());
      },
    });

    const timeoutMs = Number.isFinite(deadlineMs) ? Math.max(1, deadlineMs - Date.now()) : 0;
    stream.send({
      kind: 'start',
      start: {
        method: client.getPath(),
        metadata: requestMetadataToWire(client.metadata),
        timeoutMs,
        callId: opts.callId,
        caller: opts.caller,
      },
    });

    if (opts.cutter) {
      opts.cutter.cut = (error) => {
        if (settled) return;
        stream.send({ kind: 'cancel', reason: error.message });
        complete(error.code, error.message, new Metadata());
      };
    }
    client.on('data', onClientData);
    client.on('end', () => {
      if (!settled) stream.send({ kind: 'halfClose' });
    });
    client.on('cancelled', () => {
      if (settled) return;
      const expired = Number.isFinite(deadlineMs) && Date.now() >= deadlineMs;
      const reason = expired ? 'deadline exceeded' : 'cancelled by the client';
      stream.send({ kind: 'cancel', reason });
      stream.endCall();
      settle(expired ? Status.DEADLINE_EXCEEDED : Status.CANCELLED, reason);
    });
  });
}

/** Fails a call that never reached the tunnel (no route, no agent, denied). */
export function rejectCall(client: ServerDuplexStream<Buffer, Buffer>, error: BurrowError): void {
  client.emit('error', error.toServiceError());
}

/** What {@link originateUnary} sends: one request message of a unary method. */
export interface UnaryRequest {
  method: string;
  message: Buffer;
  metadata: Metadata;
  /** Absolute deadline in epoch ms, or Infinity. */
  deadlineMs: number;
  signal?: AbortSignal;
}

/** How a unary call through the tunnel ended; `response` is set when `code` is OK. */
export interface UnaryResult extends CallOutcome {
  response?: Buffer;
  trailers: Metadata;
}

/**
 * The originator end of a unary call that Burrow itself makes (not relayed from a gRPC client):
 * the broker's AuthZEN HTTP binding uses it. Same frame sequence and deadline rules as
 * {@link originate}; aborting `signal` cancels the call. Resolves, never rejects.
 */
export function originateUnary(req: UnaryRequest, stream: CallStream, opts: OriginateOptions): Promise<UnaryResult> {
  return new Promise((resolve) => {
    let response: Buffer | undefined;
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const settle = (code: number, details: string, trailers: Metadata): void => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      req.signal?.removeEventListener('abort', onAbort);
      stream.endCall();
      resolve({
        code,
        details,
        trailers,
        requestBytes: req.message.length,
        responseBytes: response?.length ?? 0,
        response: code === Status.OK ? response : undefined,
      });
    };
    const cancel = (code: number, reason: string): void => {
      if (settled) return;
      stream.send({ kind: 'cancel', reason });
      settle(code, reason, new Metadata());
    };
    const onAbort = (): void => cancel(Status.CANCELLED, 'cancelled by the client');
    if (opts.cutter) opts.cutter.cut = (error) => cancel(error.code, error.message);

    stream.attach({
      onFrame(frame) {
        if (frame.kind === 'message') {
          if (response !== undefined) {
            cancel(Status.INTERNAL, `${opts.peerName} sent more than one response to unary ${req.method}`);
            return;
          }
          response = frame.data;
        } else if (frame.kind === 'trailers') {
          const code =
            frame.trailers.code === Status.OK && response === undefined ? Status.INTERNAL : frame.trailers.code;
          const details =
            code !== frame.trailers.code
              ? `${opts.peerName} sent no response to unary ${req.method}`
              : frame.trailers.message;
          settle(code, details, responseMetadataFromWire(frame.trailers.metadata));
        }
      },
      onDrain() {},
      onClosed(error) {
        if (error)
          settle(
            Status.UNAVAILABLE,
            `connection to ${opts.peerName} lost during the call: ${error.message}`,
            new Metadata(),
          );
      },
      onProtocolError(error) {
        settle(Status.UNAVAILABLE, `${opts.peerName} broke the tunnel protocol: ${error.message}`, new Metadata());
      },
    });

    const timeoutMs = Number.isFinite(req.deadlineMs) ? Math.max(1, req.deadlineMs - Date.now()) : 0;
    if (timeoutMs > 0) timer = setTimeout(() => cancel(Status.DEADLINE_EXCEEDED, 'deadline exceeded'), timeoutMs);
    if (req.signal?.aborted) {
      settle(Status.CANCELLED, 'cancelled by the client', new Metadata());
      return;
    }
    req.signal?.addEventListener('abort', onAbort);
    stream.send({
      kind: 'start',
      start: {
        method: req.method,
        metadata: requestMetadataToWire(req.metadata),
        timeoutMs,
        callId: opts.callId,
        caller: opts.caller,
      },
    });
    stream.send({ kind: 'message', data: req.message });
    stream.send({ kind: 'halfClose' });
  });
}
