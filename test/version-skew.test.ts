import { EventEmitter, once } from 'node:events';
import { readFileSync } from 'node:fs';
import * as http2 from 'node:http2';
import * as tls from 'node:tls';
import { expect } from 'chai';
import { ServerCredentials, status as Status, type ServiceError } from '@grpc/grpc-js';
import { AGENT_DEFAULTS, Agent } from '@burrow/agent';
import {
  CONTROL_PATH,
  ControlChannel,
  GRPC_CONTENT_TYPE,
  LEGACY_SESSION_PATH,
  PROTOCOL_VERSIONS,
  TUNNEL_ALPN,
  decodeSessionFrame,
  describeVersions,
  negotiateVersion,
  type HelloFrame,
  type SessionFrame,
} from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { answerEcho, expectRefused } from './helpers/raw-call';
import { startRawServer } from './helpers/raw-grpc';
import { RawAgent, legacySession } from './helpers/raw-agent';
import { recordingLogger } from './helpers/recording-logger';
import { Stack } from './helpers/stack';

/**
 * Version skew, as tunnel.proto's "Versioning" section promises it: the agent lists every version it
 * speaks, the broker answers with the highest common one or refuses the session with
 * FAILED_PRECONDITION naming both lists. Agents of versions 1-3 reach a version-4 broker on the
 * `h2` path (legacySession), and a version-4 agent reaches brokers of versions 1-3 the same way
 * (an "old broker" double: grpc-js on ALPN h2 answering the old Tunnel/Session). The versions are
 * derived from PROTOCOL_VERSIONS so the tests keep their meaning when a version 5 is added.
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
  const rawAgent = async (): Promise<RawAgent> => {
    const a = await RawAgent.connect(stack.agentAddress, stack.agentCert);
    rawAgents.push(a);
    return a;
  };
  const refusedForVersion = (): Promise<number> =>
    counterTotal(stack.broker.metrics.rejectedHandshakes, { listener: 'agent', reason: 'protocol_version' });

  before(async () => {
    stack = await Stack.start({ startAgent: false });
  });
  afterEach(async () => {
    for (const a of rawAgents.splice(0)) a.close();
    await Promise.all(rawAgents.map((a) => a.closed));
  });
  after(async () => {
    await stack?.stop();
  });

  const olderTitle =
    `an agent one version older than the broker (agent ${list([OLDER])}, ` + `broker ${list(PROTOCOL_VERSIONS)})`;
  describe(olderTitle, () => {
    it(
      'on the control stream: Refused with FAILED_PRECONDITION naming both lists, ' +
        'no Welcome, not registered, counted, not a protocol error',
      async () => {
        const refusedBefore = await refusedForVersion();
        const protocolErrorsBefore = await counterTotal(stack.broker.metrics.protocolErrors);
        const agent = await rawAgent();
        const control = await agent.control();
        control.send({ kind: 'hello', hello: { protocolVersions: [OLDER], agentVersion: 'raw-agent/old' } });
        const refused = await expectRefused(control);
        expect(refused.code).to.equal(Status.FAILED_PRECONDITION);
        expect(refused.message).to.equal(
          `no common protocol version: agent speaks ${list([OLDER])}, broker speaks ${list(PROTOCOL_VERSIONS)}`,
        );
        // The broker closes the connection after Refused.
        await agent.closed;
        expect(stack.broker.registry.counts()).to.deep.include({ agents: 0, sessions: 0 });
        expect(await refusedForVersion()).to.equal(refusedBefore + 1);
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

    for (const versions of [[1, 2, 3], [3]]) {
      const title = `an agent of versions ${list(versions)} (h2, the old Tunnel/Session) is refused naming both lists`;
      it(title, async () => {
        const refusedBefore = await refusedForVersion();
        const status = await legacySession(stack.agentAddress, stack.agentCert, versions);
        expect(status.code).to.equal(Status.FAILED_PRECONDITION);
        expect(status.details).to.equal(
          `no common protocol version: agent speaks ${list(versions)}, broker speaks ${list(PROTOCOL_VERSIONS)}`,
        );
        expect(await refusedForVersion()).to.equal(refusedBefore + 1);
        expect(stack.broker.registry.counts()).to.deep.include({ agents: 0, sessions: 0 });
      });
    }

    it('an agent that also speaks the current version is welcomed in it', async () => {
      const agent = await rawAgent();
      const { welcome } = await agent.welcome([OLDER, ...PROTOCOL_VERSIONS]);
      expect(welcome.protocolVersion).to.equal(NEWEST);
    });
  });

  describe(`an agent one version newer than the broker (agent ${list([...PROTOCOL_VERSIONS, NEWER])})`, () => {
    for (const versions of [
      [...PROTOCOL_VERSIONS, NEWER],
      [NEWER, ...PROTOCOL_VERSIONS],
    ]) {
      const title = `offering ${list(versions)}: welcomed in ${NEWEST}, the highest common version, and carries a call`;
      it(title, async () => {
        const agent = await rawAgent();
        const { welcome } = await agent.welcome(versions, 'raw-agent/new');
        expect(welcome.protocolVersion).to.equal(NEWEST);
        expect(stack.broker.registry.summaries()[0]!.sessions[0]).to.deep.include({
          protocolVersion: NEWEST,
          agentVersion: 'raw-agent/new',
        });
        let answered: Promise<unknown> | undefined;
        agent.onCall((stream, headers) => {
          answered = answerEcho(stream, headers);
        });
        const res = await stack.caller.unary(ECHO.unary, Buffer.from('spoken in the older version'), stack.md());
        expect(res.response.toString()).to.equal('spoken in the older version');
        await answered;
      });
    }

    it(`an agent that speaks only ${list([NEWER])} is refused with FAILED_PRECONDITION naming both lists`, async () => {
      const control = await (await rawAgent()).control();
      control.send({ kind: 'hello', hello: { protocolVersions: [NEWER], agentVersion: 'raw-agent/new' } });
      const refused = await expectRefused(control);
      expect(refused.code).to.equal(Status.FAILED_PRECONDITION);
      expect(refused.message).to.equal(
        `no common protocol version: agent speaks ${list([NEWER])}, broker speaks ${list(PROTOCOL_VERSIONS)}`,
      );
    });

    it(
      'a Hello listing a version 300,000 times is a protocol error with a short message, and the broker serves ' +
        'the next session',
      async () => {
        const control = await (await rawAgent()).control();
        control.send({
          kind: 'hello',
          hello: { protocolVersions: new Array<number>(300_000).fill(NEWER), agentVersion: 'raw-agent/new' },
        });
        const refused = await expectRefused(control);
        // Past the 64 KiB session frame limit: refused from its length, before it is read.
        expect(refused.code).to.equal(Status.INTERNAL);
        expect(refused.message.length).to.be.below(300);
        expect(refused.message).to.match(/^tunnel protocol error: session frame of \d+ bytes; at most 65536 allowed$/);
        const ok = await rawAgent();
        expect((await ok.welcome([NEWER, NEWEST, NEWER])).welcome.protocolVersion).to.equal(NEWEST);
      },
    );
  });
});

/** Server TLS options of a broker double: the stack's broker certificate, client certificates required. */
function brokerTls(stack: Stack): tls.TlsOptions {
  return {
    ca: readFileSync(stack.brokerCert.ca),
    cert: readFileSync(stack.brokerCert.cert),
    key: readFileSync(stack.brokerCert.key),
    requestCert: true,
    rejectUnauthorized: true,
  };
}

