import type * as http2 from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import {
  AGENT_ID_KEY,
  BurrowError,
  CALLER_ID_KEY,
  CALL_ID_KEY,
  CallIds,
  type StreamListener,
  HealthService,
  ID_GRAMMAR,
  deadlineFromTimeout,
  endWithStatus,
  isValidId,
  nextHopHeaders,
  openStream,
  relayCall,
  toBurrowError,
  unaryCall,
  unaryOnStream,
  type CallOutcome,
  type Logger,
  type PeerIdentity,
  recordCallFinished,
  type CallCutter,
  type UnaryCallResult,
  BURROW_ATTRIBUTES,
  SpanKind,
  TRACEPARENT_KEY,
  endRpcSpan,
  endSpan,
  remoteParent,
  startChildSpan,
  startRpcSpan,
  traceLogFields,
  traceparentOf,
  type Span,
  type Tracing,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import { countIfLimited, type CallLimiter } from './call-limiter';
import { ALLOW_ALL_CALLERS, type CallerAuthorizer, type CallerDecision } from './caller-authorizer';
import type { CredentialWatch, WatchedListener } from './credential-watch';
import type { AgentDirectory } from './agent-directory';
import { CALLER_RULE, checkPeer, presentedBy, type PresentedPeer } from './peer-admission';
import type { PeerForwarder } from './peer-forwarder';
import { noBrokerServes } from './peer-protocol';
import { giveUpAtMs, type AgentSession, type TunnelRegistry } from './tunnel-registry';

/** A broker cluster: where agents connected elsewhere are looked up and how calls reach them. */
export interface ClusterRouting {
  directory: AgentDirectory;
  forwarder: PeerForwarder;
  /** While a call waits for its agent, how often the directory is asked again. */
  retryIntervalMs: number;
}

/**
 * Where a call goes: one of the agent's tunnel sessions here, or a stream to the broker that holds
 * the agent's tunnel (already confirmed ready).
 */
type Route =
  | { local: true; session: AgentSession }
  | { local: false; peer: string; stream: http2.ClientHttp2Stream; span: Span | undefined };

/** How {@link CallerApi.callUnary} is called: by which listener, cancelled by what, in which trace. */
export interface UnaryCallOptions {
  /** The client left: the call is cancelled. */
  signal?: AbortSignal;
  /** The listener the call came in on (credential-watch metrics and logs); default `authzen`. */
  listener?: Exclude<WatchedListener, 'api' | 'peer'>;
  /** The client's `traceparent` header, when it sent one. */
  traceparent?: string;
}

/** A call as it arrived on the caller API: the stream, its method and headers. */
interface ApiCall {
  stream: http2.ServerHttp2Stream;
  headers: http2.IncomingHttpHeaders;
  rawHeaders: string[];
  method: string;
  deadlineMs: number;
}

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
  /** Where calls in flight are registered, so that revoking or expiring their certificate ends them. */
  watch: CredentialWatch;
  /** Set when the broker runs in a cluster (--redis-url). */
  cluster?: ClusterRouting;
  /** Largest message either way, read from the length prefixes as calls pass. */
  maxMessageBytes: number;
  /** The broker's own health service, answered on the caller API. */
  health: HealthService;
  /** Spans of calls; `tracing.enabled` false: none, and the caller's traceparent passes as it came. */
  tracing: Tracing;
  /** This broker's id (the spans' `burrow.broker_id`). */
  brokerId: string;
}

/**
 * Names the agent a caller's call is for: the `burrow-agent-id` metadata, or else an authority of
 * the form `<id>.agent` (optionally with a port), so stock clients need only a target change.
 */
export function agentIdOfCall(headers: http2.IncomingHttpHeaders): string | undefined {
  const fromMetadata = headers[AGENT_ID_KEY];
  const first = Array.isArray(fromMetadata) ? fromMetadata[0] : fromMetadata;
  if (typeof first === 'string' && first !== '') return first.split(',')[0]!.trim();
  const host = String(headers[':authority'] ?? '');
  const m = /^([^:]+)\.agent(:\d+)?$/.exec(host);
  return m ? m[1] : undefined;
}

/** What a caller presented: its connection's certificate (read once per connection). */
function presentedOf(stream: http2.ServerHttp2Stream): PresentedPeer {
  const socket = stream.session?.socket as TLSSocket | undefined;
  return socket ? presentedBy(socket) : { identity: undefined };
}

