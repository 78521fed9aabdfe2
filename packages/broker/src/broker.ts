import { readFileSync } from 'node:fs';
import type * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Server, ServerCredentials, status as Status } from '@grpc/grpc-js';
import {
  BurrowError, HealthService, createAdminServer, UpstreamTable, callServerOptions, identityOfCertificate, installCatchAll,
  observeTlsClientErrors, tunnelServerOptions, upstreamChannelOptions, type Logger,
} from '@burrow/tunnel';

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
  private readonly agentListener: AgentListener;
  private readonly health = new HealthService();
  private readonly platformUpstreams: UpstreamTable;
  private readonly trustDomain: string;
  private admin: http.Server | undefined;
  private timers: NodeJS.Timeout[] = [];
  private draining = false;
  private started = false;
  private stopped = false;
  private stopping: Promise<void> | undefined;

  constructor(private readonly config: BrokerConfig, private readonly logger: Logger) {
    const own = identityOfCertificate(readFileSync(config.tlsCertFile));
    if (!own) throw new BurrowError(Status.INVALID_ARGUMENT, `${config.tlsCertFile} has no Burrow identity (one spiffe:// URI SAN)`);
    this.trustDomain = config.trustDomain ?? own.trustDomain;
    this.platformUpstreams = new UpstreamTable(config.upstreams, upstreamChannelOptions(config.maxMessageBytes));
    const isDraining = (): boolean => this.draining;
    this.agentListener = new AgentListener({
      registry: this.registry, metrics: this.metrics, logger, platformUpstreams: this.platformUpstreams,
      trustDomain: this.trustDomain, brokerId: config.brokerId, maxMessageBytes: config.maxMessageBytes, isDraining,
    });
    this.agentServer = new Server(tunnelServerOptions(config.maxMessageBytes, config.keepalive));
    this.agentListener.addTo(this.agentServer);
    this.apiServer = new Server(callServerOptions(config.maxMessageBytes, config.keepalive));
    this.health.addTo(this.apiServer);
    const api = new CallerApi({ registry: this.registry, metrics: this.metrics, logger, trustDomain: this.trustDomain, agentWaitMs: config.agentWaitMs, isDraining });
    installCatchAll(this.apiServer, api.handle);
  }

  /** Binds all listeners. Rejects with a message naming the address when one cannot be bound. */
  async start(): Promise<BrokerPorts> {
    const creds = ServerCredentials.createSsl(
      readFileSync(this.config.caFile),
      [{ cert_chain: readFileSync(this.config.tlsCertFile), private_key: readFileSync(this.config.tlsKeyFile) }],
      true,
    );
    const agentPort = await bind(this.agentServer, this.config.agentListen, creds);
    const apiPort = await bind(this.apiServer, this.config.apiListen, creds);
    const onTlsError = (listener: string) => (err: Error & { code?: string }): void => {
      this.metrics.rejectedHandshakes.inc({ listener, reason: 'tls' });
      this.logger.warn('TLS handshake refused', { listener, error: err.code ?? err.message });
    };
    observeTlsClientErrors(this.agentServer, onTlsError('agent'));
    observeTlsClientErrors(this.apiServer, onTlsError('api'));
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
    }, EXPIRY_CHECK_INTERVAL_MS));
    this.timers.push(setInterval(() => this.registry.retireIdle(this.config.idleOfferTtlMs), IDLE_SWEEP_INTERVAL_MS));
    for (const t of this.timers) t.unref();
    this.started = true;
    this.logger.info('broker started', { brokerId: this.config.brokerId, agentListen: this.config.agentListen, agentPort, apiListen: this.config.apiListen, apiPort, adminPort, trustDomain: this.trustDomain, platformUpstreams: this.config.upstreams.length });
    return { agentPort, apiPort, adminPort };
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
