import { EventEmitter } from 'node:events';
import * as http2 from 'node:http2';
import { isIP } from 'node:net';
import * as tls from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  CALLER_ID_KEY,
  CALL_ID_KEY,
  CallIds,
  CONTROL_PATH,
  SESSION_HANDSHAKE_TIMEOUT_MS,
  ControlChannel,
  ENROLLMENT_SERVICE,
  GRPC_CONTENT_TYPE,
  H2_SESSION_OPTIONS,
  HealthService,
  LEGACY_SESSION_PATH,
  PROTOCOL_VERSIONS,
  ProtocolError,
  TUNNEL_ALPN,
  answerUnary,
  answerUnimplemented,
  brokerIdentityCheck,
  deadlineFromTimeout,
  encodeSessionFrame,
  endWithStatus,
  frameMessage,
  keepSessionAlive,
  nextHopHeaders,
  openStream,
  recordCallFinished,
  relayCall,
  serviceOfMethod,
  splitHostPort,
  statusOfHeaders,
  toBurrowError,
  unaryCall,
  type CallOutcome,
  type CredentialStore,
  type IssuedAgentCertificate,
  type KeepaliveSettings,
  type Logger,
  type RenewRequest,
  type SessionFrame,
  type UpstreamTable,
  type WelcomeFrame,
  type BrokerEndpoint,
  BURROW_ATTRIBUTES,
  SpanKind,
  TRACEPARENT_KEY,
  endRpcSpan,
  remoteParent,
  startRpcSpan,
  traceLogFields,
  traceparentOf,
  type Span,
  type Tracing,
  ROOT_CONTEXT,
} from '@burrow/tunnel';
import type { AgentMetrics } from './agent-metrics';
import type { BuiltinServices } from './builtin-services';

/** How long a leaving agent waits for the broker's Drain that answers its own. */
const DRAIN_ACK_TIMEOUT_MS = 5_000;

export interface BrokerConnectionOptions {
  address: string;
  /** The agent's certificate, key and trust bundle (renewals and rotation apply to new connections). */
  tls: CredentialStore;
  trustDomain: string;
  agentId: string;
  agentVersion: string;
  /** Calls the broker may run on this connection at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS). */
  maxConcurrentCalls: number;
  maxMessageBytes: number;
  /** How long calls in flight may run on after the broker asked the agent to drain. */
  drainTimeoutMs: number;
  keepalive: KeepaliveSettings;
  serverNameOverride?: string;
  upstreams: UpstreamTable;
  /** Services the agent answers itself (auth, policy), unless an upstream route names them. */
  builtins: BuiltinServices;
  /** The agent's health (grpc.health.v1), answered for calls through the tunnel that ask for it. */
  health: HealthService;
  metrics: AgentMetrics;
  logger: Logger;
  /** Spans of the calls the broker carries here and of renewals; off: none, traceparent passes as it came. */
  tracing: Tracing;
}

/**
 * What a {@link BrokerConnection} reports, by event name and listener arguments. Public:
 * `closed` (once, with the error it ended with, if any), `drain` (the broker asked the agent to go
 * elsewhere), `brokers` (each replica set the broker sends), `trust-bundle` (a new trust bundle).
 * Internal: `welcome`, `drain-ack` (the broker's Drain after the agent's), `call-ended`.
 */
export interface BrokerConnectionEvents {
  closed: [error?: BurrowError];
  drain: [reason: string];
  brokers: [set: BrokerEndpoint[]];
  'trust-bundle': [pem: string, version: number];
  welcome: [welcome: WelcomeFrame];
  'drain-ack': [];
  'call-ended': [];
}

/** A call the broker opened on the tunnel, as {@link BrokerConnection.relayToUpstream} carries it. */
interface TunnelCall {
  stream: http2.ServerHttp2Stream;
  method: string;
  headers: http2.IncomingHttpHeaders;
  raw: string[];
  deadlineMs: number;
  caller: string | undefined;
  /** The call's SERVER span, when traced. */
  span: Span | undefined;
}

/**
 * One tunnel from the agent to one broker (tunnel.proto, "Roles"): the TLS connection the agent
 * dials with ALPN `burrow-tunnel`, on which the agent is the HTTP/2 server, its control stream, and
 * the calls the broker opens on it, each answered by a built-in service or relayed to an upstream.
 * Site clients' calls go up on a second, ordinary `h2` connection made when the first one comes.
 *
 * Events ({@link BrokerConnectionEvents}): after `closed` or `drain` the connection takes no new
 * calls; calls in flight finish and then the connection closes.
 */
