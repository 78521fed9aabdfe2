import { ProtocolError } from './errors';
import type { CallFrame } from './frames';

/**
 * The forwarded-call state machine: the frame-order rules of tunnel.proto's `CallFrame`, in one
 * place, with one transition function. Both sides run it for the frames they send and the frames
 * they receive, so a peer that breaks the order is caught at the first wrong frame.
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
}

export const INITIAL_CALL_STATE: CallState = { request: 'idle', response: 'pending' };

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
}

// Message frames flow both ways; every other kind belongs to one side.
const ORIGINATOR_ONLY = new Set<CallFrame['kind']>(['start', 'halfClose', 'cancel']);
const ANSWERER_ONLY = new Set<CallFrame['kind']>(['headers', 'trailers']);

/**
 * The single transition function. Throws {@link ProtocolError} for a frame that the protocol does
 * not allow in `state` from `sender`.
 */
export function transition(state: CallState, sender: FrameSender, kind: CallFrame['kind']): Transition {
  if ((sender === 'originator' && ANSWERER_ONLY.has(kind)) || (sender === 'answerer' && ORIGINATOR_ONLY.has(kind))) {
    throw new ProtocolError(`${kind} frame sent by the ${sender}`);
  }
  const { request, response } = state;
  if (sender === 'originator') {
    if (request === 'cancelled') throw new ProtocolError(`${kind} frame after cancel`);
    switch (kind) {
      case 'start':
        if (request !== 'idle') throw new ProtocolError('second start frame');
        return { state: { request: 'open', response }, deliver: true };
      case 'message':
        if (request !== 'open') throw new ProtocolError(request === 'idle' ? 'message before start' : 'message after half-close');
        // The answerer may already have finished (Trailers before HalfClose): the message is moot.
        return { state, deliver: response !== 'closed' };
      case 'halfClose':
        if (request !== 'open') throw new ProtocolError(request === 'idle' ? 'half-close before start' : 'second half-close');
        return { state: { request: 'half-closed', response }, deliver: response !== 'closed' };
      case 'cancel':
        if (request === 'idle') throw new ProtocolError('cancel before start');
        // A Cancel crossing the answerer's Trailers is a race, not a violation.
        return { state: { request: 'cancelled', response }, deliver: response !== 'closed' };
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
      return { state: { request, response: 'streaming' }, deliver };
    case 'message':
      return { state: { request, response: 'streaming' }, deliver };
    case 'trailers':
      return { state: { request, response: 'closed' }, deliver };
  }
  throw new ProtocolError(`unknown frame kind ${String(kind)}`);
}

/** True once nothing more will be forwarded for this call. */
export function isCallDone(state: CallState): boolean {
  return state.response === 'closed' || state.request === 'cancelled';
}
