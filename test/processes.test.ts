import { expect } from 'chai';
import { EventEmitter } from 'node:events';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import { Metadata, status as Status, type ServerDuplexStream, type ServiceError } from '@grpc/grpc-js';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { freePort } from './helpers/free-port';
import { callOverStalledConnection, stalledConnection } from './helpers/late-connection';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import {
  getJson,
  httpGet,
  killAll,
  liveProcessCount,
  startAgent,
  startBroker,
  type AgentListing,
  type BurrowProcess,
  type BrokerPorts,
  tlsArgs,
} from './helpers/processes';
import { RawClient, collect, mtlsCredentials, startRawServer } from './helpers/raw-grpc';

const SLOW = '/burrow.test.Slow/Unary';

/**
 * An upstream whose SLOW method answers only when the test releases it, so a call can be held "in
 * flight" for exactly as long as a test needs. Emits 'call' when a call arrives.
 */
class GatedUpstream extends EventEmitter {
  private readonly held: ServerDuplexStream<Buffer, Buffer>[] = [];
  address = '';
  stop: () => Promise<void> = async () => {};

  async start(): Promise<this> {
    const s = await startRawServer({
      [SLOW]: (call) => {
        call.on('error', () => {});
        call.once('data', (m: Buffer) => {
          this.held.push(call);
          this.emit('call', m);
        });
      },
    });
    this.address = s.address;
    this.stop = s.stop;
    return this;
  }

  /** Resolves when the next call reaches the upstream. */
  nextCall(): Promise<Buffer> {
    return new Promise((resolve) => this.once('call', resolve));
  }

  /** Answers every held call with `slow:done`. */
  release(): void {
    for (const call of this.held.splice(0)) {
      call.write(Buffer.from('slow:done'));
      call.end();
    }
  }
}

/**
 * A loopback TCP proxy that can go silent: `stall()` stops reading and writing on every
 * connection without closing any (a half-open path: no FIN, no RST, the peer just never answers),
 * and refuses new connections while stalled; `restore()` drops the dead pairs and forwards new
 * connections again.
 */
class StallableProxy {
  private server: net.Server | undefined;
  private readonly pairs = new Set<{ a: net.Socket; b: net.Socket; stalled: boolean }>();
  private stalled = false;
  port = 0;

  constructor(private readonly targetPort: number) {}

