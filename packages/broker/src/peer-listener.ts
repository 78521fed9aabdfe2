import { Metadata, status as Status, type Server, type ServerDuplexStream } from '@grpc/grpc-js';
import {
  AGENT_ID_KEY,
  type BurrowError,
  CallStream,
  rawBidiMethod,
  identityOfPeerCertificate,
  parseSpiffeId,
  relayCall,
  statusName,
  recordCallFinished,
  deadlineMsOf,
  waitCancellable,
  type PeerIdentity,
} from '@burrow/tunnel';
import { countIfLimited } from './call-limiter';
import type { CallerApiDeps } from './caller-api';
import { ALLOW_ALL_CALLERS } from './caller-authorizer';
import { PEER_BROKER_RULE, checkPeer } from './peer-admission';
import {
  FORWARDED_BY_KEY,
  HOP_CALLER_KEY,
  PEER_FORWARD_METHOD,
  PEER_READY_KEY,
  PEER_REFUSED_DECISION,
  PEER_REFUSED_KEY,
  decodeHop,
  type Hop,
} from './peer-protocol';

/** What a forwarding broker's id ({@link FORWARDED_BY_KEY}) may be: printable ASCII, a host name's length. */
const BROKER_ID = /^[\x21-\x7e]{1,253}$/;

/**
 * The owning side checks what the caller API checks: the agent's limits are enforced here (every
 * call to the agent's tunnels here counts, wherever it entered), and its own caller policy, if it
 * has one, is applied again to the caller the forwarding broker vouches for.
 */
export type PeerListenerDeps = Pick<
  CallerApiDeps,
  | 'registry'
  | 'metrics'
  | 'logger'
  | 'trustDomain'
  | 'agentWaitMs'
  | 'isDraining'
  | 'isRevoked'
  | 'watch'
  | 'limiter'
  | 'authorizer'
>;

type RawCall = ServerDuplexStream<Buffer, Buffer>;

/** A Forward call that passed {@link PeerListener.admitForward}; it holds the agent's limit slot. */
interface AdmittedForward {
  /** The forwarding broker. */
  peer: PeerIdentity;
  agentId: string;
  forwardedBy: string;
  hop: Hop | undefined;
  releaseAgent(): void;
}

/**
 * The owning side of the broker-to-broker API: takes calls other brokers forward for agents
 * connected here, confirms it can serve each (ready header) and relays it onto the agent's
 * tunnel. Never forwards a call further.
 */
export class PeerListener {
  constructor(private readonly deps: PeerListenerDeps) {}

  addTo(server: Server): void {
    server.addService(
      { forward: rawBidiMethod(PEER_FORWARD_METHOD) },
      {
        forward: (call: RawCall) => {
          void this.onForward(call);
        },
      },
    );
  }

  private refuse(call: RawCall, code: Status, details: string, decision = false): void {
    this.deps.metrics.peerCalls.inc({ code: statusName(code) });
    const metadata = new Metadata();
    metadata.set(PEER_REFUSED_KEY, decision ? PEER_REFUSED_DECISION : '1');
    call.emit('error', { code, details, metadata });
  }

  /**
   * Everything a Forward call must pass before it waits for the agent: the forwarding broker's
   * certificate, the agent and broker ids, that the agent is served here, the hop metadata and
   * caller policy, the agent's limits. Returns what the call goes on with, or undefined after
   * refusing it (the refusal is a stream error: the connection between the brokers lives on).
   */
  private admitForward(call: RawCall): AdmittedForward | undefined {
    const { registry, metrics, logger } = this.deps;
    // Without the certificate: this refusal has never said what is wrong with a broker's certificate.
    const presented = { identity: identityOfPeerCertificate(call.getAuthContext().sslPeerCertificate) };
    const checked = checkPeer(presented, PEER_BROKER_RULE, this.deps);
    if ('refusal' in checked) {
      logger.warn('peer call refused', { peer: call.getPeer(), reason: checked.refusal.message });
      this.refuse(call, checked.refusal.code, checked.refusal.message);
      return undefined;
    }
    const peer = checked.identity;
    const agentId = call.metadata.get(AGENT_ID_KEY)[0];
    const forwardedBy = String(call.metadata.get(FORWARDED_BY_KEY)[0] ?? '');
    if (typeof agentId !== 'string' || agentId === '') {
      this.refuse(call, Status.INVALID_ARGUMENT, `peer call without ${AGENT_ID_KEY}`);
      return undefined;
    }
    if (!BROKER_ID.test(forwardedBy)) {
      const why = `peer call without a valid ${FORWARDED_BY_KEY} (the forwarding broker's id)`;
      this.refuse(call, Status.INVALID_ARGUMENT, why);
      return undefined;
    }
    // Only agents connected here: a forwarded call is never forwarded again.
    if (this.deps.isDraining() || !registry.canServe(agentId)) {
      this.refuse(
        call,
        Status.UNAVAILABLE,
        this.deps.isDraining() ? 'broker is draining' : `agent "${agentId}" has no tunnel to this broker`,
      );
      return undefined;
    }
    const hop = this.checkHop(call, peer, agentId, forwardedBy);
    if (hop === false) return undefined;
    let releaseAgent: () => void;
    try {
      releaseAgent = this.deps.limiter.admitAgent(agentId);
    } catch (err) {
      countIfLimited(err, metrics);
      this.refuse(call, (err as BurrowError).code, (err as BurrowError).message, true);
      return undefined;
    }
    return { peer, agentId, forwardedBy, hop, releaseAgent };
  }

