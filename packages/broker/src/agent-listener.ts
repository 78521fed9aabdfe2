import * as http2 from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  CALLING_AGENT_KEY,
  CALL_ID_KEY,
  CallIds,
  CONTROL_PATH,
  SESSION_HANDSHAKE_TIMEOUT_MS,
  ControlChannel,
  ENROLLMENT_NOT_ENABLED,
  ENROLLMENT_SERVICE,
  refuseStream,
  GRPC_CONTENT_TYPE,
  H2_SESSION_OPTIONS,
  LEGACY_SESSION_PATH,
  LEGACY_TUNNEL_SERVICE,
  MessageReader,
  PROTOCOL_VERSIONS,
  ProtocolError,
  TUNNEL_ALPN,
  type UpstreamTable,
  answerUnary,
  answerUnimplemented,
  checkReplicaSet,
  deadlineFromTimeout,
  decodeSessionFrame,
  describeVersions,
  endWithStatus,
  keepSessionAlive,
  limitUnauthenticatedSession,
  type UnauthenticatedLimits,
  negotiateVersion,
  nextHopHeaders,
  openStream,
  recordCallFinished,
  relayCall,
  serviceOfMethod,
  toBurrowError,
  verifyCertificateChain,
  type BrokerEndpoint,
  type KeepaliveSettings,
  type Logger,
  type PeerIdentity,
  type SessionFrame,
  SpanKind,
  TRACEPARENT_KEY,
  endRpcSpan,
  remoteParent,
  startRpcSpan,
  BURROW_ATTRIBUTES,
  traceLogFields,
  traceparentOf,
  type Span,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import { type BrokerTelemetry, TelemetryAllowance } from './broker-telemetry';
import type { BrokerPki } from './broker-pki';
import { AGENT_RULE, CALLER_RULE, checkPeer, peerCertificateOf, presentedBy } from './peer-admission';
import { AgentSession, type TunnelRegistry } from './tunnel-registry';

/** Site -> platform calls one agent connection may run at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS). */
const MAX_SITE_CALLS_PER_CONNECTION = 4096;

/** How long a refused or cut tunnel may take to read its Refused frame before the socket is destroyed. */
const CLOSE_GRACE_MS = 2_000;

export interface AgentListenerDeps {
  registry: TunnelRegistry;
  metrics: BrokerMetrics;
  logger: Logger;
  platformUpstreams: UpstreamTable;
  trustDomain: string;
  brokerId: string;
  maxMessageBytes: number;
  keepalive: KeepaliveSettings;
  /**
   * Most tunnel sessions one agent (certificate identity) may hold here at once, counting those
   * still waiting for Hello; 0 = no cap. A session past it is Refused with RESOURCE_EXHAUSTED.
   */
  maxSessionsPerAgent: number;
  /** True once the broker is draining: new sessions are refused. */
  isDraining(): boolean;
  /** Revocation check for every connection; without a PKI directory nothing is revoked. */
  isRevoked(id: PeerIdentity): boolean;
  /** The CAs agents' renewed certificates must chain to (Credentials frames). */
  trustBundlePem(): string;
  /** Enrollment (Enroll, Renew) when the broker has a PKI directory. */
  pki?: BrokerPki;
  /** Limits of connections without a valid client certificate (with enrollment on). */
  unauthenticated?: UnauthenticatedLimits;
  /**
   * The broker replica set agents should keep tunnels to (this broker included), sent in a
   * Brokers frame right after Welcome when it is not empty. Without it a new session gets the set
   * last given to {@link AgentListener.broadcastReplicaSet}, if any.
   */
  replicaSet?(): BrokerEndpoint[];
  /**
   * The port of this broker's caller API once bound, named to a caller (a service certificate)
   * that called this listener by mistake; undefined before it is bound.
   */
  callerApiPort?(): number | undefined;
  /** Where agents' Telemetry frames go; absent: none are taken (Welcome says so). */
  telemetry?: BrokerTelemetry;
}

/** One tunnel connection: its HTTP/2 session (broker = client), its control channel, its session once welcomed. */
interface Tunnel {
  readonly socket: TLSSocket;
  readonly h2: http2.ClientHttp2Session;
  /** The control stream (the first stream this broker opens), once opened. */
  control?: http2.ClientHttp2Stream;
  channel?: ControlChannel;
  session?: AgentSession;
  closed: boolean;
  /** The session's Telemetry byte allowance (set at Welcome when the broker takes telemetry). */
  telemetryAllowance?: TelemetryAllowance;
}

