import { Metadata, status as Status, type Server, type ServerDuplexStream } from '@grpc/grpc-js';
import {
  AGENT_ID_KEY,
  BurrowError,
  CallStream,
  identity,
  identityOfPeerCertificate,
  parseSpiffeId,
  relayCall,
  statusName,
  logCallFinished,
  type PeerIdentity,
} from '@burrow/tunnel';
import { LimitExceededError } from './call-limiter';
import type { CallerApiDeps } from './caller-api';
import { ALLOW_ALL_CALLERS } from './caller-authorizer';

/** The one method of the broker-to-broker API (tunnel.proto, service BrokerPeer). */
export const PEER_FORWARD_METHOD = '/burrow.tunnel.v1.BrokerPeer/Forward';
/** Response header by which the owning broker says it holds a tunnel stream for the call. */
export const PEER_READY_KEY = 'burrow-peer-ready';
/**
 * Trailer on every refusal by the owning broker, so the forwarder can tell it from a transport
 * failure: `1` when it cannot serve the call (try another broker), {@link PEER_REFUSED_DECISION}
 * when it decided against the call itself (caller policy, the agent's limit, bad hop metadata).
 */
export const PEER_REFUSED_KEY = 'burrow-peer-refused';
/** {@link PEER_REFUSED_KEY} value of a decision on the call: the forwarder passes it to the caller. */
export const PEER_REFUSED_DECISION = 'decision';
/** Request header naming the forwarding broker: the broker where the call entered (logs, audit). */
export const FORWARDED_BY_KEY = 'burrow-forwarded-by';
/** Hop metadata: the caller's verified SPIFFE id, as the broker where the call entered saw it. */
export const HOP_CALLER_KEY = 'burrow-hop-caller';
/** Hop metadata: the gRPC method of the call (the Start frame must name the same). */
export const HOP_METHOD_KEY = 'burrow-hop-method';
/** Hop metadata: the entry broker's caller-policy decision, `allow` or `allow policies=<id>,...` (ids URI-encoded). */
export const HOP_DECISION_KEY = 'burrow-hop-decision';

/** What the broker where a call entered vouches for when it forwards the call (hop metadata). */
export interface Hop {
  /** The caller's verified SPIFFE id. */
  caller: string;
  method: string;
  /** Ids of the caller policies that permitted the call there (empty: it has no caller policy). */
  policies: string[];
}

const MAX_HOP_POLICIES = 32;
const MAX_HOP_VALUE_CHARS = 4_096;
const HOP_DECISION = /^allow(?: policies=([A-Za-z0-9%._~!*'()-]+(?:,[A-Za-z0-9%._~!*'()-]+)*))?$/;
const GRPC_METHOD = /^\/[A-Za-z0-9_.-]+\/[A-Za-z0-9_.-]+$/;
const BROKER_ID = /^[\x21-\x7e]{1,253}$/;

/** Writes `hop` into the metadata of a Forward call (the forwarding side). */
export function encodeHop(hop: Hop, md: Metadata): void {
  md.set(HOP_CALLER_KEY, hop.caller);
  md.set(HOP_METHOD_KEY, hop.method);
  const ids = hop.policies.slice(0, MAX_HOP_POLICIES).map(encodeURIComponent);
  md.set(HOP_DECISION_KEY, ids.length ? `allow policies=${ids.join(',')}` : 'allow');
}

/**
 * Reads and checks the hop metadata of a Forward call: `undefined` when there is none (a broker
 * of an older version), else the hop, or the first problem found (the call is refused with it).
 */
export function decodeHop(md: Metadata, trustDomain: string): Hop | undefined | { problem: string } {
  const value = (key: string): string | undefined => {
    const v = md.get(key)[0];
    return typeof v === 'string' ? v : undefined;
  };
  const caller = value(HOP_CALLER_KEY);
  const method = value(HOP_METHOD_KEY);
  const decision = value(HOP_DECISION_KEY);
  if (caller === undefined && method === undefined && decision === undefined) return undefined;
  if (caller === undefined || method === undefined || decision === undefined) {
    return { problem: `${HOP_CALLER_KEY}, ${HOP_METHOD_KEY} and ${HOP_DECISION_KEY} go together` };
  }
  if ([caller, method, decision].some((v) => v.length > MAX_HOP_VALUE_CHARS)) {
    return { problem: `a hop metadata value is longer than ${MAX_HOP_VALUE_CHARS} characters` };
  }
  const id = parseSpiffeId(caller);
  if (id?.role !== 'service' || id.trustDomain !== trustDomain) {
    const shown = caller.slice(0, 200);
    return { problem: `${HOP_CALLER_KEY} "${shown}" is not a service SPIFFE id of trust domain ${trustDomain}` };
  }
  if (!GRPC_METHOD.test(method)) {
    const shown = method.slice(0, 200);
    return { problem: `${HOP_METHOD_KEY} "${shown}" is not a gRPC method path (/package.Service/Method)` };
  }
  const m = HOP_DECISION.exec(decision);
  const ids = m?.[1]?.split(',') ?? [];
  if (!m || ids.length > MAX_HOP_POLICIES) {
    const expected = `"allow" or "allow policies=<id>,..." (at most ${MAX_HOP_POLICIES})`;
    return { problem: `${HOP_DECISION_KEY} "${decision.slice(0, 200)}" is not ${expected}` };
  }
  try {
    return { caller, method, policies: ids.map(decodeURIComponent) };
  } catch {
    return { problem: `${HOP_DECISION_KEY}: a policy id is not URI-encoded` };
  }
}

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