/**
 * The agent a call names, if the name can be one: present, and of the one id grammar (anything
 * else cannot name a connected agent). The refusal is INVALID_ARGUMENT.
 */
function checkAgentName(agentId: string | undefined): { agentId: string } | { refusal: BurrowError } {
  if (agentId === undefined) {
    const why = `name the agent with metadata "${AGENT_ID_KEY}" or the authority "<agent-id>.agent"`;
    return { refusal: new BurrowError(Status.INVALID_ARGUMENT, why) };
  }
  // isValidId narrows to string, which agentId already is: its boolean is what is wanted here.
  const valid: boolean = isValidId(agentId);
  if (!valid) {
    const why = `"${agentId.slice(0, 140)}" is not a valid agent id: ${ID_GRAMMAR}`;
    return { refusal: new BurrowError(Status.INVALID_ARGUMENT, why) };
  }
  return { agentId };
}

/**
 * A call that passed admission: the caller is a valid service, allowed by policy and within its
 * limits. `finish` records the outcome (metrics, log) and releases the limits exactly once.
 */
interface AdmittedCall {
  caller: PeerIdentity;
  agentId: string;
  callId: string;
  method: string;
  /** The caller-policy decision that let the call in (sent to the owning broker in hop metadata). */
  decision: CallerDecision;
  /** The call's SERVER span here, when it is traced; `finish` ends it. */
  span: Span | undefined;
  /** Takes the agent's limit slot (only where the call goes down a tunnel); released by `finish`. */
  holdAgentSlot(): void;
  finish(code: number, details: string, requestBytes?: number, responseBytes?: number): void;
}

/** One call's registration with the credential watch (see {@link CallerApi.liveCall}). */
interface LiveCallState {
  cutter: CallCutter;
  waiting: AbortController | undefined;
  /** Set once the call was cut: the status it ends with, whatever stage it was at. */
  cutBy: BurrowError | undefined;
  untrack(): void;
}

/**
 * The caller API: every method that is not the health service lands here, is routed to the named
 * agent, and travels as one HTTP/2 stream on its tunnel. The AuthZEN HTTP binding enters through
 * {@link CallerApi.callUnary} and passes the same checks: identity, agent name, draining, caller
 * policy, limits.
 */
export class CallerApi {
  private readonly callIds = new CallIds('c');

  constructor(private readonly deps: CallerApiDeps) {}

  /** The caller API server's 'stream' handler. */
  readonly handle: StreamListener = (stream, headers, _flags, rawHeaders) => {
    stream.on('error', () => {});
    const method = String(headers[':path'] ?? '');
    const deadlineMs = deadlineFromTimeout(headers['grpc-timeout'], Date.now()) ?? Number.POSITIVE_INFINITY;
    // The broker's own health, unless the call names an agent: then it is the agent's (a ping
    // through the tunnel, answered by the agent itself).
    if (HealthService.handles(method) && agentIdOfCall(headers) === undefined) {
      this.deps.health.answer(stream, method, deadlineMs);
      return;
    }
    void this.forward({ stream, headers, rawHeaders, method, deadlineMs });
  };

  /**
   * Checks everything that does not need the agent, in the order that reveals least to a caller
   * that fails: identity first, so an unknown client learns nothing about agents or policy.
   * Throws a BurrowError after recording the refusal.
   */
  private admit(
    presented: PresentedPeer,
    agentId: string | undefined,
    method: string,
    transport: 'grpc' | 'http',
    span?: Span,
  ): AdmittedCall {
    const { limiter, metrics } = this.deps;
    const { callId, slots, finish } = this.accounting(presented, method, transport, span);
    const refuse = (id: string | undefined, err: BurrowError): never => {
      finish(id, err.code, err.message);
      throw err;
    };

    const checked = checkPeer(presented, CALLER_RULE, this.deps);
    if ('refusal' in checked) return refuse(undefined, checked.refusal);
    const caller = checked.identity;
    const named = checkAgentName(agentId);
    if ('refusal' in named) return refuse(undefined, named.refusal);
    const agent = named.agentId;
    if (this.deps.isDraining())
      refuse(agent, new BurrowError(Status.UNAVAILABLE, 'broker is draining; retry on another broker'));
    const authorized = this.authorize(caller, agent, method);
    if ('refusal' in authorized) return refuse(agent, authorized.refusal);
    // Per-caller limits here, where the call enters; the agent's where its tunnel is
    // (holdAgentSlot, and the peer listener for a forwarded call): README, "Which broker decides what".
    try {
      slots.caller = limiter.admitCaller(caller.spiffeId);
    } catch (err) {
      countIfLimited(err, metrics);
      refuse(agent, err as BurrowError);
    }
    const holdAgentSlot = (): void => {
      if (slots.agent) return;
      try {
        slots.agent = limiter.admitAgent(agent);
      } catch (err) {
        countIfLimited(err, metrics);
        throw err;
      }
    };
    return {
      caller,
      agentId: agent,
      callId,
      method,
      decision: authorized.decision,
      span,
      holdAgentSlot,
      finish: (code, details, req, res) => finish(agent, code, details, req, res),
    };
  }