  async start(): Promise<this> {
    this.server = net.createServer((client) => {
      if (this.stalled) {
        client.resetAndDestroy();
        return;
      }
      const upstream = net.connect(this.targetPort, '127.0.0.1');
      const pair = { a: client, b: upstream, stalled: false };
      this.pairs.add(pair);
      client.on('data', (c) => {
        if (!pair.stalled) upstream.write(c);
      });
      upstream.on('data', (c) => {
        if (!pair.stalled) client.write(c);
      });
      const close = (): void => {
        if (pair.stalled) return; // a stalled pair stays open until restore() drops it
        this.pairs.delete(pair);
        client.destroy();
        upstream.destroy();
      };
      for (const s of [client, upstream]) s.on('error', close).on('close', close).on('end', close);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.port = (this.server!.address() as net.AddressInfo).port;
    return this;
  }

  get connections(): number {
    return this.pairs.size;
  }

  stall(): void {
    this.stalled = true;
    for (const p of this.pairs) {
      p.stalled = true;
      p.a.pause();
      p.b.pause();
    }
  }

  restore(): void {
    for (const p of [...this.pairs])
      if (p.stalled) {
        this.pairs.delete(p);
        p.a.destroy();
        p.b.destroy();
      }
    this.stalled = false;
  }

  async stop(): Promise<void> {
    for (const p of this.pairs) {
      p.a.destroy();
      p.b.destroy();
    }
    this.pairs.clear();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}

/** The error of a unary call that must fail. */
async function failure(p: Promise<unknown>): Promise<ServiceError> {
  try {
    await p;
  } catch (err) {
    if (typeof (err as ServiceError).code === 'number') return err as ServiceError;
    throw err;
  }
  throw new Error('call unexpectedly succeeded');
}

describe('processes (real broker and agent binaries)', function () {
  this.timeout(30_000);
  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let agentCert: CertFiles;
  let serviceCert: CertFiles;
  let echo: EchoUpstream;
  const clients: RawClient[] = [];
  const cleanups: (() => Promise<void>)[] = [];

  before(async () => {
    pki = await PkiFixture.create();
    [brokerCert, agentCert, serviceCert] = await Promise.all([
      pki.issue('broker', 'b'),
      pki.issue('agent', 'site-a'),
      pki.issue('service', 'platform-svc'),
    ]);
    echo = await new EchoUpstream().start();
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await killAll();
    for (const f of cleanups.splice(0)) await f();
  });
  after(async () => {
    await echo?.stop();
    pki?.cleanup();
    expect(liveProcessCount(), 'child processes left').to.equal(0);
  });

  const brokerArgs = (agentListen = '127.0.0.1:0', extra: string[] = []): string[] => [
    '--agent-listen',
    agentListen,
    '--api-listen',
    '127.0.0.1:0',
    '--admin-listen',
    '127.0.0.1:0',
    ...tlsArgs(brokerCert),
    '--agent-wait',
    '1s',
    '--drain-timeout',
    '10s',
    ...extra,
  ];
  const agentArgs = (broker: string, upstream: string, extra: string[] = []): string[] => [
    '--broker',
    broker,
    ...tlsArgs(agentCert),
    '--upstream',
    `*=${upstream}`,
    '--admin-listen',
    '127.0.0.1:0',
    '--reconnect-base',
    '100ms',
    '--reconnect-max',
    '500ms',
    '--drain-timeout',
    '10s',
    ...(process.env.BURROW_TEST_LOG ? ['--log-level', 'debug'] : []),
    ...extra,
  ];
  const caller = (ports: BrokerPorts): RawClient => {
    const c = new RawClient(`127.0.0.1:${ports.apiPort}`, mtlsCredentials(serviceCert));
    clients.push(c);
    return c;
  };
  const md = (): Metadata => {
    const m = new Metadata();
    m.set('burrow-agent-id', 'site-a');
    return m;
  };
  const agentsOf = (ports: BrokerPorts): Promise<AgentListing[]> =>
    getJson<AgentListing[]>(`http://127.0.0.1:${ports.adminPort}/agents`);

  /** Broker + agent processes, connected. */
  async function startPair(
    upstream: string,
    opts: {
      agentListen?: string;
      brokerExtra?: string[];
      agentExtra?: string[];
      brokerAddress?: (p: BrokerPorts) => string;
    } = {},
  ): Promise<{ broker: BurrowProcess; bports: BrokerPorts; agent: BurrowProcess }> {
    const b = await startBroker(brokerArgs(opts.agentListen, opts.brokerExtra));
    const address = opts.brokerAddress ? opts.brokerAddress(b.ports) : `127.0.0.1:${b.ports.agentPort}`;
    const a = await startAgent(agentArgs(address, upstream, opts.agentExtra));
    await Promise.all([
      a.proc.waitForLog('tunnel session established'),
      b.proc.waitForLog('agent connected', (l) => l.agentId === 'site-a'),
    ]);
    return { broker: b.proc, bports: b.ports, agent: a.proc };
  }

  it('(a) caller -> broker process -> agent process -> upstream in the test', async () => {
    const { bports } = await startPair(echo.address);
    const client = caller(bports);
    const res = await client.unary(ECHO.unary, Buffer.from('through two processes'), md());
    expect(res.response.toString()).to.equal('through two processes');
    const call = client.bidi(ECHO.bidi, md());
    for (const m of ['x', 'y', 'z']) call.write(Buffer.from(m));
    call.end();
    const r = await collect(call);
    expect(r.status.code, r.status.details).to.equal(Status.OK);
    expect(r.messages.map(String)).to.deep.equal(['x', 'y', 'z']);
    const agents = await agentsOf(bports);
    expect(agents).to.have.length(1);
    expect(agents[0]).to.include({ id: 'site-a', connections: 1, callsInFlight: 0 });
  });

  it('(b) broker restart on the same agent port: the agent reconnects by itself and calls work again', async () => {
    const port = await freePort();
    const first = await startPair(echo.address, { agentListen: `127.0.0.1:${port}` });
    expect((await caller(first.bports).unary(ECHO.unary, Buffer.from('before'), md())).response.toString()).to.equal(
      'before',
    );

    const logsBefore = first.agent.logs.length;
    first.broker.signal('SIGKILL');
    expect(await first.broker.waitExit()).to.deep.equal({ code: null, signal: 'SIGKILL' });
    await first.agent.waitForLog('tunnel session lost', undefined, { from: logsBefore });

    const second = await startBroker(brokerArgs(`127.0.0.1:${port}`), {}, 'broker-2');
    await Promise.all([
      first.agent.waitForLog('tunnel session established', undefined, { from: logsBefore }),
      second.proc.waitForLog('agent connected', (l) => l.agentId === 'site-a'),
    ]);
    const agents = await agentsOf(second.ports);
    expect(agents.map((a) => a.id)).to.deep.equal(['site-a']);
    const res = await caller(second.ports).unary(ECHO.unary, Buffer.from('after'), md());
    expect(res.response.toString()).to.equal('after');
  });

  it('(c1) SIGTERM to the broker: the call in flight completes OK, new calls are refused, exit code 0', async () => {
    const gate = await new GatedUpstream().start();
    cleanups.push(() => gate.stop());
    const { broker, bports } = await startPair(gate.address);
    const client = caller(bports);
    const arrived = gate.nextCall();
    const inFlight = client.unary(SLOW, Buffer.from('slow'), md());
    expect((await arrived).toString()).to.equal('slow');

    broker.signal('SIGTERM');
    const draining = await broker.waitForLog('broker draining');
    expect(draining.callsInFlight).to.equal(1);
    const refused = await failure(
      client.unary(ECHO.unary, Buffer.from('late'), md(), { deadline: Date.now() + 5_000 }),
    );
    expect(refused.code, refused.details).to.equal(Status.UNAVAILABLE);
    const fresh = await failure(
      caller(bports).unary(ECHO.unary, Buffer.from('late'), md(), { deadline: Date.now() + 5_000 }),
    );
    expect(fresh.code, fresh.details).to.equal(Status.UNAVAILABLE);
    expect((await httpGet(`http://127.0.0.1:${bports.adminPort}/readyz`)).status).to.equal(503);
    expect(broker.exit, 'broker still draining while the call is in flight').to.equal(undefined);

    gate.release();
    const res = await inFlight;
    expect(res.response.toString()).to.equal('slow:done');
    expect(res.status.code).to.equal(Status.OK);
    expect(await broker.waitExit()).to.deep.equal({ code: 0, signal: null });
    const stopped = broker.logs.find((l) => l.message === 'broker stopped');
    expect(stopped, 'a "broker stopped" line').to.not.equal(undefined);
    expect(stopped!.drained, 'drained before the timeout').to.equal(true);
  });

  it('(c1b) a caller that keeps calling a draining broker does not hold up its drain', async () => {
    const { broker, bports } = await startPair(echo.address);
    const client = caller(bports);
    expect((await client.unary(ECHO.unary, Buffer.from('warm'), md())).response.toString()).to.equal('warm');
    // Eight loops keep the caller's connection busy with calls the draining broker refuses.
    let stop = false;
    const codes = new Map<number, number>();
    const loops = Array.from({ length: 8 }, async () => {
      while (!stop) {
        const r = await client.unary(ECHO.unary, Buffer.from('x'), md(), { deadline: Date.now() + 2_000 }).then(
          () => Status.OK,
          (e: ServiceError) => e.code,
        );
        codes.set(r, (codes.get(r) ?? 0) + 1);
      }
    });
    try {
      broker.signal('SIGTERM');
      // `drained: true`: the broker finished before its --drain-timeout (10 s here) cut anything off.
      expect(await broker.waitExit(15_000)).to.deep.equal({ code: 0, signal: null });
      expect(broker.logs.find((l) => l.message === 'broker stopped')?.drained).to.equal(true);
      // The GOAWAY moved the caller's calls off the connection: nothing was left to cut.
      expect(broker.logs.filter((l) => /cutting/.test(String(l.message)))).to.deep.equal([]);
    } finally {
      stop = true;
      await Promise.all(loops);
    }
    expect(
      [...codes.keys()].every((c) => c === Status.OK || c === Status.UNAVAILABLE),
      JSON.stringify([...codes]),
    ).to.equal(true);
  });

  it(
    "(c1c) SIGTERM to the broker while a caller's connection is mid-handshake: that connection gets GOAWAY too, " +
      'its call is refused before it starts, nothing is cut',
    async () => {
      const { broker, bports } = await startPair(echo.address);
      // Accepted before the SIGTERM, secure only after the drain closed the listener: it becomes an
      // HTTP/2 session that the shutdown's first round of GOAWAYs did not see.
      const raw = await stalledConnection(bports.apiPort);
      const logsBefore = broker.logs.length;
      broker.signal('SIGTERM');
      await broker.waitForLog('broker draining', undefined, { from: logsBefore });
      const late = callOverStalledConnection(raw, serviceCert, ECHO.unary, { 'burrow-agent-id': 'site-a' });
      try {
        expect(await late.first, 'what the late connection saw first').to.equal(
          `GOAWAY ${http2.constants.NGHTTP2_NO_ERROR}`,
        );
        // Refused by HTTP/2 (the stream is past the GOAWAY): a grpc-js caller retries it elsewhere.
        expect(await late.streamClosed).to.equal(
          `stream closed (answered: false, rstCode ${http2.constants.NGHTTP2_REFUSED_STREAM})`,
        );
        expect(await broker.waitExit(15_000)).to.deep.equal({ code: 0, signal: null });
      } finally {
        late.close();
      }
      expect(broker.logs.find((l) => l.message === 'broker stopped')?.drained).to.equal(true);
      expect(
        broker.logs.filter((l) => /cutting/.test(String(l.message))),
        'connections cut after the grace',
      ).to.deep.equal([]);
    },
  );

  it('(c2) SIGTERM to the agent: the call in flight completes OK, new calls are refused, exit code 0', async () => {
    const gate = await new GatedUpstream().start();
    cleanups.push(() => gate.stop());
    const { broker, agent, bports } = await startPair(gate.address);
    const client = caller(bports);
    const arrived = gate.nextCall();
    const inFlight = client.unary(SLOW, Buffer.from('slow'), md());
    await arrived;

    agent.signal('SIGTERM');
    await agent.waitForLog('shutting down');
    // The agent's Drain (protocol 3) tells the broker; calls the broker sent before it are answered.
    await broker.waitForLog('agent is leaving', (l) => l.agentId === 'site-a');
    const refused = await failure(
      client.unary(ECHO.unary, Buffer.from('late'), md(), { deadline: Date.now() + 5_000 }),
    );
    expect(refused.code, refused.details).to.equal(Status.UNAVAILABLE);
    expect(agent.exit, 'agent still draining while the call is in flight').to.equal(undefined);

    gate.release();
    const res = await inFlight;
    expect(res.response.toString()).to.equal('slow:done');
    expect(await agent.waitExit()).to.deep.equal({ code: 0, signal: null });
    expect(agent.logs.some((l) => l.message === 'agent stopped')).to.equal(true);
  });

  it(
    '(d) half-open path: with 1 s keepalives both sides notice ' +
      'within ~5 s, and the agent reconnects once the path works',
    async () => {
      const keepalive = ['--keepalive-time', '1s', '--keepalive-timeout', '1s'];
      const broker = await startBroker(brokerArgs('127.0.0.1:0', keepalive));
      const proxy = await new StallableProxy(broker.ports.agentPort).start();
      cleanups.push(() => proxy.stop());
      const agent = await startAgent(agentArgs(`127.0.0.1:${proxy.port}`, echo.address, keepalive));
      await Promise.all([
        agent.proc.waitForLog('tunnel session established'),
        broker.proc.waitForLog('agent connected'),
      ]);
      expect(
        (await caller(broker.ports).unary(ECHO.unary, Buffer.from('via proxy'), md())).response.toString(),
      ).to.equal('via proxy');
      expect(proxy.connections).to.equal(1);

      const brokerLogs = broker.proc.logs.length;
      const agentLogs = agent.proc.logs.length;
      const stalledAt = Date.now();
      proxy.stall();
      const [gone, lost] = await Promise.all([
        broker.proc.waitForLog('agent disconnected', (l) => l.agentId === 'site-a', {
          from: brokerLogs,
          timeoutMs: 8_000,
        }),
        agent.proc.waitForLog('tunnel session lost', undefined, { from: agentLogs, timeoutMs: 8_000 }),
      ]);
      const elapsed = Date.now() - stalledAt;
      expect(elapsed, 'both sides noticed the dead path within ~5 s').to.be.below(5_000);
      expect(gone).to.be.an('object');
      expect(lost.broker).to.equal(`127.0.0.1:${proxy.port}`);
      expect(await agentsOf(broker.ports), 'the broker no longer lists the agent').to.deep.equal([]);
      const unrouted = await failure(
        caller(broker.ports).unary(ECHO.unary, Buffer.from('x'), md(), { deadline: Date.now() + 5_000 }),
      );
      expect(unrouted.code).to.equal(Status.UNAVAILABLE);

      const agentLogsBeforeRestore = agent.proc.logs.length;
      const brokerLogsBeforeRestore = broker.proc.logs.length;
      proxy.restore();
      await Promise.all([
        agent.proc.waitForLog('tunnel session established', undefined, { from: agentLogsBeforeRestore }),
        broker.proc.waitForLog('agent connected', (l) => l.agentId === 'site-a', { from: brokerLogsBeforeRestore }),
      ]);
      expect((await agentsOf(broker.ports))[0]).to.include({ id: 'site-a', connections: 1 });
      expect((await caller(broker.ports).unary(ECHO.unary, Buffer.from('again'), md())).response.toString()).to.equal(
        'again',
      );
    },
  );
});
