import { status as Status } from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import type { CallStream } from './call-stream';
import type { CallFrame } from './frames';

/** Options of {@link relayCall}. */
export interface RelayOptions {
  /**
   * The method the call was admitted for (the owning broker checked policy for it): a Start
   * naming another one is refused with PERMISSION_DENIED and never reaches the answerer.
   */
  expectedMethod?: string;
}

/**
 * Carries one forwarded call from one tunnel stream to another without decoding its messages: the
 * broker that owns an agent's tunnel relays a call another broker forwarded to it (peer API) onto
 * one of the agent's offers. `inbound` is the stream the call arrived on (this side answers it),
 * `outbound` the stream towards the answerer (this side originates on it). Both state machines
 * check every frame, so a peer that breaks the order on either side is caught there.
 *
 * Backpressure runs both ways (a stream that cannot take more pauses the other). Either side
 * vanishing ends the call on the other: towards the answerer with Cancel, towards the originator
 * with UNAVAILABLE trailers. Resolves once the call is over on both streams; never rejects.
 */
export function relayCall(
  inbound: CallStream,
  outbound: CallStream,
  peerName: string,
  opts: RelayOptions = {},
): Promise<CallOutcome & { method?: string }> {
  return new Promise((resolve) => {
    let requestBytes = 0;
    let responseBytes = 0;
    let method: string | undefined;
    let outcome: { code: number; details: string } | undefined;

    // The answerer's status went back (or the call was abandoned): end both halves once.
    const settle = (code: number, details: string): void => {
      if (outcome) return;
      outcome = { code, details };
      inbound.finish();
      outbound.endCall();
      void outbound.whenCallEnded().then(() => resolve({ code, details, requestBytes, responseBytes, method }));
    };
    const failInbound = (details: string): void => {
      if (outcome) return;
      inbound.send({ kind: 'trailers', trailers: { code: Status.UNAVAILABLE, message: details, metadata: [] } });
      settle(Status.UNAVAILABLE, details);
    };
    const abandonOutbound = (reason: string): void => {
      if (outcome) return;
      if (outbound.callState.request === 'open' || outbound.callState.request === 'half-closed')
        outbound.send({ kind: 'cancel', reason });
      settle(Status.CANCELLED, reason);
    };
    const toOutbound = (frame: CallFrame): void => {
      if (frame.kind === 'start' && opts.expectedMethod !== undefined && frame.start.method !== opts.expectedMethod) {
        // Nothing reached the answerer: the call is refused before its Start goes on.
        const method = frame.start.method.slice(0, 200);
        const details = `the call's method ${method} is not ${opts.expectedMethod}, the one it was admitted for`;
        const trailers = { code: Status.PERMISSION_DENIED, message: details, metadata: [] };
        inbound.send({ kind: 'trailers', trailers });
        settle(Status.PERMISSION_DENIED, details);
        return;
      }
      if (frame.kind === 'message') requestBytes += frame.data.length;
      else if (frame.kind === 'start') method = frame.start.method;
      if (!outbound.send(frame)) inbound.pause();
      if (frame.kind === 'cancel') settle(Status.CANCELLED, frame.reason);
    };

    inbound.attach({
      onFrame: toOutbound,
      onDrain: () => outbound.resume(),
      onClosed: (error) => {
        if (error) abandonOutbound(`forwarding broker lost the call: ${error.message}`);
      },
      onProtocolError: (error) => abandonOutbound(`forwarding broker broke the tunnel protocol: ${error.message}`),
    });
    outbound.attach({
      onFrame(frame) {
        if (outcome && frame.kind !== 'trailers') return;
        if (frame.kind === 'message') responseBytes += frame.data.length;
        if (!inbound.send(frame)) outbound.pause();
        if (frame.kind === 'trailers') settle(frame.trailers.code, frame.trailers.message);
      },
      onDrain: () => inbound.resume(),
      onClosed: (error) => {
        if (error) failInbound(`connection to ${peerName} lost during the call: ${error.message}`);
      },
      onProtocolError: (error) => failInbound(`${peerName} broke the tunnel protocol: ${error.message}`),
    });
  });
}