  /**
   * A new call's id, the limit slots it will hold, and its `finish`: releases those slots and
   * records the call (metrics, the log line), the first time only.
   */
  private accounting(presented: PresentedPeer, method: string, transport: 'grpc' | 'http', span?: Span) {
    const { metrics } = this.deps;
    const startedMs = Date.now();
    const callId = this.callIds.next();
    // The limit slots taken so far, released by `finish`.
    const slots: { caller?: () => void; agent?: () => void } = {};
    let finished = false;
    const finish = (id: string | undefined, code: number, details: string, requestBytes = 0, responseBytes = 0) => {
      if (finished) return;
      finished = true;
      slots.caller?.();
      slots.agent?.();
      if (span) {
        if (id) span.setAttribute(BURROW_ATTRIBUTES.agentId, id);
        span.setAttribute(BURROW_ATTRIBUTES.callId, callId);
        endRpcSpan(span, code, details);
      }
      // A call refused at admission carried no message: it adds no byte series.
      recordCallFinished(this.deps.logger, metrics, {
        direction: 'to_agent',
        code,
        details,
        startedMs,
        requestBytes: requestBytes || undefined,
        responseBytes: responseBytes || undefined,
        callLabels: { method: metrics.methodLabel(method) },
        log: { agentId: id, callId, method, caller: presented.identity?.spiffeId, transport, ...traceLogFields(span) },
      });
    };
    return { callId, slots, finish };
  }

  /** The caller policy's decision on the call, counted, and logged with the refusal when it denies. */
  private authorize(
    caller: PeerIdentity,
    agentId: string,
    method: string,
  ): { decision: CallerDecision } | { refusal: BurrowError } {
    const decision = this.deps.authorizer.authorize(caller, agentId, method);
    this.deps.metrics.authzDecisions.inc({ decision: decision.allowed ? 'allow' : 'deny' });
    if (decision.allowed) return { decision };
    this.deps.logger.warn('caller denied by policy', {
      caller: caller.spiffeId,
      agentId,
      method,
      reason: decision.reason,
      policies: decision.policies,
    });
    const why = `${caller.spiffeId} may not call ${method} on agent "${agentId}": ${decision.reason}`;
    return { refusal: new BurrowError(Status.PERMISSION_DENIED, why) };
  }

  private async forward(call: ApiCall): Promise<void> {
    const { stream } = call;
    const { headers } = call;
    const span = this.deps.tracing.enabled
      ? this.serverSpan(call.method, headers[TRACEPARENT_KEY], headers.tracestate)
      : undefined;
    // Admission is a span of its own where it decides something worth timing: a caller policy.
    const admission =
      span && this.deps.authorizer !== ALLOW_ALL_CALLERS && startChildSpan(this.deps.tracing, 'burrow.admission', span);
    let admitted: AdmittedCall;
    try {
      admitted = this.admit(presentedOf(stream), agentIdOfCall(call.headers), call.method, 'grpc', span);
    } catch (err) {
      const e = err as BurrowError;
      if (admission) endRpcSpan(admission, e.code, e.message);
      endWithStatus(stream, e.code, e.message);
      return;
    }
    if (admission) endSpan(admission);
    const { metrics } = this.deps;
    const { agentId, caller } = admitted;
    metrics.toAgentCallStarted();
    const live = this.liveCall(caller, 'api');
    const route = await this.routeOf(call, admitted, live);
    if (!route) return;
    let outcome: CallOutcome;
    // The hop's CLIENT span: to the agent here, or the peer forward's (begun when it was opened).
    let hopSpan = route.local ? undefined : route.span;
    try {
      if (route.local && admitted.span) hopSpan = this.agentSpan(admitted.span, admitted);
      const outbound = route.local ? this.openOnAgent(route.session, call, admitted, hopSpan) : route.stream;
      const peerName = route.local ? `agent "${agentId}"` : `broker ${route.peer} (for agent "${agentId}")`;
      if (route.local) route.session.callStarted(live.cutter);
      const relayed = relayCall(stream, outbound, {
        peerName,
        maxMessageBytes: this.deps.maxMessageBytes,
        deadlineMs: call.deadlineMs,
        cutter: live.cutter,
      });
      if (live.cutBy) live.cutter.cut?.(live.cutBy);
      outcome = await relayed;
      if (route.local) route.session.callEnded(live.cutter);
    } catch (err) {
      const e = toBurrowError(err);
      if (hopSpan) endRpcSpan(hopSpan, e.code, e.message);
      this.endRefused(call, admitted, live, e);
      return;
    }
    if (hopSpan) endRpcSpan(hopSpan, outcome.code, outcome.details, outcome.settledAt);
    live.untrack();
    metrics.toAgentCallEnded();
    admitted.finish(outcome.code, outcome.details, outcome.requestBytes, outcome.responseBytes);
  }

