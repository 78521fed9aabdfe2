import * as http2 from 'node:http2';
import { isIP } from 'node:net';
import {
  AGENT_ID_KEY,
  BurrowError,
  H2_SESSION_OPTIONS,
  brokerIdentityCheck,
  keepSessionAlive,
  nextHopHeaders,
  TRACEPARENT_KEY,
  openStream,
  splitHostPort,
  statusOfHeaders,
  type CredentialStore,
  type KeepaliveSettings,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import { FORWARDED_BY_KEY, PEER_REFUSED_DECISION, PEER_REFUSED_KEY, encodeHop, type Hop } from './peer-protocol';

export interface PeerForwarderOptions {
  /** The broker's own credentials: its broker certificate is the client certificate here. */
  tls: CredentialStore;
  brokerId: string;
  /** Peers must present a broker certificate of this trust domain. */
  trustDomain: string;
  keepalive: KeepaliveSettings;
  metrics: BrokerMetrics;
  /**
   * How long a peer may take to confirm a call before the next one is tried: a broker behind a
   * dead link would otherwise hold the call until its deadline. Default 2 s.
   */
  readyTimeoutMs?: number;
}

/** The reason of an attempt the client gave up on (not counted in peer_forwards_total). */
const CANCELLED_BY_CLIENT = 'cancelled by the client';

/**
 * What a peer's answer without 100 Continue means: a refusal by the peer itself carries
 * PEER_REFUSED_KEY (`decision`: a decision on the call, which goes to the caller as it is); any
 * other answer is the transport's.
 */
function refusalOf(
  peer: string,
  headers: http2.IncomingHttpHeaders,
): { byPeer: boolean; reason: string; refusal?: BurrowError } {
  const status = statusOfHeaders(headers);
  const refused = headers[PEER_REFUSED_KEY];
  if (!status || refused === undefined)
    return { byPeer: false, reason: `broker ${peer}: ${status?.details ?? 'answered without confirming the call'}` };
  const decided = `${status.details} (decided by the broker holding the agent, ${peer})`;
  const refusal = refused === PEER_REFUSED_DECISION ? new BurrowError(status.code, decided) : undefined;
  return { byPeer: true, reason: `broker ${peer}: ${status.details}`, refusal };
}

/** A peer that failed at the transport level this recently is tried after the others. */
const RECENT_FAILURE_MS = 5_000;

/** How an attempt to hand a call to another broker went. */
export type PeerAttempt =
  | { ready: true; stream: http2.ClientHttp2Stream }
  /** `refusal`: the owner decided against the call (policy, limit, bad hop metadata), not "cannot serve". */
  | { ready: false; reason: string; refusal?: BurrowError };

/** The call being handed on: its method, the caller's headers as received, the deadline. */
export interface ForwardedCall {
  method: string;
  rawHeaders: readonly string[];
  contentType?: string | string[];
  deadlineMs: number;
  /** The forwarding broker's CLIENT span of this hop, when traced: replaces the caller's traceparent. */
  traceparent?: string;
}

/**
 * The forwarding side of the broker-to-broker API (tunnel.proto, service BrokerPeer): one HTTP/2
 * connection per peer broker (kept open, made again after it closes), and {@link open}, which opens
 * the call's stream at a peer and resolves once the peer has confirmed (100 Continue) or refused.
 * No DATA of the call is sent before the confirmation, so a refusal can always be retried with the
 * next peer.
 */
export class PeerForwarder {
  private readonly sessions = new Map<string, http2.ClientHttp2Session>();
  /** When each peer last failed at the transport level (ms since epoch). */
  private readonly failedAtMs = new Map<string, number>();
  private readonly checkServerIdentity: ReturnType<typeof brokerIdentityCheck>;

  constructor(private readonly opts: PeerForwarderOptions) {
    // A peer is a broker by its certificate's SPIFFE id, not by any certificate of the trust domain.
    this.checkServerIdentity = brokerIdentityCheck(opts.trustDomain);
  }

  /**
   * Opens `call` at `peer` for `agentId`, telling it who the caller is and which decision let the
   * call in here (`hop`). Resolves with the stream, ready for the call's DATA, or with why the peer
   * did not take it. Never rejects; aborting `signal` cancels the attempt.
   */
  open(peer: string, agentId: string, call: ForwardedCall, signal: AbortSignal, hop: Hop): Promise<PeerAttempt> {
    const readyTimeoutMs = this.opts.readyTimeoutMs ?? 2_000;
    const owned: Record<string, string> = { [AGENT_ID_KEY]: agentId, [FORWARDED_BY_KEY]: this.opts.brokerId };
    encodeHop(hop, owned);
    if (call.traceparent) owned[TRACEPARENT_KEY] = call.traceparent;
    const headers = nextHopHeaders(call.method, peer, call.rawHeaders, call.deadlineMs, owned, call.contentType);
    headers.expect = '100-continue';
    let stream: http2.ClientHttp2Stream;
    try {
      stream = openStream(this.sessionFor(peer), headers, `broker ${peer}`);
    } catch (err) {
      this.failedAtMs.set(peer, Date.now());
      this.opts.metrics.peerForwards.inc({ result: 'unreachable' });
      return Promise.resolve({ ready: false, reason: (err as Error).message });
    }
    const readyWithinMs = Math.max(1, Math.min(readyTimeoutMs, call.deadlineMs - Date.now()));
    return this.confirmation(peer, stream, readyWithinMs, signal);
  }

  /**
   * Waits for the peer's answer to an opened call: 100 Continue (ready), a refusal (trailers-only,
   * with PEER_REFUSED_KEY when the peer itself decided), or nothing within `readyWithinMs` or a reset
   * (unreachable: the peer is tried after the others for a while).
   */
  private confirmation(
    peer: string,
    stream: http2.ClientHttp2Stream,
    readyWithinMs: number,
    signal: AbortSignal,
  ): Promise<PeerAttempt> {
    const { metrics } = this.opts;
    return new Promise((resolve) => {
      let settled = false;
      // A connection that failed (TLS: a peer that is not a broker) destroys the stream with that error: name it.
      let streamError: Error | undefined;
      const done = (attempt: PeerAttempt, result: 'served' | 'refused' | 'unreachable'): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        stream.removeListener('continue', onContinue);
        stream.removeListener('response', onResponse);
        stream.removeListener('close', onClose);
        signal.removeEventListener('abort', onAbort);
        if (result === 'unreachable') this.failedAtMs.set(peer, Date.now());
        if (result === 'served') this.failedAtMs.delete(peer);
        if (attempt.ready || attempt.reason !== CANCELLED_BY_CLIENT) metrics.peerForwards.inc({ result });
        resolve(attempt);
      };
      const timer = setTimeout(() => {
        stream.close(http2.constants.NGHTTP2_CANCEL);
        done(
          { ready: false, reason: `broker ${peer} did not confirm the call within ${readyWithinMs} ms` },
          'unreachable',
        );
      }, readyWithinMs);
      const onContinue = (): void => done({ ready: true, stream }, 'served');
      const onResponse = (h: http2.IncomingHttpHeaders): void => {
        stream.close(http2.constants.NGHTTP2_CANCEL);
        const answer = refusalOf(peer, h);
        done(
          { ready: false, reason: answer.reason, refusal: answer.refusal },
          answer.byPeer ? 'refused' : 'unreachable',
        );
      };
      const onClose = (): void => {
        const why = streamError?.message ?? `the stream was reset (HTTP/2 error ${stream.rstCode})`;
        done({ ready: false, reason: `broker ${peer}: ${why}` }, 'unreachable');
      };
      const onAbort = (): void => {
        stream.close(http2.constants.NGHTTP2_CANCEL);
        done({ ready: false, reason: CANCELLED_BY_CLIENT }, 'refused');
      };
      stream.on('error', (err) => {
        streamError ??= err;
      });
      stream.on('continue', onContinue);
      stream.on('response', onResponse);
      stream.on('close', onClose);
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** `peers` in the order to try them: as given, but those that failed recently last. */
  rank(peers: readonly string[], nowMs = Date.now()): string[] {
    const recent = (p: string): boolean => nowMs - (this.failedAtMs.get(p) ?? -Infinity) < RECENT_FAILURE_MS;
    return [...peers.filter((p) => !recent(p)), ...peers.filter(recent)];
  }

  /** Closes every peer connection. */
  close(): void {
    for (const s of this.sessions.values()) s.close();
    this.sessions.clear();
  }

  private sessionFor(peer: string): http2.ClientHttp2Session {
    let s = this.sessions.get(peer);
    if (s && !s.closed && !s.destroyed) return s;
    const { tls } = this.opts;
    const { host } = splitHostPort(peer);
    const made = http2.connect(`https://${peer}`, {
      ...H2_SESSION_OPTIONS,
      ca: tls.caPem,
      cert: tls.certPem,
      key: tls.keyPem,
      // No SNI for an IP address (RFC 6066); '' keeps http2.connect from using the host.
      servername: isIP(host.replace(/^\[|\]$/g, '')) ? '' : host,
      checkServerIdentity: this.checkServerIdentity,
      ALPNProtocols: ['h2'],
      minVersion: 'TLSv1.2',
    });
    made.on('error', () => this.failedAtMs.set(peer, Date.now()));
    made.on('close', () => {
      if (this.sessions.get(peer) === made) this.sessions.delete(peer);
    });
    made.on('goaway', () => {
      if (this.sessions.get(peer) === made) this.sessions.delete(peer);
    });
    keepSessionAlive(made, this.opts.keepalive);
    made.unref();
    this.sessions.set(peer, made);
    s = made;
    return s;
  }
}
