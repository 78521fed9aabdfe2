import { status as Status } from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import type { CallStream } from './call-stream';

/**
 * Answers the call that just started on `stream` with UNIMPLEMENTED and `details` (its side has
 * no upstream for the method's service), and ends the call on the stream: a stream error, the
 * tunnel lives on. Called by the agent for an Offer and by the broker for a Forward. Returns the
 * status, for the call's accounting.
 */
export function answerUnimplemented(stream: CallStream, details: string): Pick<CallOutcome, 'code' | 'details'> {
  const code = Status.UNIMPLEMENTED;
  stream.send({ kind: 'trailers', trailers: { code, message: details, metadata: [] } });
  stream.endCall();
  return { code, details };
}
