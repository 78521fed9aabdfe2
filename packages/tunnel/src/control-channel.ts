import type * as http2 from 'node:http2';
import { ProtocolError, type BurrowError } from './errors';
import {
  MAX_SESSION_FRAME_BYTES,
  type SessionFrame,
  decodeSessionFrame,
  encodeSessionFrame,
  sessionFrameTooLarge,
} from './frames';
import { MessageReader, frameMessage } from './grpc-wire';

/** What a control channel reports to its owner. */
export interface ControlHandlers {
  onFrame(frame: SessionFrame): void;
  /** The peer broke the protocol on the control stream (undecodable or oversized frame). */
  onProtocolError(error: ProtocolError): void;
  /** The stream ended or was reset: the session is over. Called once. */
  onClosed(): void;
}

/**
 * The session frames of one tunnel connection on its control stream (tunnel.proto, "Control
 * stream"): the broker's request stream or the agent's response stream, each frame one gRPC
 * length-prefixed message. A frame over {@link MAX_SESSION_FRAME_BYTES} is refused from its prefix,
 * before its body is buffered.
 */
export class ControlChannel {
  private readonly reader = new MessageReader(
    MAX_SESSION_FRAME_BYTES,
    (bytes) => new ProtocolError(sessionFrameTooLarge(bytes)),
  );
  private closed = false;
  private broken = false;

  constructor(
    private readonly stream: http2.Http2Stream,
    private readonly handlers: ControlHandlers,
  ) {
    stream.on('data', (chunk: Buffer) => this.receive(chunk));
    stream.on('error', () => {});
    stream.on('end', () => this.ended());
    stream.on('close', () => this.ended());
  }

  /** Sends one frame; false when the stream is gone (the session is over anyway). */
  send(frame: SessionFrame): boolean {
    if (this.closed || this.stream.destroyed || this.stream.writableEnded) return false;
    this.stream.write(frameMessage(encodeSessionFrame(frame)));
    return true;
  }

  /**
   * True when a frame sent now goes out without queueing behind HTTP/2 flow control: best-effort
   * frames (Telemetry) are sent only then, so they never hold up the frames that matter.
   */
  get writable(): boolean {
    return !this.closed && !this.stream.destroyed && !this.stream.writableEnded && !this.stream.writableNeedDrain;
  }

  /** Ends the stream after anything already written (a Refused frame goes out before the end). */
  end(): void {
    if (!this.stream.destroyed && !this.stream.writableEnded) this.stream.end();
  }

  private receive(chunk: Buffer): void {
    if (this.broken) return;
    let frames: Buffer[];
    try {
      frames = this.reader.push(chunk);
    } catch (err) {
      this.broke(err instanceof ProtocolError ? err : new ProtocolError((err as BurrowError).message));
      return;
    }
    for (const bytes of frames) {
      let frame: SessionFrame;
      try {
        frame = decodeSessionFrame(bytes);
      } catch (err) {
        this.broke(err as ProtocolError);
        return;
      }
      this.handlers.onFrame(frame);
      if (this.broken || this.closed) return;
    }
  }

  private broke(error: ProtocolError): void {
    this.broken = true;
    this.handlers.onProtocolError(error);
  }

  private ended(): void {
    if (this.closed) return;
    this.closed = true;
    this.handlers.onClosed();
  }
}
