import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { hostname } from 'node:os';
import { Server, experimental, status as Status, type ServerCredentials, type ServerUnaryCall, type sendUnaryData } from '@grpc/grpc-js';
import {
  BurrowError, CredentialStore, ENROLLMENT_SERVICE, HealthService, createAdminServer, UpstreamTable, callServerOptions,
  cachePeerCertificates, identityOfCertificate, installCatchAll, observeTlsClientErrors, tunnelServerOptions, upstreamChannelOptions,
  type IssuedAgentCertificate, type Logger, type RenewRequest,
} from '@burrow/tunnel';
import { BrokerPki } from './broker-pki';

import { AgentListener } from './agent-listener';
import type { BrokerConfig } from './broker-config';
import { BrokerMetrics } from './broker-metrics';
import { CallerApi } from './caller-api';
import { TunnelRegistry } from './tunnel-registry';

/** The ports a started broker listens on (useful with port 0). */
export interface BrokerPorts { agentPort: number; apiPort: number; adminPort?: number }

// How often the broker looks for expired agent certificates and idle offers to retire.
const EXPIRY_CHECK_INTERVAL_MS = 1_000;
const IDLE_SWEEP_INTERVAL_MS = 10_000;

function splitHostPort(text: string): { host: string; port: number } {
  const i = text.lastIndexOf(':');
  return { host: text.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(text.slice(i + 1)) };
}

function bind(server: Server, address: string, creds: ServerCredentials): Promise<number> {
  return new Promise((resolve, reject) =>
    server.bindAsync(address, creds, (err, port) => (err ? reject(new Error(`cannot listen on ${address}: ${err.message}`)) : resolve(port))));
}

/**
 * A Burrow broker: the agent listener (tunnels), the caller API and the admin listener, wired to
 * one tunnel registry. Construct, `start()`, and `stop()` to drain and shut down.
 */
export class Broker {
  readonly registry = new TunnelRegistry();
  readonly metrics = new BrokerMetrics(() => this.registry.counts());
  private readonly agentServer: Server;
  private readonly apiServer: Server;
  private agentListener!: AgentListener;
  private readonly health = new HealthService();
  private readonly platformUpstreams: UpstreamTable;
  private readonly pki: BrokerPki | undefined;
  private tls: CredentialStore | undefined;
  private trustDomain = '';
  private admin: http.Server | undefined;
  private timers: NodeJS.Timeout[] = [];
  private draining = false;
  private started = false;
  private stopped = false;
  private stopping: Promise<void> | undefined;

  constructor(private readonly config: BrokerConfig, private readonly logger: Logger) {
    if (!config.pkiDir && !(config.tlsCertFile && config.tlsKeyFile && config.caFile)) {
      throw new BurrowError(Status.INVALID_ARGUMENT, 'tls-cert, tls-key and ca are required without pki-dir');
    }
    this.platformUpstreams = new UpstreamTable(config.upstreams, upstreamChannelOptions(config.maxMessageBytes));
    this.agentServer = new Server(tunnelServerOptions(config.maxMessageBytes, config.keepalive));
    this.apiServer = new Server(callServerOptions(config.maxMessageBytes, config.keepalive));
    if (config.pkiDir) {
      const defaultIps = ['127.0.0.1', '::1'];
      this.pki = new BrokerPki({
        dir: config.pkiDir, logger, metrics: this.metrics, issueOwnCertificate: !config.tlsCertFile,
        dns: config.tlsDns.length ? config.tlsDns : [hostname(), 'localhost'], ip: config.tlsIp.length || config.tlsDns.length ? config.tlsIp : defaultIps,
        leafTtlMs: config.leafTtlMs, enrollPerMinute: config.enrollPerMinute,
      });
    }
  }

  /** The broker's current TLS material (tests, status). */
  get credentials(): CredentialStore | undefined { return this.tls; }

