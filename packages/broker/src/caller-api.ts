import { status as Status, type ServerDuplexStream } from '@grpc/grpc-js';
import {
  AGENT_ID_KEY, BurrowError, identityOfPeerCertificate, originate, rejectCall, statusName, type Logger, type PeerIdentity,
  logCallFinished,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import type { TunnelRegistry } from './tunnel-registry';

export interface CallerApiDeps {
  registry: TunnelRegistry;
  metrics: BrokerMetrics;
  logger: Logger;
  trustDomain: string;
  agentWaitMs: number;
  isDraining(): boolean;
  /** Revocation check (service certificates can be revoked by serial). */
  isRevoked(id: PeerIdentity): boolean;
}

type RawCall = ServerDuplexStream<Buffer, Buffer>;

// Agent ids as the PKI issues them; anything else cannot name a connected agent.
const AGENT_ID = /^[A-Za-z0-9._-]{1,128}$/;

/**
 * Names the agent a caller's call is for: the `burrow-agent-id` metadata, or else an authority of
 * the form `<id>.agent` (optionally with a port), so stock clients need only a target change.
 */
export function agentIdOfCall(call: RawCall): string | undefined {
  const fromMetadata = call.metadata.get(AGENT_ID_KEY)[0];
  if (typeof fromMetadata === 'string' && fromMetadata !== '') return fromMetadata;
  const host = call.getHost?.() ?? '';
  const m = /^([^:]+)\.agent(:\d+)?$/.exec(host);
  return m ? m[1] : undefined;
}

/**
 * The caller API: every method that is not the health service lands here, is routed to the named
 * agent, and travels down one of its idle offers.
 */
export class CallerApi {
  private callCounter = 0;
  private readonly idPrefix = Math.random().toString(36).slice(2, 8);

  constructor(private readonly deps: CallerApiDeps) {}

  /** The catch-all handler for the caller API server. */
  readonly handle = (call: RawCall): void => { void this.forward(call); };

  private async forward(call: RawCall): Promise<void> {
    const { registry, metrics, logger } = this.deps;
    const startedMs = Date.now();
    const method = call.getPath();
    const callId = `${this.idPrefix}-${(++this.callCounter).toString(36)}`;
    const finish = (agentId: string | undefined, code: number, details: string, requestBytes = 0, responseBytes = 0): void => {
      const seconds = (Date.now() - startedMs) / 1000;
      metrics.calls.inc({ direction: 'to_agent', method: metrics.methodLabel(method), code: statusName(code) });
      metrics.callDuration.observe({ direction: 'to_agent' }, seconds);
      if (requestBytes) metrics.messageBytes.inc({ direction: 'to_agent', flow: 'request' }, requestBytes);
      if (responseBytes) metrics.messageBytes.inc({ direction: 'to_agent', flow: 'response' }, responseBytes);
      logCallFinished(logger, { direction: 'to_agent', agentId, callId, method, code, details, durationMs: Math.round(seconds * 1000) });
    };
    const refuse = (agentId: string | undefined, err: BurrowError): void => {
      rejectCall(call, err);
      finish(agentId, err.code, err.message);
    };

    const caller = identityOfPeerCertificate(call.getAuthContext().sslPeerCertificate);
    if (!caller || caller.role !== 'service' || caller.trustDomain !== this.deps.trustDomain || this.deps.isRevoked(caller)) {
      const reason = !caller ? 'client certificate has no Burrow identity' : caller.role !== 'service' ? `certificate role "${caller.role}" may not call agents; a service certificate is required`
        : caller.trustDomain !== this.deps.trustDomain ? `certificate trust domain "${caller.trustDomain}" is not "${this.deps.trustDomain}"` : `certificate ${caller.spiffeId} (serial ${caller.serialHex}) is revoked`;
      metrics.rejectedHandshakes.inc({ listener: 'api', reason: caller ? 'wrong_role' : 'no_identity' });
      refuse(undefined, new BurrowError(Status.PERMISSION_DENIED, reason));
      return;
    }
    const agentId = agentIdOfCall(call);
    if (agentId === undefined) {
      refuse(undefined, new BurrowError(Status.INVALID_ARGUMENT, `name the agent with metadata "${AGENT_ID_KEY}" or the authority "<agent-id>.agent"`));
      return;
    }
    if (!AGENT_ID.test(agentId)) {
      refuse(undefined, new BurrowError(Status.INVALID_ARGUMENT, `"${agentId.slice(0, 140)}" is not a valid agent id`));
      return;
    }
    if (this.deps.isDraining()) {
      refuse(agentId, new BurrowError(Status.UNAVAILABLE, 'broker is draining; retry on another broker'));
      return;
    }

    const abort = new AbortController();
    const onCancel = (): void => abort.abort();
    call.on('cancelled', onCancel);
    const deadline = call.getDeadline();
    const deadlineMs = deadline instanceof Date ? deadline.getTime() : deadline;
    let offer;
    try {
      metrics.callsInFlight.inc({ direction: 'to_agent' });
      offer = await registry.acquire(agentId, this.deps.agentWaitMs, deadlineMs, abort.signal);
    } catch (err) {
      metrics.callsInFlight.dec({ direction: 'to_agent' });
      call.removeListener('cancelled', onCancel);
      refuse(agentId, err as BurrowError);
      return;
    }
    call.removeListener('cancelled', onCancel);
    const { session, stream } = offer;
    session.active.add(stream);
    const outcome = await originate(call, stream, { callId, peerName: `agent "${agentId}"` });
    registry.callFinished(offer);
    metrics.callsInFlight.dec({ direction: 'to_agent' });
    finish(agentId, outcome.code, outcome.details, outcome.requestBytes, outcome.responseBytes);
  }
}
