import { once } from 'node:events';
import { expect } from 'chai';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import {
  AGENT_DEFAULTS,
  Agent,
  chooseTargets,
  expandConfigured,
  rendezvousScore,
  type HostResolver,
  type TargetSpec,
} from '@burrow/agent';
import { Broker, type BrokerConfig } from '@burrow/broker';
import { ProtocolError, silentLogger, type BrokerEndpoint, type SessionFrame, type WelcomeFrame } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { RawAgent, type RawControl } from './helpers/raw-agent';
import { RawClient, collect, mtlsCredentials } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';
import { pollUntil } from './helpers/wait';

/**
 * Broker replicas (the Brokers session frame of tunnel.proto): brokers advertise the replica
 * set, agents keep tunnels to several brokers, converge when the set changes, and keep serving
 * through the remaining tunnels when one broker goes away. In-process brokers on port 0, real
 * sockets, real mTLS.
 */

/** Where the broker tells its agents' sessions the replica set and the trust bundle. */
const listenerOf = (broker: Broker): Broker['agentSessions'] => broker.agentSessions;

const sessions = (b: Broker): number => b.registry.counts().sessions;

describe('broker replica set: choosing targets (pure)', () => {
  const configured = (address: string): TargetSpec => ({ address, source: 'configured', configuredAs: address });
  const set = (...ids: string[]): BrokerEndpoint[] =>
    ids.map((id, i) => ({ brokerId: id, address: `10.0.0.${i + 1}:7443` }));

  it('keeps configured targets, skips brokers already reached by id or address, and stops at maxBrokers', () => {
    const targets = chooseTargets({
      agentId: 'site-a',
      configured: [configured('10.0.0.1:7443')],
      knownIds: new Map([['10.0.0.1:7443', 'a']]),
      replicaSet: set('a', 'b', 'c', 'd'),
      maxBrokers: 3,
    });
    expect(targets.map((t) => t.source)).to.deep.equal(['configured', 'learned', 'learned']);
    expect(targets.filter((t) => t.advertisedId === 'a')).to.have.length(0);
    // A configured target whose broker id is not known yet counts as a broker of its own.
    expect(
      chooseTargets({
        agentId: 'site-a',
        configured: [configured('broker.example:7443')],
        knownIds: new Map(),
        replicaSet: set('a', 'b'),
        maxBrokers: 2,
      }),
    ).to.have.length(2);
    expect(
      chooseTargets({
        agentId: 'site-a',
        configured: [configured('x:1'), configured('y:1')],
        knownIds: new Map(),
        replicaSet: set('a', 'b'),
        maxBrokers: 1,
      }),
    ).to.have.length(2);
  });

  it(
    'chooses by rendezvous hashing: stable, spread over brokers, ' + 'and a broker leaving moves only its own agents',
    () => {
      const ids = ['b1', 'b2', 'b3', 'b4', 'b5'];
      const choice = (agentId: string, brokers: string[]): string[] =>
        chooseTargets({ agentId, configured: [], knownIds: new Map(), replicaSet: set(...brokers), maxBrokers: 2 })
          .map((t) => t.advertisedId!)
          .sort();
      const load = new Map(ids.map((id) => [id, 0]));
      let moved = 0;
      for (let i = 0; i < 500; i++) {
        const agentId = `site-${i}`;
        const before = choice(agentId, ids);
        expect(choice(agentId, [...ids].reverse()), 'independent of the order of the set').to.deep.equal(before);
        for (const id of before) load.set(id, load.get(id)! + 1);
        const after = choice(
          agentId,
          ids.filter((id) => id !== 'b3'),
        );
        if (!before.includes('b3'))
          expect(after, 'agents that did not pick b3 keep their brokers').to.deep.equal(before);
        else moved++;
      }
      // 500 agents x 2 picks over 5 brokers: 200 each on average.
      for (const [id, n] of load) expect(n, id).to.be.within(140, 260);
      expect(moved).to.equal(load.get('b3'));
      expect(rendezvousScore('site-1', 'b1')).to.equal(rendezvousScore('site-1', 'b1'));
    },
  );

  it('expands a configured name to one target per address, keeping the name as the TLS server name', async () => {
    const resolver: HostResolver = async (host) =>
      host === 'brokers.example' ? ['10.0.0.2', '10.0.0.1', '10.0.0.2', 'fd00::1'] : [];
    const { specs } = await expandConfigured('brokers.example:7443', resolver);
    expect(specs.map((t) => [t.address, t.serverName])).to.deep.equal([
      ['10.0.0.1:7443', 'brokers.example'],
      ['10.0.0.2:7443', 'brokers.example'],
      ['[fd00::1]:7443', 'brokers.example'],
    ]);
    expect(
      (await expandConfigured('brokers.example:7443', resolver, 'override.example')).specs[0]!.serverName,
    ).to.equal('override.example');
    expect(
      (await expandConfigured('127.0.0.1:7443', () => Promise.reject(new Error('not asked')))).specs.map(
        (t) => t.address,
      ),
    ).to.deep.equal(['127.0.0.1:7443']);
    const failed = await expandConfigured('nowhere.example:7443', () => Promise.reject(new Error('ENOTFOUND')));
    expect(failed.specs.map((t) => t.address)).to.deep.equal(['nowhere.example:7443']);
    expect(failed.error?.message).to.equal('ENOTFOUND');
  });
});

