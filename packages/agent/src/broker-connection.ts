import { EventEmitter } from 'node:events';
import {
  Client,
  Metadata,
  status as Status,
  type ChannelCredentials,
  type ClientDuplexStream,
  type ServerDuplexStream,
} from '@grpc/grpc-js';
import {
  BurrowError,
  CALLER_ID_KEY,
  CallStream,
  ENROLLMENT_SERVICE,
  AGENT_DRAIN_VERSION,
  PROTOCOL_VERSIONS,
  REPLICA_SET_VERSION,
  REUSABLE_OFFERS_VERSION,
  ProtocolError,
  SESSION_ID_KEY,
  TUNNEL_METHODS,
  answer,
  answerLocally,
  decodeSessionFrame,
  isIdle,
  abortConnectsOnChannelClose,
  encodeSessionFrame,
  identity,
  originate,
  serviceOfMethod,
  statusName,
  toBurrowError,
  tunnelChannelOptions,
  type CallOutcome,
  type IssuedAgentCertificate,
  type KeepaliveSettings,
  type RenewRequest,
  type Logger,
  type StartFrame,
  type UpstreamTable,
  type WelcomeFrame,
  recordCallFinished,
  answerUnimplemented,
} from '@burrow/tunnel';
import type { AgentMetrics } from './agent-metrics';
import type { BuiltinServices } from './builtin-services';

/** How long the agent waits for Welcome after opening its session stream. */
const WELCOME_TIMEOUT_MS = 10_000;

// An attempt given up on (no Welcome in time) must not leave its TLS handshake running.
abortConnectsOnChannelClose();

export interface BrokerConnectionOptions {
  address: string;
  credentials: ChannelCredentials;
  agentId: string;
  agentVersion: string;
  minIdleOffers: number;
  maxOffers: number;
  maxMessageBytes: number;
  /** How long calls in flight may run on after the broker asked the agent to drain. */
  drainTimeoutMs: number;
  keepalive: KeepaliveSettings;
  serverNameOverride?: string;
  upstreams: UpstreamTable;
  /** Services the agent answers itself (auth, policy), unless an upstream route names them. */
  builtins: BuiltinServices;
  metrics: AgentMetrics;
  logger: Logger;
}

/**
 * One connection from the agent to one broker: its own channel (HTTP/2 connection), the session
 * stream, the pool of idle Offer streams, and the Forward streams of site clients' calls.
 *
 * Events: `closed` (error?: BurrowError) once the session is over; `drain` when the broker asked
 * the agent to go elsewhere. After either, the connection takes no new calls; calls in flight
 * finish and then the channel closes by itself. `brokers` (set: BrokerEndpoint[]) for each
 * replica set the broker sends (protocol version 3); `trust-bundle` (pem, version).
 */
export class BrokerConnection extends EventEmitter {
  private readonly client: Client;
  private session: ClientDuplexStream<Buffer, Buffer> | undefined;
  private welcome: WelcomeFrame | undefined;
  // Invariant: idleOffers + activeCalls = tunnel streams this connection has open.
  private idleOffers = 0;
  private activeCalls = 0;
  private readonly offerStreams = new Set<CallStream>();
  private closedError: BurrowError | undefined;
  private isClosed = false;
  private draining = false;
  private callCounter = 0;

  constructor(private readonly opts: BrokerConnectionOptions) {
    super();
    const channelOptions: Record<string, string | number> = {
      ...tunnelChannelOptions(opts.maxMessageBytes, opts.keepalive),
    };
    if (opts.serverNameOverride) channelOptions['grpc.ssl_target_name_override'] = opts.serverNameOverride;
    this.client = new Client(opts.address, opts.credentials, channelOptions);
  }

  get address(): string {
    return this.opts.address;
  }
  /** True while the session is up and the broker has not asked us to drain. */
  get usable(): boolean {
    return this.welcome !== undefined && !this.isClosed && !this.draining;
  }
  get callsInFlight(): number {
    return this.activeCalls;
  }
  get idle(): number {
    return this.idleOffers;
  }
  get brokerId(): string {
    return this.welcome?.brokerId ?? '';
  }
  get protocolVersion(): number {
    return this.welcome?.protocolVersion ?? 0;
  }

