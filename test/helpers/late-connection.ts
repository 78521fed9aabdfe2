import * as http2 from 'node:http2';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { readFileSync } from 'node:fs';
import type { CertFiles } from './pki-fixture';

/** A TCP connection that has not said ClientHello yet: a TLS handshake the server waits for. */
export function stalledConnection(port: number, host = '127.0.0.1'): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, host, () => resolve(s));
    s.on('error', reject);
  });
}

/** One gRPC message frame (uncompressed). */
function grpcFrame(payload: Buffer): Buffer {
  const header = Buffer.alloc(5);
  header.writeUInt32BE(payload.length, 1);
  return Buffer.concat([header, payload]);
}

/** What {@link callOverStalledConnection} saw. */
export interface LateCall {
  /** The first of: `GOAWAY <code>` on the session, or `stream closed (...) before any GOAWAY`. */
  first: Promise<string>;
  /** `stream closed (answered: <response headers came>, rstCode <code>)`. */
  streamClosed: Promise<string>;
  /** Closes the HTTP/2 session and the socket. */
  close(): void;
}

/**
 * Finishes the TLS handshake of `raw` (from {@link stalledConnection}) with `cert`, opens an
 * HTTP/2 session on it and sends one unary gRPC call to `path` at once, before anything the server
 * sends can arrive: how a client whose connection was accepted just before a shutdown behaves.
 */
export function callOverStalledConnection(
  raw: net.Socket,
  cert: CertFiles,
  path: string,
  headers: Record<string, string> = {},
): LateCall {
  const socket = tls.connect({
    socket: raw,
    servername: 'localhost',
    key: readFileSync(cert.key),
    cert: readFileSync(cert.cert),
    ca: readFileSync(cert.ca),
    ALPNProtocols: ['h2'],
  });
  const session = http2.connect('https://localhost', { createConnection: () => socket });
  session.on('error', () => {});
  const goaway = new Promise<string>((resolve) => {
    session.once('goaway', (code: number) => resolve(`GOAWAY ${code}`));
    session.once('close', () => resolve('closed without GOAWAY'));
  });
  const stream = session.request({
    ':method': 'POST',
    ':path': path,
    'content-type': 'application/grpc',
    te: 'trailers',
    ...headers,
  });
  stream.on('error', () => {});
  stream.resume();
  stream.end(grpcFrame(Buffer.from('late')));
  let answered = false;
  stream.on('response', () => {
    answered = true;
  });
  const streamClosed = new Promise<string>((resolve) =>
    stream.once('close', () => resolve(`stream closed (answered: ${answered}, rstCode ${stream.rstCode})`)),
  );
  return {
    first: Promise.race([goaway, streamClosed.then((s) => `${s} before any GOAWAY`)]),
    streamClosed,
    close: () => {
      session.close();
      socket.destroy();
      raw.destroy();
    },
  };
}