  /**
   * Where an admitted call goes, or undefined after ending it (the agent's limit, no route in time,
   * the caller gone). The common case, a session of the agent here, has nothing to wait for and so
   * nothing to cancel: no AbortController (an EventTarget, ~1.5% of the broker's CPU per call).
   */
  private async routeOf(call: ApiCall, admitted: AdmittedCall, live: LiveCallState): Promise<Route | undefined> {
    let here: Route | undefined;
    try {
      here = this.sessionHere(admitted);
    } catch (err) {
      this.endRefused(call, admitted, live, err as BurrowError);
      return undefined;
    }
    if (here) return here;
    const abort = new AbortController();
    live.waiting = abort;
    const onClose = (): void => abort.abort();
    call.stream.once('close', onClose);
    try {
      return await this.route(admitted, call, abort.signal);
    } catch (err) {
      this.endRefused(call, admitted, live, live.cutBy ?? (err as BurrowError));
      return undefined;
    } finally {
      call.stream.off('close', onClose);
      live.waiting = undefined;
    }
  }

  /** The SERVER span of a call on the caller API, continuing the caller's traceparent. */
  private serverSpan(method: string, traceparent: unknown, tracestate?: unknown): Span {
    const parent = remoteParent(traceparent, tracestate);
    // burrow.broker_id is on the resource of every broker span: not repeated per span.
    return startRpcSpan(this.deps.tracing, SpanKind.SERVER, method, parent);
  }

  /** The CLIENT span of a call's hop down an agent's tunnel (or to the broker holding it). */
  private agentSpan(parent: Span, admitted: AdmittedCall, peer?: string): Span {
    const span = startRpcSpan(this.deps.tracing, SpanKind.CLIENT, admitted.method, parent, {
      [BURROW_ATTRIBUTES.agentId]: admitted.agentId,
      [BURROW_ATTRIBUTES.callId]: admitted.callId,
    });
    if (peer) span.setAttribute('server.address', peer);
    return span;
  }

  /**
   * The call's stream on the agent's session: the caller's metadata after the crossing rules, plus
   * who calls and, when traced, `traceparent` naming the hop's span.
   */
  private openOnAgent(
    session: AgentSession,
    call: ApiCall,
    admitted: AdmittedCall,
    span: Span | undefined,
  ): http2.ClientHttp2Stream {
    const owned: Record<string, string> = { [CALLER_ID_KEY]: admitted.caller.spiffeId, [CALL_ID_KEY]: admitted.callId };
    if (span) owned[TRACEPARENT_KEY] = traceparentOf(span);
    const headers = nextHopHeaders(
      call.method,
      `${admitted.agentId}.agent`,
      call.rawHeaders,
      call.deadlineMs,
      owned,
      call.headers['content-type'],
    );
    return openStream(session.h2, headers, `agent "${admitted.agentId}"`);
  }

  /** A call that ends before it was carried: its status to the caller, its accounting. */
  private endRefused(call: ApiCall, admitted: AdmittedCall, live: LiveCallState, error: BurrowError): void {
    live.untrack();
    this.deps.metrics.toAgentCallEnded();
    endWithStatus(call.stream, error.code, error.message);
    admitted.finish(error.code, error.message);
  }