  /**
   * Opens the session: Hello, then waits for Welcome. Rejects with the broker's refusal (wrong
   * certificate, no common version, draining) or UNAVAILABLE when it cannot be reached.
   */
  open(): Promise<WelcomeFrame> {
    return new Promise((resolve, reject) => {
      const call = this.client.makeBidiStreamRequest(TUNNEL_METHODS.session, identity, identity, new Metadata());
      this.session = call;
      const timer = setTimeout(() => {
        const err = new BurrowError(
          Status.UNAVAILABLE,
          `no welcome from broker ${this.opts.address} within ${WELCOME_TIMEOUT_MS} ms`,
        );
        reject(err);
        this.close(err);
      }, WELCOME_TIMEOUT_MS);
      call.on('error', () => {});
      call.on('data', (bytes: Buffer) => {
        let frame: ReturnType<typeof decodeSessionFrame>;
        try {
          frame = decodeSessionFrame(bytes);
          if (!this.welcome && frame.kind !== 'welcome')
            throw new ProtocolError(`session began with ${frame.kind}, not welcome`);
          if (this.welcome && (frame.kind === 'welcome' || frame.kind === 'hello'))
            throw new ProtocolError(`${frame.kind} frame after welcome`);
          if (frame.kind === 'welcome' && !PROTOCOL_VERSIONS.includes(frame.welcome.protocolVersion))
            throw new ProtocolError(
              `broker chose protocol version ${frame.welcome.protocolVersion}, which this agent does not speak`,
            );
          if (frame.kind === 'brokers' && this.welcome!.protocolVersion < REPLICA_SET_VERSION)
            throw new ProtocolError(
              `brokers frame on a session of protocol version ${this.welcome!.protocolVersion} (it ` +
                `needs ${REPLICA_SET_VERSION})`,
            );
        } catch (err) {
          const e = toBurrowError(err);
          clearTimeout(timer);
          reject(e);
          this.close(e);
          return;
        }
        switch (frame.kind) {
          case 'welcome':
            clearTimeout(timer);
            this.welcome = frame.welcome;
            this.opts.logger.info('tunnel session established', {
              broker: this.opts.address,
              brokerId: frame.welcome.brokerId,
              sessionId: frame.welcome.sessionId,
              protocolVersion: frame.welcome.protocolVersion,
            });
            this.opts.metrics.connectedBrokers.inc();
            this.addOffers(this.opts.minIdleOffers);
            resolve(frame.welcome);
            return;
          case 'demand':
            this.addOffers(frame.offers);
            return;
          case 'drain':
            this.startDrain(frame.reason);
            return;
          case 'trustBundle':
            this.emit('trust-bundle', frame.pem, frame.version);
            return;
          case 'brokers':
            this.emit('brokers', frame.brokers);
            return;
          default:
            return;
        }
      });
      call.on('status', (s) => {
        clearTimeout(timer);
        const err =
          s.code === Status.OK
            ? new BurrowError(Status.UNAVAILABLE, `broker ${this.opts.address} ended the session`)
            : new BurrowError(s.code, s.details || statusName(s.code));
        if (!this.welcome) reject(err);
        this.close(err);
      });
      call.write(
        encodeSessionFrame({
          kind: 'hello',
          hello: {
            protocolVersions: [...PROTOCOL_VERSIONS],
            agentVersion: this.opts.agentVersion,
            minIdleOffers: this.opts.minIdleOffers,
          },
        }),
      );
    });
  }

  /**
   * Carries one site client's call to the broker on a new Forward stream. Resolves with the
   * outcome once the client has its status.
   */
  forward(clientCall: ServerDuplexStream<Buffer, Buffer>): Promise<CallOutcome> {
    const md = new Metadata();
    md.set(SESSION_ID_KEY, this.welcome!.sessionId);
    const call = this.client.makeBidiStreamRequest(TUNNEL_METHODS.forward, identity, identity, md);
    const stream = new CallStream(call, 'client', 'originator', (err) => this.close(err));
    this.activeCalls++;
    this.opts.metrics.tunnelStreams.inc({ state: 'active' });
    return originate(clientCall, stream, {
      callId: `a${(++this.callCounter).toString(36)}`,
      peerName: `broker ${this.opts.address}`,
    }).then((outcome) => {
      this.callEnded();
      return outcome;
    });
  }