  private async onForward(call: RawCall): Promise<void> {
    const admitted = this.admitForward(call);
    if (!admitted) return;
    const { registry, metrics, logger } = this.deps;
    const { peer, agentId, forwardedBy, hop, releaseAgent } = admitted;
    const abort = new AbortController();
    // The forwarding broker's certificate revoked or expired mid-call: the call ends (the agent
    // gets Cancel), whether it still waits for an offer or is being relayed.
    let cutBy: BurrowError | undefined;
    let inbound: CallStream | undefined;
    const untrack = this.deps.watch.track({
      identity: peer,
      listener: 'peer',
      cut: (error) => {
        cutBy ??= error;
        if (inbound) inbound.abort(error);
        else abort.abort();
      },
    });
    let offer: Awaited<ReturnType<typeof registry.acquire>>;
    try {
      const deadlineMs = deadlineMsOf(call);
      offer = await waitCancellable(call, abort, (signal) =>
        registry.acquire(agentId, this.deps.agentWaitMs, deadlineMs, signal),
      );
    } catch (err) {
      untrack();
      releaseAgent();
      const e = cutBy ?? (err as BurrowError);
      if (!call.cancelled) this.refuse(call, e.code, e.message);
      return;
    }
    const startedMs = Date.now();
    inbound = new CallStream(call, 'server', 'answerer', (err) => {
      logger.warn('forwarding broker broke the tunnel protocol', { forwardedBy, agentId, error: err.message });
    });
    const ready = new Metadata();
    ready.set(PEER_READY_KEY, '1');
    call.sendMetadata(ready);
    metrics.toAgentCallStarted();
    const outcome = await relayCall(inbound, offer.stream, `agent "${agentId}"`, { expectedMethod: hop?.method });
    untrack();
    releaseAgent();
    registry.callFinished(offer);
    metrics.toAgentCallEnded();
    metrics.peerCalls.inc({ code: statusName(outcome.code) });
    // Counted as a call where it entered; here only the peer call and the log line.
    recordCallFinished(logger, undefined, {
      direction: 'to_agent',
      code: outcome.code,
      details: outcome.details,
      startedMs,
      log: { agentId, method: outcome.method ?? '', forwardedBy, caller: hop?.caller, entryPolicies: hop?.policies },
    });
  }

  /**
   * Checks the hop metadata and, when this broker has a caller policy, applies it to the caller
   * the forwarding broker vouches for (an audit record names both). Returns the hop (undefined
   * from a broker too old to send one, accepted only without a caller policy here), or false
   * after refusing the call.
   */
  private checkHop(call: RawCall, peer: PeerIdentity, agentId: string, forwardedBy: string): Hop | undefined | false {
    const { metrics, logger, authorizer } = this.deps;
    const hop = decodeHop(call.metadata, this.deps.trustDomain);
    if (hop && 'problem' in hop) {
      logger.warn('peer call refused: bad hop metadata', { forwardedBy, peer: peer.spiffeId, problem: hop.problem });
      this.refuse(call, Status.INVALID_ARGUMENT, `hop metadata from broker ${forwardedBy}: ${hop.problem}`, true);
      return false;
    }
    if (authorizer === ALLOW_ALL_CALLERS) return hop;
    if (!hop) {
      const why =
        `broker ${forwardedBy} forwarded a call without ${HOP_CALLER_KEY}, and this broker's caller policy ` +
        'needs the caller (upgrade that broker)';
      this.refuse(call, Status.PERMISSION_DENIED, why, true);
      return false;
    }
    const caller = parseSpiffeId(hop.caller)!;
    const identity: PeerIdentity = { ...caller, notAfterMs: Number.POSITIVE_INFINITY, notBeforeMs: 0, serialHex: '' };
    const decision = authorizer.authorize(identity, agentId, hop.method, { forwardedBy, entryPolicies: hop.policies });
    metrics.authzDecisions.inc({ decision: decision.allowed ? 'allow' : 'deny' });
    if (decision.allowed) return hop;
    const unnamed = decision.policies.filter((id) => !decision.reason.includes(id));
    const policies = unnamed.length ? ` (policies: ${unnamed.join(', ')})` : '';
    logger.warn('forwarded caller denied by policy', {
      caller: hop.caller,
      agentId,
      method: hop.method,
      forwardedBy,
      entryPolicies: hop.policies,
      reason: decision.reason,
      policies: decision.policies,
    });
    const why =
      `${hop.caller} may not call ${hop.method} on agent "${agentId}": ${decision.reason}${policies}; ` +
      `the call entered at broker ${forwardedBy}`;
    this.refuse(call, Status.PERMISSION_DENIED, why, true);
    return false;
  }
}