/**
 * A broker of protocol versions 1-3 as a version-4 agent meets it: a grpc-js server (ALPN `h2` only)
 * whose old Tunnel/Session reads the agent's Hello and ends the call with FAILED_PRECONDITION in the
 * old brokers' wording. Records every Hello; emits 'hello' per attempt.
 */
async function oldBrokerDouble(stack: Stack, versions: readonly number[]) {
  const events = new EventEmitter();
  const hellos: HelloFrame[] = [];
  const creds = ServerCredentials.createSsl(
    readFileSync(stack.brokerCert.ca),
    [{ cert_chain: readFileSync(stack.brokerCert.cert), private_key: readFileSync(stack.brokerCert.key) }],
    true,
  );
  const server = await startRawServer(
    {
      [LEGACY_SESSION_PATH]: (call) => {
        call.on('error', () => {});
        call.once('data', (bytes: Buffer) => {
          const frame = decodeSessionFrame(bytes);
          if (frame.kind !== 'hello') throw new Error(`the agent opened with ${frame.kind}`);
          hellos.push(frame.hello);
          call.emit('error', {
            code: Status.FAILED_PRECONDITION,
            details:
              `no common protocol version: agent speaks ${list(frame.hello.protocolVersions)}, broker ` +
              `speaks ${list(versions)}`,
          });
          events.emit('hello', frame.hello);
        });
      },
    },
    creds,
  );
  return {
    address: server.address,
    hellos,
    async hellosReached(n: number): Promise<void> {
      while (hellos.length < n) await once(events, 'hello');
    },
    stop: () => server.stop(),
  };
}

/**
 * A broker double of version 4 or later: it accepts ALPN `burrow-tunnel`, becomes the HTTP/2 client on
 * the agent's connection as a real broker does, opens the control stream, and answers each Hello
 * with Welcome in `welcomeWith` (default: the highest version both speak) followed by `afterWelcome`.
 */
