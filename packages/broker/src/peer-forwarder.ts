import {
  Client,
  Metadata,
  experimental,
  type ChannelCredentials,
  type ClientDuplexStream,
  type StatusObject,
} from '@grpc/grpc-js';
import {
  AGENT_ID_KEY,
  BurrowError,
  CallStream,
  abortConnectsOnChannelClose,
  brokerIdentityCheck,
  identity,
  tunnelChannelOptions,
  type CredentialStore,
  type KeepaliveSettings,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import {
  FORWARDED_BY_KEY,
  PEER_FORWARD_METHOD,
  PEER_READY_KEY,
  PEER_REFUSED_DECISION,
  PEER_REFUSED_KEY,
  encodeHop,
  type Hop,
} from './peer-protocol';

// A peer channel closed while connecting (a peer that stalls its handshakes) must not leak the socket.
abortConnectsOnChannelClose();

export interface PeerForwarderOptions {
  /** The broker's own credentials: its broker certificate is the client certificate here. */
  tls: CredentialStore;
  brokerId: string;
  /** Peers must present a broker certificate of this trust domain. */
  trustDomain: string;
  maxMessageBytes: number;
  keepalive: KeepaliveSettings;
  metrics: BrokerMetrics;
  /**
   * How long a peer may take to confirm a call before the next one is tried: a broker behind a
   * dead link would otherwise hold the call until its deadline. Default 2 s.
   */
  readyTimeoutMs?: number;
}

/** A peer that failed at the transport level this recently is tried after the others. */
const RECENT_FAILURE_MS = 5_000;

/** How an attempt to hand a call to another broker went. */
export type PeerAttempt =
  | { ready: true; stream: CallStream }
  /** `refusal`: the owner decided against the call (policy, limit, bad hop metadata), not "cannot serve". */
  | { ready: false; reason: string; refusal?: BurrowError };

/**
 * The forwarding side of the broker-to-broker API: one HTTP/2 connection per peer broker (kept
 * open, reconnected by grpc-js), and {@link open}, which asks a peer to take a call and resolves
 * once it has confirmed (ready header) or refused. Nothing of the call has been sent before the
 * confirmation, so a refusal can always be retried with the next peer.
 */
export class PeerForwarder {
  private readonly clients = new Map<string, Client>();
  /** When each peer last failed at the transport level (ms since epoch). */
  private readonly failedAtMs = new Map<string, number>();
  private readonly credentials: ChannelCredentials;

  constructor(private readonly opts: PeerForwarderOptions) {
    // A peer is a broker by its certificate's SPIFFE id, not by any certificate of the trust domain.
    const checkServerIdentity = brokerIdentityCheck(opts.trustDomain);
    this.credentials = experimental.createCertificateProviderChannelCredentials(opts.tls, opts.tls, {
      checkServerIdentity,
    });
  }

  /**
   * Opens a Forward stream to `peer` for a call to `agentId`, telling it who the caller is and
   * which decision let the call in here (`hop`, see {@link encodeHop}). Resolves with a stream
   * ready for the call's frames (this side is the originator) or with why the peer did not take
   * it. Never rejects; aborting `signal` cancels the attempt.
   */
  open(peer: string, agentId: string, deadlineMs: number, signal: AbortSignal, hop: Hop): Promise<PeerAttempt> {
    const readyTimeoutMs = this.opts.readyTimeoutMs ?? 2_000;
    const md = new Metadata();
    md.set(AGENT_ID_KEY, agentId);
    md.set(FORWARDED_BY_KEY, this.opts.brokerId);
    encodeHop(hop, md);
    const call: ClientDuplexStream<Buffer, Buffer> = this.clientFor(peer).makeBidiStreamRequest(
      PEER_FORWARD_METHOD,
      identity,
      identity,
      md,
      Number.isFinite(deadlineMs) ? { deadline: deadlineMs } : {},
    );
    return new Promise((resolve) => {
      let settled = false;
      const unreachable = (reason: string): void => {
        this.failedAtMs.set(peer, Date.now());
        this.opts.metrics.peerForwards.inc({ result: 'unreachable' });
        done({ ready: false, reason });
      };
      const timer = setTimeout(
        () => {
          call.cancel();
          unreachable(`broker ${peer} did not confirm the call within ${readyTimeoutMs} ms`);
        },
        Math.max(1, Math.min(readyTimeoutMs, deadlineMs - Date.now())),
      );
      const done = (attempt: PeerAttempt): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        call.removeListener('metadata', onMetadata);
        call.removeListener('status', onStatus);
        signal.removeEventListener('abort', onAbort);
        resolve(attempt);
      };
      const onMetadata = (headers: Metadata): void => {
        if (headers.get(PEER_READY_KEY)[0] === '1') {
          this.failedAtMs.delete(peer);
          this.opts.metrics.peerForwards.inc({ result: 'served' });
          done({ ready: true, stream: new CallStream(call, 'client', 'originator') });
        } else {
          call.cancel();
          this.opts.metrics.peerForwards.inc({ result: 'refused' });
          done({ ready: false, reason: `broker ${peer} answered without the ready header` });
        }
      };
      const onStatus = (s: StatusObject): void => {
        // A refusal by the peer itself carries PEER_REFUSED_KEY; anything else is the transport.
        if (!s.metadata.get(PEER_REFUSED_KEY).length) {
          unreachable(`broker ${peer}: ${s.details}`);
          return;
        }
        this.opts.metrics.peerForwards.inc({ result: 'refused' });
        const decision = s.metadata.get(PEER_REFUSED_KEY)[0] === PEER_REFUSED_DECISION;
        const refusal = decision
          ? new BurrowError(s.code, `${s.details} (decided by the broker holding the agent, ${peer})`)
          : undefined;
        done({ ready: false, reason: `broker ${peer}: ${s.details}`, refusal });
      };
      const onAbort = (): void => {
        call.cancel();
        done({ ready: false, reason: 'cancelled by the client' });
      };
      call.on('error', () => {}); // 'status' carries the outcome
      call.on('metadata', onMetadata);
      call.on('status', onStatus);
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
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }

  private clientFor(peer: string): Client {
    let c = this.clients.get(peer);
    if (!c) {
      c = new Client(peer, this.credentials, {
        ...tunnelChannelOptions(this.opts.maxMessageBytes, this.opts.keepalive),
        'grpc.initial_reconnect_backoff_ms': 200,
        'grpc.max_reconnect_backoff_ms': 2000,
      });
      this.clients.set(peer, c);
    }
    return c;
  }
}