/**
 * The broker's agent listener (tunnel.proto, "Roles"): connections agents dial. `burrow-tunnel`
 * connections become tunnels (this broker the HTTP/2 client, one stream per call); `h2` connections
 * are ordinary gRPC: Enrollment, the agents' calls to platform services, and the refusal of agents
 * that speak only protocol versions 1-3. Every tunnel and every call needs a client certificate of
 * role agent in the broker's trust domain; the agent id is taken from it and nothing else.
 */
export class AgentListener {
  private readonly tunnels = new Set<Tunnel>();
  /** Tunnels per agent id that have not sent Hello yet (the registry holds the others). */
  private readonly pendingSessions = new Map<string, number>();
  /** The set last broadcast; what new sessions get when `deps.replicaSet` is not given. */
  private lastReplicaSet: BrokerEndpoint[] = [];
  /** Agents refused for the session cap whose refusal was logged: one line per agent until it is under it. */
  private readonly refusalsLogged = new Set<string>();
  /** `h2` connections of agents (site -> platform calls), cut with the agent's sessions. */
  private readonly callConnections = new Map<http2.ServerHttp2Session, PeerIdentity>();
  private readonly callIds = new CallIds('b');
  /** Serves the `h2` connections. */
  readonly grpcServer: http2.Http2Server;

  constructor(private readonly deps: AgentListenerDeps) {
    // An agent's site calls share one connection; past this many at once HTTP/2 holds them back
    // (the agent's client queues), so one site cannot open streams without bound here.
    this.grpcServer = http2.createServer({
      ...H2_SESSION_OPTIONS,
      settings: { ...H2_SESSION_OPTIONS.settings, maxConcurrentStreams: MAX_SITE_CALLS_PER_CONNECTION },
    });
    this.grpcServer.on('session', (session: http2.ServerHttp2Session) => this.onGrpcSession(session));
    this.grpcServer.on(
      'stream',
      (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, _flags: number, raw: string[]) =>
        this.onGrpcStream(stream, headers, raw),
    );
  }

  /** Takes a connection whose TLS handshake completed (the agent TLS server's 'secureConnection'). */
  accept(socket: TLSSocket): void {
    socket.on('error', () => {});
    // Calls are small writes each way: Nagle would hold every other one for the peer's delayed ACK.
    socket.setNoDelay(true);
    if (socket.alpnProtocol === TUNNEL_ALPN) this.openTunnel(socket);
    else this.grpcServer.emit('connection', socket);
  }

  /** Number of sessions known (leak checks). */
  get sessionCount(): number {
    let n = 0;
    for (const t of this.tunnels) if (t.session) n++;
    return n;
  }

  /** Sends Drain to every session; each closes once its calls have ended. */
  drainAll(reason: string): void {
    for (const t of this.tunnels) if (t.session) this.drainSession(t, reason);
  }

  /**
   * Cuts off every session of `agentId` now (revocation): calls in flight on them fail with
   * `error`. Returns the number of sessions closed.
   */
  disconnectAgent(agentId: string, error: BurrowError): number {
    let n = 0;
    for (const t of [...this.tunnels])
      if (t.session?.agentId === agentId) {
        this.closeTunnel(t, error);
        n++;
      }
    for (const [conn, id] of this.callConnections) if (id.name === agentId) conn.destroy();
    return n;
  }

  /** Closes sessions whose agent certificate has expired; TLS does not re-check open connections. */
  closeExpired(nowMs = Date.now()): number {
    for (const [conn, id] of this.callConnections) if (id.notAfterMs <= nowMs) conn.destroy();
    return this.cutSessions('expired', (s) => {
      if (s.credentialExpiryMs > nowMs) return undefined;
      const at = new Date(s.credentialExpiryMs).toISOString();
      return new BurrowError(Status.UNAUTHENTICATED, `certificate of agent "${s.agentId}" expired at ${at}`);
    });
  }

  /** Closes sessions whose certificate is revoked now (called when the revocation list changes). */
  closeRevoked(): number {
    for (const [conn, id] of this.callConnections) if (this.deps.isRevoked(id)) conn.destroy();
    return this.cutSessions('revoked', (s) => {
      if (!this.deps.isRevoked(s.identity)) return undefined;
      return new BurrowError(Status.PERMISSION_DENIED, `certificate of agent "${s.agentId}" was revoked`);
    });
  }

