import { expect } from 'chai';
import { status as Status, type ServiceError } from '@grpc/grpc-js';
import type { Broker } from '@burrow/broker';
import { DEFAULT_MAX_MESSAGE_BYTES, type CallFrame, type SessionFrame } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import type { CertFiles } from './helpers/pki-fixture';
import { RawAgent, type RawCallStream, type RawSession } from './helpers/raw-agent';
import { Stack } from './helpers/stack';
import { pollUntil } from './helpers/wait';

/**
 * Component tests of the broker's side of tunnel.proto against a hand-written agent (RawAgent)
 * that sends exactly the frames each test chooses, on real sockets with real mTLS.
 */

/** `promise`, or a rejection naming `what` if it has not settled within `ms`. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function counterValue(counter: Broker['metrics']['protocolErrors']): Promise<number> {
  return (await counter.get()).values.reduce((n, v) => n + v.value, 0);
}

/** The broker's agent listener, for its session count (leak checks). */
const sessionCount = (broker: Broker): number =>
  (broker as unknown as { agentListener: { sessionCount: number } }).agentListener.sessionCount;

describe('protocol peer: a raw agent against a real broker', () => {
  let stack: Stack;
  let siteB: CertFiles;
  const agents: RawAgent[] = [];
  let protocolErrorsBefore = 0;

  const rawAgent = (cert: CertFiles = stack.agentCert): RawAgent => {
    const a = new RawAgent(stack.agentAddress, cert);
    agents.push(a);
    return a;
  };
  const protocolErrorsInThisTest = async (): Promise<number> =>
    (await counterValue(stack.broker.metrics.protocolErrors)) - protocolErrorsBefore;

  /** A raw agent with a session that completed its handshake. */
  const connected = async (
    opts: { minIdleOffers?: number; cert?: CertFiles } = {},
  ): Promise<{ agent: RawAgent; session: RawSession; sessionId: string }> => {
    const agent = rawAgent(opts.cert);
    const session = agent.session();
    session.hello({ minIdleOffers: opts.minIdleOffers ?? 0 });
    const welcome = await session.welcome();
    return { agent, session, sessionId: welcome.sessionId };
  };

  /** Opens `n` offers and waits until the broker holds them all as idle. */
  const openIdleOffers = async (agent: RawAgent, sessionId: string, n: number): Promise<RawCallStream[]> => {
    const before = stack.broker.registry.counts().idleOffers;
    const offers: RawCallStream[] = [];
    for (let i = 0; i < n; i++) {
      offers.push(agent.offer(sessionId));
      // One at a time, so the broker's idle list is in the order we opened them.
      await pollUntil(
        `idle offer #${i + 1}`,
        () => stack.broker.registry.counts().idleOffers === before + i + 1,
        3_000,
      );
    }
    return offers;
  };

  before(async () => {
    stack = await Stack.start({ startAgent: false });
    siteB = await stack.pki.issue('agent', 'site-b');
  });
  after(async () => {
    await stack?.stop();
  });

  beforeEach(async () => {
    protocolErrorsBefore = await counterValue(stack.broker.metrics.protocolErrors);
  });

  afterEach(async () => {
    for (const a of agents.splice(0)) a.close();
    // Leak check: every session, offer, waiter and agent entry is gone once the agents are.
    await pollUntil(
      `an empty registry (now ${JSON.stringify(stack.broker.registry.counts())}, listener ` +
        `sessions ${sessionCount(stack.broker)})`,
      () => {
        const c = stack.broker.registry.counts();
        return (
          c.agents === 0 &&
          c.sessions === 0 &&
          c.idleOffers === 0 &&
          c.activeCalls === 0 &&
          c.waiters === 0 &&
          stack.broker.registry.entryCount === 0 &&
          sessionCount(stack.broker) === 0
        );
      },
      3_000,
    );
  });

  describe('(a) version negotiation', () => {
    it('a newer agent ([1, 2, 3, 4]) gets Welcome with version 3 from this broker and is registered', async () => {
      const agent = rawAgent();
      const session = agent.session();
      session.hello({ protocolVersions: [1, 2, 3, 4], agentVersion: 'raw-agent/4.0', minIdleOffers: 0 });
      const welcome = await session.welcome();
      expect(welcome.protocolVersion).to.equal(3);
      expect(welcome.sessionId).to.be.a('string').and.not.equal('');
      expect(welcome.brokerId).to.equal('broker-test');
      expect(welcome.maxMessageBytes).to.equal(DEFAULT_MAX_MESSAGE_BYTES);
      expect(stack.broker.registry.counts()).to.deep.include({ agents: 1, sessions: 1 });
      const [summary] = stack.broker.registry.summaries();
      expect(summary!.id).to.equal('site-a');
      expect(summary!.sessions[0]).to.deep.include({
        id: welcome.sessionId,
        protocolVersion: 3,
        agentVersion: 'raw-agent/4.0',
      });
      // The agent ending its session stream makes the broker forget it.
      session.end();
      const st = await session.ended();
      expect(st.code).to.equal(Status.OK);
      await pollUntil('the session to be forgotten', () => stack.broker.registry.counts().sessions === 0, 3_000);
    });

    it(
      'an agent with no common version ([99]) gets ' + 'FAILED_PRECONDITION naming both lists, and no Welcome',
      async () => {
        const agent = rawAgent();
        const session = agent.session();
        session.hello({ protocolVersions: [99] });
        const st = await session.ended();
        expect(st.code).to.equal(Status.FAILED_PRECONDITION);
        expect(st.details).to.contain('[99]');
        expect(st.details).to.contain('[1, 2, 3]');
        expect(session.received).to.have.length(0);
        expect(stack.broker.registry.counts().sessions).to.equal(0);
      },
    );
  });

  describe('(b) a broken session stream', () => {
    const cases: [string, (s: RawSession) => void][] = [
      ['first frame is Demand, not Hello', (s) => s.send({ kind: 'demand', offers: 3 })],
      [
        'first frame is Welcome, not Hello',
        (s) =>
          s.send({
            kind: 'welcome',
            welcome: { protocolVersion: 1, sessionId: 'x', maxMessageBytes: 1, brokerId: 'b' },
          }),
      ],
      [
        'undecodable bytes',
        (s) => {
          s.writeBytes(Buffer.from([0x0a, 0x7f, 0x01, 0x02]));
        },
      ],
      [
        'a frame with no kind',
        (s) => {
          s.writeBytes(Buffer.alloc(0));
        },
      ],
    ];
    for (const [name, send] of cases) {
      it(`${name}: the session ends with INTERNAL and protocolErrors increments`, async () => {
        const agent = rawAgent();
        const session = agent.session();
        send(session);
        const st = await session.ended();
        expect(st.code).to.equal(Status.INTERNAL);
        expect(st.details).to.contain('protocol error');
        expect(await protocolErrorsInThisTest()).to.equal(1);
        expect(session.received).to.have.length(0);
        expect(stack.broker.registry.counts().sessions).to.equal(0);
      });
    }

    it('a second frame after Hello: the registered session is closed with INTERNAL', async () => {
      const { session } = await connected();
      expect(stack.broker.registry.counts().sessions).to.equal(1);
      session.hello();
      const st = await session.ended();
      expect(st.code).to.equal(Status.INTERNAL);
      expect(st.details).to.contain('after hello');
      expect(await protocolErrorsInThisTest()).to.equal(1);
      expect(stack.broker.registry.counts().sessions).to.equal(0);
    });
  });

  describe("(c) offers for sessions that are not the agent's", () => {
    it('an Offer with an unknown burrow-session-id, or none, gets FAILED_PRECONDITION', async () => {
      const { agent } = await connected();
      const unknown = agent.offer('00000000-0000-0000-0000-000000000000');
      const missing = agent.offer(undefined);
      const [a, b] = await Promise.all([unknown.ended(), missing.ended()]);
      expect(a.code).to.equal(Status.FAILED_PRECONDITION);
      expect(a.details).to.contain('00000000-0000-0000-0000-000000000000');
      expect(b.code).to.equal(Status.FAILED_PRECONDITION);
      expect(stack.broker.registry.counts().idleOffers).to.equal(0);
    });

    it(
      "an Offer or Forward with another agent's session id " + 'gets PERMISSION_DENIED and leaves that session alone',
      async () => {
        const a = await connected();
        const b = await connected({ cert: siteB });
        expect(stack.broker.registry.counts()).to.deep.include({ agents: 2, sessions: 2 });
        const stolenOffer = b.agent.offer(a.sessionId);
        const stolenForward = b.agent.forward(a.sessionId);
        const [o, f] = await Promise.all([stolenOffer.ended(), stolenForward.ended()]);
        expect(o.code).to.equal(Status.PERMISSION_DENIED);
        expect(f.code).to.equal(Status.PERMISSION_DENIED);
        expect(await protocolErrorsInThisTest()).to.equal(2);
        expect(stack.broker.registry.counts()).to.deep.include({ agents: 2, sessions: 2, idleOffers: 0 });
        // site-a's session still works: an offer of its own carries a call.
        const [offer] = await openIdleOffers(a.agent, a.sessionId, 1);
        const answered = offer!.answerEcho();
        const res = await stack.caller.unary(ECHO.unary, Buffer.from('still a'), stack.md());
        expect(res.response.toString()).to.equal('still a');
        await answered;
        expect(a.session.status).to.equal(undefined);
        expect(b.session.status).to.equal(undefined);
      },
    );
  });

  describe("(d) a call assigned to the raw agent's offer", () => {
    it('Start carries the method, only the metadata that may cross, and the remaining deadline', async () => {
      const { agent, sessionId } = await connected();
      const [offer] = await openIdleOffers(agent, sessionId, 1);
      const md = stack.md({
        authorization: 'Bearer caller-secret',
        'burrow-foo': 'spoofed',
        'x-foo': 'bar',
        'x-blob-bin': Buffer.from([0, 255, 1]),
      });
      const sentAt = Date.now();
      const call = stack.caller.unary(ECHO.unary, Buffer.from('ping'), md, { deadline: sentAt + 5_000 });
      const start = await offer!.answerEcho();
      const res = await call;
      expect(res.response.toString()).to.equal('ping');
      expect(start.method).to.equal(ECHO.unary);
      expect(start.callId).to.not.equal('');
      const keys = start.metadata.map((e) => e.key);
      expect(keys).to.not.include('authorization');
      expect(keys.filter((k) => k.startsWith('burrow-'))).to.deep.equal([]);
      expect(
        keys.filter((k) => k.startsWith('grpc-') || k === 'user-agent' || k === 'content-type' || k === 'te'),
      ).to.deep.equal([]);
      const hex = (k: string): string[] =>
        start.metadata.filter((e) => e.key === k).map((e) => Buffer.from(e.value).toString('hex'));
      expect(hex('x-foo')).to.deep.equal([Buffer.from('bar').toString('hex')]);
      expect(hex('x-blob-bin')).to.deep.equal(['00ff01']);
      // The broker measured the remaining time when it sent Start: a little under 5 s.
      expect(start.timeoutMs).to.be.at.most(5_000);
      expect(start.timeoutMs).to.be.greaterThan(5_000 - (Date.now() - sentAt) - 50);
      const st = await offer!.ended();
      expect(st.code).to.equal(Status.OK);
    });

    /** Assigns a caller call to a fresh offer, reads its request, and returns both ends. */
    const assigned = async (): Promise<{ session: RawSession; offer: RawCallStream; call: Promise<unknown> }> => {
      const { agent, session, sessionId } = await connected();
      const [offer] = await openIdleOffers(agent, sessionId, 1);
      const call = stack.caller.unary(ECHO.unary, Buffer.from('x'), stack.md(), { deadline: Date.now() + 5_000 });
      call.catch(() => {}); // inspected by the test
      await offer!.expectNext('start');
      await offer!.expectNext('message');
      await offer!.expectNext('halfClose');
      return { session, offer: offer!, call };
    };

    it('Headers twice: the caller gets UNAVAILABLE mentioning the protocol, the offer ends with INTERNAL', async () => {
      const { offer, call } = await assigned();
      offer.send({ kind: 'headers', metadata: [] });
      offer.send({ kind: 'headers', metadata: [] });
      const err = await call.then(
        () => {
          throw new Error('the call succeeded');
        },
        (e: ServiceError) => e,
      );
      expect(err.code).to.equal(Status.UNAVAILABLE);
      expect(err.details).to.match(/protocol/);
      expect(err.details).to.contain('headers frame after headers');
      const st = await offer.ended();
      expect(st.code).to.equal(Status.INTERNAL);
    });

    // BUG: once an offer carries a call, originate() re-attaches the CallStream handlers and its
    // onProtocolError only fails the call; AgentListener.protocolError() (close the session, count
    // the error) is never reached, so an agent that broke the protocol keeps its session.
    it(
      "Headers twice: the broker closes the agent's whole " + 'session with INTERNAL and counts a protocol error',
      async () => {
        const { session, offer, call } = await assigned();
        offer.send({ kind: 'headers', metadata: [] });
        offer.send({ kind: 'headers', metadata: [] });
        await call.catch(() => {});
        await offer.ended();
        // Both are decided synchronously when the bad frame is read, before the offer's status is sent.
        expect(await protocolErrorsInThisTest(), 'protocolErrors').to.equal(1);
        expect(stack.broker.registry.counts().sessions, 'sessions still registered').to.equal(0);
        const st = await within(session.ended(), 2_000, 'end of the session stream');
        expect(st.code).to.equal(Status.INTERNAL);
      },
    );

    it(
      'Trailers then Message: the caller gets the Trailers status unchanged, ' + 'the late Message is never forwarded',
      async () => {
        const { offer, call } = await assigned();
        offer.send({ kind: 'trailers', trailers: { code: Status.NOT_FOUND, message: '  gone\t😀 ', metadata: [] } });
        offer.send({ kind: 'message', data: Buffer.from('after trailers') });
        const err = await call.then(
          () => {
            throw new Error('the call succeeded');
          },
          (e: ServiceError) => e,
        );
        expect(err.code).to.equal(Status.NOT_FOUND);
        expect(err.details).to.equal('  gone\t😀 ');
        // The broker finishes the offer as soon as Trailers arrives, so the Message behind it is not
        // read at all (whether it counts as a detected protocol error depends on that race, so it is
        // not asserted here). The offer itself ends cleanly or as a protocol error, never hangs.
        const st = await offer.ended();
        expect([Status.OK, Status.INTERNAL]).to.include(st.code);
      },
    );

    it('Start sent by the agent on an idle offer ends the offer with INTERNAL and closes the session', async () => {
      const { agent, sessionId } = await connected();
      const [offer] = await openIdleOffers(agent, sessionId, 1);
      offer!.send({ kind: 'start', start: { method: '/x.Y/Z', metadata: [], timeoutMs: 0, callId: 'evil' } });
      const st = await offer!.ended();
      expect(st.code).to.equal(Status.INTERNAL);
      expect(st.details).to.contain('protocol error');
      // An idle offer's protocol error reaches the listener: the session goes too.
      await pollUntil('the session to be closed', () => stack.broker.registry.counts().sessions === 0, 3_000);
      expect(await protocolErrorsInThisTest()).to.equal(1);
    });
  });

  describe('(d2) a Forward stream from the raw agent', () => {
    it('a well-ordered Forward reaches the platform upstream with the verified agent id', async () => {
      const { agent, sessionId } = await connected();
      const fwd = agent.forward(sessionId);
      fwd.send({
        kind: 'start',
        start: {
          method: ECHO.unary,
          metadata: [{ key: 'burrow-agent-id', value: Buffer.from('spoofed') }],
          timeoutMs: 5_000,
          callId: 'f1',
        },
      });
      fwd.send({ kind: 'message', data: Buffer.from('up') });
      fwd.send({ kind: 'halfClose' });
      const frames: CallFrame[] = [];
      while (frames[frames.length - 1]?.kind !== 'trailers') frames.push(await fwd.next());
      fwd.end();
      const data = frames.flatMap((f) => (f.kind === 'message' ? [f.data.toString()] : []));
      expect(data).to.deep.equal(['up']);
      const last = frames[frames.length - 1]!;
      if (last.kind !== 'trailers') throw new Error('unreachable');
      expect(last.trailers.code).to.equal(Status.OK);
      const seen = stack.platformUpstream.calls[stack.platformUpstream.calls.length - 1]!;
      expect(seen.metadata.get('burrow-agent-id')).to.deep.equal(['site-a']);
      expect((await fwd.ended()).code).to.equal(Status.OK);
    });

    // BUG: same root cause as the Offer case: AgentListener.answerForward() hands the stream to
    // answer(), which re-attaches the handlers, so a protocol error after Start only cancels the
    // upstream call; the session that broke the protocol stays open and nothing is counted.
    it('Message after HalfClose: the Forward ends with INTERNAL and the broker closes the session', async () => {
      const { agent, session, sessionId } = await connected();
      const fwd = agent.forward(sessionId);
      const upstreamCancelled = new Promise((resolve) => stack.platformUpstream.once('cancelled', resolve));
      fwd.send({ kind: 'start', start: { method: ECHO.hang, metadata: [], timeoutMs: 5_000, callId: 'f2' } });
      fwd.send({ kind: 'halfClose' });
      fwd.send({ kind: 'message', data: Buffer.from('after half-close') });
      const st = await fwd.ended();
      expect(st.code).to.equal(Status.INTERNAL);
      expect(st.details).to.contain('message after half-close');
      await within(upstreamCancelled, 2_000, 'cancellation of the upstream call');
      expect(await protocolErrorsInThisTest(), 'protocolErrors').to.equal(1);
      expect(stack.broker.registry.counts().sessions, 'sessions still registered').to.equal(0);
      expect((await within(session.ended(), 2_000, 'end of the session stream')).code).to.equal(Status.INTERNAL);
    });
  });

  describe('(e) demand', () => {
    it(
      '5 calls waiting on an agent with no idle offers make the ' +
        'broker demand exactly 5, and all 5 succeed once offered',
      async () => {
        const { agent, session, sessionId } = await connected({ minIdleOffers: 0 });
        const demandedBefore = await counterValue(stack.broker.metrics.demandedOffers);
        const calls = [0, 1, 2, 3, 4].map((i) =>
          stack.caller.unary(ECHO.unary, Buffer.from(`call-${i}`), stack.md(), { deadline: Date.now() + 10_000 }),
        );
        let demanded = 0;
        while (demanded < 5) {
          const f = await session.expectNext('demand');
          expect(f.offers).to.be.greaterThan(0);
          demanded += f.offers;
        }
        expect(demanded).to.equal(5);
        expect(stack.broker.registry.counts().waiters).to.equal(5);
        const offers = [0, 1, 2, 3, 4].map(() => agent.offer(sessionId));
        const starts = await Promise.all(offers.map((o) => o.answerEcho()));
        const results = await Promise.all(calls);
        expect(results.map((r) => r.response.toString()).sort()).to.deep.equal([
          'call-0',
          'call-1',
          'call-2',
          'call-3',
          'call-4',
        ]);
        expect(starts.every((s) => s.method === ECHO.unary)).to.equal(true);
        for (const o of offers) expect((await o.ended()).code).to.equal(Status.OK);
        // Not more: no further Demand arrived, and the broker counted exactly 5.
        expect(
          session.received
            .filter((f) => f.kind === 'demand')
            .reduce((n, f) => n + (f.kind === 'demand' ? f.offers : 0), 0),
        ).to.equal(5);
        expect((await counterValue(stack.broker.metrics.demandedOffers)) - demandedBefore).to.equal(5);
        expect(stack.broker.registry.counts()).to.deep.include({ waiters: 0, activeCalls: 0, idleOffers: 0 });
      },
    );
  });

  describe('(e2) demand bookkeeping', () => {
    const isDemand = (f: SessionFrame): boolean => f.kind === 'demand';

    // BUG: TunnelRegistry.acquire() removes a waiter that timed out or was cancelled but leaves
    // entry.outstandingDemand as it was, so the broker believes an offer is still on its way for a
    // call that no longer exists, and the next waiting call gets no Demand at all.
    it(
      'a call that gave up waiting leaves no demand owed: ' + 'the next waiting call makes the broker send Demand',
      async () => {
        const { agent, session, sessionId } = await connected();
        const first = stack.caller.unary(ECHO.unary, Buffer.from('first'), stack.md(), { deadline: Date.now() + 300 });
        expect((await session.expectNext('demand')).offers).to.equal(1);
        // The raw agent ignores it (e.g. it is at its own concurrency limit); the call times out.
        const e1 = await first.then(
          () => {
            throw new Error('the call succeeded');
          },
          (e: ServiceError) => e,
        );
        expect(e1.code).to.equal(Status.DEADLINE_EXCEEDED);
        await pollUntil('the first waiter to go', () => stack.broker.registry.counts().waiters === 0, 3_000);
        const second = stack.caller.unary(ECHO.unary, Buffer.from('second'), stack.md(), {
          deadline: Date.now() + 1_500,
        });
        try {
          const d = await within(session.expectNext('demand'), 1_000, 'Demand for the second waiting call');
          expect(d.offers).to.equal(1);
          const answered = agent.offer(sessionId).answerEcho();
          expect((await second).response.toString()).to.equal('second');
          await answered;
        } finally {
          await second.catch(() => {});
        }
      },
    );

    // BUG: TunnelRegistry.removeSession() forgets a session without taking back the Demand it was
    // sent; outstandingDemand is only reset by addSession(), so when an agent has two sessions and
    // the one asked goes away, the waiting call is never offered a stream by the other one.
    it("demand owed by a session that ends is asked again from the agent's other session", async () => {
      const one = await connected();
      const two = await connected();
      expect(stack.broker.registry.counts()).to.deep.include({ agents: 1, sessions: 2 });
      const call = stack.caller.unary(ECHO.unary, Buffer.from('survivor'), stack.md(), {
        deadline: Date.now() + 1_800,
      });
      try {
        await Promise.race([one.session.seen(isDemand), two.session.seen(isDemand)]);
        const [asked, other] = one.session.received.some(isDemand) ? [one, two] : [two, one];
        expect(other.session.received.filter(isDemand), 'only one session is asked').to.have.length(0);
        asked.agent.close(); // the asked session goes away before opening the offer
        await pollUntil(
          'the asked session to be forgotten',
          () => stack.broker.registry.counts().sessions === 1,
          3_000,
        );
        const d = await within(other.session.seen(isDemand), 1_000, 'Demand on the remaining session');
        expect(d.kind === 'demand' && d.offers).to.equal(1);
        const answered = other.agent.offer(other.sessionId).answerEcho();
        expect((await call).response.toString()).to.equal('survivor');
        await answered;
      } finally {
        await call.catch(() => {});
      }
    });
  });

  describe('(f) a session that never sends Hello', () => {
    const realSetTimeout = globalThis.setTimeout;
    const realClearTimeout = globalThis.clearTimeout;
    afterEach(() => {
      globalThis.setTimeout = realSetTimeout;
      globalThis.clearTimeout = realClearTimeout;
    });

    it('is not registered, and cancelling it clears its hello timer and leaves nothing behind', async () => {
      // Track the agent listener's hello timer: its creation shows the broker has the stream, its
      // clearing shows the broker let go of it (there is no other observable event for either).
      const helloTimers = new Set<unknown>();
      globalThis.setTimeout = ((fn: (...a: unknown[]) => void, ms?: number, ...args: unknown[]) => {
        const t = realSetTimeout(fn, ms, ...args);
        if (new Error().stack?.includes('agent-listener')) helloTimers.add(t);
        return t;
      }) as typeof setTimeout;
      globalThis.clearTimeout = ((t: Parameters<typeof clearTimeout>[0]) => {
        helloTimers.delete(t);
        realClearTimeout(t);
      }) as typeof clearTimeout;

      const agent = rawAgent();
      const silent = agent.session();
      await pollUntil('the broker to start the session handler', () => helloTimers.size === 1, 3_000);
      expect(stack.broker.registry.counts()).to.deep.include({ agents: 0, sessions: 0 });
      expect(sessionCount(stack.broker)).to.equal(0);
      silent.cancel();
      await pollUntil('the hello timer to be cleared', () => helloTimers.size === 0, 3_000);
      expect(await protocolErrorsInThisTest()).to.equal(0);
      expect(stack.broker.registry.counts()).to.deep.include({ agents: 0, sessions: 0 });
    });
  });

  describe('(g) retiring idle offers', () => {
    it(
      'retireIdle(0) with minIdleOffers=1 and 3 idle offers ' + 'retires exactly the 2 oldest, ending them with OK',
      async () => {
        const { agent, sessionId } = await connected({ minIdleOffers: 1 });
        const offers = await openIdleOffers(agent, sessionId, 3);
        // retireIdle retires offers idle *longer than* maxIdleMs; pass a clock 1 ms ahead so the
        // offers registered in this very millisecond count as idle for longer than 0 ms.
        const retired = stack.broker.registry.retireIdle(0, Date.now() + 1);
        expect(retired).to.equal(2);
        expect(stack.broker.registry.counts().idleOffers).to.equal(1);
        const [s0, s1] = await Promise.all([offers[0]!.ended(), offers[1]!.ended()]);
        expect(s0.code).to.equal(Status.OK);
        expect(s1.code).to.equal(Status.OK);
        expect(offers[0]!.received).to.have.length(0);
        expect(offers[1]!.received).to.have.length(0);
        // Below the minimum nothing more is retired, and the kept offer still carries a call.
        expect(stack.broker.registry.retireIdle(0, Date.now() + 1_000)).to.equal(0);
        expect(offers[2]!.status).to.equal(undefined);
        const answered = offers[2]!.answerEcho();
        const res = await stack.caller.unary(ECHO.unary, Buffer.from('on the kept offer'), stack.md(), {
          deadline: Date.now() + 5_000,
        });
        expect(res.response.toString()).to.equal('on the kept offer');
        await answered;
        expect((await offers[2]!.ended()).code).to.equal(Status.OK);
      },
    );
  });

  it(
    'the raw agent can also be refused by certificate role: ' + 'a service certificate may not open a session',
    async () => {
      const agent = rawAgent(stack.serviceCert);
      const session = agent.session();
      session.hello();
      const st = await session.ended();
      expect(st.code).to.equal(Status.PERMISSION_DENIED);
      expect(st.details).to.contain('agent certificate is required');
    },
  );
});
