import { Metadata, status as Status, type Server, type ServerDuplexStream } from '@grpc/grpc-js';
import {
  AGENT_ID_KEY, BurrowError, CallStream, identity, identityOfPeerCertificate, relayCall, statusName, logCallFinished,
} from '@burrow/tunnel';
import type { CallerApiDeps } from './caller-api';

/** The one method of the broker-to-broker API (tunnel.proto, service BrokerPeer). */
export const PEER_FORWARD_METHOD = '/burrow.tunnel.v1.BrokerPeer/Forward';
/** Response header by which the owning broker says it holds a tunnel stream for the call. */
export const PEER_READY_KEY = 'burrow-peer-ready';
/** Trailer on every refusal by the owning broker, so the forwarder can tell it from a transport failure. */
export const PEER_REFUSED_KEY = 'burrow-peer-refused';
/** Request header naming the forwarding broker (logs). */
export const FORWARDED_BY_KEY = 'burrow-forwarded-by';

/** The owning side checks what the caller API checks, minus caller policy (done by the forwarder). */
export type PeerListenerDeps = Pick<CallerApiDeps, 'registry' | 'metrics' | 'logger' | 'trustDomain' | 'agentWaitMs' | 'isDraining' | 'isRevoked' | 'watch'>;

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
      { forward: { path: PEER_FORWARD_METHOD, requestStream: true, responseStream: true, requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity } },
      { forward: (call: RawCall) => { void this.onForward(call); } },
    );
  }

  private refuse(call: RawCall, code: Status, details: string): void {
    this.deps.metrics.peerCalls.inc({ code: statusName(code) });
    const metadata = new Metadata();
    metadata.set(PEER_REFUSED_KEY, '1');
    call.emit('error', { code, details, metadata });
  }

  private async onForward(call: RawCall): Promise<void> {
    const { registry, metrics, logger } = this.deps;
    const peer = identityOfPeerCertificate(call.getAuthContext().sslPeerCertificate);
    if (!peer || peer.role !== 'broker' || peer.trustDomain !== this.deps.trustDomain || this.deps.isRevoked(peer)) {
      const why = !peer ? 'client certificate has no Burrow identity' : peer.role !== 'broker' ? `certificate role "${peer.role}" may not use the peer API; a broker certificate is required`
        : peer.trustDomain !== this.deps.trustDomain ? `certificate trust domain "${peer.trustDomain}" is not "${this.deps.trustDomain}"` : `certificate ${peer.spiffeId} is revoked`;
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
    // Only agents connected here: a forwarded call is never forwarded again.
    if (this.deps.isDraining() || !registry.canServe(agentId)) {
      this.refuse(call, Status.UNAVAILABLE, this.deps.isDraining() ? 'broker is draining' : `agent "${agentId}" has no tunnel to this broker`);
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
      identity: peer, listener: 'peer',
      cut: (error) => {
        cutBy ??= error;
        if (inbound) inbound.abort(error);
        else abort.abort();
      },
    });
    const deadline = call.getDeadline();
    const deadlineMs = deadline instanceof Date ? deadline.getTime() : deadline;
    let offer;
    try {
      offer = await registry.acquire(agentId, this.deps.agentWaitMs, deadlineMs, abort.signal);
    } catch (err) {
      untrack();
      call.removeListener('cancelled', onCancel);
      const e = cutBy ?? (err as BurrowError);
      if (!call.cancelled) this.refuse(call, e.code, e.message);
      return;
    }
    call.removeListener('cancelled', onCancel);
    const startedMs = Date.now();
    inbound = new CallStream(call, 'server', 'answerer', (err) => logger.warn('forwarding broker broke the tunnel protocol', { forwardedBy, agentId, error: err.message }));
    const ready = new Metadata();
    ready.set(PEER_READY_KEY, '1');
    call.sendMetadata(ready);
    metrics.toAgentCallStarted();
    const outcome = await relayCall(inbound, offer.stream, `agent "${agentId}"`);
    untrack();
    registry.callFinished(offer);
    metrics.toAgentCallEnded();
    metrics.peerCalls.inc({ code: statusName(outcome.code) });
    logCallFinished(logger, { direction: 'to_agent', agentId, method: outcome.method ?? '', forwardedBy, code: outcome.code, details: outcome.details, durationMs: Date.now() - startedMs });
  }
}

/** Thrown to callers when no broker could take a call (kept for messages naming the attempts). */
export function noBrokerServes(agentId: string, waitedMs: number, attempts: string[]): BurrowError {
  const tried = attempts.length ? `; tried ${attempts.join('; ')}` : '';
  return new BurrowError(Status.UNAVAILABLE, `agent "${agentId}" is not connected to this broker or any other (waited ${waitedMs} ms${tried})`);
}
