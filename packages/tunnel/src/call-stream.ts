import type { ClientDuplexStream, ServerDuplexStream, StatusObject } from '@grpc/grpc-js';
import { status as Status } from '@grpc/grpc-js';
import { INITIAL_CALL_STATE, isCallDone, isIdle, transition, type CallState, type FrameSender } from './call-state';
import { BurrowError, ProtocolError, toBurrowError } from './errors';
import { decodeCallFrame, encodeCallFrame, type CallFrame } from './frames';

/** What a {@link CallStream} reports to the code driving the forwarded call. */
export interface CallStreamHandlers {
  /** A frame that passed the state machine and is to be acted on. */
  onFrame(frame: CallFrame): void;
  /** The transport can take more frames after {@link CallStream.send} returned false. */
  onDrain(): void;
  /**
   * The transport stream is finished. `error` is set when it ended before the call was complete
   * (the peer vanished, reset the stream or the connection dropped).
   */
  onClosed(error?: BurrowError): void;
  /** The peer broke the protocol on this stream; the owner closes the whole session. */
  onProtocolError(error: ProtocolError): void;
}

/**
 * What the owner of a reusable stream (the pool it belongs to) hears, whatever call handlers are
 * attached at the time.
 */
export interface CallStreamOwnerHooks {
  /**
   * The call in progress ended and the stream is idle again (reusable streams only). The call's
   * handlers are detached already; frames of the next call queue until the next {@link CallStream.attach}.
   */
  onCallEnded?(): void;
  /** The transport stream is finished (after the call handlers' `onClosed`). */
  onClosed?(error?: BurrowError): void;
}

/**
 * What a CallStream uses of its transport: a grpc-js `ServerDuplexStream` or `ClientDuplexStream` of bytes
 * (client streams also have `cancel`). Naming only these lets the unit tests drive a CallStream with a fake.
 */
export interface CallDuplex extends NodeJS.EventEmitter {
  write(chunk: Buffer): boolean;
  pause(): unknown;
  resume(): unknown;
  end(): unknown;
}

/**
 * One Offer or Forward stream seen as a sequence of validated call frames. It owns the
 * {@link CallState} for the call, checks every frame sent and received against it, and turns the
 * ways a gRPC stream can end into one `onClosed` callback.
 *
 * A `reusable` stream (an Offer stream of a protocol-version-2 session) carries calls one after
 * the other: when a call ends (see call-state.ts) its handlers are detached, {@link whenCallEnded}
 * resolves and the owner's `onCallEnded` hook runs; the next call attaches its own handlers.
 *
 * `grpcRole` says which end of the gRPC stream this is: the broker is always the gRPC server of
 * tunnel streams, the agent always the client, whatever their forwarded-call role.
 */
export class CallStream {
  private state: CallState = INITIAL_CALL_STATE;
  private handlers: CallStreamHandlers | undefined;
  private readonly peer: FrameSender;
  // Invariant: once closed, no handler is called again and send() is a no-op.
  private closed = false;
  private writeEnded = false;
  private readEnded = false;
  private pendingFrames: CallFrame[] = [];
  // Resolved when the call in progress ends (true) or the stream closes (false).
  private callEndWaiters: ((reusable: boolean) => void)[] = [];
  private closeWaiters: (() => void)[] = [];
  private endedCalls = 0;
  /** Set by the owner of a reusable stream; see {@link CallStreamOwnerHooks}. */
  ownerHooks: CallStreamOwnerHooks = {};

  /**
   * @param onOwnerProtocolError called on a protocol error whatever handlers are attached at the
   *   time, so the owner of the session (not just the call) always learns of it and can close the
   *   session, as tunnel.proto requires.
   */
  constructor(
    private readonly duplex: CallDuplex,
    readonly grpcRole: 'server' | 'client',
    readonly role: FrameSender,
    private readonly onOwnerProtocolError?: (error: ProtocolError) => void,
    /** True for an Offer stream of a version-2 session: it carries calls one after the other. */
    readonly reusable = false,
  ) {
    this.peer = role === 'originator' ? 'answerer' : 'originator';
    duplex.on('data', (bytes: Buffer) => this.receive(bytes));
    duplex.on('drain', () => this.handlers?.onDrain());
    duplex.on('end', () => {
      this.readEnded = true;
      // On a reusable offer the agent withdraws an idle stream by half-closing it (tunnel.proto,
      // "Offer"); the broker ends its side too. Mid-call, the stream cannot finish the call.
      if (this.reusable && grpcRole === 'server' && !this.writeEnded) {
        if (isIdle(this.state)) this.finish();
        else this.abort(new BurrowError(Status.UNAVAILABLE, 'tunnel stream ended before the call completed'));
        return;
      }
      this.maybeClosedCleanly();
    });
    // grpc-js reports failures of the stream as 'error' (client) or 'cancelled' (server); the
    // 'error' listener also keeps an unhandled error from crashing the process.
    duplex.on('error', () => {});
    if (grpcRole === 'client') {
      (duplex as ClientDuplexStream<Buffer, Buffer>).on('status', (s: StatusObject) => this.onClientStatus(s));
    } else {
      // grpc-js emits 'cancelled' also after a clean end; build the error only when it matters.
      (duplex as ServerDuplexStream<Buffer, Buffer>).on('cancelled', () => {
        if (!this.closed) this.close(new BurrowError(Status.UNAVAILABLE, 'tunnel stream reset by the peer'));
      });
    }
  }

