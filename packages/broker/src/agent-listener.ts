import { Metadata, status as Status, type Server, type ServerDuplexStream } from '@grpc/grpc-js';
import {
  AGENT_DRAIN_VERSION,
  BurrowError,
  CALLING_AGENT_KEY,
  CallStream,
  PROTOCOL_VERSIONS,
  REPLICA_SET_VERSION,
  REUSABLE_OFFERS_VERSION,
  ProtocolError,
  SESSION_ID_KEY,
  TUNNEL_METHODS,
  type UpstreamTable,
  answer,
  decodeSessionFrame,
  describeVersions,
  encodeSessionFrame,
  rawBidiMethod,
  identityOfPeerCertificate,
  negotiateVersion,
  verifyCertificateChain,
  checkReplicaSet,
  type BrokerEndpoint,
  type CallFrame,
  type Logger,
  type PeerIdentity,
  type StartFrame,
  recordCallFinished,
  answerUnimplemented,
  type CallOutcome,
  boundedForLog,
  MAX_SESSION_FRAME_BYTES,
  sessionFrameTooLarge,
  type OversizedMessage,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import { AGENT_RULE, checkPeer, presentedPeer } from './peer-admission';
import { AgentSession, type TunnelRegistry } from './tunnel-registry';

/** How long a new session may take to send Hello before the broker gives up on it. */
const HELLO_TIMEOUT_MS = 10_000;

/**
 * Receive limits of the agent listener's methods below the server-wide one (receiveLimitInterceptor):
 * the session stream carries control frames only (tunnel.proto, "Session").
 */
export const AGENT_LISTENER_RECEIVE_LIMITS: Readonly<Record<string, number>> = {
  [TUNNEL_METHODS.session]: MAX_SESSION_FRAME_BYTES,
};

export interface AgentListenerDeps {
  registry: TunnelRegistry;
  metrics: BrokerMetrics;
  logger: Logger;
  platformUpstreams: UpstreamTable;
  trustDomain: string;
  brokerId: string;
  maxMessageBytes: number;
  /**
   * Most session streams one agent (certificate identity) may hold open here at once, counting
   * those still waiting for Hello; 0 = no cap. A session past it is refused with RESOURCE_EXHAUSTED.
   */
  maxSessionsPerAgent: number;
  /**
   * Most Offer streams (idle or carrying a call) one agent may hold open here at once, over all its
   * sessions; 0 = no cap. An offer past it is refused with RESOURCE_EXHAUSTED; its session lives on.
   */
  maxOffersPerAgent: number;
  /** True once the broker is draining: new sessions are refused. */
  isDraining(): boolean;
  /** Revocation check for every stream; without a PKI directory nothing is revoked. */
  isRevoked(id: PeerIdentity): boolean;
  /** The CAs agents' renewed certificates must chain to (Credentials frames). */
  trustBundlePem(): string;
  /**
   * The broker replica set agents should keep tunnels to (this broker included), sent in a
   * Brokers frame right after Welcome on every version-3 session when it is not empty. Without it
   * a new session gets the set last given to {@link AgentListener.broadcastReplicaSet}, if any.
   */
  replicaSet?(): BrokerEndpoint[];
}

type RawCall = ServerDuplexStream<Buffer, Buffer>;

// While an offer is idle only its end matters (its ownerHooks.onClosed); once assigned, the
// originator attaches its own handlers. Shared by every idle offer: a broker holds thousands.
const IDLE_OFFER_HANDLERS = Object.freeze({
  onFrame: () => {},
  onDrain: () => {},
  onClosed: () => {},
  onProtocolError: () => {},
});

/**
 * The broker's Tunnel service (tunnel.proto): Session, Offer and Forward streams opened by agents.
 * Every stream must come with a client certificate of role agent in the broker's trust domain;
 * the agent id is taken from that certificate and nothing else.
 */
export class AgentListener {
  private readonly sessionsById = new Map<string, AgentSession>();
  private readonly sessionCalls = new Map<AgentSession, RawCall>();
  private callCounter = 0;
  /** The set last broadcast; what new sessions get when `deps.replicaSet` is not given. */
  private lastReplicaSet: BrokerEndpoint[] = [];
  /** Session streams per agent id that have not sent Hello yet (the registry holds the others). */
  private readonly pendingSessions = new Map<string, number>();
  /** Offer streams open per agent id, idle or carrying a call; an id is removed at 0. */
  private readonly offerStreams = new Map<string, number>();
  /**
   * Agents refused for a per-agent cap whose refusal was logged: one line per agent and limit
   * until a stream of that kind is accepted again, so a flood of refused streams is one log line.
   */
  private readonly refusalsLogged = new Set<string>();

  constructor(private readonly deps: AgentListenerDeps) {}

  addTo(server: Server): void {
    server.addService(
      {
        session: rawBidiMethod(TUNNEL_METHODS.session),
        offer: rawBidiMethod(TUNNEL_METHODS.offer),
        forward: rawBidiMethod(TUNNEL_METHODS.forward),
      },
      {
        session: (call: RawCall) => this.onSession(call),
        offer: (call: RawCall) => this.onOffer(call),
        forward: (call: RawCall) => this.onForward(call),
      },
    );
  }

  /** Number of sessions known (leak checks). */
  get sessionCount(): number {
    return this.sessionsById.size;
  }

  /** Sends Drain to every session and retires their idle offers. */
  drainAll(reason: string): void {
    for (const session of this.sessionsById.values()) {
      session.draining = true;
      session.control.drain(reason);
      for (const offer of session.idle.splice(0)) offer.stream.finish();
    }
  }

  /**
   * Cuts off every session of `agentId` now (revocation): session streams end with `error` and
   * calls in flight on them fail. Returns the number of sessions closed.
   */
  disconnectAgent(agentId: string, error: BurrowError): number {
    const sessions = this.deps.registry.sessionsOf(agentId);
    for (const s of sessions) this.closeSession(s, error, true);
    return sessions.length;
  }

  /** Closes sessions whose agent certificate has expired; TLS does not re-check open connections. */
  closeExpired(nowMs = Date.now()): number {
    return this.cutSessions('expired', (s) => {
      if (s.credentialExpiryMs > nowMs) return undefined;
      const at = new Date(s.credentialExpiryMs).toISOString();
      return new BurrowError(Status.UNAUTHENTICATED, `certificate of agent "${s.agentId}" expired at ${at}`);
    });
  }

  /** Closes sessions whose certificate is revoked now (called when the revocation list changes). */
  closeRevoked(): number {
    return this.cutSessions('revoked', (s) => {
      if (!this.deps.isRevoked(s.identity)) return undefined;
      return new BurrowError(Status.PERMISSION_DENIED, `certificate of agent "${s.agentId}" was revoked`);
    });
  }

  /**
   * Closes every session for which `verdict` gives an error, with that error (calls in flight on
   * it fail), counting each in connections_closed_total under `reason`. Returns how many.
   */
  private cutSessions(reason: 'expired' | 'revoked', verdict: (s: AgentSession) => BurrowError | undefined): number {
    let closed = 0;
    for (const s of [...this.sessionsById.values()]) {
      const error = verdict(s);
      if (!error) continue;
      this.closeSession(s, error, true);
      this.deps.metrics.connectionsClosed.inc({ reason });
      closed++;
    }
    return closed;
  }

  /**
   * The agent is leaving this session (its Drain, protocol version 3): no more calls go to it,
   * and its idle offers end, which is what lets the agent close the connection. Calls already on
   * their way to it are answered as usual.
   */
  private agentLeaving(session: AgentSession, reason: string): void {
    if (session.draining) return;
    session.draining = true;
    for (const offer of session.idle.splice(0)) offer.stream.finish();
    this.deps.logger.info('agent is leaving', {
      agentId: session.agentId,
      sessionId: session.id,
      reason,
      callsInFlight: session.activeCalls,
    });
  }

  /** Sends the new trust bundle to every session (CA rotation). */
  broadcastTrustBundle(pem: string, version: number): void {
    for (const s of this.sessionsById.values()) s.control.trustBundle(pem, version);
  }

  /**
   * Sends the broker replica set to every session of protocol version 3 or later (older sessions
   * cannot receive it; tunnel.proto, "Brokers"), replacing what those agents had. Call it whenever
   * a replica joins, drains or leaves; an empty set is sent too. Synchronous; throws a
   * ProtocolError naming the problem, before sending anything, when the set breaks the frame's
   * rules (more than 64 entries, an empty or repeated broker id, an address that is not HOST:PORT).
   */
  broadcastReplicaSet(set: BrokerEndpoint[]): void {
    checkReplicaSet(set);
    this.lastReplicaSet = set.map((b) => ({ ...b }));
    for (const s of this.sessionsById.values()) s.control.replicaSet(this.lastReplicaSet);
  }

  /** Earliest certificate expiry among connected agents (ms since epoch), for metrics. */
  earliestAgentExpiryMs(): number | undefined {
    let min: number | undefined;
    for (const s of this.sessionsById.values())
      if (min === undefined || s.credentialExpiryMs < min) min = s.credentialExpiryMs;
    return min;
  }

  /**
   * A renewed certificate presented on the session: if it chains to our trust bundle and names the
   * same agent, the session lives on until the new certificate expires. Anything else breaks the
   * protocol (see the Credentials frame in tunnel.proto).
   */
  private acceptCredentials(session: AgentSession, chainPem: string): void {
    let id: PeerIdentity;
    try {
      id = verifyCertificateChain(chainPem, this.deps.trustBundlePem());
    } catch (err) {
      this.protocolError(session, new ProtocolError(`renewed certificate refused: ${(err as Error).message}`));
      return;
    }
    if (id.role !== 'agent' || id.name !== session.agentId || id.trustDomain !== session.identity.trustDomain) {
      this.protocolError(
        session,
        new ProtocolError(`renewed certificate names ${id.spiffeId}, not the session's ${session.identity.spiffeId}`),
      );
      return;
    }
    if (this.deps.isRevoked(id)) {
      this.closeSession(
        session,
        new BurrowError(Status.PERMISSION_DENIED, `certificate of agent "${id.name}" is revoked`),
        true,
      );
      return;
    }
    session.identity = id;
    session.credentialExpiryMs = Math.max(session.credentialExpiryMs, id.notAfterMs);
    this.deps.logger.debug('agent presented a renewed certificate', {
      agentId: id.name,
      sessionId: session.id,
      serial: id.serialHex,
      notAfter: new Date(id.notAfterMs).toISOString(),
    });
  }

  /** Ends every session stream (final shutdown). */
  closeAll(error: BurrowError): void {
    for (const s of [...this.sessionsById.values()]) this.closeSession(s, error, true);
  }

  private authenticate(call: RawCall, stream: string): PeerIdentity | undefined {
    const checked = checkPeer(presentedPeer(call.getAuthContext().sslPeerCertificate), AGENT_RULE, this.deps);
    if ('identity' in checked) return checked.identity;
    const { code, message } = checked.refusal;
    this.deps.logger.warn('tunnel stream refused', { stream, peer: call.getPeer(), reason: message });
    call.emit('error', { code, details: message });
    return undefined;
  }

  private onSession(call: RawCall): void {
    const id = this.authenticate(call, 'session');
    if (!id) return;
    const { logger, metrics, registry } = this.deps;
    if (this.deps.isDraining()) {
      call.emit('error', { code: Status.UNAVAILABLE, details: 'broker is draining; connect to another broker' });
      return;
    }
    const cap = this.deps.maxSessionsPerAgent;
    const held = registry.sessionsOf(id.name).length + (this.pendingSessions.get(id.name) ?? 0);
    if (cap > 0 && held >= cap) {
      const details = `agent "${id.name}" holds ${held} sessions at this broker; at most ${cap} allowed`;
      this.refuseOverLimit(call, id, 'sessions', `${details} (--max-sessions-per-agent)`);
      return;
    }
    this.refusalsLogged.delete(`sessions:${id.name}`);
    this.pendingSessions.set(id.name, (this.pendingSessions.get(id.name) ?? 0) + 1);
    let pending = true;
    // Called once the stream has sent Hello or ended, whichever comes first.
    const settle = (): void => {
      if (!pending) return;
      pending = false;
      const n = (this.pendingSessions.get(id.name) ?? 1) - 1;
      if (n > 0) this.pendingSessions.set(id.name, n);
      else this.pendingSessions.delete(id.name);
    };
    let session: AgentSession | undefined;
    const helloTimer = setTimeout(
      () => fail(new ProtocolError(`no hello within ${HELLO_TIMEOUT_MS} ms`)),
      HELLO_TIMEOUT_MS,
    );
    const fail = (err: BurrowError): void => {
      clearTimeout(helloTimer);
      settle();
      if (err instanceof ProtocolError) metrics.protocolErrors.inc();
      logger.warn('tunnel session failed', { agentId: id.name, peer: call.getPeer(), error: err.message });
      if (session) this.closeSession(session, err, true);
      else call.emit('error', err.toServiceError());
    };
    call.on('error', () => {});
    call.on('data', (bytes: Buffer) => {
      let frame: ReturnType<typeof decodeSessionFrame>;
      try {
        frame = decodeSessionFrame(bytes);
      } catch (err) {
        fail(err as BurrowError);
        return;
      }
      if (session && frame.kind === 'credentials') {
        this.acceptCredentials(session, frame.certificateChainPem);
        return;
      }
      if (session && frame.kind === 'drain' && session.protocolVersion >= AGENT_DRAIN_VERSION) {
        this.agentLeaving(session, frame.reason);
        return;
      }
      if (session || frame.kind !== 'hello') {
        fail(
          new ProtocolError(
            session
              ? `${frame.kind} frame after hello on a session stream`
              : `session opened with ${frame.kind}, not hello`,
          ),
        );
        return;
      }
      clearTimeout(helloTimer);
      settle();
      const version = negotiateVersion(PROTOCOL_VERSIONS, frame.hello.protocolVersions);
      if (version === undefined) {
        const details =
          `no common protocol version: agent speaks ${describeVersions(frame.hello.protocolVersions)}, broker ` +
          `speaks ${describeVersions(PROTOCOL_VERSIONS)}`;
        metrics.rejectedHandshakes.inc({ listener: 'agent', reason: 'protocol_version' });
        logger.warn('tunnel session refused', { agentId: id.name, reason: details });
        call.emit('error', { code: Status.FAILED_PRECONDITION, details });
        return;
      }
      session = new AgentSession(
        id,
        call.getPeer(),
        version,
        frame.hello.agentVersion,
        Math.min(frame.hello.minIdleOffers, 1000),
        {
          demand: (offers) => {
            metrics.demandedOffers.inc(offers);
            call.write(encodeSessionFrame({ kind: 'demand', offers }));
          },
          drain: (reason) => call.write(encodeSessionFrame({ kind: 'drain', reason })),
          trustBundle: (pem, version) => call.write(encodeSessionFrame({ kind: 'trustBundle', pem, version })),
          replicaSet: (brokers) => {
            if (version >= REPLICA_SET_VERSION) call.write(encodeSessionFrame({ kind: 'brokers', brokers }));
          },
          close: (err) => (err ? call.emit('error', err.toServiceError()) : call.end()),
        },
      );
      this.sessionsById.set(session.id, session);
      this.sessionCalls.set(session, call);
      call.write(
        encodeSessionFrame({
          kind: 'welcome',
          welcome: {
            protocolVersion: version,
            sessionId: session.id,
            maxMessageBytes: this.deps.maxMessageBytes,
            brokerId: this.deps.brokerId,
          },
        }),
      );
      const replicas = this.deps.replicaSet ? this.deps.replicaSet() : this.lastReplicaSet;
      if (replicas.length > 0) session.control.replicaSet(replicas);
      registry.addSession(session);
      metrics.agentConnects.inc();
      logger.info('agent connected', {
        agentId: id.name,
        sessionId: session.id,
        peer: session.peerAddress,
        protocolVersion: version,
        agentVersion: session.agentVersion,
      });
    });
    const ended = (): void => {
      clearTimeout(helloTimer);
      settle();
      if (session) this.closeSession(session, undefined, false);
    };
    call.on('end', ended);
    call.on('cancelled', ended);
  }

  /**
   * Forgets `session`. `endStream` ends the session stream with `error` (broker-initiated); calls
   * in flight are aborted only when the session is cut off with an error.
   */
  private closeSession(session: AgentSession, error: BurrowError | undefined, endStream: boolean): void {
    if (!this.sessionsById.delete(session.id)) return;
    const call = this.sessionCalls.get(session);
    this.sessionCalls.delete(session);
    this.deps.registry.removeSession(session);
    if (error) for (const stream of [...session.active]) stream.abort(error);
    if (endStream && call && !call.cancelled) session.control.close(error);
    else if (call && !call.writableEnded && !call.cancelled) call.end();
    this.deps.logger.info('agent disconnected', {
      agentId: session.agentId,
      sessionId: session.id,
      reason: error?.message ?? 'session ended',
    });
  }

  private sessionOf(call: RawCall, id: PeerIdentity, stream: string): AgentSession | undefined {
    const sessionId = call.metadata.get(SESSION_ID_KEY)[0];
    const session = typeof sessionId === 'string' ? this.sessionsById.get(sessionId) : undefined;
    if (!session) {
      // Usually a race with a session that just ended; the agent reconnects and opens new ones.
      const details = `unknown tunnel session "${boundedForLog(String(sessionId ?? ''))}"`;
      call.emit('error', { code: Status.FAILED_PRECONDITION, details });
      return undefined;
    }
    if (session.agentId !== id.name) {
      this.deps.metrics.protocolErrors.inc();
      this.deps.logger.warn("tunnel stream for another agent's session refused", {
        stream,
        agentId: id.name,
        sessionAgentId: session.agentId,
      });
      call.emit('error', { code: Status.PERMISSION_DENIED, details: 'tunnel session belongs to another agent' });
      return undefined;
    }
    return session;
  }

  private onOffer(call: RawCall): void {
    const id = this.authenticate(call, 'offer');
    if (!id) return;
    const session = this.sessionOf(call, id, 'offer');
    if (!session) return;
    const cap = this.deps.maxOffersPerAgent;
    const held = this.offerStreams.get(id.name) ?? 0;
    if (cap > 0 && held >= cap) {
      // An offer it was asked for and that is refused will not come: do not wait for it.
      if (session.owedOffers > 0) session.owedOffers--;
      const details = `agent "${id.name}" holds ${held} tunnel streams (offers) at this broker; at most ${cap} allowed`;
      this.refuseOverLimit(call, id, 'offers', `${details} (--max-offers-per-agent)`);
      return;
    }
    this.refusalsLogged.delete(`offers:${id.name}`);
    this.offerStreams.set(id.name, held + 1);
    const reusable = session.protocolVersion >= REUSABLE_OFFERS_VERSION;
    const stream = new CallStream(call, 'server', 'originator', (err) => this.protocolError(session, err), reusable);
    stream.attach(IDLE_OFFER_HANDLERS);
    stream.ownerHooks = {
      onCallEnded: () => {
        stream.attach(IDLE_OFFER_HANDLERS);
        this.deps.registry.releaseOffer(session, stream);
      },
      onClosed: () => {
        const n = (this.offerStreams.get(id.name) ?? 1) - 1;
        if (n > 0) this.offerStreams.set(id.name, n);
        else this.offerStreams.delete(id.name);
        this.deps.registry.dropOffer(session, stream);
      },
    };
    this.deps.registry.addOffer(session, stream);
  }

  private onForward(call: RawCall): void {
    const id = this.authenticate(call, 'forward');
    if (!id) return;
    const session = this.sessionOf(call, id, 'forward');
    if (!session) return;
    const stream = new CallStream(call, 'server', 'answerer', (err) => this.protocolError(session, err));
    stream.attach({
      onFrame: (frame: CallFrame) => {
        if (frame.kind === 'start') void this.answerForward(session, stream, frame.start);
      },
      onDrain: () => {},
      onClosed: () => {},
      onProtocolError: () => {},
    });
  }

  private async answerForward(session: AgentSession, stream: CallStream, start: StartFrame): Promise<void> {
    const { metrics, logger, platformUpstreams } = this.deps;
    const startedMs = Date.now();
    const callId = start.callId || `b${(++this.callCounter).toString(36)}`;
    const upstream = platformUpstreams.clientFor(start.method);
    metrics.callsInFlight.inc({ direction: 'from_agent' });
    session.active.add(stream);
    let outcome: Pick<CallOutcome, 'code' | 'details'> & Partial<CallOutcome>;
    if (!upstream) {
      outcome = answerUnimplemented(stream, `no platform upstream for the service of ${start.method} at this broker`);
    } else {
      const md = new Metadata();
      md.set(CALLING_AGENT_KEY, session.agentId);
      outcome = await answer(stream, start, upstream, { extraMetadata: md });
    }
    session.active.delete(stream);
    metrics.callsInFlight.dec({ direction: 'from_agent' });
    recordCallFinished(logger, metrics, {
      direction: 'from_agent',
      code: outcome.code,
      details: outcome.details,
      startedMs,
      requestBytes: outcome.requestBytes,
      responseBytes: outcome.responseBytes,
      callLabels: { method: metrics.methodLabel(start.method) },
      log: { agentId: session.agentId, callId, method: start.method },
    });
  }

  /**
   * Refuses a stream past a per-agent cap with RESOURCE_EXHAUSTED and `details`; the agent's other
   * streams are left alone. Counted every time (`rejected_handshakes_total`, reason session_limit or
   * offer_limit), logged once per agent and limit until the agent is under it again.
   */
  private refuseOverLimit(call: RawCall, id: PeerIdentity, limit: 'sessions' | 'offers', details: string): void {
    const key = `${limit}:${id.name}`;
    const reason = limit === 'sessions' ? 'session_limit' : 'offer_limit';
    this.deps.metrics.rejectedHandshakes.inc({ listener: 'agent', reason });
    if (!this.refusalsLogged.has(key)) {
      this.refusalsLogged.add(key);
      const fields = { agentId: id.name, peer: call.getPeer(), limit, reason: details };
      this.deps.logger.warn('tunnel stream refused: per-agent limit', fields);
    }
    call.emit('error', { code: Status.RESOURCE_EXHAUSTED, details });
  }

  /**
   * A session frame over {@link MAX_SESSION_FRAME_BYTES} (from the agent server's
   * receiveLimitInterceptor, before the frame is read): a protocol error, logged with the agent's
   * id; returns the status that ends that session stream. The agent's other sessions live on.
   */
  oversizedSessionFrame(message: OversizedMessage): { code: number; details: string } {
    const err = new ProtocolError(sessionFrameTooLarge(message.bytes));
    const id = identityOfPeerCertificate(message.call.getAuthContext().sslPeerCertificate);
    this.deps.metrics.protocolErrors.inc();
    const fields = { agentId: id?.name, peer: message.call.getPeer(), error: err.message };
    this.deps.logger.warn('tunnel session failed', fields);
    return { code: err.code, details: err.message };
  }

  private protocolError(session: AgentSession, err: ProtocolError): void {
    this.deps.metrics.protocolErrors.inc();
    this.deps.logger.warn('agent broke the tunnel protocol; closing its session', {
      agentId: session.agentId,
      sessionId: session.id,
      error: err.message,
    });
    this.closeSession(session, err, true);
  }
}