  /**
   * Asks this broker for a new certificate (Enrollment/Renew over this mTLS connection). Rejects
   * with the broker's status when it refuses (revoked, expired) or the call fails.
   */
  renew(csrPem: string, bundleVersion: number, timeoutMs = 15_000): Promise<IssuedAgentCertificate> {
    const def = ENROLLMENT_SERVICE.renew;
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        def.path,
        def.requestSerialize,
        def.responseDeserialize,
        { csrPem, bundleVersion } satisfies RenewRequest,
        new Metadata(),
        { deadline: Date.now() + timeoutMs },
        (err, res) =>
          err
            ? reject(new BurrowError(err.code, `renewal at ${this.opts.address} failed: ${err.details}`, err))
            : resolve(res!),
      );
    });
  }

  /** Tells the broker about a renewed certificate, so this session outlives the old one. */
  presentCredentials(certificateChainPem: string): void {
    if (this.session && this.welcome && !this.isClosed)
      this.session.write(encodeSessionFrame({ kind: 'credentials', certificateChainPem }));
  }

  /** Ends the session and the connection now; calls in flight fail with `error`. */
  close(error?: BurrowError): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closedError = error;
    this.draining = true;
    this.session?.cancel();
    for (const s of [...this.offerStreams])
      s.abort(error ?? new BurrowError(Status.UNAVAILABLE, 'agent connection closed'));
    if (this.welcome) this.opts.metrics.connectedBrokers.dec();
    this.client.close();
    this.emit('closed', error);
  }

  /**
   * Stops taking new calls; closes once calls in flight are done (or `timeoutMs` passes). When the
   * broker asked for the drain (`brokerAsked`), or was told with the agent's own Drain (protocol
   * version 3), the broker ends the idle offers itself: a Start it sent before may still be on its
   * way on any of them, so the agent keeps them and closes only once every offer stream has ended.
   * With an older broker the agent withdraws its idle offers at once.
   */
  drainAndClose(timeoutMs: number, brokerAsked = false, reason = 'agent leaving'): Promise<void> {
    const alreadyDraining = this.draining;
    this.draining = true;
    // From protocol version 3 on the agent says it is leaving, and the broker ends the idle offers
    // as it does for its own drain; an older broker cannot be told, so idle offers are withdrawn.
    const polite = brokerAsked || (this.welcome !== undefined && this.welcome.protocolVersion >= AGENT_DRAIN_VERSION);
    if (polite && !brokerAsked && !alreadyDraining && this.session && !this.isClosed)
      this.session.write(encodeSessionFrame({ kind: 'drain', reason }));
    if (!polite)
      for (const s of [...this.offerStreams])
        if (isIdle(s.callState)) s.abort(new BurrowError(Status.UNAVAILABLE, 'agent draining'));
    return new Promise((resolve) => {
      if (this.isClosed) return resolve();
      const timer = setTimeout(
        () => this.close(new BurrowError(Status.UNAVAILABLE, 'agent shut down before the call finished')),
        timeoutMs,
      );
      const check = (): void => {
        if (this.activeCalls === 0 && (!polite || this.offerStreams.size === 0)) this.close();
      };
      this.once('closed', () => {
        clearTimeout(timer);
        resolve();
      });
      this.on('stream-ended', check);
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
    this.emit('stream-ended');
  }

  private addOffers(count: number): void {
    const room = this.opts.maxOffers - this.idleOffers - this.activeCalls;
    const n = Math.min(count, room);
    for (let i = 0; i < n; i++) this.openOffer();
  }

  private openOffer(): void {
    if (this.isClosed || this.draining || !this.welcome) return;
    const md = new Metadata();
    md.set(SESSION_ID_KEY, this.welcome.sessionId);
    const call = this.client.makeBidiStreamRequest(TUNNEL_METHODS.offer, identity, identity, md);
    // From protocol version 2 on, an offer carries calls one after the other (tunnel.proto, "Offer").
    const stream = new CallStream(
      call,
      'client',
      'answerer',
      (err) => this.close(err),
      this.welcome.protocolVersion >= REUSABLE_OFFERS_VERSION,
    );
    this.offerStreams.add(stream);
    this.waitForCall(stream);
  }

  /** Counts `stream` as an idle offer and answers the next call that arrives on it. */
  private waitForCall(stream: CallStream): void {
    this.idleOffers++;
    this.opts.metrics.tunnelStreams.inc({ state: 'idle' });
    // These handlers stay attached through a call answered without an upstream call.
    let taken = false;
    stream.attach({
      onFrame: (frame) => {
        if (frame.kind !== 'start') return;
        taken = true;
        this.idleOffers--;
        this.activeCalls++;
        this.opts.metrics.tunnelStreams.dec({ state: 'idle' });
        this.opts.metrics.tunnelStreams.inc({ state: 'active' });
        // Keep the pool at the size the load needs. A single-call offer is replaced as soon as it
        // takes a call; a reusable one comes back when its call ends, so only the idle minimum is
        // topped up. The broker retires idle offers above the minimum after its idle TTL.
        const room = this.idleOffers + this.activeCalls < this.opts.maxOffers;
        if (room && (!stream.reusable || this.idleOffers < this.opts.minIdleOffers)) this.openOffer();
        void this.answerOffer(stream, frame.start);
      },
      onDrain: () => {},
      onClosed: () => {
        // An idle offer ending is the broker retiring it (or the connection going away).
        if (taken) return;
        this.idleOffers--;
        this.opts.metrics.tunnelStreams.dec({ state: 'idle' });
        this.offerStreams.delete(stream);
        this.emit('stream-ended');
      },
      onProtocolError: () => {}, // the owner callback above closes the connection
    });
  }

  private async answerOffer(stream: CallStream, start: StartFrame): Promise<void> {
    const startedMs = Date.now();
    // Taken now: once this call ends, the next one may already be on its way on the same stream.
    const callEnded = stream.whenCallEnded();
    const service = serviceOfMethod(start.method);
    // A route naming the service wins over the built-in one; the default route `*` does not.
    const local = this.opts.upstreams.hasRoute(service) ? undefined : this.opts.builtins.handlerFor(start.method);
    const upstream = local ? undefined : this.opts.upstreams.clientFor(start.method);
    let extraMetadata: Metadata | undefined;
    if (start.caller) {
      extraMetadata = new Metadata();
      extraMetadata.set(CALLER_ID_KEY, start.caller);
    }
    let outcome: Pick<CallOutcome, 'code' | 'details'> & Partial<CallOutcome>;
    if (!local && !upstream) {
      outcome = answerUnimplemented(stream, `agent "${this.opts.agentId}" has no upstream for service "${service}"`);
    } else {
      outcome = local
        ? await answerLocally(stream, start, local, { maxMessageBytes: this.opts.maxMessageBytes, extraMetadata })
        : await answer(stream, start, upstream!, { extraMetadata });
    }
    const reusable = await callEnded;
    if (reusable && !this.draining && !this.isClosed) {
      this.callEnded();
      this.waitForCall(stream);
    } else {
      this.offerStreams.delete(stream);
      if (reusable) {
        // Withdraw the offer by half-closing it after the call's last frames, and count the call
        // as over only once the broker has ended the stream: a cancel (or a process exit) now
        // could drop the Trailers still in the send buffer.
        stream.finish();
        await stream.whenClosed();
      }
      this.callEnded();
    }
    recordCallFinished(this.opts.logger, this.opts.metrics, {
      direction: 'from_broker',
      code: outcome.code,
      details: outcome.details,
      startedMs,
      requestBytes: outcome.requestBytes,
      responseBytes: outcome.responseBytes,
      log: { broker: this.opts.address, callId: start.callId, method: start.method },
    });
  }

  /** The error the session ended with, if it has ended. */
  get closeReason(): BurrowError | undefined {
    return this.closedError;
  }
}
