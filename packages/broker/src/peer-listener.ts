import type * as http2 from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import {
  AGENT_ID_KEY,
  type BurrowError,
  CALLER_ID_KEY,
  CALL_ID_KEY,
  CallIds,
  type StreamListener,
  deadlineFromTimeout,
  refuseStream,
  nextHopHeaders,
  openStream,
  parseSpiffeId,
  relayCall,
  statusName,
  recordCallFinished,
  toBurrowError,
  type CallCutter,
  type CallOutcome,
  type PeerIdentity,
  BURROW_ATTRIBUTES,
  SpanKind,
  TRACEPARENT_KEY,
  endRpcSpan,
  remoteParent,
  startRpcSpan,
  traceLogFields,
  traceparentOf,
  type Span,
} from '@burrow/tunnel';
import { countIfLimited } from './call-limiter';
import type { CallerApiDeps } from './caller-api';
import { ALLOW_ALL_CALLERS } from './caller-authorizer';
import { PEER_BROKER_RULE, checkPeer, presentedBy } from './peer-admission';
import type { AgentSession } from './tunnel-registry';
import {
  FORWARDED_BY_KEY,
  HOP_CALLER_KEY,
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
  | 'maxMessageBytes'
  | 'tracing'
  | 'brokerId'
>;

/** A forwarded call that passed {@link PeerListener.admitForward}; it holds the agent's limit slot. */
interface AdmittedForward {
  /** The forwarding broker. */
  peer: PeerIdentity;
  agentId: string;
  forwardedBy: string;
  hop: Hop | undefined;
  releaseAgent(): void;
}

/** A forwarded call as it arrived: the stream, its method and headers. */
interface PeerCall {
  stream: http2.ServerHttp2Stream;
  headers: http2.IncomingHttpHeaders;
  rawHeaders: string[];
  method: string;
}

/**
 * The owning side of the broker-to-broker API: takes calls other brokers forward for agents
 * connected here, confirms it can serve each (100 Continue) and relays it onto a call stream of the
 * agent's tunnel. Never forwards a call further.
 */
export class PeerListener {
  private readonly callIds = new CallIds('p');

  constructor(private readonly deps: PeerListenerDeps) {}

  /** The peer server's 'stream' handler. */
  readonly handle: StreamListener = (stream, headers, _flags, rawHeaders) => {
    stream.on('error', () => {});
    void this.onForward({ stream, headers, rawHeaders, method: String(headers[':path'] ?? '') });
  };

  private refuse(call: PeerCall, code: Status, details: string, decision = false): void {
    this.deps.metrics.peerCalls.inc({ code: statusName(code) });
    // Before the 100: the forwarding broker has sent no DATA, and may try the next broker.
    refuseStream(call.stream, code, details, { [PEER_REFUSED_KEY]: decision ? PEER_REFUSED_DECISION : '1' });
  }

  /**
   * Everything a forwarded call must pass before it waits for the agent: the forwarding broker's
   * certificate, the agent and broker ids, that the agent is served here, the hop metadata and
   * caller policy, the agent's limits. Returns what the call goes on with, or undefined after
   * refusing it (the refusal is a stream error: the connection between the brokers lives on).
   */
  private admitForward(call: PeerCall): AdmittedForward | undefined {
    const { registry, metrics, logger } = this.deps;
    const socket = call.stream.session?.socket as TLSSocket | undefined;
    // Without the certificate: this refusal has never said what is wrong with a broker's certificate.
    const presented = { identity: socket ? presentedBy(socket).identity : undefined };
    const checked = checkPeer(presented, PEER_BROKER_RULE, this.deps);
    if ('refusal' in checked) {
      logger.warn('peer call refused', { peer: socket?.remoteAddress, reason: checked.refusal.message });
      this.refuse(call, checked.refusal.code, checked.refusal.message);
      return undefined;
    }
    const peer = checked.identity;
    const agentId = call.headers[AGENT_ID_KEY];
    const forwardedBy = String(call.headers[FORWARDED_BY_KEY] ?? '');
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

  private async onForward(call: PeerCall): Promise<void> {
    const admitted = this.admitForward(call);
    if (!admitted) return;
    const { metrics } = this.deps;
    const { peer, agentId, forwardedBy, hop, releaseAgent } = admitted;
    const { stream } = call;
    const abort = new AbortController();
    const onClose = (): void => abort.abort();
    stream.once('close', onClose);
    // The forwarding broker's certificate revoked or expired mid-call: the call ends (the agent's
    // stream is reset), whether it still waits for the agent or is being relayed.
    let cutBy: BurrowError | undefined;
    const cutter: CallCutter = {};
    const untrack = this.deps.watch.track({
      identity: peer,
      listener: 'peer',
      cut: (error) => {
        cutBy ??= error;
        if (cutter.cut) cutter.cut(error);
        else abort.abort();
      },
    });
    const deadlineMs = deadlineFromTimeout(call.headers['grpc-timeout'], Date.now()) ?? Number.POSITIVE_INFINITY;
    const callId = this.callIds.next();
    const spans = this.deps.tracing.enabled ? this.spans(call, agentId, callId, forwardedBy) : undefined;
    let opened: { session: AgentSession; outbound: http2.ClientHttp2Stream };
    try {
      opened = await this.openOnAgent(call, agentId, hop, callId, deadlineMs, abort.signal, spans?.client);
    } catch (err) {
      stream.off('close', onClose);
      untrack();
      releaseAgent();
      const e = cutBy ?? toBurrowError(err);
      if (spans) for (const span of [spans.client, spans.server]) endRpcSpan(span, e.code, e.message);
      this.refuse(call, e.code, e.message);
      return;
    }
    const { session, outbound } = opened;
    stream.off('close', onClose);
    const startedMs = Date.now();
    // Ready: the forwarding broker sends the call's DATA from here on.
    stream.additionalHeaders({ ':status': 100 });
    metrics.toAgentCallStarted();
    session.callStarted(cutter);
    const outcome = await relayCall(stream, outbound, {
      peerName: `agent "${agentId}"`,
      maxMessageBytes: this.deps.maxMessageBytes,
      deadlineMs,
      cutter,
    });
    session.callEnded(cutter);
    untrack();
    releaseAgent();
    metrics.toAgentCallEnded();
    // Both when the status went back: the forwarding broker's CLIENT span ends after it got it.
    const { code, details, settledAt } = outcome;
    if (spans) for (const span of [spans.client, spans.server]) endRpcSpan(span, code, details, settledAt);
    const fields = { agentId, callId, method: call.method, forwardedBy, hop };
    this.accountFinished(outcome, startedMs, fields, spans?.server);
  }

  /**
   * A traced forwarded call's spans here: SERVER (its parent the forwarding broker's CLIENT span,
   * from traceparent) and the CLIENT span of its hop down the agent's tunnel.
   */
  private spans(call: PeerCall, agentId: string, callId: string, forwardedBy: string): { server: Span; client: Span } {
    const { tracing } = this.deps;
    const attributes = {
      [BURROW_ATTRIBUTES.agentId]: agentId,
      [BURROW_ATTRIBUTES.callId]: callId,
    };
    const parent = remoteParent(call.headers[TRACEPARENT_KEY], call.headers.tracestate);
    const server = startRpcSpan(tracing, SpanKind.SERVER, call.method, parent, attributes);
    server.setAttribute('burrow.forwarded_by', forwardedBy);
    return { server, client: startRpcSpan(tracing, SpanKind.CLIENT, call.method, server, attributes) };
  }

  /** A relayed call is over: counted as a call where it entered; here only the peer call and the log line. */
  private accountFinished(
    outcome: CallOutcome,
    startedMs: number,
    call: { agentId: string; callId: string; method: string; forwardedBy: string; hop: Hop | undefined },
    span: Span | undefined,
  ): void {
    this.deps.metrics.peerCalls.inc({ code: statusName(outcome.code) });
    const { hop, ...fields } = call;
    const log = { ...fields, caller: hop?.caller, entryPolicies: hop?.policies, ...traceLogFields(span) };
    recordCallFinished(this.deps.logger, undefined, { direction: 'to_agent', ...outcome, startedMs, log });
  }

  /** Waits (bounded) for a session of the agent here and opens the call's stream on it. */
  private async openOnAgent(
    call: PeerCall,
    agentId: string,
    hop: Hop | undefined,
    callId: string,
    deadlineMs: number,
    signal: AbortSignal,
    span: Span | undefined,
  ): Promise<{ session: AgentSession; outbound: http2.ClientHttp2Stream }> {
    const session = await this.deps.registry.acquire(agentId, this.deps.agentWaitMs, deadlineMs, signal);
    const owned: Record<string, string> = { [CALL_ID_KEY]: callId };
    if (hop) owned[CALLER_ID_KEY] = hop.caller;
    if (span) owned[TRACEPARENT_KEY] = traceparentOf(span);
    const contentType = call.headers['content-type'];
    const headers = nextHopHeaders(call.method, `${agentId}.agent`, call.rawHeaders, deadlineMs, owned, contentType);
    return { session, outbound: openStream(session.h2, headers, `agent "${agentId}"`) };
  }

  /**
   * Checks the hop metadata and, when this broker has a caller policy, applies it to the caller
   * the forwarding broker vouches for (an audit record names both). Returns the hop (undefined
   * from a broker too old to send one, accepted only without a caller policy here), or false
   * after refusing the call.
   */
  private checkHop(call: PeerCall, peer: PeerIdentity, agentId: string, forwardedBy: string): Hop | undefined | false {
    const { metrics, logger, authorizer } = this.deps;
    const hop = decodeHop(call.headers, this.deps.trustDomain);
    if (hop && 'problem' in hop) {
      logger.warn('peer call refused: bad hop metadata', { forwardedBy, peer: peer.spiffeId, problem: hop.problem });
      this.refuse(call, Status.INVALID_ARGUMENT, `hop metadata from broker ${forwardedBy}: ${hop.problem}`, true);
      return false;
    }
    if (hop && hop.method !== call.method) {
      // The call's method is its :path; a hop naming another one was admitted for something else.
      const method = call.method.slice(0, 200);
      const details = `the call's method ${method} is not ${hop.method}, the one it was admitted for`;
      this.refuse(call, Status.PERMISSION_DENIED, details, true);
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