/**
 * The owning side of the broker-to-broker API: takes calls other brokers forward for agents
 * connected here, confirms it can serve each (ready header) and relays it onto the agent's
 * tunnel. Never forwards a call further.
 */
export class PeerListener {
  constructor(private readonly deps: PeerListenerDeps) {}

  addTo(server: Server): void {
    server.addService(
      {
        forward: {
          path: PEER_FORWARD_METHOD,
          requestStream: true,
          responseStream: true,
          requestSerialize: identity,
          requestDeserialize: identity,
          responseSerialize: identity,
          responseDeserialize: identity,
        },
      },
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

  private async onForward(call: RawCall): Promise<void> {
    const { registry, metrics, logger } = this.deps;
    const peer = identityOfPeerCertificate(call.getAuthContext().sslPeerCertificate);
    if (peer?.role !== 'broker' || peer.trustDomain !== this.deps.trustDomain || this.deps.isRevoked(peer)) {
      const why = !peer
        ? 'client certificate has no Burrow identity'
        : peer.role !== 'broker'
          ? `certificate role "${peer.role}" may not use the peer API; a broker certificate is required`
          : peer.trustDomain !== this.deps.trustDomain
            ? `certificate trust domain "${peer.trustDomain}" is not "${this.deps.trustDomain}"`
            : `certificate ${peer.spiffeId} is revoked`;
      metrics.rejectedHandshakes.inc({ listener: 'peer', reason: peer ? 'wrong_role' : 'no_identity' });
      logger.warn('peer call refused', { peer: call.getPeer(), reason: why });
      this.refuse(call, Status.PERMISSION_DENIED, why);
      return;
    }
    const agentId = call.metadata.get(AGENT_ID_KEY)[0];
    const forwardedBy = String(call.metadata.get(FORWARDED_BY_KEY)[0] ?? '');
    if (typeof agentId !== 'string' || agentId === '') {
      this.refuse(call, Status.INVALID_ARGUMENT, `peer call without ${AGENT_ID_KEY}`);
      return;
    }
    if (!BROKER_ID.test(forwardedBy)) {
      const why = `peer call without a valid ${FORWARDED_BY_KEY} (the forwarding broker's id)`;
      this.refuse(call, Status.INVALID_ARGUMENT, why);
      return;
    }
    // Only agents connected here: a forwarded call is never forwarded again.
    if (this.deps.isDraining() || !registry.canServe(agentId)) {
      this.refuse(
        call,
        Status.UNAVAILABLE,
        this.deps.isDraining() ? 'broker is draining' : `agent "${agentId}" has no tunnel to this broker`,
      );
      return;
    }
    const hop = this.checkHop(call, peer, agentId, forwardedBy);
    if (hop === false) return;
    let releaseAgent: () => void;
    try {
      releaseAgent = this.deps.limiter.admitAgent(agentId);
    } catch (err) {
      if (err instanceof LimitExceededError) metrics.limitedCalls.inc({ limit: err.limit });
      this.refuse(call, (err as BurrowError).code, (err as BurrowError).message, true);
      return;
    }
    const abort = new AbortController();
    const onCancel = (): void => abort.abort();
    call.on('cancelled', onCancel);
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
    const deadline = call.getDeadline();
    const deadlineMs = deadline instanceof Date ? deadline.getTime() : deadline;
    let offer: Awaited<ReturnType<typeof registry.acquire>>;
    try {
      offer = await registry.acquire(agentId, this.deps.agentWaitMs, deadlineMs, abort.signal);
    } catch (err) {
      untrack();
      releaseAgent();
      call.removeListener('cancelled', onCancel);
      const e = cutBy ?? (err as BurrowError);
      if (!call.cancelled) this.refuse(call, e.code, e.message);
      return;
    }
    call.removeListener('cancelled', onCancel);
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
    logCallFinished(logger, {
      direction: 'to_agent',
      agentId,
      method: outcome.method ?? '',
      forwardedBy,
      caller: hop?.caller,
      entryPolicies: hop?.policies,
      code: outcome.code,
      details: outcome.details,
      durationMs: Date.now() - startedMs,
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

/** Thrown to callers when no broker could take a call (kept for messages naming the attempts). */
export function noBrokerServes(agentId: string, waitedMs: number, attempts: string[]): BurrowError {
  const tried = attempts.length ? `; tried ${attempts.join('; ')}` : '';
  return new BurrowError(
    Status.UNAVAILABLE,
    `agent "${agentId}" is not connected to this broker or any other (waited ${waitedMs} ms${tried})`,
  );
}