  /** Loads credentials and binds all listeners. Rejects with a message naming what failed. */
  async start(): Promise<BrokerPorts> {
    const material = await this.loadTlsMaterial();
    this.tls = new CredentialStore(material);
    const own = identityOfCertificate(new X509Certificate(material.certPem).raw);
    if (!own || own.role !== 'broker') throw new BurrowError(Status.INVALID_ARGUMENT, 'tls-cert: not a broker certificate (URI SAN spiffe://<trust-domain>/broker)');
    this.trustDomain = this.config.trustDomain ?? own.trustDomain;
    const isDraining = (): boolean => this.draining;
    const isRevoked = this.pki ? this.pki.isRevoked.bind(this.pki) : () => false;
    this.agentListener = new AgentListener({
      registry: this.registry, metrics: this.metrics, logger: this.logger, platformUpstreams: this.platformUpstreams,
      trustDomain: this.trustDomain, brokerId: this.config.brokerId, maxMessageBytes: this.config.maxMessageBytes, isDraining,
      isRevoked, trustBundlePem: () => this.tls!.caPem,
    });
    this.agentListener.addTo(this.agentServer);
    if (this.pki) {
      const pki = this.pki;
      this.agentServer.addService(ENROLLMENT_SERVICE, {
        enroll: pki.enroll,
        renew: (call: ServerUnaryCall<RenewRequest, IssuedAgentCertificate>, cb: sendUnaryData<IssuedAgentCertificate>) => pki.renew(call, cb, this.trustDomain),
      });
    }
    this.health.addTo(this.apiServer);
    const api = new CallerApi({ registry: this.registry, metrics: this.metrics, logger: this.logger, trustDomain: this.trustDomain, agentWaitMs: this.config.agentWaitMs, isDraining, isRevoked });
    installCatchAll(this.apiServer, api.handle);

    // With enrollment on, the agent listener asks for a client certificate without requiring one:
    // Enroll is the only method that works without (every other method checks the identity).
    const agentCreds = experimental.createCertificateProviderServerCredentials(this.tls, this.tls, !this.pki);
    const apiCreds = experimental.createCertificateProviderServerCredentials(this.tls, this.tls, true);
    const agentPort = await bind(this.agentServer, this.config.agentListen, agentCreds);
    const apiPort = await bind(this.apiServer, this.config.apiListen, apiCreds);
    const onTlsError = (listener: string) => (err: Error & { code?: string }, socket?: import('node:tls').TLSSocket): void => {
      this.metrics.rejectedHandshakes.inc({ listener, reason: 'tls' });
      // Node reports a refused client certificate as a reset; the reason is on the socket.
      const reason = (socket as { authorizationError?: Error } | undefined)?.authorizationError;
      this.logger.warn('TLS handshake refused', { listener, peer: socket?.remoteAddress, error: reason ? String(reason) : err.code ?? err.message });
    };
    observeTlsClientErrors(this.agentServer, onTlsError('agent'));
    observeTlsClientErrors(this.apiServer, onTlsError('api'));
    cachePeerCertificates(this.agentServer);
    cachePeerCertificates(this.apiServer);
    let adminPort: number | undefined;
    if (this.config.adminListen) {
      const admin = createAdminServer({ metrics: this.metrics.registry, json: { '/agents': () => this.registry.summaries() }, isReady: () => this.started && !this.draining });
      this.admin = admin;
      const { host, port } = splitHostPort(this.config.adminListen);
      await new Promise<void>((resolve, reject) => {
        admin.once('error', (err) => reject(new Error(`cannot listen on ${this.config.adminListen}: ${err.message}`)));
        admin.listen(port, host, () => resolve());
      });
      adminPort = (admin.address() as AddressInfo).port;
    }
    this.timers.push(setInterval(() => {
      const closed = this.agentListener.closeExpired();
      if (closed) this.logger.warn('closed tunnels of agents whose certificate expired', { sessions: closed });
      const earliest = this.agentListener.earliestAgentExpiryMs();
      if (earliest !== undefined) this.metrics.certificateExpiry.set({ role: 'agent' }, (earliest - Date.now()) / 1000);
    }, EXPIRY_CHECK_INTERVAL_MS));
    this.timers.push(setInterval(() => this.registry.retireIdle(this.config.idleOfferTtlMs), IDLE_SWEEP_INTERVAL_MS));

    for (const t of this.timers) t.unref();
    this.pki?.start(this.tls, {
      onRevocationsChanged: () => {
        const closed = this.agentListener.closeRevoked();
        if (closed) this.logger.warn('closed tunnels of revoked agents', { sessions: closed });
      },
      onTrustBundleChanged: (pem, version) => this.agentListener.broadcastTrustBundle(pem, version),
    });
    this.started = true;
    this.logger.info('broker started', { pkiDir: this.config.pkiDir, enrollment: Boolean(this.pki), brokerId: this.config.brokerId, agentListen: this.config.agentListen, agentPort, apiListen: this.config.apiListen, apiPort, adminPort, trustDomain: this.trustDomain, platformUpstreams: this.config.upstreams.length });
    return { agentPort, apiPort, adminPort };
  }