export class BrokerConnection extends EventEmitter<BrokerConnectionEvents> {
  private socket: tls.TLSSocket | undefined;
  private h2: http2.ServerHttp2Session | undefined;
  private channel: ControlChannel | undefined;
  private welcome: WelcomeFrame | undefined;
  private activeCalls = 0;
  private closedError: BurrowError | undefined;
  private isClosed = false;
  private draining = false;
  private brokerDrained = false;
  /** The `h2` connection for site -> platform calls and renewals, made on first use. */
  private callSession: http2.ClientHttp2Session | undefined;
  private readonly callIds = new CallIds('a');

  constructor(private readonly opts: BrokerConnectionOptions) {
    super();
  }

  get address(): string {
    return this.opts.address;
  }
  /**
   * Sends one Telemetry frame (an encoded OTLP export request) when this session takes them (its
   * Welcome said so) and the control stream can take it now; false, and nothing sent, otherwise.
   */
  sendTelemetry(otlpTraces: Buffer): boolean {
    const channel = this.channel;
    if (!this.usable || !this.welcome?.acceptsTelemetry || !channel?.writable) return false;
    return channel.send({ kind: 'telemetry', otlpTraces });
  }

  /** True when this session is up and its broker takes Telemetry frames. */
  get takesTelemetry(): boolean {
    return this.usable && this.welcome?.acceptsTelemetry === true;
  }

  /** True while the session is up and neither side is draining. */
  get usable(): boolean {
    return this.welcome !== undefined && !this.isClosed && !this.draining;
  }
  get callsInFlight(): number {
    return this.activeCalls;
  }
  get brokerId(): string {
    return this.welcome?.brokerId ?? '';
  }
  get protocolVersion(): number {
    return this.welcome?.protocolVersion ?? 0;
  }
  /** The error the session ended with, if it has ended. */
  get closeReason(): BurrowError | undefined {
    return this.closedError;
  }

  /** TLS options to the broker from the store's current material. */
  private tlsOptions(alpn: string[]): tls.ConnectionOptions {
    const { host, port } = splitHostPort(this.opts.address);
    const bare = host.replace(/^\[|\]$/g, '');
    const servername = this.opts.serverNameOverride ?? bare;
    return {
      host: bare,
      port: Number(port),
      // No SNI for an IP address (RFC 6066; '' keeps http2.connect from using the host); the name
      // check still applies.
      servername: isIP(servername) ? '' : servername,
      ca: this.opts.tls.caPem,
      cert: this.opts.tls.certPem,
      key: this.opts.tls.keyPem,
      ALPNProtocols: alpn,
      minVersion: 'TLSv1.2',
      checkServerIdentity: (_host, cert) => brokerIdentityCheck(this.opts.trustDomain)(servername, cert),
    };
  }

