import {
  Metadata,
  type Server,
  type ServerDuplexStream,
  type ServerInterceptingCall,
  type ServerInterceptingCallInterface,
  type ServerInterceptor,
  type StatusObject,
  type status as Status,
} from '@grpc/grpc-js';
import type { IncomingHttpHeaders, ServerHttp2Stream } from 'node:http2';
import { guardConnections, refuseStream } from './connection-guard';

/** Passes message bytes through untouched: the tunnel never decodes application messages. */
export const identity = (b: Buffer): Buffer => b;

/** Handles every call to a path the server has no registered service for. */
export type CatchAllHandler = (call: ServerDuplexStream<Buffer, Buffer>) => void;

interface HandlerLookup {
  _retrieveHandler(path: string): unknown;
}

/**
 * Makes `server` hand every call whose method it does not serve itself to `handler`, as a bidi
 * stream of raw message bytes.
 *
 * grpc-js has no public "unknown service handler" (grpc-go's UnknownServiceHandler); the broker's
 * caller API and the agent's local listener must accept any method to stay transparent. grpc-js
 * routes every call through `Server._retrieveHandler(path)`, so we wrap that one method. A bidi
 * handler is right for all four call kinds: on the wire a unary call is a bidi call with one
 * message each way, and the far end's upstream enforces the real cardinality.
 * test/grpc-server-hooks.test.ts fails if a grpc-js upgrade changes this hook.
 */
export function installCatchAll(server: Server, handler: CatchAllHandler): void {
  const lookup = server as unknown as HandlerLookup;
  const registered = lookup._retrieveHandler.bind(server);
  if (typeof registered !== 'function')
    throw new Error('grpc-js Server has no _retrieveHandler; catch-all unsupported');
  lookup._retrieveHandler = (path: string) =>
    registered(path) ?? {
      func: handler,
      serialize: identity,
      deserialize: identity,
      type: 'bidi',
      path,
    };
}

interface Http2ServerList {
  http2Servers?: Map<import('node:net').Server, unknown>;
}

/**
 * Calls `onError` for every TLS handshake a bound `server` refuses (unknown CA, expired or missing
 * client certificate, wrong protocol). grpc-js keeps its HTTP/2 servers private and drops these
 * errors silently; operators need them counted (`rejected_handshakes_total`). Call after bindAsync.
 */
export function observeTlsClientErrors(
  server: Server,
  onError: (err: Error & { code?: string }, socket?: import('node:tls').TLSSocket) => void,
): void {
  for (const s of tlsServersOf(server)) {
    if (s.listenerCount('tlsClientError') === 0 || !(s as unknown as { burrowObserved?: boolean }).burrowObserved) {
      (s as unknown as { burrowObserved?: boolean }).burrowObserved = true;
      s.on('tlsClientError', onError);
    }
  }
}

type PeerCertificateOf = import('node:tls').TLSSocket['getPeerCertificate'];

/**
 * What of a peer certificate a connection keeps: the DER and its fingerprint, which is all that
 * grpc-js (`getAuthContext`) and {@link identityOfPeerCertificate} read. Node's object also holds
 * the subject, issuer, public key and fingerprints as strings: ~1.3 KiB per agent connection of a
 * broker holding thousands. `getPeerCertificate(true)` still returns everything.
 */
function slimPeerCertificate(full: import('node:tls').PeerCertificate): import('node:tls').PeerCertificate {
  if (!full?.raw) return full;
  return { raw: full.raw, fingerprint256: full.fingerprint256 } as import('node:tls').PeerCertificate;
}

/**
 * Makes every TLS connection of a bound `server` compute its peer certificate once. grpc-js calls
 * `getPeerCertificate()` for each call's `getAuthContext()`, and Node builds a fresh object with
 * every field of the certificate each time (~5% of the broker's CPU per forwarded call). A
 * connection's peer certificate cannot change after its handshake (Node allows no renegotiation
 * for TLS 1.3, and Burrow's servers do not request it), so it is kept per connection; the identity
 * read from it is then memoised on the object ({@link identityOfPeerCertificate}). Call after
 * bindAsync. Only the DER and its fingerprint are kept ({@link slimPeerCertificate}).
 */
export function cachePeerCertificates(server: Server): void {
  for (const s of tlsServersOf(server)) {
    const marked = s as unknown as { burrowCachesPeerCertificates?: boolean };
    if (marked.burrowCachesPeerCertificates) continue;
    marked.burrowCachesPeerCertificates = true;
    // Prepended: Node's HTTP/2 listener, registered first, creates the session (and grpc-js and the
    // broker's 'session' watchers read the certificate) inside its own 'secureConnection' listener.
    s.prependListener('secureConnection', (socket: import('node:tls').TLSSocket) => {
      const original = socket.getPeerCertificate;
      let cached: ReturnType<PeerCertificateOf> | undefined;
      socket.getPeerCertificate = ((detailed?: boolean) => {
        if (detailed) return original.call(socket, true);
        cached ??= slimPeerCertificate(original.call(socket, false));
        return cached;
      }) as PeerCertificateOf;
    });
  }
}

/**
 * The TLS servers a bound grpc-js `server` listens with (one per bound address), for
 * {@link guardConnections}. grpc-js keeps them private (`http2Servers`);
 * test/grpc-server-hooks.test.ts fails if it stops keeping them.
 */
export function tlsServersOf(server: Server): import('node:tls').Server[] {
  const servers = (server as unknown as Http2ServerList).http2Servers;
  return [...(servers?.keys() ?? [])] as unknown as import('node:tls').Server[];
}

/** A refusal decided from a call's path and peer address alone (see {@link refuseCallsEarly}). */
export interface EarlyRefusal {
  code: Status;
  details: string;
}