  /** Reads the TLS material from files, or from the PKI directory (issuing our own certificate). */
  private async loadTlsMaterial(): Promise<{ caPem: string; certPem: string; keyPem: string }> {
    const read = (file: string): string => readFileSync(file, 'utf8');
    if (!this.pki) return { caPem: read(this.config.caFile!), certPem: read(this.config.tlsCertFile!), keyPem: read(this.config.tlsKeyFile!) };
    const fromPki = await this.pki.load();
    const caPem = this.config.caFile ? read(this.config.caFile) : fromPki.caPem;
    if (this.config.tlsCertFile) {
      // An operator-supplied certificate: serve it with the bundle's roots appended, so that an
      // enrolling agent finds the CA its join token pins.
      return { caPem, certPem: `${read(this.config.tlsCertFile).trimEnd()}\n${fromPki.caPem}`, keyPem: read(this.config.tlsKeyFile!) };
    }
    return { caPem, certPem: fromPki.certPem!, keyPem: fromPki.keyPem! };
  }

  get isDraining(): boolean { return this.draining; }

  /** Cuts off every tunnel of `agentId` at once (used by revocation). */
  disconnectAgent(agentId: string, reason: string): number {
    return this.agentListener.disconnectAgent(agentId, new BurrowError(Status.PERMISSION_DENIED, reason));
  }

  /**
   * Graceful shutdown: stop taking calls, tell agents to reconnect elsewhere, let calls in flight
   * finish for up to `drainTimeoutMs`, then close everything. Idempotent.
   */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    this.draining = true;
    this.health.setStatus('NOT_SERVING');
    this.health.close();
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    this.pki?.stop();
    this.agentListener.drainAll('broker shutting down');
    const inFlight = this.registry.counts().activeCalls;
    this.logger.info('broker draining', { callsInFlight: inFlight, drainTimeoutMs: this.config.drainTimeoutMs });
    const drained = (async () => {
      await new Promise<void>((resolve) => this.apiServer.tryShutdown(() => resolve()));
      // Calls from agents (Forward streams) finish before the sessions go away.
      await this.waitFor(() => this.registry.counts().activeCalls === 0);
      this.agentListener.closeAll(new BurrowError(Status.UNAVAILABLE, 'broker shut down'));
      await new Promise<void>((resolve) => this.agentServer.tryShutdown(() => resolve()));
    })();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      drained.then(() => false),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), this.config.drainTimeoutMs); }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      this.logger.warn('drain timeout reached; cutting off calls still in flight', { callsInFlight: this.registry.counts().activeCalls });
      this.agentListener.closeAll(new BurrowError(Status.UNAVAILABLE, 'broker shut down before the call finished'));
      this.apiServer.forceShutdown();
      this.agentServer.forceShutdown();
    }
    this.stopped = true;
    this.platformUpstreams.close();
    if (this.admin) {
      const admin = this.admin;
      admin.closeAllConnections();
      await new Promise<void>((resolve) => admin.close(() => resolve()));
    }
    this.logger.info('broker stopped', { drained: !timedOut });
  }

  // Only for the drain, where "no call in flight" has no event of its own; stops with the broker.
  private waitFor(condition: () => boolean): Promise<void> {
    return new Promise((resolve) => {
      if (condition()) return resolve();
      const t = setInterval(() => {
        if (condition() || this.stopped) { clearInterval(t); resolve(); }
      }, 20);
    });
  }
}
