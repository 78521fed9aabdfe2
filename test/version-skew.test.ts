import { EventEmitter, once } from 'node:events';
import { readFileSync } from 'node:fs';
import { expect } from 'chai';
import { ServerCredentials, status as Status, type ServerDuplexStream, type ServiceError } from '@grpc/grpc-js';
import { AGENT_DEFAULTS, Agent } from '@burrow/agent';
import {
  PROTOCOL_VERSIONS,
  REPLICA_SET_VERSION,
  TUNNEL_METHODS,
  decodeSessionFrame,
  describeVersions,
  encodeSessionFrame,
  negotiateVersion,
  type HelloFrame,
  type SessionFrame,
} from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { startRawServer } from './helpers/raw-grpc';
import { RawAgent } from './helpers/raw-agent';
import { recordingLogger } from './helpers/recording-logger';
import { Stack } from './helpers/stack';

/**
 * Version skew, as tunnel.proto's "Versioning" section promises it: the agent lists every version it
 * speaks, the broker answers with the highest common one or ends the session with
 * FAILED_PRECONDITION naming both lists. Agent doubles one version older and one newer than this
 * broker; broker doubles one version older and one newer than this agent. The versions are derived
 * from PROTOCOL_VERSIONS so the tests keep their meaning when a version 2 is added.
 */
const OLDEST = Math.min(...PROTOCOL_VERSIONS);
const NEWEST = Math.max(...PROTOCOL_VERSIONS);
const OLDER = OLDEST - 1;
const NEWER = NEWEST + 1;
const list = (versions: readonly number[]): string => `[${versions.join(', ')}]`;

async function counterTotal(
  counter: { get(): Promise<{ values: { value: number; labels: Record<string, unknown> }[] }> },
  labels: Record<string, string> = {},
): Promise<number> {
  const { values } = await counter.get();
  return values
    .filter((v) => Object.entries(labels).every(([k, want]) => v.labels[k] === want))
    .reduce((n, v) => n + v.value, 0);
}

describe('version lists from a peer', () => {
  it('negotiateVersion handles a list of any length; describeVersions stays short', () => {
    expect(negotiateVersion([1, 2], new Array<number>(1_000_000).fill(7).concat(2, 1))).to.equal(2);
    expect(negotiateVersion([1], [])).to.equal(undefined);
    expect(describeVersions([1, 2])).to.equal('[1, 2]');
    expect(describeVersions([])).to.equal('[]');
    expect(describeVersions(new Array<number>(300_000).fill(2))).to.equal('[2 (300000 entries)]');
    expect(describeVersions(Array.from({ length: 20 }, (_, i) => i))).to.equal(
      '[0, 1, 2, 3, 4, 5, 6, 7, … (20 entries)]',
    );
  });
});

