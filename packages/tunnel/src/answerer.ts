import {
  type Metadata,
  status as Status,
  type Client,
  type ClientDuplexStream,
  type StatusObject,
} from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import type { CallStream } from './call-stream';
import { identity } from './grpc-server-hooks';
import type { StartFrame } from './frames';
import { requestMetadataFromWire, responseMetadataToWire, setOwnedMetadata } from './metadata-policy';

export interface AnswerOptions {
  /** Request metadata the answerer sets, replacing any value the peer sent: e.g. the calling agent's verified id. */
  extraMetadata?: Metadata;
}

/**
 * Drives the answerer end of one forwarded call: opens the upstream call for `start` on
 * `upstream` and pipes frames both ways until the upstream's status has been sent back as
 * Trailers. Resolves with the outcome; never rejects. The upstream deadline is the remaining time
 * the originator measured, so the far side never gets more time than the caller gave.
 */
export function answer(
  stream: CallStream,
  start: StartFrame,
  upstream: Client,
  opts: AnswerOptions = {},
): Promise<CallOutcome> {
  return new Promise((resolve) => {
    let requestBytes = 0;
    let responseBytes = 0;
    let settled = false;
    let status: StatusObject | undefined;
    let readEnded = false;

    const metadata = requestMetadataFromWire(start.metadata);
    if (opts.extraMetadata) setOwnedMetadata(metadata, opts.extraMetadata);
    const deadline = start.timeoutMs > 0 ? Date.now() + start.timeoutMs : Infinity;
    const call: ClientDuplexStream<Buffer, Buffer> = upstream.makeBidiStreamRequest(
      start.method,
      identity,
      identity,
      metadata,
      { deadline },
    );

    // The outcome is known when trailers go out (or the upstream is cancelled), but the promise
    // resolves only once the call has ended on the tunnel stream (the stream closed, or a reusable
    // stream is idle again): a process that exits as soon as its calls "finished" would otherwise
    // drop a status still in its send buffer, and a reused stream must not be handed on early.
    const callEnded = stream.whenCallEnded();
    const settle = (code: number, details: string): void => {
      if (settled) return;
      settled = true;
      const outcome: CallOutcome = { code, details, requestBytes, responseBytes };
      void callEnded.then(() => resolve(outcome));
    };

    // Trailers go out only after every response message has been forwarded: grpc-js may report
    // the status while messages still sit in the stream's read buffer.
    const maybeSendTrailers = (): void => {
      if (settled || !status || !readEnded) return;
      stream.send({
        kind: 'trailers',
        trailers: { code: status.code, message: status.details, metadata: responseMetadataToWire(status.metadata) },
      });
      stream.endCall();
      settle(status.code, status.details);
    };

    call.on('metadata', (md: Metadata) => {
      if (!settled) stream.send({ kind: 'headers', metadata: responseMetadataToWire(md) });
    });
    call.on('data', (message: Buffer) => {
      // After the call settled (cancelled), a reused stream may already carry the next call.
      if (settled) return;
      responseBytes += message.length;
      if (!stream.send({ kind: 'message', data: message })) call.pause();
    });
    call.on('end', () => {
      readEnded = true;
      maybeSendTrailers();
    });
    call.on('error', () => {}); // the 'status' event carries the same information
    call.on('status', (s: StatusObject) => {
      status = s;
      maybeSendTrailers();
    });

    const cancelUpstream = (code: number, details: string): void => {
      if (settled) return;
      call.cancel();
      // On a reusable stream Trailers always follow Cancel: they are what frees the stream.
      if (stream.reusable) stream.send({ kind: 'trailers', trailers: { code, message: details, metadata: [] } });
      stream.endCall();
      settle(code, details);
    };

    stream.attach({
      onFrame(frame) {
        switch (frame.kind) {
          case 'message':
            requestBytes += frame.data.length;
            if (!call.write(frame.data)) {
              stream.pause();
              call.once('drain', () => stream.resume());
            }
            return;
          case 'halfClose':
            call.end();
            return;
          case 'cancel':
            cancelUpstream(Status.CANCELLED, `cancelled by the originator: ${frame.reason}`);
            return;
          default:
            return;
        }
      },
      onDrain() {
        call.resume();
      },
      onClosed(error) {
        if (error) cancelUpstream(Status.UNAVAILABLE, `tunnel stream lost: ${error.message}`);
      },
      onProtocolError(error) {
        cancelUpstream(Status.INTERNAL, error.message);
      },
    });
  });
}
