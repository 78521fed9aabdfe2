import {
  Client,
  Metadata,
  status as Status,
  type ChannelCredentials,
  type ClientDuplexStream,
  type StatusObject,
} from '@grpc/grpc-js';
import {
  SESSION_ID_KEY,
  TUNNEL_METHODS,
  decodeCallFrame,
  decodeSessionFrame,
  encodeCallFrame,
  encodeSessionFrame,
  type CallFrame,
  type SessionFrame,
  type StartFrame,
  type WelcomeFrame,
} from '@burrow/tunnel';
import type { CertFiles } from './pki-fixture';
import { mtlsCredentials, raw } from './raw-grpc';

/**
 * A hand-written agent for protocol tests: it speaks tunnel.proto directly with grpc-js (identity
 * serializers on the Tunnel paths, mTLS with an agent certificate) and does only what the test tells
 * it to, so tests can send the broker any sequence of frames, legal or not, and see exactly what
 * comes back. It keeps no pool and opens nothing by itself.
 *
 *   const agent = new RawAgent(stack.agentAddress, stack.agentCert);
 *   const session = agent.session();
 *   session.hello({ minIdleOffers: 0 });
 *   const welcome = await session.welcome();
 *   const offer = agent.offer(welcome.sessionId);
 *   ...
 *   agent.close(); // cancels everything still open
 */
export class RawAgent {
  readonly client: Client;
  private readonly streams = new Set<{ readonly status: StatusObject | undefined; cancel(): void }>();

  constructor(address: string, cert: CertFiles | ChannelCredentials) {
    const creds = 'cert' in cert ? mtlsCredentials(cert) : cert;
    // Own subchannel: every RawAgent is its own HTTP/2 connection, like a real agent process.
    this.client = new Client(address, creds, {
      'grpc.use_local_subchannel_pool': 1,
      'grpc.enable_retries': 0,
      'grpc.max_receive_message_length': -1,
      'grpc.max_send_message_length': -1,
    });
  }

  /** Opens a Session stream; nothing is sent until the test sends it. */
  session(md = new Metadata()): RawSession {
    const s = new RawSession(this.client.makeBidiStreamRequest(TUNNEL_METHODS.session, raw, raw, md));
    this.track(s);
    return s;
  }

  /** Opens an Offer stream for `sessionId` (no metadata at all when `sessionId` is undefined). */
  offer(sessionId: string | undefined): RawCallStream {
    return this.callStream(TUNNEL_METHODS.offer, sessionId);
  }

  /** Opens a Forward stream for `sessionId`. */
  forward(sessionId: string | undefined): RawCallStream {
    return this.callStream(TUNNEL_METHODS.forward, sessionId);
  }

  /** Streams opened and not yet finished with a status. */
  get openStreams(): number {
    return [...this.streams].filter((s) => !s.status).length;
  }

  /** Cancels every stream still open and closes the channel. Idempotent. */
  close(): void {
    for (const s of this.streams) if (!s.status) s.cancel();
    this.streams.clear();
    this.client.close();
  }

  private callStream(path: string, sessionId: string | undefined): RawCallStream {
    const md = new Metadata();
    if (sessionId !== undefined) md.set(SESSION_ID_KEY, sessionId);
    const s = new RawCallStream(this.client.makeBidiStreamRequest(path, raw, raw, md));
    this.track(s);
    return s;
  }

  private track(s: { readonly status: StatusObject | undefined; cancel(): void }): void {
    this.streams.add(s);
  }
}

/**
 * One tunnel stream seen from the agent: received frames queue up until the test takes them with
 * next(); the final status is kept. Undecodable bytes from the broker are a test failure: next()
 * rejects with the decode error.
 */
export class RawStream<F> {
  /** Every frame received, in order (also those already taken by next()). */
  readonly received: F[] = [];
  status: StatusObject | undefined;
  private readonly queue: F[] = [];
  private decodeError: Error | undefined;
  private waiters: { resolve(f: F): void; reject(e: Error): void }[] = [];
  private statusWaiters: ((s: StatusObject) => void)[] = [];
  private watchers: { pred(f: F): boolean; resolve(f: F): void }[] = [];

  constructor(
    readonly call: ClientDuplexStream<Buffer, Buffer>,
    readonly decode: (b: Buffer) => F,
  ) {
    call.on('data', (bytes: Buffer) => {
      let frame: F;
      try {
        frame = decode(bytes);
      } catch (err) {
        this.decodeError = err as Error;
        this.flush();
        return;
      }
      this.received.push(frame);
      this.queue.push(frame);
      this.watchers = this.watchers.filter((w) => {
        if (!w.pred(frame)) return true;
        w.resolve(frame);
        return false;
      });
      this.flush();
    });
    call.on('error', () => {}); // 'status' carries it
    call.on('status', (s: StatusObject) => {
      this.status = s;
      this.flush();
      for (const w of this.statusWaiters.splice(0)) w(s);
    });
  }