  /** Starts delivering frames to `handlers`; frames that arrived before are delivered now. */
  attach(handlers: CallStreamHandlers): void {
    this.handlers = handlers;
    const pending = this.pendingFrames;
    this.pendingFrames = [];
    for (const f of pending) handlers.onFrame(f);
  }

  get callState(): CallState {
    return this.state;
  }
  /** Calls that have ended on this (reusable) stream so far; tells one call of the stream from the next. */
  get callsEnded(): number {
    return this.endedCalls;
  }
  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Sends one frame. Returns false when the transport's buffer is full: stop producing until
   * `onDrain`. Throws {@link ProtocolError} when this side would break the frame order (a bug).
   */
  send(frame: CallFrame): boolean {
    if (this.closed || this.writeEnded) return false;
    const t = transition(this.state, this.role, frame.kind, this.reusable);
    this.state = t.state;
    const more = this.duplex.write(encodeCallFrame(frame));
    if (t.callEnded) this.endOfCall();
    return more;
  }

  /**
   * Resolves when the call in progress has ended: true when the stream is idle again and can carry
   * another call (reusable streams), false when the stream closed. Resolves at once when no call
   * is in progress. Take it while the call runs: after it ends, a next call may already have begun.
   */
  whenCallEnded(): Promise<boolean> {
    if (this.closed) return Promise.resolve(false);
    if (this.reusable && isIdle(this.state)) return Promise.resolve(true);
    return new Promise((resolve) => this.callEndWaiters.push(resolve));
  }

  /** Resolves once the transport stream is finished (at once if it is). */
  whenClosed(): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => this.closeWaiters.push(resolve));
  }

  /**
   * This side is done with the call in progress. A single-call stream ends ({@link finish}). On a
   * reusable stream an originator whose request is still open sends Cancel, the frame that frees
   * the stream once the answerer's Trailers are in (the answerer's own last frame is Trailers).
   */
  endCall(): void {
    if (!this.reusable) {
      this.finish();
      return;
    }
    if (this.role === 'originator' && this.state.request === 'open')
      this.send({ kind: 'cancel', reason: 'call completed' });
  }

  /** Stops reading frames (backpressure towards the peer through HTTP/2 flow control). */
  pause(): void {
    this.duplex.pause();
  }
  resume(): void {
    if (!this.closed) this.duplex.resume();
  }

  /**
   * Ends this side's half of the gRPC stream once the call is complete: the server end sends
   * status OK, the client end half-closes.
   */
  finish(): void {
    if (this.writeEnded) return;
    this.writeEnded = true;
    this.duplex.end();
    this.maybeClosedCleanly();
  }

  /** Tears the gRPC stream down at once (protocol error or shutdown); pending frames are lost. */
  abort(error: BurrowError): void {
    if (!this.writeEnded) {
      this.writeEnded = true;
      if (this.grpcRole === 'client') (this.duplex as ClientDuplexStream<Buffer, Buffer>).cancel();
      else this.duplex.emit('error', error.toServiceError());
    }
    this.close(error);
  }

  private receive(bytes: Buffer): void {
    if (this.closed) return;
    let frame: CallFrame;
    let deliver: boolean;
    let callEnded: boolean;
    try {
      frame = decodeCallFrame(bytes);
      const t = transition(this.state, this.peer, frame.kind, this.reusable);
      this.state = t.state;
      deliver = t.deliver;
      callEnded = t.callEnded;
    } catch (err) {
      const error = err instanceof ProtocolError ? err : new ProtocolError('bad call frame', err);
      // Detach first: the stream ends (with INTERNAL) without reporting itself "lost", and the
      // handlers learn the real reason exactly once.
      const handlers = this.handlers;
      this.handlers = undefined;
      this.abort(error);
      handlers?.onProtocolError(error);
      this.onOwnerProtocolError?.(error);
      return;
    }
    if (deliver) {
      if (this.handlers) this.handlers.onFrame(frame);
      else this.pendingFrames.push(frame);
    }
    // After delivery: the call's handlers act on its last frame (Trailers) before they are detached.
    if (callEnded && !this.closed) this.endOfCall();
  }

  /** A call ended on a reusable stream: detach its handlers and hand the stream back to its owner. */
  private endOfCall(): void {
    this.endedCalls++;
    this.handlers = undefined;
    // The call may have paused reading for its own backpressure; the next call starts unpaused.
    this.duplex.resume();
    for (const w of this.callEndWaiters.splice(0)) w(true);
    this.ownerHooks.onCallEnded?.();
  }

  private onClientStatus(s: StatusObject): void {
    this.readEnded = true;
    if (s.code === Status.OK) this.maybeClosedCleanly(true);
    else this.close(toBurrowError(s, 'tunnel stream failed'));
  }

  private maybeClosedCleanly(serverFinished = false): void {
    if (this.closed) return;
    const streamDone = serverFinished || (this.readEnded && this.writeEnded);
    if (!streamDone) return;
    // A reusable stream between calls ends cleanly: it is an idle offer being retired.
    const clean = isCallDone(this.state) || (this.reusable && isIdle(this.state));
    this.close(
      clean ? undefined : new BurrowError(Status.UNAVAILABLE, 'tunnel stream ended before the call completed'),
    );
  }

  private close(error?: BurrowError): void {
    if (this.closed) return;
    this.closed = true;
    this.handlers?.onClosed(error);
    for (const w of this.callEndWaiters.splice(0)) w(false);
    for (const w of this.closeWaiters.splice(0)) w();
    this.ownerHooks.onClosed?.(error);
  }
}