describe('broker replica set: the Brokers frame on the wire', () => {
  let stack: Stack;
  const raws: RawAgent[] = [];
  before(async () => {
    stack = await Stack.start({ startAgent: false });
  });
  afterEach(() => {
    for (const a of raws.splice(0)) a.close();
  });
  after(async () => {
    await stack?.stop();
  });

  /** A raw agent whose session was welcomed; its control stream for reading what follows. */
  const connect = async (): Promise<{ control: RawControl; welcome: WelcomeFrame }> => {
    const a = await RawAgent.connect(stack.agentAddress, stack.agentCert);
    raws.push(a);
    return a.welcome();
  };
  /** The broker's next frame on `control`, which must be of `kind`. */
  const expectNext = async <K extends SessionFrame['kind']>(
    control: RawControl,
    kind: K,
  ): Promise<Extract<SessionFrame, { kind: K }>> => {
    const f = await control.next();
    if (f?.kind !== kind) throw new Error(`expected ${kind}, got ${f ? f.kind : 'the end of the control stream'}`);
    return f as Extract<SessionFrame, { kind: K }>;
  };
  const SET: BrokerEndpoint[] = [
    { brokerId: 'broker-test', address: '127.0.0.1:7443' },
    { brokerId: 'broker-2', address: 'broker-2.example:7443' },
  ];

  it('a session gets every broadcast set, the empty one included, in order with other frames', async () => {
    const { control, welcome } = await connect();
    expect(welcome.protocolVersion).to.equal(4);
    listenerOf(stack.broker).broadcastReplicaSet(SET);
    expect(await expectNext(control, 'brokers')).to.deep.equal({ kind: 'brokers', brokers: SET });
    listenerOf(stack.broker).broadcastReplicaSet([]);
    expect(await expectNext(control, 'brokers')).to.deep.equal({ kind: 'brokers', brokers: [] });
    listenerOf(stack.broker).broadcastTrustBundle('pem', 7);
    expect(await expectNext(control, 'trustBundle')).to.deep.include({ pem: 'pem', version: 7 });
  });

  it('a new session gets the current set right after Welcome, and none while the set is empty', async () => {
    listenerOf(stack.broker).broadcastReplicaSet(SET);
    const first = await connect();
    expect(await expectNext(first.control, 'brokers')).to.deep.equal({ kind: 'brokers', brokers: SET });
    listenerOf(stack.broker).broadcastReplicaSet([]);
    expect(await expectNext(first.control, 'brokers')).to.deep.equal({ kind: 'brokers', brokers: [] });
    // With the set empty a new session gets no Brokers frame: frames on one stream arrive in order,
    // so one sent after Welcome would come before this TrustBundle.
    const second = await connect();
    listenerOf(stack.broker).broadcastTrustBundle('pem', 8);
    expect((await second.control.next())?.kind).to.equal('trustBundle');
    expect((await first.control.next())?.kind).to.equal('trustBundle');
  });

  it('broadcastReplicaSet refuses a set the frame cannot carry, before sending anything', async () => {
    const { control } = await connect();
    expect(() => listenerOf(stack.broker).broadcastReplicaSet([{ brokerId: 'x', address: 'no-port' }])).to.throw(
      ProtocolError,
      /address "no-port" is not HOST:PORT/,
    );
    expect(() =>
      listenerOf(stack.broker).broadcastReplicaSet(
        Array.from({ length: 65 }, (_, i) => ({ brokerId: `b${i}`, address: 'h:1' })),
      ),
    ).to.throw(ProtocolError, /at most 64/);
    // Nothing went out: the next frame the session sees is the one sent after the refusals.
    listenerOf(stack.broker).broadcastTrustBundle('pem', 9);
    expect((await control.next())?.kind).to.equal('trustBundle');
  });
});

