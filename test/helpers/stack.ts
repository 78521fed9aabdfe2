import { Metadata, credentials } from '@grpc/grpc-js';
import { Agent, AGENT_DEFAULTS, type AgentConfig } from '@burrow/agent';
import { Broker, BROKER_DEFAULTS, type BrokerConfig } from '@burrow/broker';
import { silentLogger, type Logger, createLogger } from '@burrow/tunnel';
import { EchoUpstream } from './echo-upstream';
import { expectNoLeaks, snapshotResources, type ResourceSnapshot } from './leaks';
import { PkiFixture, type CertFiles } from './pki-fixture';
import { RawClient, mtlsCredentials } from './raw-grpc';

export const AGENT_ID = 'site-a';

const logger = (component: string): Logger =>
  process.env.BURROW_TEST_LOG
    ? createLogger({ level: process.env.BURROW_TEST_LOG, format: 'text', component })
    : silentLogger();

export interface StackOptions {
  broker?: Partial<BrokerConfig>;
  agent?: Partial<AgentConfig>;
  /** Start the agent (default true). */
  startAgent?: boolean;
  /** Loggers to use instead of the silent ones (e.g. a recording logger). */
  brokerLogger?: Logger;
  agentLogger?: Logger;
}

/**
 * A whole Burrow path in this process, on real sockets with real mTLS: PKI, broker, agent with an
 * echo upstream (site) and another echo upstream (platform), a caller client with a service
 * certificate, and a site client on the agent's local listener.
 */
export class Stack {
  pki!: PkiFixture;
  broker!: Broker;
  agent!: Agent;
  siteUpstream!: EchoUpstream;
  platformUpstream!: EchoUpstream;
  caller!: RawClient;
  siteClient!: RawClient;
  brokerCert!: CertFiles;
  agentCert!: CertFiles;
  serviceCert!: CertFiles;
  agentAddress = '';
  apiAddress = '';
  adminUrl = '';
  /** host:port of the AuthZEN HTTPS binding, when the broker config turned it on. */
  authzenAddress = '';
  /** host:port of the gateway listeners (Envoy ext_authz, forward auth), when the broker config turned them on. */
  extAuthzAddress = '';
  forwardAuthAddress = '';
  localAddress = '';
  brokerConfig!: BrokerConfig;
  private baseline: ResourceSnapshot = {};
  private agentLogger: Logger | undefined;
  agentConfig!: AgentConfig;

  static async start(opts: StackOptions = {}): Promise<Stack> {
    const s = new Stack();
    s.baseline = snapshotResources();
    s.pki = await PkiFixture.create();
    [s.brokerCert, s.agentCert, s.serviceCert] = await Promise.all([
      s.pki.issue('broker', 'broker-1'),
      s.pki.issue('agent', AGENT_ID),
      s.pki.issue('service', 'platform-svc'),
    ]);
    s.siteUpstream = await new EchoUpstream().start();
    s.platformUpstream = await new EchoUpstream().start();
    s.brokerConfig = {
      ...BROKER_DEFAULTS,
      agentListen: '127.0.0.1:0',
      apiListen: '127.0.0.1:0',
      adminListen: '127.0.0.1:0',
      tlsCertFile: s.brokerCert.cert,
      tlsKeyFile: s.brokerCert.key,
      caFile: s.brokerCert.ca,
      brokerId: 'broker-test',
      upstreams: [{ service: '*', address: s.platformUpstream.address }],
      agentWaitMs: 2_000,
      drainTimeoutMs: 5_000,
      ...opts.broker,
    };
    s.broker = new Broker(s.brokerConfig, opts.brokerLogger ?? logger('broker'));
    s.agentLogger = opts.agentLogger;
    const ports = await s.broker.start();
    s.agentAddress = `127.0.0.1:${ports.agentPort}`;
    s.apiAddress = `127.0.0.1:${ports.apiPort}`;
    s.adminUrl = `http://127.0.0.1:${ports.adminPort}`;
    if (ports.authzenPort) s.authzenAddress = `127.0.0.1:${ports.authzenPort}`;
    if (ports.extAuthzPort) s.extAuthzAddress = `127.0.0.1:${ports.extAuthzPort}`;
    if (ports.forwardAuthPort) s.forwardAuthAddress = `127.0.0.1:${ports.forwardAuthPort}`;
    s.caller = new RawClient(s.apiAddress, mtlsCredentials(s.serviceCert));
    if (opts.startAgent !== false) await s.startAgent(opts.agent);
    return s;
  }

  /** The config {@link startAgent} runs the test agent with: this stack's broker and certificates. */
  agentConfigWith(overrides: Partial<AgentConfig> = {}): AgentConfig {
    return {
      ...AGENT_DEFAULTS,
      brokers: [this.agentAddress],
      tlsCertFile: this.agentCert.cert,
      tlsKeyFile: this.agentCert.key,
      caFile: this.agentCert.ca,
      upstreams: [{ service: '*', address: this.siteUpstream.address }],
      localListen: '127.0.0.1:0',
      reconnectBaseMs: 50,
      reconnectMaxMs: 500,
      drainTimeoutMs: 5_000,
      ...overrides,
    };
  }

  async startAgent(overrides: Partial<AgentConfig> = {}): Promise<Agent> {
    this.agentConfig = this.agentConfigWith(overrides);
    this.agent = new Agent(this.agentConfig, this.agentLogger ?? logger('agent'));
    const ports = await this.agent.start();
    this.localAddress = `127.0.0.1:${ports.localPort}`;
    this.siteClient?.close();
    this.siteClient = new RawClient(this.localAddress, credentials.createInsecure());
    await this.agent.waitConnected();
    return this.agent;
  }

  /** Metadata naming the test agent. */
  md(extra: Record<string, string | Buffer> = {}, agentId = AGENT_ID): Metadata {
    const md = new Metadata();
    md.set('burrow-agent-id', agentId);
    for (const [k, v] of Object.entries(extra)) md.add(k, v);
    return md;
  }

  /**
   * Stops everything this stack started and asserts that every socket, server and timer it opened
   * is closed again. Stop anything else the test started first.
   */
  async stop(): Promise<void> {
    this.caller?.close();
    this.siteClient?.close();
    await this.agent?.stop();
    await this.broker?.stop();
    await this.siteUpstream?.stop();
    await this.platformUpstream?.stop();
    this.pki?.cleanup();
    await expectNoLeaks(this.baseline);
  }
}