describe('version skew between agent and broker', () => {
  let stack: Stack;
  const rawAgents: RawAgent[] = [];
  const rawAgent = (): RawAgent => {
    const a = new RawAgent(stack.agentAddress, stack.agentCert);
    rawAgents.push(a);
    return a;
  };

  before(async () => {
    stack = await Stack.start({ startAgent: false });
  });
  afterEach(() => {
    for (const a of rawAgents.splice(0)) a.close();
  });
  after(async () => {
    await stack?.stop();
  });

  describe(
    `an agent one version older than the broker (agent ${list([OLDER])}, ` + `broker ${list(PROTOCOL_VERSIONS)})`,
    () => {
      it(
        'is refused with FAILED_PRECONDITION naming both lists: ' +
          'no Welcome, not registered, counted, not a protocol error',
        async () => {
          const refusedBefore = await counterTotal(stack.broker.metrics.rejectedHandshakes, {
            listener: 'agent',
            reason: 'protocol_version',
          });
          const protocolErrorsBefore = await counterTotal(stack.broker.metrics.protocolErrors);
          const session = rawAgent().session();
          session.hello({ protocolVersions: [OLDER], agentVersion: 'raw-agent/old' });
          const st = await session.ended();
          expect(st.code).to.equal(Status.FAILED_PRECONDITION);
          expect(st.details).to.equal(
            `no common protocol version: agent speaks ${list([OLDER])}, broker speaks ${list(PROTOCOL_VERSIONS)}`,
          );
          expect(session.received).to.have.length(0);
          expect(stack.broker.registry.counts()).to.deep.include({ agents: 0, sessions: 0 });
          expect(
            await counterTotal(stack.broker.metrics.rejectedHandshakes, {
              listener: 'agent',
              reason: 'protocol_version',
            }),
          ).to.equal(refusedBefore + 1);
          expect(await counterTotal(stack.broker.metrics.protocolErrors)).to.equal(protocolErrorsBefore);
          // A caller asking for that agent learns it is not connected.
          const err = await stack.caller
            .unary(ECHO.unary, Buffer.from('x'), stack.md(), { deadline: Date.now() + 500 })
            .then(
              () => undefined,
              (e: ServiceError) => e,
            );
          expect(err?.code).to.be.oneOf([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED]);
        },
      );

      it('an agent that also speaks the current version is welcomed in it', async () => {
        const session = rawAgent().session();
        session.hello({ protocolVersions: [OLDER, ...PROTOCOL_VERSIONS] });
        expect((await session.welcome()).protocolVersion).to.equal(NEWEST);
        session.end();
        await session.ended();
      });
    },
  );

  describe(`an agent one version newer than the broker (agent ${list([...PROTOCOL_VERSIONS, NEWER])})`, () => {
    for (const versions of [
      [...PROTOCOL_VERSIONS, NEWER],
      [NEWER, ...PROTOCOL_VERSIONS],
    ]) {
      it(
        `offering ${list(versions)}: welcomed in ${NEWEST}, the ` +
          `highest common version, and carries a caller's call in it`,
        async () => {
          const agent = rawAgent();
          const session = agent.session();
          session.hello({ protocolVersions: versions, agentVersion: 'raw-agent/new' });
          const welcome = await session.welcome();
          expect(welcome.protocolVersion).to.equal(NEWEST);
          expect(stack.broker.registry.summaries()[0]!.sessions[0]).to.deep.include({
            protocolVersion: NEWEST,
            agentVersion: 'raw-agent/new',
          });
          const offer = agent.offer(welcome.sessionId);
          const [res] = await Promise.all([
            stack.caller.unary(ECHO.unary, Buffer.from('spoken in the older version'), stack.md()),
            offer.answerEcho(),
          ]);
          expect(res.response.toString()).to.equal('spoken in the older version');
          session.end();
          await session.ended();
        },
      );
    }

    it(`an agent that speaks only ${list([NEWER])} is refused with FAILED_PRECONDITION naming both lists`, async () => {
      const session = rawAgent().session();
      session.hello({ protocolVersions: [NEWER] });
      const st = await session.ended();
      expect(st.code).to.equal(Status.FAILED_PRECONDITION);
      expect(st.details).to.equal(
        `no common protocol version: agent speaks ${list([NEWER])}, broker speaks ${list(PROTOCOL_VERSIONS)}`,
      );
    });

    it(
      'a Hello listing a version 300,000 times is a protocol error with a short message, and the broker serves ' +
        'the next session',
      async () => {
        const session = rawAgent().session();
        session.hello({ protocolVersions: new Array<number>(300_000).fill(NEWER) });
        const st = await session.ended();
        // Past the 64 KiB session frame limit: refused from its length, before it is read.
        expect(st.code).to.equal(Status.INTERNAL);
        expect(st.details.length).to.be.below(300);
        expect(st.details).to.match(/^tunnel protocol error: session frame of \d+ bytes; at most 65536 allowed$/);
        const ok = rawAgent().session();
        ok.hello({ protocolVersions: [NEWER, NEWEST, NEWER] });
        expect((await ok.welcome()).protocolVersion).to.equal(NEWEST);
        ok.end();
        await ok.ended();
      },
    );
  });
});

/**
 * A broker double that speaks `versions`: it answers the real agent's Hello the way tunnel.proto
 * says a broker must (or, with `welcomeWith`, the way a broken one might) and records every Hello
 * and Offer. Emits 'hello' per session attempt.
 */
async function brokerDouble(
  stack: Stack,
  versions: readonly number[],
  welcomeWith?: number,
  afterWelcome: SessionFrame[] = [],
) {
  const events = new EventEmitter();
  const hellos: HelloFrame[] = [];
  let offers = 0;
  const calls: ServerDuplexStream<Buffer, Buffer>[] = [];
  const creds = ServerCredentials.createSsl(
    readFileSync(stack.brokerCert.ca),
    [{ cert_chain: readFileSync(stack.brokerCert.cert), private_key: readFileSync(stack.brokerCert.key) }],
    true,
  );
  const server = await startRawServer(
    {
      [TUNNEL_METHODS.session]: (call) => {
        calls.push(call);
        call.on('error', () => {});
        call.once('data', (bytes: Buffer) => {
          const frame = decodeSessionFrame(bytes);
          if (frame.kind !== 'hello') throw new Error(`the agent opened with ${frame.kind}`);
          hellos.push(frame.hello);
          const version = welcomeWith ?? negotiateVersion(versions, frame.hello.protocolVersions);
          if (version === undefined) {
            call.emit('error', {
              code: Status.FAILED_PRECONDITION,
              details:
                `no common protocol version: agent speaks ${list(frame.hello.protocolVersions)}, broker ` +
                `speaks ${list(versions)}`,
            });
          } else {
            call.write(
              encodeSessionFrame({
                kind: 'welcome',
                welcome: {
                  protocolVersion: version,
                  sessionId: `s${hellos.length}`,
                  maxMessageBytes: 1 << 20,
                  brokerId: 'double',
                },
              }),
            );
            for (const f of afterWelcome) call.write(encodeSessionFrame(f));
          }
          events.emit('hello', frame.hello);
        });
      },
      [TUNNEL_METHODS.offer]: (call) => {
        calls.push(call);
        call.on('error', () => {});
        offers++;
        events.emit('offer', call.metadata);
      },
    },
    creds,
  );
  return {
    address: server.address,
    events,
    hellos,
    get offers() {
      return offers;
    },
    /** Resolves once `n` Hellos have arrived in all. */
    async hellosReached(n: number): Promise<void> {
      while (hellos.length < n) await once(events, 'hello');
    },
    stop: async () => {
      for (const c of calls) c.destroy();
      await server.stop();
    },
  };
}