  private cutSessions(reason: 'expired' | 'revoked', verdict: (s: AgentSession) => BurrowError | undefined): number {
    let closed = 0;
    for (const t of [...this.tunnels]) {
      const error = t.session && verdict(t.session);
      if (!error) continue;
      this.closeTunnel(t, error);
      this.deps.metrics.connectionsClosed.inc({ reason });
      closed++;
    }
    return closed;
  }

  /** Sends the new trust bundle to every session (CA rotation). */
  broadcastTrustBundle(pem: string, version: number): void {
    for (const t of this.tunnels) if (t.session) t.session.control.trustBundle(pem, version);
  }

  /**
   * Sends the broker replica set to every session, replacing what those agents had. Throws a
   * ProtocolError naming the problem, before sending anything, when the set breaks the frame's rules.
   */
  broadcastReplicaSet(set: BrokerEndpoint[]): void {
    checkReplicaSet(set);
    this.lastReplicaSet = set.map((b) => ({ ...b }));
    for (const t of this.tunnels) if (t.session) t.session.control.replicaSet(this.lastReplicaSet);
  }

  /** Earliest certificate expiry among connected agents (ms since epoch), for metrics. */
  earliestAgentExpiryMs(): number | undefined {
    let min: number | undefined;
    for (const t of this.tunnels)
      if (t.session && (min === undefined || t.session.credentialExpiryMs < min)) min = t.session.credentialExpiryMs;
    return min;
  }

  /** Ends every tunnel and call connection (final shutdown). */
  closeAll(error: BurrowError): void {
    for (const t of [...this.tunnels]) this.closeTunnel(t, error);
    for (const conn of this.callConnections.keys()) conn.destroy();
  }

  /** Closes the `h2` connections gracefully (drain): calls in flight finish. */
  closeCallConnections(): void {
    for (const conn of this.callConnections.keys()) if (!conn.closed) conn.close();
  }

  /** Calls in flight on `h2` connections (site -> platform), for drain. */
  get callConnectionCount(): number {
    return this.callConnections.size;
  }

  // ---------------------------------------------------------------------------------------------
  // Tunnels (ALPN burrow-tunnel): this broker is the HTTP/2 client.

  private openTunnel(socket: TLSSocket): void {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    const tunnel = this.connectTunnel(socket);
    if (!tunnel) return;
    const checked = checkPeer(presentedBy(socket), AGENT_RULE, this.deps);
    const id = 'identity' in checked ? checked.identity : undefined;
    const refusal = 'refusal' in checked ? checked.refusal : this.sessionRefusal(checked.identity, peer);
    this.watchHttp2Errors(tunnel, id);
    const hello = this.awaitHello(id);
    tunnel.channel = new ControlChannel(tunnel.control!, {
      onFrame: (frame) => {
        // A refused or closed tunnel takes nothing more: an agent sends Hello without waiting, and
        // a Hello read after Refused must not register a session (past the cap, or never removed).
        if (tunnel.closed) return;
        if (tunnel.session) {
          this.onSessionFrame(tunnel, tunnel.session, frame);
          return;
        }
        hello.settle();
        if (frame.kind !== 'hello' || !id) {
          this.protocolError(tunnel, new ProtocolError(`session opened with ${frame.kind}, not hello`), id);
          return;
        }
        this.welcome(tunnel, id, frame.hello.protocolVersions, frame.hello.agentVersion, peer);
      },
      onProtocolError: (error) => {
        hello.settle();
        this.protocolError(tunnel, error, id);
      },
      onClosed: () => {
        hello.settle();
        this.closeTunnel(tunnel, undefined);
      },
    });
    if (refusal) {
      // The per-agent cap logs its own line, once per agent while it stays over it: a flood of
      // connections must not become a flood of log lines.
      if (refusal.code !== Status.RESOURCE_EXHAUSTED)
        this.deps.logger.warn('tunnel refused', { agentId: id?.name, peer, reason: refusal.message });
      this.refuse(tunnel, refusal);
      return;
    }
    hello.start(() =>
      this.protocolError(tunnel, new ProtocolError(`no hello within ${SESSION_HANDSHAKE_TIMEOUT_MS} ms`), id),
    );
  }

