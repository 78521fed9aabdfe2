import { Metadata, status as Status, type ServerDuplexStream } from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import type { CallStream } from './call-stream';
import { BurrowError } from './errors';
import { requestMetadataToWire, responseMetadataFromWire } from './metadata-policy';

export interface OriginateOptions {
  /** Id of the call, sent in Start for the far side's logs. */
  callId: string;
  /** Name of the far side for error messages, e.g. `agent "site-a"` or `broker`. */
  peerName: string;
}

/**
 * Drives the originator end of one forwarded call: `client` is the call Burrow received from a real
 * gRPC client, `stream` the tunnel stream it travels on. Resolves when the client has its status;
 * never rejects. Backpressure runs both ways: the client is paused while the tunnel is full and the
 * tunnel is paused while the client is not reading.
 */
export function originate(client: ServerDuplexStream<Buffer, Buffer>, stream: CallStream, opts: OriginateOptions): Promise<CallOutcome> {
  return new Promise((resolve) => {
    let requestBytes = 0;
    let responseBytes = 0;
    let settled = false;

    const deadline = client.getDeadline();
    const deadlineMs = deadline instanceof Date ? deadline.getTime() : deadline;

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
      onDrain() { client.resume(); },
      onClosed(error) {
        if (error) complete(Status.UNAVAILABLE, `connection to ${opts.peerName} lost during the call: ${error.message}`, new Metadata());
      },
      onProtocolError(error) {
        complete(Status.UNAVAILABLE, `${opts.peerName} broke the tunnel protocol: ${error.message}`, new Metadata());
      },
    });

    const timeoutMs = Number.isFinite(deadlineMs) ? Math.max(1, deadlineMs - Date.now()) : 0;
    stream.send({
      kind: 'start',
      start: { method: client.getPath(), metadata: requestMetadataToWire(client.metadata), timeoutMs, callId: opts.callId },
    });

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