/**
 * Lets `check` refuse a call of a bound grpc-js `server` as soon as its headers arrive, before
 * any of its request body is read or decoded (grpc-js decodes a unary request completely before
 * the handler runs: a rate limit in the handler cost the broker the whole body of each refused
 * call). `check` gets the `:path` and the peer's IP address; what it returns is sent as a
 * trailers-only status and the stream is reset. Runs after grpc-js's own stream listener, which
 * then sees its call cancelled. Call after bindAsync.
 */
export function refuseCallsEarly(
  server: Server,
  check: (path: string, remoteAddress: string) => EarlyRefusal | undefined,
): void {
  for (const s of tlsServersOf(server)) {
    s.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
      const refusal = check(String(headers[':path'] ?? ''), stream.session?.socket?.remoteAddress ?? '');
      if (refusal) refuseStream(stream, refusal.code, refusal.details);
    });
  }
}

/**
 * `server.tryShutdown()`, and a GOAWAY for every connection that becomes an HTTP/2 session after
 * it. Why: tryShutdown closes the listener and sends GOAWAY to the sessions it has at that moment,
 * but a connection still in its TLS handshake becomes a session afterwards, and grpc-js neither
 * closes it nor refuses its calls: its client keeps sending calls there (each refused while the
 * server drains) and the connection lives until forceShutdown() resets it, cancelling whatever it
 * carries at that instant (CANCELLED, which a caller cannot tell from a call that ran). With the
 * GOAWAY the client's calls go elsewhere, and the connection closes by itself as soon as what it
 * carries is done. Resolves when every connection is closed, as tryShutdown does. Call after
 * bindAsync; test/grpc-server-hooks.test.ts fails if grpc-js stops keeping `http2Servers`.
 */
export function shutdownGracefully(server: Server): Promise<void> {
  for (const s of tlsServersOf(server)) {
    // Runs after grpc-js's own 'session' listener (added at bind), so grpc-js tracks the session
    // and its close still holds tryShutdown's callback.
    s.on('session', (session: import('node:http2').ServerHttp2Session) => session.close());
  }
  return new Promise((resolve) => server.tryShutdown(() => resolve()));
}

/** A message refused by {@link receiveLimitInterceptor}, as its `onOversized` sees it. */
export interface OversizedMessage {
  /** Full method path of the call. */
  path: string;
  /** The message's length as its gRPC length prefix gives it (nothing more of it has been read). */
  bytes: number;
  /** The limit for `path`. */
  limitBytes: number;
  /** The call (peer address, auth context); it ends with the status `onOversized` returns. */
  call: ServerInterceptingCallInterface;
}

/** The parts of grpc-js's BaseServerInterceptingCall and StreamDecoder this hook touches. */
interface DecodingCall {
  maxReceiveMessageSize?: number;
  decoder?: { maxReadMessageLength?: number; readMessageSize?: number; write(data: Buffer): Buffer[] };
}

/**
 * A grpc-js server interceptor (put it first in `ServerOptions.interceptors`) that gives the
 * methods in `limitBytesByPath` a smaller receive limit than the server's
 * `grpc.max_receive_message_length`, which grpc-js applies to every method alike. A message past
 * the limit is refused as soon as its 5-byte gRPC prefix arrives, before any of it is buffered;
 * the call ends with the status `onOversized` returns (called once per call), and the rest of what
 * the peer sends on that stream is dropped unread. Other methods are untouched. Why: the broker's
 * agent listener must accept 16 MiB messages on call streams, but its session stream carries small
 * control frames, and a peer must not make it buffer and decode 16 MiB there.
 *
 * grpc-js has no per-method limit; it reads each message's length in the StreamDecoder of the
 * call's BaseServerInterceptingCall (the `call` the first interceptor gets), checked against that
 * decoder's `maxReadMessageLength`. This hook lowers that field for the listed paths and wraps the
 * decoder's `write` to turn its refusal into `onOversized`'s status. It throws at the first call
 * if grpc-js changes that shape; test/grpc-server-hooks.test.ts pins it.
 */
export function receiveLimitInterceptor(
  limitBytesByPath: Readonly<Record<string, number>>,
  onOversized: (message: OversizedMessage) => { code: number; details: string },
): ServerInterceptor {
  return (method, call) => {
    const limitBytes = limitBytesByPath[method.path];
    // Returned unchanged: grpc-js only calls the interceptor chain's methods, and a pass-through
    // ServerInterceptingCall would cost every tunnel stream an extra layer for nothing.
    if (limitBytes === undefined) return call as ServerInterceptingCall;
    const decoder = (call as unknown as DecodingCall).decoder;
    if (!decoder || typeof decoder.write !== 'function' || typeof decoder.maxReadMessageLength !== 'number') {
      throw new Error('grpc-js server call has no StreamDecoder (receiveLimitInterceptor must come first)');
    }
    decoder.maxReadMessageLength = limitBytes;
    (call as unknown as DecodingCall).maxReceiveMessageSize = limitBytes;
    const write = decoder.write.bind(decoder);
    let refused = false;
    decoder.write = (data: Buffer): Buffer[] => {
      if (refused) return [];
      try {
        return write(data);
      } catch {
        // StreamDecoder throws only for a length over its limit, after storing that length.
        refused = true;
        const bytes = typeof decoder.readMessageSize === 'number' ? decoder.readMessageSize : -1;
        const status = onOversized({ path: method.path, bytes, limitBytes, call });
        call.sendStatus({ ...status, metadata: new Metadata() } satisfies StatusObject);
        return [];
      }
    };
    return call as ServerInterceptingCall;
  };
}