  /**
   * This broker as the HTTP/2 client on the socket the agent dialed, and the control stream opened
   * on it (tunnel.proto, "Control stream"); undefined when the connection is already gone.
   */
  private connectTunnel(socket: TLSSocket): Tunnel | undefined {
    const h2 = http2.connect('https://agent.burrow', { ...H2_SESSION_OPTIONS, createConnection: () => socket });
    const tunnel: Tunnel = { socket, h2, closed: false };
    this.tunnels.add(tunnel);
    h2.on('error', () => {});
    h2.on('close', () => this.closeTunnel(tunnel, undefined));
    keepSessionAlive(h2, this.deps.keepalive);
    try {
      tunnel.control = h2.request(
        { ':method': 'POST', ':path': CONTROL_PATH, 'content-type': GRPC_CONTENT_TYPE, te: 'trailers' },
        { endStream: false },
      );
    } catch {
      this.closeTunnel(tunnel, undefined);
      return undefined;
    }
    return tunnel;
  }

  /**
   * nghttp2 found the agent breaking HTTP/2 itself (a PUSH_PROMISE, a stream the agent, the HTTP/2
   * server, tried to open, bad framing): a protocol error like a bad session frame. The session is
   * gone already (GOAWAY sent, its streams closed), so no Refused can follow: the error is counted
   * and logged, and the tunnel closed.
   */
  private watchHttp2Errors(tunnel: Tunnel, id: PeerIdentity | undefined): void {
    tunnel.h2.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code !== 'ERR_HTTP2_ERROR') return;
      this.reportProtocolError(tunnel, new ProtocolError(`HTTP/2: ${err.message}`), id);
      this.closeTunnel(tunnel, undefined);
    });
  }

  /**
   * The wait for a tunnel's Hello: it counts against the agent's session cap from `start` until
   * `settle` (Hello, a protocol error, the end), and `timedOut` runs when no Hello came in time.
   */
  private awaitHello(id: PeerIdentity | undefined): { start(timedOut: () => void): void; settle(): void } {
    let timer: NodeJS.Timeout | undefined;
    let pending = false;
    const settle = (): void => {
      clearTimeout(timer);
      if (!pending || !id) return;
      pending = false;
      const n = (this.pendingSessions.get(id.name) ?? 1) - 1;
      if (n > 0) this.pendingSessions.set(id.name, n);
      else this.pendingSessions.delete(id.name);
    };
    const start = (timedOut: () => void): void => {
      if (id) {
        pending = true;
        this.pendingSessions.set(id.name, (this.pendingSessions.get(id.name) ?? 0) + 1);
      }
      timer = setTimeout(() => {
        settle();
        timedOut();
      }, SESSION_HANDSHAKE_TIMEOUT_MS);
    };
    return { start, settle };
  }

  /** Why a new session of `id` is not taken (draining, over the per-agent cap), or undefined. */
  private sessionRefusal(id: PeerIdentity, peer: string): BurrowError | undefined {
    if (this.deps.isDraining())
      return new BurrowError(Status.UNAVAILABLE, 'broker is draining; connect to another broker');
    const cap = this.deps.maxSessionsPerAgent;
    const held = this.deps.registry.sessionsOf(id.name).length + (this.pendingSessions.get(id.name) ?? 0);
    if (cap > 0 && held >= cap) {
      const details = `agent "${id.name}" holds ${held} sessions at this broker; at most ${cap} allowed`;
      const key = `sessions:${id.name}`;
      this.deps.metrics.rejectedHandshakes.inc({ listener: 'agent', reason: 'session_limit' });
      if (!this.refusalsLogged.has(key)) {
        this.refusalsLogged.add(key);
        this.deps.logger.warn('tunnel refused: per-agent limit', {
          agentId: id.name,
          peer,
          limit: 'sessions',
          reason: details,
        });
      }
      return new BurrowError(Status.RESOURCE_EXHAUSTED, `${details} (--max-sessions-per-agent)`);
    }
    this.refusalsLogged.delete(`sessions:${id.name}`);
    return undefined;
  }

  private welcome(tunnel: Tunnel, id: PeerIdentity, versions: number[], agentVersion: string, peer: string): void {
    const { metrics, logger, registry } = this.deps;
    const version = negotiateVersion(PROTOCOL_VERSIONS, versions);
    if (version === undefined) {
      const details =
        `no common protocol version: agent speaks ${describeVersions(versions)}, broker ` +
        `speaks ${describeVersions(PROTOCOL_VERSIONS)}`;
      metrics.rejectedHandshakes.inc({ listener: 'agent', reason: 'protocol_version' });
      logger.warn('tunnel session refused', { agentId: id.name, reason: details });
      this.refuse(tunnel, new BurrowError(Status.FAILED_PRECONDITION, details));
      return;
    }
    const channel = tunnel.channel!;
    const session = new AgentSession(id, peer, version, agentVersion, tunnel.h2, {
      drain: (reason) => channel.send({ kind: 'drain', reason }),
      trustBundle: (pem, v) => channel.send({ kind: 'trustBundle', pem, version: v }),
      replicaSet: (brokers) => channel.send({ kind: 'brokers', brokers }),
      close: (err) => this.closeTunnel(tunnel, err),
    });
    tunnel.session = session;
    const telemetry = this.deps.telemetry;
    const acceptsTelemetry = telemetry?.acceptsAgentTelemetry === true;
    if (acceptsTelemetry)
      tunnel.telemetryAllowance = new TelemetryAllowance(telemetry.budgets.maxBytesPerAgentPerSecond);
    channel.send({
      kind: 'welcome',
      welcome: {
        protocolVersion: version,
        sessionId: session.id,
        maxMessageBytes: this.deps.maxMessageBytes,
        brokerId: this.deps.brokerId,
        acceptsTelemetry,
      },
    });
    const replicas = this.deps.replicaSet ? this.deps.replicaSet() : this.lastReplicaSet;
    if (replicas.length > 0) session.control.replicaSet(replicas);
    registry.addSession(session);
    metrics.agentConnects.inc();
    logger.info('agent connected', {
      agentId: id.name,
      sessionId: session.id,
      peer,
      protocolVersion: version,
      agentVersion,
    });
  }

  private onSessionFrame(tunnel: Tunnel, session: AgentSession, frame: SessionFrame): void {
    if (frame.kind === 'credentials') this.acceptCredentials(tunnel, session, frame.certificateChainPem);
    else if (frame.kind === 'drain') this.agentLeaving(tunnel, session, frame.reason);
    else if (frame.kind === 'telemetry')
      this.deps.telemetry?.acceptAgentBatch(session.identity.name, tunnel.telemetryAllowance, frame.otlpTraces);
    else
      this.protocolError(tunnel, new ProtocolError(`${frame.kind} frame from an agent after hello`), session.identity);
  }

  /**
   * The agent is leaving this session: no more calls go to it, and this broker answers with its own
   * Drain, written after every call stream opened before it, so the agent can close once its calls
   * are done without one arriving late (tunnel.proto, "Drain").
   */
  private agentLeaving(tunnel: Tunnel, session: AgentSession, reason: string): void {
    if (session.draining) return;
    session.draining = true;
    tunnel.channel?.send({ kind: 'drain', reason: 'agent leaving' });
    this.deps.logger.info('agent is leaving', {
      agentId: session.agentId,
      sessionId: session.id,
      reason,
      callsInFlight: session.activeCalls,
    });
  }

  /** Broker drain of one session: Drain, no new calls, close once the calls in flight have ended. */
  private drainSession(tunnel: Tunnel, reason: string): void {
    const session = tunnel.session!;
    if (!session.draining) {
      session.draining = true;
      session.control.drain(reason);
    }
    void session.whenIdle().then(() => this.closeTunnel(tunnel, undefined));
  }

  /**
   * A renewed certificate presented on the session: if it chains to our trust bundle and names the
   * same agent, the session lives on until the new certificate expires. Anything else breaks the
   * protocol (see the Credentials frame in tunnel.proto).
   */
  private acceptCredentials(tunnel: Tunnel, session: AgentSession, chainPem: string): void {
    let id: PeerIdentity;
    try {
      id = verifyCertificateChain(chainPem, this.deps.trustBundlePem());
    } catch (err) {
      const error = new ProtocolError(`renewed certificate refused: ${(err as Error).message}`);
      this.protocolError(tunnel, error, session.identity);
      return;
    }
    if (id.role !== 'agent' || id.name !== session.agentId || id.trustDomain !== session.identity.trustDomain) {
      const error = new ProtocolError(
        `renewed certificate names ${id.spiffeId}, not the session's ${session.identity.spiffeId}`,
      );
      this.protocolError(tunnel, error, session.identity);
      return;
    }
    if (this.deps.isRevoked(id)) {
      this.closeTunnel(
        tunnel,
        new BurrowError(Status.PERMISSION_DENIED, `certificate of agent "${id.name}" is revoked`),
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

  private protocolError(tunnel: Tunnel, error: ProtocolError, id: PeerIdentity | undefined): void {
    this.reportProtocolError(tunnel, error, id);
    this.closeTunnel(tunnel, error);
  }

  /** Counts and logs a protocol error of the agent on `tunnel`. */
  private reportProtocolError(tunnel: Tunnel, error: ProtocolError, id: PeerIdentity | undefined): void {
    this.deps.metrics.protocolErrors.inc();
    this.deps.logger.warn('agent broke the tunnel protocol; closing its session', {
      agentId: id?.name,
      sessionId: tunnel.session?.id,
      error: error.message,
    });
  }

  /** Sends Refused, then closes the connection (destroyed if the agent does not close it first). */
  private refuse(tunnel: Tunnel, error: BurrowError): void {
    tunnel.channel?.send({ kind: 'refused', code: error.code, message: error.message.slice(0, 1024) });
    tunnel.channel?.end();
    this.closeTunnel(tunnel, undefined, true);
  }

  /**
   * Forgets `tunnel`. With `error`, calls in flight on it end with that status and the agent is told
   * (Refused) before the connection closes; without, the connection closes once its streams are done.
   */
  private closeTunnel(tunnel: Tunnel, error: BurrowError | undefined, refusedAlready = false): void {
    const { session, h2 } = tunnel;
    if (!tunnel.closed) {
      tunnel.closed = true;
      this.tunnels.delete(tunnel);
      if (session) {
        this.deps.registry.removeSession(session);
        this.deps.logger.info('agent disconnected', {
          agentId: session.agentId,
          sessionId: session.id,
          reason: error?.message ?? 'session ended',
        });
      }
    }
    if (error) {
      if (session) for (const call of [...session.active]) call.cut?.(error);
      if (!refusedAlready) {
        tunnel.channel?.send({ kind: 'refused', code: error.code, message: error.message.slice(0, 1024) });
        tunnel.channel?.end();
      }
    }
    if (!h2.closed && !h2.destroyed) {
      tunnel.channel?.end();
      const close = (): void => {
        if (!h2.closed && !h2.destroyed) h2.close();
      };
      // After a Refused frame, GOAWAY waits for the control stream to end: nghttp2 sends control
      // frames (GOAWAY) ahead of queued HEADERS and DATA, so a tunnel refused as soon as it was
      // accepted would get GOAWAY before its control stream, and the agent (an HTTP/2 server that
      // has seen GOAWAY) would never see the stream nor the Refused on it. The timer below still
      // cuts an agent that keeps the stream open.
      const { control } = tunnel;
      if ((error || refusedAlready) && control && !control.closed) control.once('close', close);
      else close();
      // A peer that keeps the connection (or its streams) open past the grace period is cut.
      setTimeout(() => h2.destroy(), error || refusedAlready ? CLOSE_GRACE_MS : this.deps.keepalive.timeMs).unref();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Ordinary gRPC (ALPN h2): enrollment, site -> platform calls, refusal of agents of versions 1-3.

  private onGrpcSession(session: http2.ServerHttp2Session): void {
    session.on('error', () => {});
    if (this.deps.unauthenticated) limitUnauthenticatedSession(session, this.deps.unauthenticated);
    keepSessionAlive(session, this.deps.keepalive);
  }

  private onGrpcStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, raw: string[]): void {
    stream.on('error', () => {});
    const method = String(headers[':path'] ?? '');
    const socket = stream.session?.socket as TLSSocket | undefined;
    if (!socket) return;
    const deadlineMs = deadlineFromTimeout(headers['grpc-timeout'], Date.now()) ?? Number.POSITIVE_INFINITY;
    if (method === ENROLLMENT_SERVICE.enroll.path || method === ENROLLMENT_SERVICE.renew.path) {
      this.answerEnrollment(stream, method, socket, deadlineMs, headers[TRACEPARENT_KEY]);
      return;
    }
    if (serviceOfMethod(method) === LEGACY_TUNNEL_SERVICE) {
      this.refuseLegacyAgent(stream, method);
      return;
    }
    const presented = presentedBy(socket);
    const checked = checkPeer(presented, AGENT_RULE, this.deps);
    if ('refusal' in checked) {
      // A caller's certificate here means the wrong port, not a wrong certificate: say where to go.
      const refusal = presented.identity?.role === CALLER_RULE.role ? this.wrongListener() : checked.refusal;
      this.deps.logger.warn('site call refused', { peer: socket.remoteAddress, method, reason: refusal.message });
      endWithStatus(stream, refusal.code, refusal.message);
      return;
    }
    const session = stream.session as http2.ServerHttp2Session;
    if (!this.callConnections.has(session)) {
      this.callConnections.set(session, checked.identity);
      session.once('close', () => this.callConnections.delete(session));
    }
    void this.answerSiteCall(stream, method, raw, headers, checked.identity, deadlineMs);
  }

  /**
   * The refusal of a caller (service certificate) that called this listener: still PERMISSION_DENIED
   * (the role may not use this listener, counted as wrong_role), but worded for the likely cause,
   * the wrong port, rather than a problem with the certificate.
   */
  private wrongListener(): BurrowError {
    const port = this.deps.callerApiPort?.();
    const where = port === undefined ? "the broker's caller API port" : `the caller API on port ${port}`;
    return new BurrowError(
      Status.PERMISSION_DENIED,
      `this is the broker's agent listener (agents connect here); call ${where}`,
    );
  }

  /** A site client's call (site -> platform): relayed to the platform upstream that serves it. */
  private async answerSiteCall(
    stream: http2.ServerHttp2Stream,
    method: string,
    raw: string[],
    headers: http2.IncomingHttpHeaders,
    agent: PeerIdentity,
    deadlineMs: number,
  ): Promise<void> {
    const { metrics, logger } = this.deps;
    const startedMs = Date.now();
    const callId = this.callIds.fromHeader(headers[CALL_ID_KEY]);
    metrics.callsInFlight.inc({ direction: 'from_agent' });
    const tracing = this.deps.telemetry?.tracing;
    const span = tracing?.enabled
      ? startRpcSpan(tracing, SpanKind.SERVER, method, remoteParent(headers[TRACEPARENT_KEY], headers.tracestate), {
          [BURROW_ATTRIBUTES.agentId]: agent.name,
          [BURROW_ATTRIBUTES.callId]: callId,
        })
      : undefined;
    const outcome = await this.relayToPlatform({ stream, method, raw, headers, agent, deadlineMs }, span);
    if (span) endRpcSpan(span, outcome.code, outcome.details, outcome.settledAt);
    metrics.callsInFlight.dec({ direction: 'from_agent' });
    recordCallFinished(logger, metrics, {
      direction: 'from_agent',
      code: outcome.code,
      details: outcome.details,
      startedMs,
      requestBytes: outcome.requestBytes,
      responseBytes: outcome.responseBytes,
      callLabels: { method: metrics.methodLabel(method) },
      log: { agentId: agent.name, callId, method, ...traceLogFields(span) },
    });
  }

  /** {@link answerSiteCall}'s relay to the platform upstream, in a CLIENT span when traced. */
  private async relayToPlatform(
    call: {
      stream: http2.ServerHttp2Stream;
      method: string;
      raw: string[];
      headers: http2.IncomingHttpHeaders;
      agent: PeerIdentity;
      deadlineMs: number;
    },
    span: Span | undefined,
  ): Promise<{ code: number; details: string; requestBytes?: number; responseBytes?: number; settledAt?: number }> {
    const { stream, method, raw, headers, agent, deadlineMs } = call;
    const upstream = this.deps.platformUpstreams.sessionFor(method);
    if (!upstream)
      return answerUnimplemented(stream, `no platform upstream for the service of ${method} at this broker`);
    const peerName = `platform upstream ${upstream.address}`;
    const client = span && startRpcSpan(this.deps.telemetry!.tracing, SpanKind.CLIENT, method, span);
    const owned: Record<string, string> = { [CALLING_AGENT_KEY]: agent.name };
    if (client) owned[TRACEPARENT_KEY] = traceparentOf(client);
    let outcome: Awaited<ReturnType<AgentListener['relayToPlatform']>>;
    try {
      const next = nextHopHeaders(method, upstream.address, raw, deadlineMs, owned, headers['content-type']);
      const out = openStream(upstream.session, next, peerName);
      outcome = await relayCall(stream, out, { peerName, maxMessageBytes: this.deps.maxMessageBytes, deadlineMs });
    } catch (err) {
      const e = toBurrowError(err);
      endWithStatus(stream, e.code, e.message);
      outcome = { code: e.code, details: e.message };
    }
    if (client) endRpcSpan(client, outcome.code, outcome.details, outcome.settledAt);
    return outcome;
  }

  /** Enroll (no client certificate needed) and Renew, when this broker has a PKI directory. */
  private answerEnrollment(
    stream: http2.ServerHttp2Stream,
    method: string,
    socket: TLSSocket,
    deadlineMs: number,
    traceparent: string | string[] | undefined,
  ): void {
    const { pki } = this.deps;
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    if (!pki) {
      endWithStatus(stream, Status.UNIMPLEMENTED, ENROLLMENT_NOT_ENABLED);
      return;
    }
    const enroll = method === ENROLLMENT_SERVICE.enroll.path;
    if (enroll) {
      // Before the body is read: a refused Enroll must not cost the broker its request.
      const refused = pki.refuseEnrollment(socket.remoteAddress ?? '');
      if (refused) {
        refuseStream(stream, refused.code, refused.details);
        return;
      }
    }
    const certificate = socket.authorized ? peerCertificateOf(socket) : undefined;
    const tracing = this.deps.telemetry?.tracing;
    const span = tracing?.enabled
      ? startRpcSpan(tracing, SpanKind.SERVER, method, remoteParent(traceparent))
      : undefined;
    const answered = answerUnary(
      stream,
      (request) =>
        new Promise<Buffer>((resolve, reject) => {
          const reply = (
            err: { code: number; details?: string } | null,
            response?: Parameters<typeof ENROLLMENT_SERVICE.enroll.responseSerialize>[0],
          ): void => {
            if (err) reject(new BurrowError(err.code, err.details ?? ''));
            else resolve(ENROLLMENT_SERVICE.enroll.responseSerialize(response!));
          };
          if (enroll) {
            const req = ENROLLMENT_SERVICE.enroll.requestDeserialize(request);
            pki.enroll({ request: req, peer, peerCertificate: certificate }, reply);
          } else {
            const req = ENROLLMENT_SERVICE.renew.requestDeserialize(request);
            pki.renew({ request: req, peer, peerCertificate: certificate }, reply, this.deps.trustDomain);
          }
        }),
      { method, maxMessageBytes: 64 * 1024, deadlineMs, callId: '' },
    );
    if (span) void answered.then((outcome) => endRpcSpan(span, outcome.code, outcome.details));
  }

  /**
   * An agent of protocol versions 1-3 (it offered only `h2` and opened the old Tunnel service):
   * FAILED_PRECONDITION naming both version lists, read from its Hello when it sends one.
   */
  private refuseLegacyAgent(stream: http2.ServerHttp2Stream, method: string): void {
    const { metrics, logger } = this.deps;
    const refuse = (theirs: string): void => {
      const ours = describeVersions(PROTOCOL_VERSIONS);
      const details = `no common protocol version: agent speaks ${theirs}, broker speaks ${ours}`;
      metrics.rejectedHandshakes.inc({ listener: 'agent', reason: 'protocol_version' });
      logger.warn('tunnel session refused', { peer: stream.session?.socket?.remoteAddress, reason: details });
      endWithStatus(stream, Status.FAILED_PRECONDITION, details);
    };
    if (method !== LEGACY_SESSION_PATH) {
      refuse('[1, 2, 3] (an old tunnel stream)');
      return;
    }
    const reader = new MessageReader(64 * 1024);
    const timer = setTimeout(() => refuse('an older protocol (no hello)'), SESSION_HANDSHAKE_TIMEOUT_MS);
    stream.on('close', () => clearTimeout(timer));
    stream.on('data', (chunk: Buffer) => {
      let frames: Buffer[];
      try {
        frames = reader.push(chunk);
      } catch {
        clearTimeout(timer);
        refuse('an older protocol');
        return;
      }
      const first = frames[0];
      if (first === undefined || stream.headersSent) return;
      clearTimeout(timer);
      try {
        const frame = decodeSessionFrame(first);
        refuse(frame.kind === 'hello' ? describeVersions(frame.hello.protocolVersions) : 'an older protocol');
      } catch {
        refuse('an older protocol');
      }
    });
  }
}
