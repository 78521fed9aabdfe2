import type * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import type { CallOutcome } from './call-outcome';
import { endWithStatus } from './grpc-wire';

/**
 * Answers the call on `stream` with UNIMPLEMENTED and `details` (this side has no upstream for the
 * method's service): a stream error, the tunnel lives on. Called by the agent for a call from the
 * broker and by the broker for a site's call. Returns the status, for the call's accounting.
 */
export function answerUnimplemented(
  stream: http2.ServerHttp2Stream,
  details: string,
): Pick<CallOutcome, 'code' | 'details'> {
  endWithStatus(stream, Status.UNIMPLEMENTED, details);
  return { code: Status.UNIMPLEMENTED, details };
}
