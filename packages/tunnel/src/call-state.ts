/**
 * The state of one relayed call as the side in the middle sees it (stream-relay.ts): everything
 * else a call needs (ordering, flow control, cancellation) is HTTP/2's, so what is left is when
 * the call's status is decided and when it is over. Every change goes through {@link transition};
 * the relay asks the state, never its own flags, whether an event still matters.
 *
 *   awaiting-response --response headers--> responding
 *   awaiting-response | responding --status (next hop) | failed (this side) | caller gone--> settled
 *   any --caller's stream closed--> (settled with CANCELLED if nothing decided it) closed
 *
 * Invariants: `outcome` is set exactly from `settled` on and never changes; `closed` is final and
 * is the only phase in which the relay resolves.
 */

/** The phase of a relayed call. */
export type CallPhase = 'awaiting-response' | 'responding' | 'settled' | 'closed';

/** The status a call ended with, as its caller sees it. */
export interface CallStatus {
  code: number;
  details: string;
}

export interface CallState {
  readonly phase: CallPhase;
  /** Set from `settled` on: the status the caller gets (or got). */
  readonly outcome?: CallStatus;
}

/** What happened to the call. */
export type CallEvent =
  /** The next hop sent response headers; they went on to the caller. */
  | { kind: 'response-headers' }
  /** The next hop's status (trailers, or a trailers-only response) went on to the caller. */
  | { kind: 'status'; status: CallStatus }
  /** This side ended the call (a limit, the deadline, a cut credential, a reset of the next hop). */
  | { kind: 'failed'; status: CallStatus }
  /** The caller reset its stream before any status. */
  | { kind: 'caller-gone' }
  /** The caller's stream has closed (whatever the reason). */
  | { kind: 'caller-closed' };

export const INITIAL_CALL_STATE: CallState = { phase: 'awaiting-response' };

/** CANCELLED, as the outcome of a call whose caller went away first. */
const CALLER_GONE: CallStatus = { code: 1, details: 'the caller cancelled the call' };

/**
 * The state after `event`. Events that no longer matter (a second status, headers after the
 * status) leave the state as it is: the relay checks {@link isSettled} before acting on one.
 */
export function transition(state: CallState, event: CallEvent): CallState {
  if (state.phase === 'closed') return state;
  switch (event.kind) {
    case 'response-headers':
      return state.phase === 'awaiting-response' ? { phase: 'responding' } : state;
    case 'status':
    case 'failed':
      return isSettled(state) ? state : { phase: 'settled', outcome: event.status };
    case 'caller-gone':
      return isSettled(state) ? state : { phase: 'settled', outcome: CALLER_GONE };
    case 'caller-closed':
      return { phase: 'closed', outcome: state.outcome ?? CALLER_GONE };
  }
}

/** True once the call's status is decided: nothing more goes to the caller or the next hop. */
export function isSettled(state: CallState): boolean {
  return state.phase === 'settled' || state.phase === 'closed';
}