  /**
   * Registers a call of `caller` with the credential watch: a cut while the call waits for its
   * agent aborts `waiting`; once the call is carried, `cutter` ends it. `cutBy` says why.
   */
  private liveCall(caller: PeerIdentity, listener: WatchedListener): LiveCallState {
    const state: LiveCallState = { cutter: {}, waiting: undefined, cutBy: undefined, untrack: () => {} };
    state.untrack = this.deps.watch.track({
      identity: caller,
      listener,
      cut: (error) => {
        state.cutBy ??= error;
        if (state.cutter.cut) state.cutter.cut(error);
        else state.waiting?.abort();
      },
    });
    return state;
  }

  /**
   * Finds the way to `agentId`: its tunnel here if it has one; else, in a cluster, the broker the
   * directory names that confirms it can serve; else waits (up to the agent wait, capped by the
   * deadline) for the agent to turn up here or anywhere. Rejects like {@link TunnelRegistry.acquire}.
   */
  private async route(
    admitted: AdmittedCall,
    call: Pick<ApiCall, 'method' | 'rawHeaders' | 'headers' | 'deadlineMs'>,
    signal: AbortSignal,
  ): Promise<Route> {
    const { registry, cluster, agentWaitMs } = this.deps;
    const { agentId } = admitted;
    const { deadlineMs } = call;
    const local = async (waitMs: number): Promise<Route> => {
      admitted.holdAgentSlot();
      const session = await this.spanWait(admitted, () => registry.acquire(agentId, waitMs, deadlineMs, signal));
      return { local: true, session };
    };
    if (!cluster || registry.canServe(agentId)) return local(agentWaitMs);
    const startedMs = Date.now();
    // Ends before the caller's deadline (see giveUpAtMs) so the caller hears which agent is missing.
    const waitUntilMs = giveUpAtMs(startedMs, agentWaitMs, deadlineMs);
    const attempts: string[] = [];
    const hop = { caller: admitted.caller.spiffeId, method: admitted.method, policies: admitted.decision.policies };
    for (;;) {
      // Every owner that answered was at its limit for the agent: that is the answer, not a wait.
      let exhausted: BurrowError | undefined;
      let owners: string[] = [];
      try {
        owners = await cluster.directory.lookup(agentId);
      } catch (err) {
        attempts.push((err as Error).message);
      }
      for (const peer of cluster.forwarder.rank(owners)) {
        if (signal.aborted) break;
        const span = admitted.span && this.agentSpan(admitted.span, admitted, peer);
        const forwarded = {
          method: call.method,
          rawHeaders: call.rawHeaders,
          contentType: call.headers['content-type'],
          deadlineMs,
          traceparent: span && traceparentOf(span),
        };
        const attempt = await cluster.forwarder.open(peer, agentId, forwarded, signal, hop);
        if (attempt.ready) return { local: false, peer, stream: attempt.stream, span };
        if (span) endRpcSpan(span, attempt.refusal?.code ?? Status.UNAVAILABLE, attempt.reason);
        // The owner decided against the call (its caller policy, malformed hop metadata): final.
        if (attempt.refusal && attempt.refusal.code !== Status.RESOURCE_EXHAUSTED) throw attempt.refusal;
        if (attempt.refusal) exhausted = attempt.refusal;
        else cluster.directory.forgetOwner(agentId, peer);
        attempts.push(attempt.reason);
      }
      if (exhausted) throw exhausted;
      if (signal.aborted) throw new BurrowError(Status.CANCELLED, 'cancelled while waiting for the agent');
      if (registry.canServe(agentId)) return local(Math.max(0, waitUntilMs - Date.now()));
      const leftMs = waitUntilMs - Date.now();
      if (leftMs <= 0) throw noBrokerServes(agentId, Date.now() - startedMs, [...new Set(attempts)].slice(-3));
      await this.spanWait(admitted, () =>
        registry.whenConnected(agentId, Math.min(leftMs, cluster.retryIntervalMs), signal),
      );
    }
  }

  /** `wait`, inside an INTERNAL span "burrow.wait_for_agent" when the call is traced. */
  private async spanWait<T>(admitted: AdmittedCall, wait: () => Promise<T>): Promise<T> {
    if (!admitted.span) return wait();
    const span = startChildSpan(this.deps.tracing, 'burrow.wait_for_agent', admitted.span, SpanKind.INTERNAL, {
      [BURROW_ATTRIBUTES.agentId]: admitted.agentId,
    });
    try {
      const result = await wait();
      endSpan(span);
      return result;
    } catch (err) {
      const e = toBurrowError(err);
      endRpcSpan(span, e.code, e.message);
      throw err;
    }
  }

