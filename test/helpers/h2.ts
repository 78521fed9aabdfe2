import * as http2 from 'node:http2';
import type { AddressInfo, Socket } from 'node:net';

/**
 * Plain-text HTTP/2 on loopback for the raw data-plane tests: a server on 127.0.0.1:0 that
 * remembers its sessions (so `close` can end them all), and client sessions that resolve once
 * connected.
 */
export interface LoopbackServer {
  server: http2.Http2Server;
  port: number;
  /** host:port, as grpc-js and the upstream table take addresses. */
  address: string;
  sessions: Set<http2.ServerHttp2Session>;
  /** The accepted TCP sockets (a test destroys one to lose a connection abruptly). */
  sockets: Set<Socket>;
  /** Destroys every session and stops listening. */
  close(): Promise<void>;
}

export type StreamHandler = (
  stream: http2.ServerHttp2Stream,
  headers: http2.IncomingHttpHeaders,
  rawHeaders: string[],
) => void;

export async function listenH2(onStream: StreamHandler): Promise<LoopbackServer> {
  const server = http2.createServer();
  const sessions = new Set<http2.ServerHttp2Session>();
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.on('session', (s) => {
    sessions.add(s);
    s.on('error', () => {});
    s.on('close', () => sessions.delete(s));
  });
  server.on(
    'stream',
    (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, _f: number, rawHeaders: string[]) => {
      stream.on('error', () => {});
      onStream(stream, headers, rawHeaders);
    },
  );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    server,
    port,
    address: `127.0.0.1:${port}`,
    sessions,
    sockets,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sessions) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** A client session to `address`, resolved once connected. */
export function connectH2(address: string): Promise<http2.ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`http://${address}`);
    session.once('connect', () => {
      session.off('error', reject);
      session.on('error', () => {});
      resolve(session);
    });
    session.once('error', reject);
  });
}

/** Destroys `session` and resolves once it has closed. */
export function closeSession(session: http2.ClientHttp2Session | http2.ServerHttp2Session): Promise<void> {
  if (session.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    session.once('close', () => resolve());
    session.destroy();
  });
}

/** Everything a raw client stream received. */
export interface RawReply {
  headers: http2.IncomingHttpHeaders;
  /** Flags of the response HEADERS frame (END_STREAM = 1 for trailers-only). */
  headerFlags: number;
  trailers: http2.IncomingHttpHeaders | undefined;
  data: Buffer;
  rstCode: number | undefined;
}

/** Reads `stream` to its close. */
export function readReply(stream: http2.ClientHttp2Stream): Promise<RawReply> {
  return new Promise((resolve) => {
    const reply: RawReply = { headers: {}, headerFlags: 0, trailers: undefined, data: Buffer.alloc(0), rstCode: 0 };
    const parts: Buffer[] = [];
    stream.on('response', (h, flags) => {
      reply.headers = h;
      reply.headerFlags = flags;
    });
    stream.on('trailers', (t) => {
      reply.trailers = t;
    });
    stream.on('data', (c: Buffer) => parts.push(c));
    stream.on('error', () => {});
    stream.on('close', () => {
      reply.data = Buffer.concat(parts);
      reply.rstCode = stream.rstCode;
      resolve(reply);
    });
  });
}