  /**
   * Dials the broker and opens the tunnel: resolves with Welcome; rejects with the broker's refusal
   * (wrong certificate, no common version, draining, a limit) or UNAVAILABLE when it cannot be
   * reached.
   */
  open(): Promise<WelcomeFrame> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (err: BurrowError): void => {
        if (!settled) {
          settled = true;
          clearTimeout(timer);
          reject(err);
        }
        this.close(err);
      };
      const timer = setTimeout(
        () =>
          fail(
            new BurrowError(
              Status.UNAVAILABLE,
              `no welcome from broker ${this.opts.address} within ${SESSION_HANDSHAKE_TIMEOUT_MS} ms`,
            ),
          ),
        SESSION_HANDSHAKE_TIMEOUT_MS,
      );
      this.once('welcome', (welcome: WelcomeFrame) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(welcome);
      });
      this.once('closed', (err?: BurrowError) =>
        fail(err ?? new BurrowError(Status.UNAVAILABLE, `broker ${this.opts.address} ended the session`)),
      );
      const socket = tls.connect(this.tlsOptions([TUNNEL_ALPN, 'h2']));
      // Calls are small writes each way: Nagle would hold every other one for the peer's delayed ACK.
      socket.setNoDelay(true);
      this.socket = socket;
      socket.once('error', (err) => fail(toBurrowError(err, `cannot connect to broker ${this.opts.address}`)));
      socket.once('close', () => this.close());
      socket.once('secureConnect', () => {
        if (socket.alpnProtocol === TUNNEL_ALPN) this.serve(socket);
        else if (socket.alpnProtocol === 'h2') void this.askOldBroker(socket).then(fail);
        else fail(new BurrowError(Status.UNAVAILABLE, `broker ${this.opts.address} chose no application protocol`));
      });
    });
  }

  /**
   * A broker that picked `h2` speaks protocol versions 1-3: its Session refuses this agent's Hello
   * with FAILED_PRECONDITION naming both version lists, which is the error to report.
   */
  private async askOldBroker(socket: tls.TLSSocket): Promise<BurrowError> {
    const session = http2.connect(`https://${this.opts.address}`, { createConnection: () => socket });
    session.on('error', () => {});
    const hello = frameMessage(
      encodeSessionFrame({
        kind: 'hello',
        hello: { protocolVersions: [...PROTOCOL_VERSIONS], agentVersion: this.opts.agentVersion },
      }),
    );
    const result = await new Promise<BurrowError>((resolve) => {
      const stream = session.request({
        ':method': 'POST',
        ':path': LEGACY_SESSION_PATH,
        'content-type': GRPC_CONTENT_TYPE,
        te: 'trailers',
      });
      const timer = setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), SESSION_HANDSHAKE_TIMEOUT_MS);
      let status: { code: number; details: string } | undefined;
      let done = false;
      // Settled by the status itself: this stream's request side stays open (an old Session is a
      // bidi stream), so it would close only when the old broker resets it, which grpc-js does not.
      const settle = (): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
        const why = status
          ? status.details
          : `it speaks an older protocol; this agent speaks [${PROTOCOL_VERSIONS.join(', ')}]`;
        resolve(new BurrowError(status?.code ?? Status.FAILED_PRECONDITION, why));
      };
      stream.on('response', (h) => {
        status ??= statusOfHeaders(h);
        if (status) settle();
      });
      stream.on('trailers', (h) => {
        status ??= statusOfHeaders(h);
        settle();
      });
      stream.on('error', () => {});
      stream.resume();
      stream.on('close', settle);
      stream.write(hello);
    });
    session.destroy();
    return result;
  }

  /** The tunnel proper: this agent is the HTTP/2 server on the connection it dialed. */
  private serve(socket: tls.TLSSocket): void {
    const server = http2.createServer({
      ...H2_SESSION_OPTIONS,
      // The control stream counts too.
      settings: { ...H2_SESSION_OPTIONS.settings, maxConcurrentStreams: this.opts.maxConcurrentCalls + 1 },
    });
    server.on('session', (session: http2.ServerHttp2Session) => {
      this.h2 = session;
      session.on('error', () => {});
      session.once('close', () => this.close());
      keepSessionAlive(session, this.opts.keepalive);
    });
    server.on(
      'stream',
      (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, _flags: number, raw: string[]) =>
        this.onStream(stream, headers, raw),
    );
    server.emit('connection', socket);
  }

  private onStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, raw: string[]): void {
    stream.on('error', () => {});
    const path = String(headers[':path'] ?? '');
    if (!this.channel) {
      if (path !== CONTROL_PATH) {
        this.protocolError(new ProtocolError(`first stream is ${path.slice(0, 200)}, not the control stream`));
        return;
      }
      stream.respond({ ':status': 200, 'content-type': GRPC_CONTENT_TYPE });
      this.channel = new ControlChannel(stream, {
        onFrame: (frame) => this.onControlFrame(frame),
        onProtocolError: (error) => this.protocolError(error),
        onClosed: () => this.close(this.closedError),
      });
      this.channel.send({
        kind: 'hello',
        hello: { protocolVersions: [...PROTOCOL_VERSIONS], agentVersion: this.opts.agentVersion },
      });
      return;
    }
    if (!this.welcome) {
      // HTTP/2 writes a new stream's HEADERS ahead of DATA already queued, so a call the broker
      // opened right after Welcome can arrive before it: it waits for Welcome (or the tunnel's end).
      this.once('welcome', () => void this.answerCall(stream, path, headers, raw));
      return;
    }
    void this.answerCall(stream, path, headers, raw);
  }

  private onControlFrame(frame: SessionFrame): void {
    if (!this.welcome) {
      if (frame.kind === 'refused') {
        this.close(new BurrowError(frame.code, frame.message));
        return;
      }
      if (frame.kind !== 'welcome') {
        this.protocolError(new ProtocolError(`session began with ${frame.kind}, not welcome`));
        return;
      }
      if (!PROTOCOL_VERSIONS.includes(frame.welcome.protocolVersion)) {
        const v = frame.welcome.protocolVersion;
        this.protocolError(new ProtocolError(`broker chose protocol version ${v}, which this agent does not speak`));
        return;
      }
      this.welcome = frame.welcome;
      this.opts.logger.info('tunnel session established', {
        broker: this.opts.address,
        brokerId: frame.welcome.brokerId,
        sessionId: frame.welcome.sessionId,
        protocolVersion: frame.welcome.protocolVersion,
      });
      this.opts.metrics.connectedBrokers.inc();
      this.emit('welcome', frame.welcome);
      return;
    }
    switch (frame.kind) {
      case 'drain':
        this.brokerDrained = true;
        this.emit('drain-ack');
        this.startDrain(frame.reason);
        return;
      case 'trustBundle':
        this.emit('trust-bundle', frame.pem, frame.version);
        return;
      case 'brokers':
        this.emit('brokers', frame.brokers);
        return;
      case 'refused':
        this.close(new BurrowError(frame.code, frame.message));
        return;
      default:
        this.protocolError(new ProtocolError(`${frame.kind} frame from a broker after welcome`));
    }
  }

  /** A call the broker opened on the tunnel: a built-in service, an upstream, or UNIMPLEMENTED. */
  private async answerCall(
    stream: http2.ServerHttp2Stream,
    method: string,
    headers: http2.IncomingHttpHeaders,
    raw: string[],
  ): Promise<void> {
    const startedMs = Date.now();
    this.activeCalls++;
    this.opts.metrics.tunnelStreams.inc({ state: 'active' });
    const deadlineMs = deadlineFromTimeout(headers['grpc-timeout'], startedMs) ?? Number.POSITIVE_INFINITY;
    // From the raw list, not `headers`: node joins a repeated key's values with ", ", and a broker
    // that sent burrow-caller-id twice must not make the upstream see one value that is both ids.
    // A v4 broker sends it once (it replaces any value); of several, the first is the one passed on.
    const caller = firstRawValue(raw, CALLER_ID_KEY) || undefined;
    const callId = this.callIds.fromHeader(headers[CALL_ID_KEY]);
    const service = serviceOfMethod(method);
    // A route naming the service wins over the built-in one; the default route `*` does not.
    if (HealthService.handles(method) && !this.opts.upstreams.hasRoute(service)) {
      // A ping through the tunnel: the agent answers for itself (its health, not an upstream's).
      this.opts.health.answer(stream, method, deadlineMs);
      this.callEnded();
      return;
    }
    const local = this.opts.upstreams.hasRoute(service) ? undefined : this.opts.builtins.handlerFor(method);
    const span = this.opts.tracing.enabled ? this.serverSpan(method, headers, callId) : undefined;
    const call = { stream, method, headers, raw, deadlineMs, caller, span };
    const { maxMessageBytes } = this;
    const outcome = local
      ? await answerUnary(stream, local, { method, maxMessageBytes, deadlineMs, callId, caller, span })
      : await this.relayToUpstream(call, service);
    // At the status sent (not the stream's close): the broker's CLIENT span ends after it got it.
    if (span) endRpcSpan(span, outcome.code, outcome.details, outcome.settledAt);
    this.callEnded();
    recordCallFinished(this.opts.logger, this.opts.metrics, {
      direction: 'from_broker',
      code: outcome.code,
      details: outcome.details,
      startedMs,
      requestBytes: outcome.requestBytes,
      responseBytes: outcome.responseBytes,
      log: { broker: this.opts.address, callId, method, ...traceLogFields(span) },
    });
  }

  /** The SERVER span of a call the broker carried here; its parent is the broker's CLIENT span. */
  private serverSpan(method: string, headers: http2.IncomingHttpHeaders, callId: string): Span {
    // burrow.agent_id is on the resource of every agent span (the broker stamps it): not repeated.
    return startRpcSpan(this.opts.tracing, SpanKind.SERVER, method, remoteParent(headers[TRACEPARENT_KEY]), {
      [BURROW_ATTRIBUTES.callId]: callId,
      [BURROW_ATTRIBUTES.brokerId]: this.brokerId,
    });
  }

  /** A call for a service the agent does not answer itself: to its upstream, or UNIMPLEMENTED. */
  private async relayToUpstream(
    call: TunnelCall,
    service: string,
  ): Promise<Pick<CallOutcome, 'code' | 'details'> & Partial<CallOutcome>> {
    const { stream, method } = call;
    const upstream = this.opts.upstreams.sessionFor(method);
    if (!upstream)
      return answerUnimplemented(stream, `agent "${this.opts.agentId}" has no upstream for service "${service}"`);
    // The upstream call's CLIENT span: the upstream gets it as its parent in traceparent.
    const span = call.span && startRpcSpan(this.opts.tracing, SpanKind.CLIENT, method, call.span);
    if (span) span.setAttribute('server.address', upstream.address);
    const outcome = await this.relayTo(call, upstream, service, span);
    if (span) endRpcSpan(span, outcome.code, outcome.details, outcome.settledAt);
    return outcome;
  }

  /** {@link relayToUpstream}'s relay proper. */
  private async relayTo(
    call: TunnelCall,
    upstream: { address: string; session: http2.ClientHttp2Session },
    service: string,
    span: Span | undefined,
  ): Promise<Pick<CallOutcome, 'code' | 'details'> & Partial<CallOutcome>> {
    const { stream, method, deadlineMs, caller } = call;
    const peerName = `upstream ${upstream.address}`;
    try {
      const owned: Record<string, string> = {};
      if (caller) owned[CALLER_ID_KEY] = caller;
      if (span) owned[TRACEPARENT_KEY] = traceparentOf(span);
      const contentType = call.headers['content-type'];
      const next = nextHopHeaders(method, upstream.address, call.raw, deadlineMs, owned, contentType);
      const out = openStream(upstream.session, next, peerName);
      // The route's name as configured (`*` for the default route), as operations.md quotes it.
      const route = this.opts.upstreams.hasRoute(service) ? service : '*';
      return await relayCall(stream, out, {
        peerName,
        maxMessageBytes: this.maxMessageBytes,
        deadlineMs,
        unreachableName: `agent "${this.opts.agentId}": upstream ${route} at ${upstream.address}`,
      });
    } catch (err) {
      const e = toBurrowError(err);
      endWithStatus(stream, e.code, e.message);
      return { code: e.code, details: e.message };
    }
  }

  private get maxMessageBytes(): number {
    const theirs = this.welcome?.maxMessageBytes ?? 0;
    return theirs > 0 ? Math.min(theirs, this.opts.maxMessageBytes) : this.opts.maxMessageBytes;
  }

  /** The `h2` connection to this broker (agent = client): site -> platform calls and renewals. */
  private platformSession(): http2.ClientHttp2Session {
    if (this.callSession && !this.callSession.closed && !this.callSession.destroyed) return this.callSession;
    const options = this.tlsOptions(['h2']);
    const session = http2.connect(`https://${this.opts.address}`, {
      ...H2_SESSION_OPTIONS,
      ...options,
    } as http2.SecureClientSessionOptions);
    session.on('error', () => {});
    keepSessionAlive(session, this.opts.keepalive);
    this.callSession = session;
    return session;
  }

  /**
   * Carries one site client's call to the broker on the `h2` connection. Resolves with the outcome
   * once the client has its status.
   */
  async forward(
    stream: http2.ServerHttp2Stream,
    headers: http2.IncomingHttpHeaders,
    raw: string[],
    deadlineMs: number,
    parent?: Span,
  ): Promise<CallOutcome> {
    const method = String(headers[':path'] ?? '');
    const peerName = `broker ${this.opts.address}`;
    this.activeCalls++;
    this.opts.metrics.tunnelStreams.inc({ state: 'active' });
    const owned: Record<string, string> = { [CALL_ID_KEY]: this.callIds.next() };
    const span = parent && startRpcSpan(this.opts.tracing, SpanKind.CLIENT, method, parent);
    if (span) owned[TRACEPARENT_KEY] = traceparentOf(span);
    let outcome: CallOutcome;
    try {
      const next = nextHopHeaders(method, this.opts.address, raw, deadlineMs, owned, headers['content-type']);
      const out = openStream(this.platformSession(), next, peerName);
      outcome = await relayCall(stream, out, { peerName, maxMessageBytes: this.maxMessageBytes, deadlineMs });
    } catch (err) {
      const e = toBurrowError(err);
      endWithStatus(stream, e.code, e.message);
      outcome = { code: e.code, details: e.message, requestBytes: 0, responseBytes: 0 };
    } finally {
      this.callEnded();
    }
    if (span) endRpcSpan(span, outcome.code, outcome.details, outcome.settledAt);
    return outcome;
  }

  /**
   * Asks this broker for a new certificate (Enrollment/Renew over mTLS). Rejects with the broker's
   * status when it refuses (revoked, expired) or the call fails.
   */
  async renew(csrPem: string, bundleVersion: number, timeoutMs = 15_000): Promise<IssuedAgentCertificate> {
    const def = ENROLLMENT_SERVICE.renew;
    const { tracing } = this.opts;
    const span = tracing.enabled
      ? startRpcSpan(tracing, SpanKind.CLIENT, def.path, ROOT_CONTEXT, {
          [BURROW_ATTRIBUTES.brokerId]: this.brokerId,
        })
      : undefined;
    const result = await unaryCall(
      this.platformSession(),
      def.path,
      def.requestSerialize({ csrPem, bundleVersion } satisfies RenewRequest),
      {
        authority: this.opts.address,
        peerName: `broker ${this.opts.address}`,
        deadlineMs: Date.now() + timeoutMs,
        maxMessageBytes: 1024 * 1024,
        headers: span ? { [TRACEPARENT_KEY]: traceparentOf(span) } : undefined,
      },
    );
    if (span) endRpcSpan(span, result.code, result.details);
    if (result.code !== Status.OK || !result.response)
      throw new BurrowError(result.code, `renewal at ${this.opts.address} failed: ${result.details}`);
    return def.responseDeserialize(result.response);
  }

  /** Tells the broker about a renewed certificate, so this session outlives the old one. */
  presentCredentials(certificateChainPem: string): void {
    if (this.welcome && !this.isClosed) this.channel?.send({ kind: 'credentials', certificateChainPem });
  }

  private protocolError(error: ProtocolError): void {
    this.opts.logger.warn('broker broke the tunnel protocol; closing the tunnel', {
      broker: this.opts.address,
      error: error.message,
    });
    this.close(error);
  }

  /** Ends the tunnel and its connections now; calls in flight fail. */
  close(error?: BurrowError): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closedError = error;
    this.draining = true;
    if (error) {
      this.h2?.destroy();
      this.socket?.destroy();
    } else {
      // Clean end: the last statuses may still sit in send buffers; GOAWAY and let them go out.
      this.channel?.end();
      this.h2?.close();
      const socket = this.socket;
      setTimeout(() => socket?.destroy(), 2_000).unref();
    }
    this.callSession?.close();
    if (this.welcome) this.opts.metrics.connectedBrokers.dec();
    this.emit('closed', error);
  }

  /**
   * Stops taking new calls and closes once the calls in flight are done (or `timeoutMs` passes).
   * Unless the broker asked for it (`brokerAsked`), the agent says it is leaving (Drain) and waits
   * for the broker's Drain that answers it: written after every call stream the broker opened
   * before, it means no call is still on its way (tunnel.proto, "Drain").
   */
  async drainAndClose(timeoutMs: number, brokerAsked = false, reason = 'agent leaving'): Promise<void> {
    if (this.isClosed) return;
    const alreadyDraining = this.draining;
    this.draining = true;
    if (!brokerAsked && !alreadyDraining && this.welcome && !this.brokerDrained) {
      this.channel?.send({ kind: 'drain', reason });
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(DRAIN_ACK_TIMEOUT_MS, timeoutMs));
        const done = (): void => {
          clearTimeout(timer);
          this.off('drain-ack', done);
          this.off('closed', done);
          resolve();
        };
        this.once('drain-ack', done);
        this.once('closed', done);
      });
    }
    if (this.isClosed) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(
        () => this.close(new BurrowError(Status.UNAVAILABLE, 'agent shut down before the call finished')),
        timeoutMs,
      );
      const check = (): void => {
        if (this.activeCalls === 0) this.close();
      };
      this.once('closed', () => {
        clearTimeout(timer);
        this.off('call-ended', check);
        resolve();
      });
      this.on('call-ended', check);
      check();
    });
  }

  private startDrain(reason: string): void {
    if (this.draining) return;
    this.draining = true;
    this.opts.logger.info('broker asked to drain; reconnecting', {
      broker: this.opts.address,
      reason,
      callsInFlight: this.activeCalls,
    });
    this.emit('drain', reason);
    void this.drainAndClose(this.opts.drainTimeoutMs, true);
  }

  private callEnded(): void {
    this.activeCalls--;
    this.opts.metrics.tunnelStreams.dec({ state: 'active' });
    this.emit('call-ended');
  }
}

/** The first value of `key` (lowercase) in node's flat raw header list, or undefined. */
function firstRawValue(raw: readonly string[], key: string): string | undefined {
  for (let i = 0; i + 1 < raw.length; i += 2) if (raw[i]!.toLowerCase() === key) return raw[i + 1];
  return undefined;
}