  /**
   * A session of the agent on this broker, its limit slot taken: the common case, with no wait and
   * no promise chain to build. Undefined when none is up here ({@link route} then waits or
   * forwards); throws RESOURCE_EXHAUSTED when the agent's limit is reached.
   */
  private sessionHere(admitted: AdmittedCall): Route | undefined {
    const session = this.deps.registry.pick(admitted.agentId);
    if (!session) return undefined;
    admitted.holdAgentSlot();
    return { local: true, session };
  }

  /**
   * One unary call made on behalf of `peer` (the AuthZEN HTTP binding, the gateway listeners):
   * admitted like a gRPC call, then carried down the agent's tunnel. `listener` names the entry in
   * the credential watch's metrics and logs; `traceparent` the client's W3C trace context, continued
   * like a gRPC caller's. Resolves with the status; never rejects.
   */
  async callUnary(
    peer: PeerIdentity | undefined,
    agentId: string,
    method: string,
    message: Buffer,
    deadlineMs: number,
    opts: UnaryCallOptions = {},
  ): Promise<UnaryCallResult> {
    const { signal, listener = 'authzen', traceparent } = opts;
    const span = this.deps.tracing.enabled ? this.serverSpan(method, traceparent) : undefined;
    let admitted: AdmittedCall;
    try {
      const transport = listener === 'ext_authz' ? 'grpc' : 'http';
      admitted = this.admit({ identity: peer }, agentId, method, transport, span);
    } catch (err) {
      const e = err as BurrowError;
      return { code: e.code, details: e.message, trailers: {}, requestBytes: 0, responseBytes: 0 };
    }
    const { metrics } = this.deps;
    metrics.toAgentCallStarted();
    const live = this.liveCall(admitted.caller, listener);
    const waiting = new AbortController();
    live.waiting = waiting;
    const onGone = (): void => waiting.abort();
    signal?.addEventListener('abort', onGone, { once: true });
    const ended = (result: UnaryCallResult): UnaryCallResult => {
      live.untrack();
      signal?.removeEventListener('abort', onGone);
      metrics.toAgentCallEnded();
      admitted.finish(result.code, result.details, result.requestBytes, result.responseBytes);
      return result;
    };
    let route: Route;
    try {
      route =
        this.sessionHere(admitted) ??
        (await this.route(admitted, { method, rawHeaders: [], headers: {}, deadlineMs }, waiting.signal));
    } catch (err) {
      const e = live.cutBy ?? (err as BurrowError);
      return ended({ code: e.code, details: e.message, trailers: {}, requestBytes: 0, responseBytes: 0 });
    }
    live.waiting = undefined;
    live.cutter.cut = (error) => {
      live.cutBy ??= error;
      waiting.abort();
    };
    if (live.cutBy) waiting.abort();
    let result = await this.carryUnary(route, admitted, live, message, { deadlineMs, signal: waiting.signal });
    if (live.cutBy) result = { ...result, code: live.cutBy.code, details: live.cutBy.message };
    return ended(result);
  }

  /** {@link callUnary}'s call down the route, inside its hop's CLIENT span when traced. */
  private async carryUnary(
    route: Route,
    admitted: AdmittedCall,
    live: LiveCallState,
    message: Buffer,
    call: { deadlineMs: number; signal: AbortSignal },
  ): Promise<UnaryCallResult> {
    const { agentId, method } = admitted;
    const opts = { ...call, peerName: `agent "${agentId}"`, maxMessageBytes: this.deps.maxMessageBytes };
    let result: UnaryCallResult;
    let span = route.local ? undefined : route.span;
    if (route.local) {
      route.session.callStarted(live.cutter);
      if (admitted.span) span = this.agentSpan(admitted.span, admitted);
      const headers: Record<string, string> = {
        [CALLER_ID_KEY]: admitted.caller.spiffeId,
        [CALL_ID_KEY]: admitted.callId,
      };
      if (span) headers[TRACEPARENT_KEY] = traceparentOf(span);
      result = await unaryCall(route.session.h2, method, message, { ...opts, authority: `${agentId}.agent`, headers });
      route.session.callEnded(live.cutter);
    } else {
      result = await unaryOnStream(route.stream, message, opts);
    }
    if (span) endRpcSpan(span, result.code, result.details);
    return result;
  }
}
