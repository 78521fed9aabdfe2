import { readFileSync } from 'node:fs';
import * as http2 from 'node:http2';
import * as tls from 'node:tls';
import {
  CONTROL_PATH,
  GRPC_CONTENT_TYPE,
  LEGACY_SESSION_PATH,
  MessageReader,
  TUNNEL_ALPN,
  decodeSessionFrame,
  encodeSessionFrame,
  frameMessage,
  statusOfHeaders,
  type SessionFrame,
  type WelcomeFrame,
} from '@burrow/tunnel';
import type { CertFiles } from './pki-fixture';

/**
 * A hand-written agent for protocol tests (tunnel.proto, version 4): it dials the broker's agent
 * listener with ALPN `burrow-tunnel`, becomes the HTTP/2 server on that connection as a real agent
 * does, and does only what the test tells it to: it sends the session frames (or raw bytes) the
 * test gives, and hands every call stream the broker opens to the test. Nothing is answered or sent
 * by itself.
 *
 *   const agent = await RawAgent.connect(stack.agentAddress, stack.agentCert);
 *   const control = await agent.control();
 *   control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw' } });
 *   const welcome = await control.welcome();
 *   agent.onCall((stream, headers) => ...);
 *   agent.close();
 */
export class RawAgent {
  private controlStream: Promise<RawControl>;
  private callHandler: ((stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => void) | undefined;
  /** Call streams that arrived before a handler was set. */
  readonly pendingCalls: { stream: http2.ServerHttp2Stream; headers: http2.IncomingHttpHeaders }[] = [];
  session: http2.ServerHttp2Session | undefined;
  /** Resolves when the connection has closed. */
  readonly closed: Promise<void>;

  private constructor(readonly socket: tls.TLSSocket) {
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    let gotControl!: (c: RawControl) => void;
    this.controlStream = new Promise((resolve) => {
      gotControl = resolve;
    });
    const server = http2.createServer();
    server.on('session', (s: http2.ServerHttp2Session) => {
      this.session = s;
      s.on('error', () => {});
    });
    let first = true;
    server.on('stream', (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => {
      stream.on('error', () => {});
      if (first && headers[':path'] === CONTROL_PATH) {
        first = false;
        stream.respond({ ':status': 200, 'content-type': GRPC_CONTENT_TYPE });
        gotControl(new RawControl(stream));
        return;
      }
      if (this.callHandler) this.callHandler(stream, headers);
      else this.pendingCalls.push({ stream, headers });
    });
    server.emit('connection', socket);
  }

  /**
   * Dials `address` as agent `cert` with ALPN `burrow-tunnel` (or `alpn`); resolves once TLS is up.
   * Rejects with the TLS error when the handshake fails.
   */
  static connect(address: string, cert: CertFiles, opts: { alpn?: string[] } = {}): Promise<RawAgent> {
    const [host, port] = splitAddress(address);
    return new Promise((resolve, reject) => {
      const socket = tls.connect({
        host,
        port,
        ca: readFileSync(cert.ca),
        cert: readFileSync(cert.cert),
        key: readFileSync(cert.key),
        ALPNProtocols: opts.alpn ?? [TUNNEL_ALPN],
        // Tests dial by IP; the broker's identity is not what they check.
        checkServerIdentity: () => undefined,
      });
      socket.once('error', reject);
      socket.once('secureConnect', () => {
        socket.off('error', reject);
        socket.on('error', () => {});
        resolve(new RawAgent(socket));
      });
    });
  }

  /** The control stream, once the broker has opened it. */
  control(): Promise<RawControl> {
    return this.controlStream;
  }

  /** Hands every call stream the broker opens (and those that came before) to `handler`. */
  onCall(handler: (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => void): void {
    this.callHandler = handler;
    for (const c of this.pendingCalls.splice(0)) handler(c.stream, c.headers);
  }

  /** Opens the control stream, says Hello with `versions` and resolves with Welcome. */
  async welcome(
    versions: number[] = [4],
    agentVersion = 'raw-agent',
  ): Promise<{ control: RawControl; welcome: WelcomeFrame }> {
    const control = await this.control();
    control.send({ kind: 'hello', hello: { protocolVersions: versions, agentVersion } });
    return { control, welcome: await control.welcome() };
  }

  close(): void {
    this.session?.destroy();
    this.socket.destroy();
  }
}

/** The agent's end of the control stream: frames out, frames in, in order. */
export class RawControl {
  private readonly frames: SessionFrame[] = [];
  private readonly waiters: ((f: SessionFrame | undefined) => void)[] = [];
  private ended = false;
  /** A frame the reader could not decode (the broker broke the protocol), if any. */
  error: Error | undefined;

  constructor(readonly stream: http2.ServerHttp2Stream) {
    const reader = new MessageReader(1024 * 1024);
    stream.on('data', (chunk: Buffer) => {
      try {
        for (const m of reader.push(chunk)) this.push(decodeSessionFrame(m));
      } catch (err) {
        this.error = err as Error;
      }
    });
    const end = (): void => {
      this.ended = true;
      for (const w of this.waiters.splice(0)) w(undefined);
    };
    stream.on('end', end);
    stream.on('close', end);
  }

  private push(frame: SessionFrame): void {
    const w = this.waiters.shift();
    if (w) w(frame);
    else this.frames.push(frame);
  }

  send(frame: SessionFrame): void {
    this.stream.write(frameMessage(encodeSessionFrame(frame)));
  }

  /** Writes `bytes` as they are (a test's malformed frame, a bare length prefix). */
  sendRaw(bytes: Buffer): void {
    this.stream.write(bytes);
  }

  /** The next frame from the broker; undefined once the stream has ended. */
  next(timeoutMs = 5_000): Promise<SessionFrame | undefined> {
    const f = this.frames.shift();
    if (f) return Promise.resolve(f);
    if (this.ended) return Promise.resolve(undefined);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no session frame within ${timeoutMs} ms`)), timeoutMs);
      this.waiters.push((frame) => {
        clearTimeout(timer);
        resolve(frame);
      });
    });
  }

  /** The next frame, which must be Welcome; rejects naming a Refused frame's status otherwise. */
  async welcome(): Promise<WelcomeFrame> {
    const f = await this.next();
    if (f?.kind === 'welcome') return f.welcome;
    if (f?.kind === 'refused') throw Object.assign(new Error(f.message), { code: f.code });
    throw new Error(`expected welcome, got ${f ? f.kind : 'the end of the control stream'}`);
  }

  /** The next frame, which must be Refused: its code and message. */
  async refused(): Promise<{ code: number; message: string }> {
    for (;;) {
      const f = await this.next();
      if (f === undefined) throw new Error('control stream ended without a refused frame');
      if (f.kind === 'refused') return { code: f.code, message: f.message };
    }
  }
}

/**
 * An agent of protocol versions 1-3 as a v4 broker sees it: ALPN `h2` and a call to the old
 * Tunnel/Session with a Hello listing `versions`. Resolves with the status the broker answers.
 */
export async function legacySession(
  address: string,
  cert: CertFiles,
  versions: number[],
): Promise<{ code: number; details: string }> {
  const [host, port] = splitAddress(address);
  const session = http2.connect(`https://${address}`, {
    host,
    port,
    ca: readFileSync(cert.ca),
    cert: readFileSync(cert.cert),
    key: readFileSync(cert.key),
    ALPNProtocols: ['h2'],
    checkServerIdentity: () => undefined,
  } as http2.SecureClientSessionOptions);
  session.on('error', () => {});
  try {
    return await new Promise((resolve, reject) => {
      const stream = session.request({
        ':method': 'POST',
        ':path': LEGACY_SESSION_PATH,
        'content-type': GRPC_CONTENT_TYPE,
        te: 'trailers',
      });
      let status: { code: number; details: string } | undefined;
      stream.on('response', (h) => (status ??= statusOfHeaders(h)));
      stream.on('trailers', (h) => (status ??= statusOfHeaders(h)));
      stream.on('error', () => {});
      stream.resume();
      stream.on('close', () => (status ? resolve(status) : reject(new Error('no status from the broker'))));
      stream.write(
        frameMessage(
          encodeSessionFrame({ kind: 'hello', hello: { protocolVersions: versions, agentVersion: 'old-agent' } }),
        ),
      );
    });
  } finally {
    session.destroy();
  }
}

function splitAddress(address: string): [string, number] {
  const i = address.lastIndexOf(':');
  return [address.slice(0, i).replace(/^\[|\]$/g, ''), Number(address.slice(i + 1))];
}
