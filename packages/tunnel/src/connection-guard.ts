import type * as http2 from 'node:http2';
import type { Socket } from 'node:net';
import type { Server as TlsServer, TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import { refuseStream } from './grpc-wire';

/** Why a {@link guardConnections} guard closed a connection. */
export type GuardedClose =
  /** At accept: `maxPending` handshakes were running (all addresses). */
  | 'pending_cap'
  /** At accept: `maxUnprovenPerAddress` connections of the peer's address had no client certificate yet. */
  | 'address_cap'
  /** After the handshake, without a valid client certificate: `unauthenticated.maxConnections` were open. */
  | 'unauthenticated_cap'
  /** The TLS handshake did not finish within `handshakeTimeoutMs`. */
  | 'handshake_timeout'
  /** A connection without a valid client certificate reached `unauthenticated.timeoutMs`. */
  | 'unauthenticated_timeout';

/**
 * Limits of connections a listener admits without a valid client certificate (the broker's agent
 * listener with enrollment on: Enroll is the only method they can use). Only HTTP/2 servers.
 */
export interface UnauthenticatedLimits {
  /** Each one is closed this long after its handshake, whatever it is doing (preface, idle, a call). */
  timeoutMs: number;
  /** Most open at once, all addresses; one past it is closed as soon as its handshake ends. */
  maxConnections: number;
  /** HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS sent to each; streams past it are refused by HTTP/2. */
  maxConcurrentStreams: number;
  /** Most request bytes (gRPC framing included) one stream may send; past it: RESOURCE_EXHAUSTED. */
  maxRequestBytes: number;
}

/** What {@link guardConnections} enforces on a TLS listener. */
export interface ConnectionGuardOptions {
  /**
   * Most TLS handshakes at once over all addresses; a connection past it is reset at accept (0 = no
   * cap). Why: Node starts every accepted handshake at once and runs them interleaved, so when a
   * fleet reconnects (a broker restart) each handshake finishes late, agents give up on it and try
   * again, and the broker spends its CPU on handshakes nobody waits for. Reset early, a connection
   * costs both sides almost nothing and the agents' jittered backoff spreads the fleet out.
   */
  maxPending: number;
  /**
   * Most connections of one source address that have not proven a valid client certificate: in
   * their handshake, or (with `unauthenticated`) open without one. One past it is reset at accept,
   * before any TLS work (0 = no cap).
   */
  maxUnprovenPerAddress: number;
  /** A connection whose TLS handshake has not finished this long after accept is destroyed (0 = never). */
  handshakeTimeoutMs: number;
  /** Set on listeners that admit connections without a valid client certificate. */
  unauthenticated?: UnauthenticatedLimits;
  /** Called for every connection the guard closes, before it is closed. */
  onClose(socket: Socket, why: GuardedClose): void;
}

/** What a guard reports (the broker exports these as metrics). */
export interface ConnectionGuard {
  /** TLS handshakes running now (connections accepted and not yet secure or closed). */
  pending(): number;
  /** Connections reset at accept by `maxPending` (not by the per-address cap). */
  shed(): number;
  /** Connections open now without a valid client certificate. */
  unauthenticated(): number;
}

/** The guard's view of one accepted connection. */
interface Tracked {
  readonly address: string;
  /** Still counted against its address (until a valid client certificate or close). */
  unproven: boolean;
  /** The handshake timeout, then (unauthenticated) the connection's budget. */
  timer?: NodeJS.Timeout;
  closed: boolean;
}

/** Answers RESOURCE_EXHAUSTED on `stream` once its request bytes pass `maxBytes`, before they are buffered. */
function capRequestBytes(stream: http2.ServerHttp2Stream, maxBytes: number): void {
  let received = 0;
  const onData = (chunk: Buffer): void => {
    received += chunk.length;
    if (received <= maxBytes) return;
    stream.off('data', onData);
    const details = `request larger than ${maxBytes} bytes on a connection without a client certificate`;
    refuseStream(stream, Status.RESOURCE_EXHAUSTED, details);
  };
  // Ahead of the gRPC decoder, which would otherwise buffer the chunk first. prependListener does
  // not resume a paused stream (Readable.on('data') would), so the reader keeps its flow control.
  stream.prependListener('data', onData);
}

/**
 * Applies `limits` to an HTTP/2 server session whose connection has no valid client certificate
 * (a session of a certified connection is left alone): its stream cap goes out in SETTINGS, and
 * each stream's request bytes are counted as they arrive. For HTTP/2 servers fed sockets by hand
 * (the broker's agent listener); {@link guardConnections} does it for the servers it guards.
 */
export function limitUnauthenticatedSession(session: http2.ServerHttp2Session, limits: UnauthenticatedLimits): void {
  if ((session.socket as TLSSocket).authorized) return;
  session.settings({ maxConcurrentStreams: limits.maxConcurrentStreams });
  session.on('stream', (stream: http2.ServerHttp2Stream) => capRequestBytes(stream, limits.maxRequestBytes));
}

/**
 * Guards the connections of TLS `servers` (one listener may be several servers: grpc-js binds
 * one per address): the caps and timeouts of {@link ConnectionGuardOptions}. Why: Node runs
 * every accepted handshake and waits 120 s for one that never finishes, so idle sockets (a
 * slowloris) held the handshake cap and locked agents out; a connection without a client
 * certificate costs the broker memory for every stream and byte it sends. Installs itself in
 * front of Node's own 'connection' listener, so a connection refused at accept costs no TLS
 * work. Call after the servers are bound (grpc-js) or created (node:https).
 */
export function guardConnections(servers: Iterable<TlsServer>, opts: ConnectionGuardOptions): ConnectionGuard {
  const guard = new GuardState(opts);
  for (const s of servers) guard.install(s);
  return {
    pending: () => guard.inHandshake.size,
    shed: () => guard.shedCount,
    unauthenticated: () => guard.unauthenticated.size,
  };
}

/** The bookkeeping of one {@link guardConnections} call, shared by all of its servers. */
class GuardState {
  /** Accepted sockets whose TLS handshake is running (what `maxPending` counts). */
  readonly inHandshake = new Set<Socket>();
  /** Sockets secure without a valid client certificate (what `unauthenticated.maxConnections` counts). */
  readonly unauthenticated = new Set<Socket>();
  /** Connections reset at accept by `maxPending`. */
  shedCount = 0;
  /** Per source address, its connections with `unproven` set; no entry for 0. */
  private readonly unprovenByAddress = new Map<string, number>();
  /** Every open connection the guard admitted, by its TCP socket. */
  private readonly tracked = new Map<Socket, Tracked>();

  constructor(private readonly opts: ConnectionGuardOptions) {}

  /** Puts the guard in front of `s`'s TLS handshakes, and caps its unauthenticated HTTP/2 sessions. */
  install(s: TlsServer): void {
    // Node's own 'connection' listener wraps the socket in TLS (an OpenSSL session, a TLSWrap, an
    // error object when it closes); it runs only for the connections admitted, so a refused one
    // costs no more than its accept.
    const startTls = s.listeners('connection') as ((raw: Socket) => void)[];
    s.removeAllListeners('connection');
    s.on('connection', (raw: Socket) => {
      if (!this.admit(raw)) return;
      for (const listener of startTls) listener.call(s, raw);
    });
    // node:tls keeps the accepted TCP socket as the TLS socket's _parent (test/handshake-limit
    // fails if that changes: handshakes would then count until the connection closes).
    s.on('secureConnection', (tlsSocket: TLSSocket & { _parent?: Socket }) => this.secured(tlsSocket));
    const limits = this.opts.unauthenticated;
    if (limits) {
      // Node's HTTP/2 server creates the session in its own 'secureConnection' listener (before
      // the one above), so these settings go out before any frame of the client is read.
      s.on('session', (session: http2.ServerHttp2Session) => limitUnauthenticatedSession(session, limits));
    }
  }

  /**
   * At accept: resets `raw` past the pending or per-address cap, else tracks it and starts its
   * handshake timeout. @returns whether the TLS handshake may start.
   */
  private admit(raw: Socket): boolean {
    const { opts } = this;
    const address = raw.remoteAddress ?? '';
    const unproven = this.unprovenByAddress.get(address) ?? 0;
    let refused: GuardedClose | undefined;
    if (opts.maxPending > 0 && this.inHandshake.size >= opts.maxPending) refused = 'pending_cap';
    else if (opts.maxUnprovenPerAddress > 0 && unproven >= opts.maxUnprovenPerAddress) refused = 'address_cap';
    if (refused) {
      if (refused === 'pending_cap') this.shedCount++;
      opts.onClose(raw, refused);
      // A reset, not a FIN: the client fails at once, and no TIME_WAIT is left on the server.
      raw.resetAndDestroy();
      return false;
    }
    const t: Tracked = { address, unproven: true, closed: false };
    this.unprovenByAddress.set(address, unproven + 1);
    this.inHandshake.add(raw);
    this.tracked.set(raw, t);
    raw.once('close', () => this.forget(raw, t));
    this.closeAfter(opts.handshakeTimeoutMs, raw, t, 'handshake_timeout', raw);
    return true;
  }

  /** Handshake done: proves a client-certified connection, caps and times the others. */
  private secured(tlsSocket: TLSSocket & { _parent?: Socket }): void {
    const raw = tlsSocket._parent;
    const t = raw ? this.tracked.get(raw) : undefined;
    if (!raw || !t) return;
    this.inHandshake.delete(raw);
    clearTimeout(t.timer);
    tlsSocket.once('close', () => this.forget(raw, t));
    const limits = this.opts.unauthenticated;
    if (tlsSocket.authorized || !limits) {
      this.prove(t);
      return;
    }
    if (this.unauthenticated.size >= limits.maxConnections) {
      this.opts.onClose(raw, 'unauthenticated_cap');
      tlsSocket.destroy();
      return;
    }
    this.unauthenticated.add(raw);
    this.closeAfter(limits.timeoutMs, raw, t, 'unauthenticated_timeout', tlsSocket);
  }

  /** Stops counting `t` against its address. */
  private prove(t: Tracked): void {
    if (!t.unproven) return;
    t.unproven = false;
    const left = (this.unprovenByAddress.get(t.address) ?? 1) - 1;
    if (left > 0) this.unprovenByAddress.set(t.address, left);
    else this.unprovenByAddress.delete(t.address);
  }

  /** The connection closed: drops it from every count (once, whichever socket reported it). */
  private forget(raw: Socket, t: Tracked): void {
    if (t.closed) return;
    t.closed = true;
    clearTimeout(t.timer);
    this.inHandshake.delete(raw);
    this.unauthenticated.delete(raw);
    this.tracked.delete(raw);
    this.prove(t);
  }

  /** Replaces `t`'s timer: after `ms` (never for 0), reports `why` and destroys `socket` and `raw`. */
  private closeAfter(ms: number, raw: Socket, t: Tracked, why: GuardedClose, socket: Socket): void {
    clearTimeout(t.timer);
    if (ms <= 0) return;
    t.timer = setTimeout(() => {
      this.opts.onClose(raw, why);
      socket.destroy();
      raw.destroy();
    }, ms);
    // Cleared when the connection closes; never the reason the process stays up.
    t.timer.unref();
  }
}
