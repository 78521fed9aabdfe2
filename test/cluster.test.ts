import { expect } from 'chai';
import { rmSync } from 'node:fs';
import * as path from 'node:path';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import { initPki, issueCertificate, revoke, writeIssued } from '@burrow/pki';
import { status as Status, type ServiceError } from '@grpc/grpc-js';
import { Broker, BROKER_DEFAULTS, type BrokerConfig, type ClusterConfig } from '@burrow/broker';
import { silentLogger } from '@burrow/tunnel';
import { ECHO, metadataJson } from './helpers/echo-upstream';
import { freePorts } from './helpers/free-port';
import { expectNoLeaks, snapshotResources } from './helpers/leaks';
import { makeTempDir } from './helpers/pki-fixture';
import { RawClient, collect, mtlsCredentials } from './helpers/raw-grpc';
import { TestRedis } from './helpers/redis-server';
import { AGENT_ID, Stack } from './helpers/stack';
import { pollUntil } from './helpers/wait';

/**
 * Broker clustering, in one process: two brokers share a test's own Redis; the agent holds a
 * tunnel to broker A only, and callers of broker B reach it through B's directory lookup and the
 * peer API. Real sockets, real mTLS, a real redis-server.
 */
describe('broker cluster (in process)', function () {
  this.timeout(30_000);
  let redis: TestRedis;
  let stack: Stack;
  let brokerB: Broker;
  let callerB: RawClient;
  let prefix = '';
  let run = 0;

  const clusterConfig = (peerPort: number): ClusterConfig => ({
    redisUrl: redis.url,
    redisKeyPrefix: prefix,
    advertise: `127.0.0.1:${peerPort}`,
    peerListen: `127.0.0.1:${peerPort}`,
    registryTtlMs: 3_000,
    lookupCacheMs: 1_000,
  });

  before(async () => {
    redis = await TestRedis.start();
  });
  after(async () => {
    await redis?.kill();
  });

  beforeEach(async () => {
    prefix = `t${++run}:`;
    const [peerA, peerB] = await freePorts(2);
    stack = await Stack.start({ broker: { brokerId: 'broker-a', cluster: clusterConfig(peerA!) }, startAgent: false });
    const certB = await stack.pki.issue('broker', 'broker-b');
    const config: BrokerConfig = {
      ...BROKER_DEFAULTS,
      agentListen: '127.0.0.1:0',
      apiListen: '127.0.0.1:0',
      tlsCertFile: certB.cert,
      tlsKeyFile: certB.key,
      caFile: certB.ca,
      brokerId: 'broker-b',
      agentWaitMs: 2_000,
      drainTimeoutMs: 5_000,
      cluster: clusterConfig(peerB!),
    };
    brokerB = new Broker(config, silentLogger());
    const portsB = await brokerB.start();
    callerB = new RawClient(`127.0.0.1:${portsB.apiPort}`, mtlsCredentials(stack.serviceCert));
    // One broker only (no tunnel to the replicas it learns), so that B must forward to A.
    await stack.startAgent({ maxBrokers: 1 });
    // The agent's claim reaches Redis when its session registers at A.
    await pollUntil('condition', () => Boolean(stack.broker.registry.canServe(AGENT_ID)));
  });

  afterEach(async () => {
    callerB?.close();
    await brokerB?.stop();
    await stack?.stop();
  });

  const claimedBy = async (): Promise<string> => redis.command('ZRANGE', `${prefix}agent:${AGENT_ID}`, '0', '-1');

  it('a caller of broker B reaches the agent connected to broker A (unary, metadata, streams)', async () => {
    const r = await callerB.unary(ECHO.unary, Buffer.from('through two brokers'), stack.md());
    expect(r.response.toString()).to.equal('through two brokers');
    const seen = stack.siteUpstream.calls.at(-1)!;
    expect(metadataJson(seen.metadata)['burrow-caller-id']).to.deep.equal([
      'spiffe://burrow.local/service/platform-svc',
    ]);

    const mdCall = callerB.bidi(ECHO.metadata, stack.md({ 'x-custom': 'v1', 'x-bin-bin': Buffer.from([1, 2, 3]) }));
    mdCall.end(Buffer.from('go'));
    const md = await collect(mdCall);
    expect(md.status.code).to.equal(Status.OK);
    expect(md.headers?.get('x-header')).to.deep.equal(['h-value']);
    expect(md.status.metadata.get('x-trailer')).to.deep.equal(['t-value']);
    const upstreamSaw = JSON.parse(md.messages[0]!.toString()) as Record<string, string[]>;
    expect(upstreamSaw['x-custom']).to.deep.equal(['v1']);

    const stream = callerB.bidi(ECHO.serverStream, stack.md());
    stream.end(Buffer.from(JSON.stringify({ count: 50, size: 64 * 1024 })));
    const out = await collect(stream);
    expect(out.status.code).to.equal(Status.OK);
    expect(out.messages).to.have.length(50);
    expect(await claimedBy()).to.include('127.0.0.1');
  });

  it('a stale claim (a broker that is gone) costs one refused attempt: the call goes to the next claim', async () => {
    const [deadPort] = await freePorts(1);
    // A claim fresher than A's, so B tries the dead broker first.
    await redis.command('ZADD', `${prefix}agent:${AGENT_ID}`, String(Date.now() + 60_000), `127.0.0.1:${deadPort}`);
    const r = await callerB.unary(ECHO.unary, Buffer.from('next claim'), stack.md());
    expect(r.response.toString()).to.equal('next claim');
    const metrics = await brokerB.metrics.registry.getSingleMetricAsString('burrow_broker_peer_forwards_total');
    expect(metrics).to.match(/result="unreachable"} 1\b/);
    expect(metrics).to.match(/result="served"} 1\b/);
  });

  it(
    'an agent given one broker learns the replica set ' + 'from the directory and keeps a tunnel to each broker',
    async () => {
      await stack.agent.stop();
      await stack.startAgent(); // --max-brokers 3 (default)
      await pollUntil('condition', () => brokerB.registry.canServe(AGENT_ID), 10_000);
      const status = await brokerB.status();
      expect((status.cluster as { brokers: { brokerId: string }[] }).brokers.map((b) => b.brokerId)).to.deep.equal([
        'broker-a',
        'broker-b',
      ]);
      const before = await brokerB.metrics.registry.getSingleMetricAsString('burrow_broker_peer_forwards_total');
      const r = await callerB.unary(ECHO.unary, Buffer.from('own tunnel'), stack.md());
      expect(r.response.toString()).to.equal('own tunnel');
      // Served on B's own tunnel: no forward.
      expect(await brokerB.metrics.registry.getSingleMetricAsString('burrow_broker_peer_forwards_total')).to.equal(
        before,
      );
    },
  );

  it('a status from the upstream crosses both brokers unchanged', async () => {
    const req = Buffer.from(JSON.stringify({ code: Status.FAILED_PRECONDITION, message: '  spaced  ü ✓ ' }));
    const err = await callerB.unary(ECHO.status, req, stack.md()).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(err?.code).to.equal(Status.FAILED_PRECONDITION);
    expect(err?.details).to.equal('  spaced  ü ✓ ');
    expect(err?.metadata.get('x-trailer')).to.deep.equal(['kept']);
  });

  it('an agent connected nowhere: UNAVAILABLE naming it after the agent wait, no hang', async () => {
    const err = await callerB.unary(ECHO.unary, Buffer.from('x'), stack.md({}, 'nowhere')).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(err?.code).to.equal(Status.UNAVAILABLE);
    expect(err?.details).to.include('"nowhere" is not connected to this broker or any other');
  });

  it('a caller deadline shorter than the agent wait: UNAVAILABLE naming the agent before the deadline', async () => {
    const started = Date.now();
    const err = await callerB
      .unary(ECHO.unary, Buffer.from('x'), stack.md({}, 'nowhere'), { deadline: started + 1_000 })
      .then(
        () => undefined,
        (e: ServiceError) => e,
      );
    expect(err?.code, err?.details).to.equal(Status.UNAVAILABLE);
    expect(err?.details).to.include('"nowhere" is not connected to this broker or any other');
    expect(Date.now() - started).to.be.below(1_000);
  });

  it('the deadline bounds a forwarded call that waits', async () => {
    const started = Date.now();
    const err = await callerB.unary(ECHO.hang, Buffer.from('x'), stack.md(), { deadline: Date.now() + 300 }).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(err?.code).to.equal(Status.DEADLINE_EXCEEDED);
    expect(Date.now() - started).to.be.below(2_000);
    await pollUntil('condition', () => stack.siteUpstream.active === 0);
  });

  it('the agent leaving A removes its claim; a caller of B then waits and fails cleanly', async () => {
    await stack.agent.stop();
    await pollUntil('condition', () => !stack.broker.registry.canServe(AGENT_ID));
    // The release is one ZREM after the session ends.
    for (let i = 0; i < 100 && (await claimedBy()).includes('127.0.0.1'); i++)
      await new Promise((r) => setImmediate(r));
    expect(await claimedBy()).to.not.include('127.0.0.1');
    const err = await callerB.unary(ECHO.unary, Buffer.from('x'), stack.md()).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(err?.code).to.equal(Status.UNAVAILABLE);
  });

  it('the peer API refuses a service certificate', async () => {
    const status = await stack.broker.status();
    expect(status.cluster).to.include({ enabled: true, redis: 'up' });
    const peerAddress = (status.cluster as { advertise: string }).advertise;
    const intruder = new RawClient(peerAddress, mtlsCredentials(stack.serviceCert));
    try {
      const err = await intruder.unary('/burrow.tunnel.v1.BrokerPeer/Forward', Buffer.alloc(0), stack.md()).then(
        () => undefined,
        (e: ServiceError) => e,
      );
      expect(err?.code).to.equal(Status.PERMISSION_DENIED);
      expect(err?.details).to.include('broker certificate is required');
    } finally {
      intruder.close();
    }
  });
});

