import { Metadata, status as Status, type ServerDuplexStream } from '@grpc/grpc-js';
import {
  AGENT_ID_KEY, BurrowError, ID_GRAMMAR, certificateIdentityProblem, identityOfPeerCertificate, isValidId, type CallStream, originate, originateUnary, rejectCall, statusName, type Logger, type PeerIdentity,
  logCallFinished, type UnaryResult,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import { LimitExceededError, type CallLimiter } from './call-limiter';
import type { CallerAuthorizer } from './caller-authorizer';
import type { AgentDirectory } from './agent-directory';
import { noBrokerServes } from './peer-listener';
import type { PeerForwarder } from './peer-forwarder';
import type { IdleOffer, TunnelRegistry } from './tunnel-registry';

/** A broker cluster: where agents connected elsewhere are looked up and how calls reach them. */
export interface ClusterRouting {
  directory: AgentDirectory;
  forwarder: PeerForwarder;
  /** While a call waits for its agent, how often the directory is asked again. */
  retryIntervalMs: number;
}

/**
 * Where a call goes: one of the agent's tunnel streams here, or a Forward stream to the broker
 * that holds the agent's tunnel (already confirmed ready).
 */
type Route =
  | { local: true; offer: IdleOffer; stream: CallStream }
  | { local: false; peer: string; stream: CallStream };

export interface CallerApiDeps {
  registry: TunnelRegistry;
  metrics: BrokerMetrics;
  logger: Logger;
  trustDomain: string;
  agentWaitMs: number;
  isDraining(): boolean;
  /** Revocation check (service certificates can be revoked by serial). */
  isRevoked(id: PeerIdentity): boolean;
  /** Which services may call which methods on which agents. */
  authorizer: CallerAuthorizer;
  limiter: CallLimiter;
  /** Set when the broker runs in a cluster (--redis-url). */
  cluster?: ClusterRouting;
}

type RawCall = ServerDuplexStream<Buffer, Buffer>;


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
 * A call that passed admission: the caller is a valid service, allowed by policy and within its
 * limits. `finish` records the outcome (metrics, log) and releases the limits exactly once.
 */
interface AdmittedCall {
  caller: PeerIdentity;
  agentId: string;
  callId: string;
  finish(code: number, details: string, requestBytes?: number, responseBytes?: number): void;
}

/**
 * The caller API: every method that is not the health service lands here, is routed to the named
 * agent, and travels down one of its idle offers. The AuthZEN HTTP binding enters through
 * {@link CallerApi.callUnary} and passes the same checks: identity, agent name, draining, caller
 * policy, limits.
 */
export class CallerApi {
  private callCounter = 0;
  private readonly idPrefix = Math.random().toString(36).slice(2, 8);

  constructor(private readonly deps: CallerApiDeps) {}

  /** The catch-all handler for the caller API server. */
  readonly handle = (call: RawCall): void => { void this.forward(call); };

  /**
   * Checks everything that does not need the agent, in the order that reveals least to a caller
   * that fails: identity first, so an unknown client learns nothing about agents or policy.
   * Throws a BurrowError after recording the refusal.
   */
  private admit(
    peer: PeerIdentity | undefined, agentId: string | undefined, method: string, transport: 'grpc' | 'http',
    peerRaw?: Buffer,
  ): AdmittedCall {
    const { metrics, logger } = this.deps;
    const startedMs = Date.now();
    const callId = `${this.idPrefix}-${(++this.callCounter).toString(36)}`;
    let release: (() => void) | undefined;
    let finished = false;
    const finish = (id: string | undefined, code: number, details: string, requestBytes = 0, responseBytes = 0): void => {
      if (finished) return;
      finished = true;
      release?.();
      const seconds = (Date.now() - startedMs) / 1000;
      metrics.calls.inc({ direction: 'to_agent', method: metrics.methodLabel(method), code: statusName(code) });
      metrics.callDuration.observe({ direction: 'to_agent' }, seconds);
      if (requestBytes) metrics.messageBytes.inc({ direction: 'to_agent', flow: 'request' }, requestBytes);
      if (responseBytes) metrics.messageBytes.inc({ direction: 'to_agent', flow: 'response' }, responseBytes);
      logCallFinished(logger, { direction: 'to_agent', agentId: id, callId, method, code, details, durationMs: Math.round(seconds * 1000), caller: peer?.spiffeId, transport });
    };
    const refuse = (id: string | undefined, err: BurrowError): never => {
      finish(id, err.code, err.message);
      throw err;
    };

    if (!peer || peer.role !== 'service' || peer.trustDomain !== this.deps.trustDomain || this.deps.isRevoked(peer)) {
      const why = peerRaw ? `: ${certificateIdentityProblem(peerRaw)}` : '';
      const reason = !peer ? `client certificate has no Burrow identity${why}` : peer.role !== 'service' ? `certificate role "${peer.role}" may not call agents; a service certificate is required`
        : peer.trustDomain !== this.deps.trustDomain ? `certificate trust domain "${peer.trustDomain}" is not "${this.deps.trustDomain}"` : `certificate ${peer.spiffeId} (serial ${peer.serialHex}) is revoked`;
      metrics.rejectedHandshakes.inc({ listener: 'api', reason: peer ? 'wrong_role' : 'no_identity' });
      refuse(undefined, new BurrowError(Status.PERMISSION_DENIED, reason));
    }
    const caller = peer!;
    if (agentId === undefined) {
      refuse(undefined, new BurrowError(Status.INVALID_ARGUMENT, `name the agent with metadata "${AGENT_ID_KEY}" or the authority "<agent-id>.agent"`));
    }
    // Agent ids follow the one id grammar; anything else cannot name a connected agent.
    if (!isValidId(agentId)) {
      const shown = agentId!.slice(0, 140);
      refuse(undefined, new BurrowError(Status.INVALID_ARGUMENT, `"${shown}" is not a valid agent id: ${ID_GRAMMAR}`));
    }
    const agent = agentId!;
    if (this.deps.isDraining()) refuse(agent, new BurrowError(Status.UNAVAILABLE, 'broker is draining; retry on another broker'));

    const decision = this.deps.authorizer.authorize(caller, agent, method);
    metrics.authzDecisions.inc({ decision: decision.allowed ? 'allow' : 'deny' });
    if (!decision.allowed) {
      logger.warn('caller denied by policy', { caller: caller.spiffeId, agentId: agent, method, reason: decision.reason, policies: decision.policies });
      refuse(agent, new BurrowError(Status.PERMISSION_DENIED, `${caller.spiffeId} may not call ${method} on agent "${agent}": ${decision.reason}`));
    }
    try {
      release = this.deps.limiter.admit(caller.spiffeId, agent);
    } catch (err) {
      if (err instanceof LimitExceededError) metrics.limitedCalls.inc({ limit: err.limit });
      refuse(agent, err as BurrowError);
    }
    return { caller, agentId: agent, callId, finish: (code, details, req, res) => finish(agent, code, details, req, res) };
  }

  private async forward(call: RawCall): Promise<void> {
    let admitted: AdmittedCall;
    try {
      const cert = call.getAuthContext().sslPeerCertificate;
      admitted = this.admit(identityOfPeerCertificate(cert), agentIdOfCall(call), call.getPath(), 'grpc', cert?.raw);
    } catch (err) {
      rejectCall(call, err as BurrowError);
      return;
    }
    const { registry, metrics } = this.deps;
    const { agentId, callId, caller } = admitted;
    metrics.toAgentCallStarted();
    // The common case, an idle offer of the agent's tunnel here, has nothing to wait for and so
    // nothing to cancel: no AbortController (an EventTarget, ~1.5% of the broker's CPU per call).
    const idle = registry.tryAcquire(agentId);
    let route: Route;
    if (idle) route = { local: true, offer: idle, stream: idle.stream };
    else {
      const abort = new AbortController();
      const onCancel = (): void => abort.abort();
      call.on('cancelled', onCancel);
      const deadline = call.getDeadline();
      const deadlineMs = deadline instanceof Date ? deadline.getTime() : deadline;
      try {
        route = await this.route(agentId, deadlineMs, abort.signal);
      } catch (err) {
        metrics.toAgentCallEnded();
        call.removeListener('cancelled', onCancel);
        rejectCall(call, err as BurrowError);
        admitted.finish((err as BurrowError).code, (err as BurrowError).message);
        return;
      }
      call.removeListener('cancelled', onCancel);
    }
    const outcome = await originate(call, route.stream, { callId, peerName: route.local ? `agent "${agentId}"` : `broker ${route.peer} (for agent "${agentId}")`, caller: caller.spiffeId });
    if (route.local) registry.callFinished(route.offer);
    metrics.toAgentCallEnded();
    admitted.finish(outcome.code, outcome.details, outcome.requestBytes, outcome.responseBytes);
  }

  /**
   * Finds the way to `agentId`: its tunnel here if it has one; else, in a cluster, the broker the
   * directory names that confirms it can serve; else waits (up to the agent wait, capped by the
   * deadline) for the agent to turn up here or anywhere. Rejects like {@link TunnelRegistry.acquire}.
   */
  private async route(agentId: string, deadlineMs: number, signal: AbortSignal): Promise<Route> {
    const { registry, cluster, agentWaitMs } = this.deps;
    const local = async (waitMs: number): Promise<Route> => {
      const offer = await registry.acquire(agentId, waitMs, deadlineMs, signal);
      return { local: true, offer, stream: offer.stream };
    };
    if (!cluster || registry.canServe(agentId)) return local(agentWaitMs);
    const startedMs = Date.now();
    const waitUntilMs = Math.min(startedMs + agentWaitMs, deadlineMs);
    const attempts: string[] = [];
    for (;;) {
      let owners: string[] = [];
      try {
        owners = await cluster.directory.lookup(agentId);
      } catch (err) {
        attempts.push((err as Error).message);
      }
      for (const peer of cluster.forwarder.rank(owners)) {
        if (signal.aborted) break;
        const attempt = await cluster.forwarder.open(peer, agentId, deadlineMs, signal);
        if (attempt.ready) return { local: false, peer, stream: attempt.stream };
        cluster.directory.forgetOwner(agentId, peer);
        attempts.push(attempt.reason);
      }
      if (signal.aborted) throw new BurrowError(Status.CANCELLED, 'cancelled while waiting for the agent');
      if (registry.canServe(agentId)) return local(Math.max(0, waitUntilMs - Date.now()));
      const leftMs = waitUntilMs - Date.now();
      if (leftMs <= 0) {
        if (deadlineMs <= waitUntilMs) throw new BurrowError(Status.DEADLINE_EXCEEDED, `deadline exceeded while waiting for agent "${agentId}"`);
        throw noBrokerServes(agentId, Date.now() - startedMs, [...new Set(attempts)].slice(-3));
      }
      await registry.whenConnected(agentId, Math.min(leftMs, cluster.retryIntervalMs), signal);
    }
  }

  /**
   * One unary call made on behalf of `peer` (the AuthZEN HTTP binding): admitted like a gRPC call,
   * then carried down the agent's tunnel. Resolves with the status; never rejects.
   */
  async callUnary(peer: PeerIdentity | undefined, agentId: string, method: string, message: Buffer, deadlineMs: number, signal?: AbortSignal): Promise<UnaryResult> {
    let admitted: AdmittedCall;
    try {
      admitted = this.admit(peer, agentId, method, 'http');
    } catch (err) {
      const e = err as BurrowError;
      return { code: e.code, details: e.message, trailers: new Metadata(), requestBytes: 0, responseBytes: 0 };
    }
    const { registry, metrics } = this.deps;
    metrics.toAgentCallStarted();
    let route: Route;
    try {
      route = await this.route(agentId, deadlineMs, signal ?? new AbortController().signal);
    } catch (err) {
      const e = err as BurrowError;
      metrics.toAgentCallEnded();
      admitted.finish(e.code, e.message);
      return { code: e.code, details: e.message, trailers: new Metadata(), requestBytes: 0, responseBytes: 0 };
    }
    const result = await originateUnary({ method, message, metadata: new Metadata(), deadlineMs, signal }, route.stream, { callId: admitted.callId, peerName: `agent "${agentId}"`, caller: admitted.caller.spiffeId });
    if (route.local) registry.callFinished(route.offer);
    metrics.toAgentCallEnded();
    admitted.finish(result.code, result.details, result.requestBytes, result.responseBytes);
    return result;
  }
}