describe('version skew: the real agent against broker doubles', () => {
  let stack: Stack;
  const cleanups: (() => Promise<void>)[] = [];
  before(async () => {
    stack = await Stack.start({ startAgent: false });
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  after(async () => {
    await stack?.stop();
  });

  async function agentAgainst(address: string): Promise<{ agent: Agent; records: Record<string, unknown>[] }> {
    const { logger, records } = recordingLogger();
    const agent = new Agent(
      {
        ...AGENT_DEFAULTS,
        brokers: [address],
        tlsCertFile: stack.agentCert.cert,
        tlsKeyFile: stack.agentCert.key,
        caFile: stack.agentCert.ca,
        upstreams: [{ service: '*', address: stack.siteUpstream.address }],
        reconnectBaseMs: 20,
        reconnectMaxMs: 100,
        minIdleOffers: 2,
        drainTimeoutMs: 1_000,
      },
      logger,
      'test-agent/1',
    );
    await agent.start();
    cleanups.push(() => agent.stop());
    return { agent, records };
  }

  it(
    `a broker one version newer (${list([...PROTOCOL_VERSIONS, NEWER])}): the agent offers exactly its versions, ` +
      `is welcomed in ${NEWEST} and opens its pool`,
    async () => {
      const double = await brokerDouble(stack, [...PROTOCOL_VERSIONS, NEWER]);
      cleanups.push(double.stop);
      const { agent, records } = await agentAgainst(double.address);
      await agent.waitConnected();
      expect(double.hellos[0]).to.deep.equal({
        protocolVersions: [...PROTOCOL_VERSIONS],
        agentVersion: 'test-agent/1',
        minIdleOffers: 2,
      });
      expect(records.find((r) => r.message === 'tunnel session established')).to.include({
        protocolVersion: NEWEST,
        brokerId: 'double',
      });
      while (double.offers < 2) await once(double.events, 'offer');
    },
  );

  it(
    `a broker one version older (${list([OLDER])}): the agent logs the refusal naming both lists, is not ` +
      `connected, and keeps retrying`,
    async () => {
      const double = await brokerDouble(stack, [OLDER]);
      cleanups.push(double.stop);
      const { agent, records } = await agentAgainst(double.address);
      await double.hellosReached(3);
      const failures = records.filter((r) => r.message === 'cannot establish tunnel session');
      expect(failures.length).to.be.at.least(2);
      expect(failures[0]!.error).to.equal(
        `no common protocol version: agent speaks ${list(PROTOCOL_VERSIONS)}, broker speaks ${list([OLDER])}`,
      );
      expect(String(failures[0]!.hint)).to.match(/upgrade/);
      expect(await counterTotal(agent.metrics.connects, { result: 'failed' })).to.be.at.least(2);
      expect(await counterTotal(agent.metrics.connectedBrokers)).to.equal(0);
      expect(double.offers).to.equal(0);
    },
  );

  const cases: [string, number, SessionFrame, string][] = [
    [
      `a version-${REPLICA_SET_VERSION - 1} broker that sends Brokers anyway`,
      REPLICA_SET_VERSION - 1,
      { kind: 'brokers', brokers: [{ brokerId: 'b', address: 'b:1' }] },
      `brokers frame on a session of protocol version ${REPLICA_SET_VERSION - 1} (it needs ${REPLICA_SET_VERSION})`,
    ],
    [
      `a version-${REPLICA_SET_VERSION} broker whose Brokers frame lists an address without a port`,
      REPLICA_SET_VERSION,
      { kind: 'brokers', brokers: [{ brokerId: 'b', address: 'b' }] },
      'address "b" is not HOST:PORT',
    ],
  ];
  for (const [name, version, frame, error] of cases) {
    it(`${name}: a protocol error that ends the session, a log naming it, and a new session`, async () => {
      const double = await brokerDouble(stack, [version], undefined, [frame]);
      cleanups.push(double.stop);
      const { agent, records } = await agentAgainst(double.address);
      await double.hellosReached(2);
      const lost = records.find((r) => r.message === 'tunnel session lost');
      expect(String(lost?.error)).to.contain(error);
      expect(agent.knownReplicaSet).to.deep.equal([]);
    });
  }

  it(
    `a broker that picks a version the agent did not offer ` +
      `(${NEWER}): a protocol error, no offers, and the agent retries`,
    async () => {
      const double = await brokerDouble(stack, [NEWER], NEWER);
      cleanups.push(double.stop);
      const { agent, records } = await agentAgainst(double.address);
      await double.hellosReached(2);
      const failure = records.find((r) => r.message === 'cannot establish tunnel session');
      expect(String(failure?.error)).to.contain(
        `broker chose protocol version ${NEWER}, which this agent does not speak`,
      );
      expect(await counterTotal(agent.metrics.connectedBrokers)).to.equal(0);
      expect(double.offers).to.equal(0);
    },
  );
});