describe('broker cluster: PKI state shared by every broker', function () {
  this.timeout(30_000);

  it(
    "a revocation closes the agent's tunnels on every " + 'broker sharing the PKI directory within about a second',
    async () => {
      const baseline = snapshotResources();
      const root = makeTempDir('burrow-cluster-pki-');
      const dir = path.join(root, 'pki');
      await initPki({ dir });
      const agentCert = await issueCertificate({ dir, role: 'agent', name: 'site-r' });
      await writeIssued(path.join(root, 'agent'), agentCert);
      const brokers = ['broker-a', 'broker-b'].map(
        (brokerId) =>
          new Broker(
            {
              ...BROKER_DEFAULTS,
              agentListen: '127.0.0.1:0',
              apiListen: '127.0.0.1:0',
              pkiDir: dir,
              tlsDns: ['localhost'],
              tlsIp: ['127.0.0.1'],
              brokerId,
              drainTimeoutMs: 2_000,
            },
            silentLogger(),
          ),
      );
      const agentPorts = await Promise.all(brokers.map(async (b) => (await b.start()).agentPort));
      const files = {
        cert: path.join(root, 'agent', 'tls.crt'),
        key: path.join(root, 'agent', 'tls.key'),
        ca: path.join(root, 'agent', 'ca.crt'),
      };
      const agent = new Agent(
        {
          ...AGENT_DEFAULTS,
          brokers: agentPorts.map((p) => `127.0.0.1:${p}`),
          brokerServerName: 'localhost',
          tlsCertFile: files.cert,
          tlsKeyFile: files.key,
          caFile: files.ca,
          reconnectBaseMs: 50,
          reconnectMaxMs: 300,
          drainTimeoutMs: 1_000,
        },
        silentLogger(),
      );
      try {
        await agent.start();
        await pollUntil('condition', () => brokers.every((b) => b.registry.canServe('site-r')));
        const revokedAtMs = Date.now();
        await revoke({ dir, agentId: 'site-r' });
        await pollUntil('condition', () => brokers.every((b) => b.registry.sessionsOf('site-r').length === 0), 5_000);
        const tookMs = Date.now() - revokedAtMs;
        console.log(`      (revocation reached both brokers in ${tookMs} ms)`);
        // Each broker polls the directory every 500 ms; the issue asks for 1 s, with slack for a loaded machine.
        expect(tookMs).to.be.below(2_000);
      } finally {
        await agent.stop();
        for (const b of brokers) await b.stop();
        rmSync(root, { recursive: true, force: true });
      }
      await expectNoLeaks(baseline);
    },
  );
});
