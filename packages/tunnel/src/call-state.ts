import { ProtocolError } from './errors';
import type { CallFrame } from './frames';

/**
 * The forwarded-call state machine: the frame-order rules of tunnel.proto's `CallFrame`, in one
 * place, with one transition function. Both sides run it for the frames they send and the frames
 * they receive, so a peer that breaks the order is caught at the first wrong frame.
 *
 * Two modes, chosen per stream: a *single-call* stream (protocol version 1, and every Forward
 * stream) carries one call and then ends; a *reusable* stream (an Offer stream of a version-2
 * session) returns to `idle` once both halves of its call are over (the originator has sent
 * HalfClose or Cancel and the answerer has sent Trailers), ready for the next Start.
 */

/** Request side (originator -> answerer). */
export type RequestState =
  | 'idle' //         nothing sent yet; only Start may come
  | 'open' //         Start seen; Message, HalfClose and Cancel may come
  | 'half-closed' //  HalfClose seen; only Cancel may come
  | 'cancelled'; //   Cancel seen; nothing more from the originator

/** Response side (answerer -> originator). */
export type ResponseState =
  | 'pending' //  nothing sent yet
  | 'streaming' // Headers or a Message seen; more Messages or Trailers may come
  | 'closed'; //   Trailers seen; the answerer is finished

export interface CallState {
  readonly request: RequestState;
  readonly response: ResponseState;
  /**
   * Reusable streams only, while idle: the previous call ended with the originator's HalfClose,
   * so a Cancel the originator sent after it (its client gave up just as the answer came) may
   * still be on its way, having crossed the answerer's Trailers. That Cancel is dropped.
   */
  readonly lateCancelAllowed?: true;
}

export const INITIAL_CALL_STATE: CallState = { request: 'idle', response: 'pending' };

/** Idle again after a call whose originator half-closed (see {@link CallState.lateCancelAllowed}). */
const IDLE_AFTER_HALF_CLOSE: CallState = { request: 'idle', response: 'pending', lateCancelAllowed: true };

/** True when no call is in progress (a fresh stream, or a reusable one between calls). */
export function isIdle(state: CallState): boolean {
  return state.request === 'idle';
}

export type FrameSender = 'originator' | 'answerer';

/** What to do with a frame after the transition. */
export interface Transition {
  readonly state: CallState;
  /**
   * False when the frame is legal but arrived after the call ended on the other side (a Message
   * racing a Trailers or a Cancel in flight): the receiver drops it. Only races the protocol
   * allows produce `false`; everything else is either delivered or a {@link ProtocolError}.
   */
  readonly deliver: boolean;
  /**
   * True when this frame ended the call on a reusable stream: `state` is back to
   * {@link INITIAL_CALL_STATE} and the stream may carry the next call. Always false on single-call
   * streams, which end instead.
   */
  readonly callEnded: boolean;
}

// Message frames flow both ways; every other kind belongs to one side.
const ORIGINATOR_ONLY = new Set<CallFrame['kind']>(['start', 'halfClose', 'cancel']);
const ANSWERER_ONLY = new Set<CallFrame['kind']>(['headers', 'trailers']);

/**
 * The single transition function. Throws {@link ProtocolError} for a frame that the protocol does
 * not allow in `state` from `sender`. `reusable` selects the reusable-stream mode (see above): the
 * frame that completes both halves of a call resets the state to idle and reports `callEnded`.
 */
export function transition(
  state: CallState,
  sender: FrameSender,
  kind: CallFrame['kind'],
  reusable = false,
): Transition {
  const t = step(state, sender, kind);
  // Both halves over: the originator sent its last frame and the answerer its Trailers. Each side
  // sees the same two frames, so both reset at the same point in the frame sequence.
  if (
    reusable &&
    t.state.response === 'closed' &&
    (t.state.request === 'half-closed' || t.state.request === 'cancelled')
  ) {
    return {
      state: t.state.request === 'half-closed' ? IDLE_AFTER_HALF_CLOSE : INITIAL_CALL_STATE,
      deliver: t.deliver,
      callEnded: true,
    };
  }
  return t;
}

function step(state: CallState, sender: FrameSender, kind: CallFrame['kind']): Transition {
  if ((sender === 'originator' && ANSWERER_ONLY.has(kind)) || (sender === 'answerer' && ORIGINATOR_ONLY.has(kind))) {
    throw new ProtocolError(`${kind} frame sent by the ${sender}`);
  }
  const { request, response } = state;
  if (sender === 'originator') {
    if (request === 'cancelled') throw new ProtocolError(`${kind} frame after cancel`);
    switch (kind) {
      case 'start':
        if (request !== 'idle') throw new ProtocolError('second start frame');
        return { state: { request: 'open', response }, deliver: true, callEnded: false };
      case 'message':
        if (request !== 'open')
          throw new ProtocolError(request === 'idle' ? 'message before start' : 'message after half-close');
        // The answerer may already have finished (Trailers before HalfClose): the message is moot.
        return { state, deliver: response !== 'closed', callEnded: false };
      case 'halfClose':
        if (request !== 'open')
          throw new ProtocolError(request === 'idle' ? 'half-close before start' : 'second half-close');
        return { state: { request: 'half-closed', response }, deliver: response !== 'closed', callEnded: false };
      case 'cancel':
        // The one frame of a finished call that may arrive after it ended: it is moot now.
        if (request === 'idle' && state.lateCancelAllowed)
          return { state: INITIAL_CALL_STATE, deliver: false, callEnded: false };
        if (request === 'idle') throw new ProtocolError('cancel before start');
        // A Cancel crossing the answerer's Trailers is a race, not a violation.
        return { state: { request: 'cancelled', response }, deliver: response !== 'closed', callEnded: false };
    }
  }
  // Answerer frames.
  if (request === 'idle') throw new ProtocolError(`${kind} frame before start`);
  if (response === 'closed') throw new ProtocolError(`${kind} frame after trailers`);
  // After the originator cancelled, answerer frames still in flight are dropped, not errors.
  const deliver = request !== 'cancelled';
  switch (kind) {
    case 'headers':
      if (response !== 'pending') throw new ProtocolError('headers frame after headers or messages');
      return { state: { request, response: 'streaming' }, deliver, callEnded: false };
    case 'message':
      return { state: { request, response: 'streaming' }, deliver, callEnded: false };
    case 'trailers':
      return { state: { request, response: 'closed' }, deliver, callEnded: false };
  }
  throw new ProtocolError(`unknown frame kind ${String(kind)}`);
}

/**
 * True once nothing more will be forwarded for this call on a single-call stream. (On a reusable
 * stream a finished call is reported by {@link Transition.callEnded} instead.)
 */
export function isCallDone(state: CallState): boolean {
  return state.response === 'closed' || state.request === 'cancelled';
}