  /** The next frame from the broker; rejects if the stream ends (with its status) first. */
  next(): Promise<F> {
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      this.flush();
    });
  }

  /**
   * The first frame, received already or later, that matches `pred`; unlike next() it does not take
   * the frame from the queue (for watching several streams at once). Never rejects.
   */
  seen(pred: (f: F) => boolean): Promise<F> {
    const already = this.received.find(pred);
    if (already !== undefined) return Promise.resolve(already);
    return new Promise((resolve) => this.watchers.push({ pred, resolve }));
  }

  /** The next frame, which must be of `kind`. */
  async expectNext<K extends string>(kind: K): Promise<Extract<F, { kind: K }>> {
    const f = await this.next();
    const got = (f as { kind: string }).kind;
    if (got !== kind) throw new Error(`expected a ${kind} frame, got ${got}: ${JSON.stringify(f)}`);
    return f as Extract<F, { kind: K }>;
  }

  /** Resolves with the stream's final status. */
  ended(): Promise<StatusObject> {
    if (this.status) return Promise.resolve(this.status);
    return new Promise((resolve) => this.statusWaiters.push(resolve));
  }

  /** Writes raw bytes (for malformed input). */
  writeBytes(bytes: Buffer): boolean {
    return this.call.write(bytes);
  }
  /** Half-closes this side. */
  end(): void {
    this.call.end();
  }
  cancel(): void {
    this.call.cancel();
  }

  private flush(): void {
    while (this.waiters.length > 0) {
      if (this.queue.length > 0) {
        this.waiters.shift()!.resolve(this.queue.shift()!);
      } else if (this.decodeError) {
        this.waiters.shift()!.reject(this.decodeError);
      } else if (this.status) {
        const s = this.status;
        this.waiters.shift()!.reject(
          Object.assign(new Error(`stream ended with status ${Status[s.code]} (${s.code}): ${s.details}`), {
            code: s.code,
          }),
        );
      } else {
        return;
      }
    }
  }
}

/** A Session stream. */
export class RawSession extends RawStream<SessionFrame> {
  constructor(call: ClientDuplexStream<Buffer, Buffer>) {
    super(call, decodeSessionFrame);
  }

  send(frame: SessionFrame): boolean {
    return this.call.write(encodeSessionFrame(frame));
  }

  /**
   * Sends Hello; defaults: version 1 only (single-call offers, so that a test's frames on one offer
   * are one call), agent version "raw-agent/0", no idle offers. Pass `protocolVersions: [1, 2]` for
   * a version-2 agent, whose offers carry calls one after the other.
   */
  hello(opts: { protocolVersions?: number[]; agentVersion?: string; minIdleOffers?: number } = {}): void {
    this.send({
      kind: 'hello',
      hello: {
        protocolVersions: opts.protocolVersions ?? [1],
        agentVersion: opts.agentVersion ?? 'raw-agent/0',
        minIdleOffers: opts.minIdleOffers ?? 0,
      },
    });
  }

  /** The Welcome frame, which must be the first frame. */
  async welcome(): Promise<WelcomeFrame> {
    return (await this.expectNext('welcome')).welcome;
  }
}

/** An Offer or Forward stream. */
export class RawCallStream extends RawStream<CallFrame> {
  constructor(call: ClientDuplexStream<Buffer, Buffer>) {
    super(call, decodeCallFrame);
  }

  send(frame: CallFrame): boolean {
    return this.call.write(encodeCallFrame(frame));
  }

  /**
   * Answers one call the way a well-behaved agent with an echo upstream would: waits for Start,
   * collects request messages until HalfClose, then sends Headers, one Message with the
   * concatenated request, Trailers OK, and half-closes (unless `keepOpen`: a version-2 agent keeps
   * its offer for the next call). Resolves with the Start frame.
   */
  async answerEcho(headers: { key: string; value: Buffer }[] = [], keepOpen = false): Promise<StartFrame> {
    const start = (await this.expectNext('start')).start;
    const parts: Buffer[] = [];
    for (;;) {
      const f = await this.next();
      if (f.kind === 'message') parts.push(f.data);
      else if (f.kind === 'halfClose') break;
      else throw new Error(`unexpected ${f.kind} frame while reading the request`);
    }
    this.send({ kind: 'headers', metadata: headers });
    this.send({ kind: 'message', data: Buffer.concat(parts) });
    this.send({ kind: 'trailers', trailers: { code: Status.OK, message: '', metadata: [] } });
    if (!keepOpen) this.end();
    return start;
  }
}