async function tunnelBrokerDouble(
  stack: Stack,
  versions: readonly number[],
  opts: { welcomeWith?: number; afterWelcome?: SessionFrame[] } = {},
) {
  const events = new EventEmitter();
  const hellos: HelloFrame[] = [];
  const sessions = new Set<http2.ClientHttp2Session>();
  const server = tls.createServer({ ...brokerTls(stack), ALPNProtocols: [TUNNEL_ALPN] }, (socket) => {
    socket.on('error', () => {});
    const h2 = http2.connect('https://agent.burrow', { createConnection: () => socket });
    sessions.add(h2);
    h2.on('error', () => {});
    h2.on('close', () => sessions.delete(h2));
    const stream = h2.request(
      { ':method': 'POST', ':path': CONTROL_PATH, 'content-type': GRPC_CONTENT_TYPE, te: 'trailers' },
      { endStream: false },
    );
    const channel: ControlChannel = new ControlChannel(stream, {
      onFrame: (frame) => {
        if (frame.kind !== 'hello') return;
        hellos.push(frame.hello);
        const version = opts.welcomeWith ?? negotiateVersion(versions, frame.hello.protocolVersions) ?? 0;
        const welcome = { protocolVersion: version, sessionId: `s${hellos.length}`, maxMessageBytes: 1 << 20 };
        channel.send({ kind: 'welcome', welcome: { ...welcome, brokerId: 'double' } });
        for (const f of opts.afterWelcome ?? []) channel.send(f);
        events.emit('hello', frame.hello);
      },
      onProtocolError: () => h2.destroy(),
      onClosed: () => h2.destroy(),
    });
  });
  server.on('tlsClientError', () => {});
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  return {
    address: `127.0.0.1:${port}`,
    hellos,
    async hellosReached(n: number): Promise<void> {
      while (hellos.length < n) await once(events, 'hello');
    },
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of sessions) s.destroy();
        server.close(() => resolve());
      }),
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
    `a broker one version newer (${list([...PROTOCOL_VERSIONS, NEWER])}): the agent offers exactly its versions ` +
      `and is welcomed in ${NEWEST}`,
    async () => {
      const double = await tunnelBrokerDouble(stack, [...PROTOCOL_VERSIONS, NEWER]);
      cleanups.push(double.stop);
      const { agent, records } = await agentAgainst(double.address);
      await agent.waitConnected();
      expect(double.hellos[0]).to.deep.equal({
        protocolVersions: [...PROTOCOL_VERSIONS],
        agentVersion: 'test-agent/1',
      });
      expect(records.find((r) => r.message === 'tunnel session established')).to.include({
        protocolVersion: NEWEST,
        brokerId: 'double',
      });
    },
  );

  it(
    'a broker of versions [1, 2, 3] (ALPN h2): the agent asks its old Tunnel/Session, reports the ' +
      'FAILED_PRECONDITION naming both lists, is not connected, and keeps retrying',
    async () => {
      const double = await oldBrokerDouble(stack, [1, 2, 3]);
      cleanups.push(double.stop);
      const { agent, records } = await agentAgainst(double.address);
      await double.hellosReached(3);
      expect(double.hellos[0]).to.deep.equal({
        protocolVersions: [...PROTOCOL_VERSIONS],
        agentVersion: 'test-agent/1',
      });
      const failures = records.filter((r) => r.message === 'cannot establish tunnel session');
      expect(failures.length).to.be.at.least(2);
      expect(failures[0]!.error).to.equal(
        `no common protocol version: agent speaks ${list(PROTOCOL_VERSIONS)}, broker speaks [1, 2, 3]`,
      );
      expect(String(failures[0]!.hint)).to.match(/upgrade/);
      expect(await counterTotal(agent.metrics.connects, { result: 'failed' })).to.be.at.least(2);
      expect(await counterTotal(agent.metrics.connectedBrokers)).to.equal(0);
    },
  );

  it(
    'a version-4 broker whose Brokers frame lists an address without a port: a protocol error that ends ' +
      'the session, a log naming it, and a new session',
    async () => {
      const double = await tunnelBrokerDouble(stack, PROTOCOL_VERSIONS, {
        afterWelcome: [{ kind: 'brokers', brokers: [{ brokerId: 'b', address: 'b' }] }],
      });
      cleanups.push(double.stop);
      const { agent, records } = await agentAgainst(double.address);
      await double.hellosReached(2);
      const lost = records.find((r) => r.message === 'tunnel session lost');
      expect(String(lost?.error)).to.contain('address "b" is not HOST:PORT');
      expect(agent.knownReplicaSet).to.deep.equal([]);
    },
  );

  const pickedTitle = `a broker picking a version the agent did not offer (${NEWER}): protocol error, agent retries`;
  it(pickedTitle, async () => {
    const double = await tunnelBrokerDouble(stack, [NEWER], { welcomeWith: NEWER });
    cleanups.push(double.stop);
    const { agent, records } = await agentAgainst(double.address);
    await double.hellosReached(2);
    const failure = records.find((r) => r.message === 'cannot establish tunnel session');
    expect(String(failure?.error)).to.contain(
      `broker chose protocol version ${NEWER}, which this agent does not speak`,
    );
    expect(await counterTotal(agent.metrics.connectedBrokers)).to.equal(0);
  });
});