describe('broker replica set: agents and several brokers', function () {
  this.timeout(30_000);
  let stack: Stack;
  const extra: Broker[] = [];
  const clients: RawClient[] = [];

  /** Another broker of the stack's PKI on port 0 (or `agentListen`). */
  async function startBroker(
    brokerId: string,
    overrides: Partial<BrokerConfig> = {},
  ): Promise<{ broker: Broker; endpoint: BrokerEndpoint; caller: RawClient }> {
    const broker = new Broker(
      { ...stack.brokerConfig, brokerId, adminListen: undefined, ...overrides },
      silentLogger(),
    );
    extra.push(broker);
    const ports = await broker.start();
    const host = (overrides.agentListen ?? '127.0.0.1:0').split(':')[0]!;
    const caller = new RawClient(`127.0.0.1:${ports.apiPort}`, mtlsCredentials(stack.serviceCert));
    clients.push(caller);
    return { broker, endpoint: { brokerId, address: `${host}:${ports.agentPort}` }, caller };
  }
  const brokerA = (): BrokerEndpoint => ({ brokerId: 'broker-test', address: stack.agentAddress });

  beforeEach(async () => {
    stack = await Stack.start({ startAgent: false });
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await stack.agent?.stop();
    for (const b of extra.splice(0)) await b.stop();
    await stack.stop();
  });

  const targetsOf = (agent: Agent) =>
    agent.brokerTargets().map((t) => ({ broker: t.broker, source: t.source, brokerId: t.brokerId }));
  const gauge = async (agent: Agent, name: 'brokersConnected' | 'brokersKnown'): Promise<number> =>
    (await agent.metrics[name].get()).values[0]!.value;

  it(
    'an agent configured with broker A only learns {A, B} from A, opens a tunnel to B, and drains it without ' +
      'failing a call when A advertises {A}',
    async () => {
      const b = await startBroker('broker-b');
      const agent = await stack.startAgent();
      expect(await gauge(agent, 'brokersKnown')).to.equal(0);
      listenerOf(stack.broker).broadcastReplicaSet([brokerA(), b.endpoint]);
      await pollUntil('condition', () => sessions(b.broker) === 1 && agent.brokerTargets().every((t) => t.usable));
      expect(sessions(stack.broker), 'A is not dialled twice').to.equal(1);
      expect(targetsOf(agent)).to.deep.equal([
        { broker: stack.agentAddress, source: 'configured', brokerId: 'broker-test' },
        { broker: b.endpoint.address, source: 'learned', brokerId: 'broker-b' },
      ]);
      expect(await gauge(agent, 'brokersConnected')).to.equal(2);
      expect(await gauge(agent, 'brokersKnown')).to.equal(2);
      // A call through B is in flight (request still open) when B leaves the set.
      const call = b.caller.bidi(ECHO.bidi, stack.md());
      const result = collect(call);
      call.write(Buffer.from('before the drain'));
      await once(stack.siteUpstream, 'call');
      listenerOf(stack.broker).broadcastReplicaSet([brokerA()]);
      await pollUntil('condition', () => agent.brokerTargets().length === 1);
      call.write(Buffer.from(', after it'));
      call.end();
      const r = await result;
      expect(r.status.code, r.status.details).to.equal(Status.OK);
      expect(Buffer.concat(r.messages).toString()).to.equal('before the drain, after it');
      await pollUntil('condition', () => sessions(b.broker) === 0);
      expect(sessions(stack.broker)).to.equal(1);
      expect(await gauge(agent, 'brokersConnected')).to.equal(1);
      expect(await gauge(agent, 'brokersKnown')).to.equal(1);
      // Calls keep working through A, from the platform and from the site.
      expect((await stack.caller.unary(ECHO.unary, Buffer.from('via A'), stack.md())).response.toString()).to.equal(
        'via A',
      );
      expect((await stack.siteClient.unary(ECHO.unary, Buffer.from('up'))).response.toString()).to.equal('up');
    },
  );

  it(
    'a broker that stops: its call in flight fails with ' +
      'UNAVAILABLE, new calls go through the other tunnel at once',
    async () => {
      const b = await startBroker('broker-b', { drainTimeoutMs: 300 });
      const agent = await stack.startAgent({ brokerWaitMs: 5_000 });
      listenerOf(stack.broker).broadcastReplicaSet([brokerA(), b.endpoint]);
      await pollUntil('condition', () => sessions(b.broker) === 1 && agent.brokerTargets().every((t) => t.usable));
      const inFlight = b.caller.unary(ECHO.hang, Buffer.from('x'), stack.md()).then(
        () => undefined,
        (e: ServiceError) => e,
      );
      await once(stack.siteUpstream, 'call');
      const stopped = b.broker.stop();
      await pollUntil('condition', () => agent.brokerTargets().filter((t) => t.usable).length === 1);
      // No waiting for the broker that is going away: both directions answer well within brokerWait.
      const t0 = Date.now();
      const [platform, site] = await Promise.all([
        stack.caller.unary(ECHO.unary, Buffer.from('platform'), stack.md(), { deadline: Date.now() + 2_000 }),
        stack.siteClient.unary(ECHO.unary, Buffer.from('site'), new Metadata(), { deadline: Date.now() + 2_000 }),
      ]);
      expect(Date.now() - t0).to.be.below(1_000);
      expect(platform.response.toString()).to.equal('platform');
      expect(site.response.toString()).to.equal('site');
      const err = await inFlight;
      expect(err?.code, err?.details).to.equal(Status.UNAVAILABLE);
      await stopped;
      // B is gone but still in the set: the agent keeps trying it and keeps serving through A.
      expect((await stack.siteClient.unary(ECHO.unary, Buffer.from('still'))).response.toString()).to.equal('still');
      expect(await gauge(agent, 'brokersConnected')).to.equal(1);
    },
  );

  it('the same --broker given twice is still two tunnels to it (HA), and the replica set adds no third', async () => {
    const agent = await stack.startAgent({ brokers: [stack.agentAddress, stack.agentAddress] });
    listenerOf(stack.broker).broadcastReplicaSet([brokerA()]);
    await pollUntil('condition', () => sessions(stack.broker) === 2 && agent.knownReplicaSet.length === 1);
    expect(targetsOf(agent).map((t) => t.source)).to.deep.equal(['configured', 'configured']);
    expect(await gauge(agent, 'brokersConnected')).to.equal(1);
  });

  it('--max-brokers: with 2, one of B and C is chosen by rendezvous hashing; with 1, none', async () => {
    const [b, c] = await Promise.all([startBroker('broker-b'), startBroker('broker-c')]);
    const agent = await stack.startAgent({ maxBrokers: 2 });
    const expected = rendezvousScore(agent.agentId, 'broker-b') > rendezvousScore(agent.agentId, 'broker-c') ? b : c;
    const other = expected === b ? c : b;
    listenerOf(stack.broker).broadcastReplicaSet([brokerA(), b.endpoint, c.endpoint]);
    await pollUntil('condition', () => sessions(expected.broker) === 1 && agent.brokerTargets().every((t) => t.usable));
    expect(targetsOf(agent).map((t) => t.brokerId)).to.deep.equal(['broker-test', expected.endpoint.brokerId]);
    expect(sessions(other.broker)).to.equal(0);
    await agent.stop();

    const one = await stack.startAgent({ maxBrokers: 1 });
    listenerOf(stack.broker).broadcastReplicaSet([brokerA(), b.endpoint, c.endpoint]);
    await pollUntil('condition', () => one.knownReplicaSet.length === 3);
    expect(targetsOf(one).map((t) => t.brokerId)).to.deep.equal(['broker-test']);
    expect(sessions(b.broker) + sessions(c.broker)).to.equal(0);
  });

  it(
    'a configured name that resolves to two addresses gives two tunnels, ' + 'and one again when DNS drops an address',
    async () => {
      const cert = await stack.pki.issue('broker', 'brokers', { dns: ['brokers.test'] });
      const tls = { tlsCertFile: cert.cert, tlsKeyFile: cert.key, caFile: cert.ca };
      const one = await startBroker('broker-dns-1', { ...tls, agentListen: '127.0.0.1:0' });
      const port = one.endpoint.address.split(':')[1]!;
      const two = await startBroker('broker-dns-2', { ...tls, agentListen: `127.0.0.2:${port}` });
      let addresses = ['127.0.0.1', '127.0.0.2'];
      const asked: string[] = [];
      const resolver: HostResolver = async (host) => {
        asked.push(host);
        return addresses;
      };
      // Stack.startAgent has no resolver option: this agent is started by hand on the stack's files.
      const agent = new Agent(
        {
          ...AGENT_DEFAULTS,
          brokers: [`brokers.test:${port}`],
          tlsCertFile: stack.agentCert.cert,
          tlsKeyFile: stack.agentCert.key,
          caFile: stack.agentCert.ca,
          upstreams: [{ service: '*', address: stack.siteUpstream.address }],
          reconnectBaseMs: 50,
          reconnectMaxMs: 500,
          drainTimeoutMs: 5_000,
        },
        silentLogger(),
        '0.0.0',
        undefined,
        { resolveHost: resolver, resolveIntervalMs: 50 },
      );
      try {
        await agent.start();
        await pollUntil(
          'condition',
          () =>
            sessions(one.broker) === 1 && sessions(two.broker) === 1 && agent.brokerTargets().every((t) => t.usable),
        );
        expect(asked[0]).to.equal('brokers.test');
        expect(
          agent
            .brokerTargets()
            .map((t) => [t.broker, t.source, t.configuredAs, t.brokerId])
            .sort(),
        ).to.deep.equal([
          [`127.0.0.1:${port}`, 'configured', `brokers.test:${port}`, 'broker-dns-1'],
          [`127.0.0.2:${port}`, 'configured', `brokers.test:${port}`, 'broker-dns-2'],
        ]);
        addresses = ['127.0.0.1'];
        await pollUntil('condition', () => sessions(two.broker) === 0 && agent.brokerTargets().length === 1);
        expect(sessions(one.broker)).to.equal(1);
      } finally {
        await agent.stop();
      }
    },
  );
});
