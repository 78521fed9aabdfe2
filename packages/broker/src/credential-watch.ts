import { status as Status } from '@grpc/grpc-js';
import type { Http2SecureServer, ServerHttp2Session } from 'node:http2';
import type { Server as HttpsServer } from 'node:https';
import type { TLSSocket } from 'node:tls';
import { BurrowError, type Logger, type PeerIdentity } from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import { presentedBy } from './peer-admission';

/** The listeners whose client certificates are watched (metric label `listener`). */
export type WatchedListener = 'api' | 'authzen' | 'peer' | 'ext_authz' | 'forward_auth';

/** A call in flight on behalf of a client certificate (a service's, or a peer broker's). */
export interface LiveCall {
  readonly identity: PeerIdentity;
  readonly listener: WatchedListener;
  /** Ends the call now with `error` as its status; a no-op once it is over. */
  cut(error: BurrowError): void;
}

interface LiveConnection {
  listener: WatchedListener;
  /** The client certificate's identity (undefined: none, or not a Burrow one). */
  identity: PeerIdentity | undefined;
  /** Refuses new calls (GOAWAY) and lets what is being answered flush. */
  close(): void;
  /** Closes at once. */
  destroy(): void;
}

/**
 * After a cut, how long a connection may take to deliver the statuses of the calls it carried
 * before it is destroyed: a client that never closes its end must not keep it.
 */
const CUT_CLOSE_GRACE_MS = 1_000;

/** The identity of a TLS connection's client certificate; undefined when it has none or is gone. */
function peerIdentityOf(socket: TLSSocket): PeerIdentity | undefined {
  try {
    return presentedBy(socket).identity;
  } catch {
    return undefined;
  }
}

/** Why a certificate lost its right to calls in flight, or undefined when it has not. */
type Verdict = { reason: 'revoked' | 'expired'; error: BurrowError } | undefined;

/**
 * Ends what a client certificate carries once it is revoked or expires. TLS checks a certificate
 * once, at the handshake: without this a service or peer broker whose certificate is revoked
 * mid-call keeps its calls and its connections (new calls were refused, streams went on). The
 * caller API, the AuthZEN listener and the peer listener {@link track} each call; the broker
 * calls {@link cutRevoked} when the revocation list changes and {@link cutExpired} every second.
 * A cut call gets PERMISSION_DENIED (revoked) or UNAUTHENTICATED (expired) naming the
 * certificate, as an agent's tunnel does; then its connection gets a GOAWAY and is destroyed after
 * {@link CUT_CLOSE_GRACE_MS}.
 */
export class CredentialWatch {
  private readonly calls = new Set<LiveCall>();
  private readonly connections = new Set<LiveConnection>();
  /** Connections cut and not yet closed, with the timer that destroys them. */
  private readonly closing = new Map<LiveConnection, NodeJS.Timeout>();
  /** HTTPS (AuthZEN, forward-auth) sockets being closed: their last responses say `connection: close`. */
  private readonly closingSockets = new WeakSet<TLSSocket>();

  constructor(private readonly deps: { logger: Logger; metrics: BrokerMetrics }) {}

  /** Tracks `call` until the returned function is called, which must happen when the call ends. */
  track(call: LiveCall): () => void {
    this.calls.add(call);
    return () => {
      this.calls.delete(call);
    };
  }

  /** Tracks every HTTP/2 connection of a node:http2 secure `server` (the API and peer listeners). */
  watchHttp2Server(server: Http2SecureServer, listener: WatchedListener): void {
    server.on('session', (session: ServerHttp2Session) => {
      const conn: LiveConnection = {
        listener,
        // Read now: once the session has lost its socket, session.socket throws.
        identity: peerIdentityOf(session.socket as TLSSocket),
        close: () => {
          if (!session.closed && !session.destroyed) session.close();
        },
        destroy: () => {
          if (!session.destroyed) session.destroy();
        },
      };
      this.connections.add(conn);
      session.once('close', () => this.connections.delete(conn));
    });
  }

  /** Tracks every connection of an HTTPS `server` (the AuthZEN and forward-auth listeners). */
  watchTlsServer(server: HttpsServer, listener: WatchedListener): void {
    server.on('secureConnection', (socket: TLSSocket) => {
      const conn: LiveConnection = {
        listener,
        identity: peerIdentityOf(socket),
        close: () => {
          this.closingSockets.add(socket);
          // An HTTP/1.1 connection between requests has nothing to flush.
          if (!(socket as { _httpMessage?: unknown })._httpMessage) socket.end();
        },
        destroy: () => socket.destroy(),
      };
      this.connections.add(conn);
      socket.once('close', () => this.connections.delete(conn));
    });
  }

  /** Whether an HTTPS response (AuthZEN, forward auth) on `socket` closes the connection (its certificate was cut). */
  isClosing(socket: TLSSocket): boolean {
    return this.closingSockets.has(socket);
  }

  /** Cuts the calls and connections of certificates `isRevoked` names. Returns how many calls were cut. */
  cutRevoked(isRevoked: (id: PeerIdentity) => boolean): number {
    return this.cut((id) => {
      if (!isRevoked(id)) return undefined;
      const message = `certificate ${id.spiffeId} (serial ${id.serialHex}) was revoked`;
      return { reason: 'revoked', error: new BurrowError(Status.PERMISSION_DENIED, message) };
    });
  }

  /** Cuts the calls and connections of certificates expired at `nowMs`. Returns how many calls were cut. */
  cutExpired(nowMs = Date.now()): number {
    return this.cut((id) => {
      if (id.notAfterMs > nowMs) return undefined;
      const at = new Date(id.notAfterMs).toISOString();
      const message = `certificate ${id.spiffeId} (serial ${id.serialHex}) expired at ${at}`;
      return { reason: 'expired', error: new BurrowError(Status.UNAUTHENTICATED, message) };
    });
  }

  /** Destroys every connection still closing and forgets everything (broker shutdown). */
  stop(): void {
    for (const [conn, timer] of this.closing) {
      clearTimeout(timer);
      conn.destroy();
    }
    this.closing.clear();
    this.calls.clear();
    this.connections.clear();
  }

  /** Tracked calls and connections (tests and the leak check). */
  get size(): { calls: number; connections: number } {
    return { calls: this.calls.size, connections: this.connections.size };
  }

  private cut(judge: (id: PeerIdentity) => Verdict): number {
    let cutCalls = 0;
    for (const call of [...this.calls]) {
      const verdict = judge(call.identity);
      if (!verdict) continue;
      this.calls.delete(call);
      call.cut(verdict.error);
      cutCalls++;
      this.deps.metrics.callsCut.inc({ listener: call.listener, reason: verdict.reason });
      this.deps.logger.warn('call cut: its client certificate is no longer valid', {
        listener: call.listener,
        caller: call.identity.spiffeId,
        serial: call.identity.serialHex,
        reason: verdict.error.message,
      });
    }
    for (const conn of [...this.connections]) {
      const id = conn.identity;
      const verdict = id && judge(id);
      if (!verdict) continue;
      this.connections.delete(conn);
      conn.close();
      const timer = setTimeout(() => {
        this.closing.delete(conn);
        conn.destroy();
      }, CUT_CLOSE_GRACE_MS);
      timer.unref();
      this.closing.set(conn, timer);
      this.deps.logger.info('connection closed: its client certificate is no longer valid', {
        listener: conn.listener,
        peer: id.spiffeId,
        serial: id.serialHex,
        reason: verdict.reason,
      });
    }
    return cutCalls;
  }
}
