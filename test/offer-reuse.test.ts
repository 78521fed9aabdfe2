import { expect } from 'chai';
import { status as Status, type ServiceError } from '@grpc/grpc-js';
import { PROTOCOL_VERSION, type CallStream } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { collect } from './helpers/raw-grpc';
import { RawAgent, type RawCallStream, type RawSession } from './helpers/raw-agent';
import { Stack } from './helpers/stack';
import { pollUntil } from './helpers/wait';

/**
 * Protocol version 2: an Offer stream carries calls one after the other (tunnel.proto, "Offer").
 * Component tests drive the broker with a hand-written agent (RawAgent) that says exactly which
 * frames go where; an end-to-end test runs the real agent. Real sockets, real mTLS.
 */
describe('offer reuse (protocol version 2)', () => {
  let stack: Stack;
  const agents: RawAgent[] = [];

  before(async () => {
    stack = await Stack.start({ startAgent: false });
  });
  after(async () => {
    await stack?.stop();
  });
  afterEach(async () => {
    for (const a of agents.splice(0)) a.close();
    await pollUntil(
      'condition',
      () => stack.broker.registry.counts().sessions === 0 && stack.broker.registry.entryCount === 0,
    );
  });

  /** A raw agent with a session of the given versions and one offer the broker holds as idle. */
  const withOneOffer = async (
    protocolVersions: number[],
  ): Promise<{ session: RawSession; offer: RawCallStream; version: number }> => {
    const agent = new RawAgent(stack.agentAddress, stack.agentCert);
    agents.push(agent);
    const session = agent.session();
    session.hello({ protocolVersions, minIdleOffers: 0 });
    const welcome = await session.welcome();
    const offer = agent.offer(welcome.sessionId);
    await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === 1);
    return { session, offer, version: welcome.protocolVersion };
  };

  const idleStreams = (): CallStream[] =>
    stack.broker.registry.allSessions().flatMap((s) => s.idle.map((o) => o.stream));
  const echo = (text: string): Promise<{ response: Buffer }> =>
    stack.caller.unary(ECHO.unary, Buffer.from(text), stack.md());

  it('one offer carries 5 sequential calls and stays open, back in the idle pool after each', async () => {
    const { offer, version } = await withOneOffer([1, 2]);
    expect(version).to.equal(2);
    const [stream] = idleStreams();
    for (let i = 0; i < 5; i++) {
      const call = echo(`call ${i}`);
      const start = await offer.answerEcho([], true);
      expect(start.method).to.equal(ECHO.unary);
      expect((await call).response.toString()).to.equal(`call ${i}`);
      await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === 1);
      expect(idleStreams()).to.deep.equal([stream]); // the same stream object, not a new offer
      expect(offer.status).to.equal(undefined);
    }
    expect(stack.broker.registry.counts().activeCalls).to.equal(0);
  });

  it(
    'a reused offer never carries two calls at once: the ' +
      "second call waits (Demand) until the first one's Trailers",
    async () => {
      const { session, offer } = await withOneOffer([1, 2]);
      const first = stack.caller.bidi(ECHO.bidi, stack.md());
      const firstResult = collect(first);
      first.write(Buffer.from('one'));
      await offer.expectNext('start');
      expect((await offer.expectNext('message')).data.toString()).to.equal('one');
      // The only offer is busy: a second call must wait, and the broker asks the agent for more.
      const second = echo('two');
      expect((await session.expectNext('demand')).offers).to.equal(1);
      first.end();
      await offer.expectNext('halfClose');
      offer.send({ kind: 'message', data: Buffer.from('one') });
      // Nothing of the second call has reached the offer while the first is in progress.
      expect(offer.received.filter((f) => f.kind === 'start')).to.have.length(1);
      offer.send({ kind: 'trailers', trailers: { code: Status.OK, message: '', metadata: [] } });
      const r1 = await firstResult;
      expect(r1.status.code).to.equal(Status.OK);
      expect(r1.messages.map(String)).to.deep.equal(['one']);
      // Trailers after HalfClose ended the call: the same stream now carries the waiting call.
      await offer.answerEcho([], true);
      expect((await second).response.toString()).to.equal('two');
    },
  );

  it('a cancelled call is followed by Trailers, and only then does the stream carry the next (good) call', async () => {
    const { session, offer } = await withOneOffer([1, 2]);
    const doomed = stack.caller.bidi(ECHO.bidi, stack.md());
    const doomedResult = collect(doomed);
    doomed.write(Buffer.from('x'));
    await offer.expectNext('start');
    await offer.expectNext('message');
    doomed.cancel();
    // grpc-js may report the client's half of the stream ended before the cancellation.
    let f = await offer.next();
    if (f.kind === 'halfClose') f = await offer.next();
    expect(f.kind).to.equal('cancel');
    expect((f as { reason: string }).reason).to.contain('cancelled');
    expect((await doomedResult).status.code).to.equal(Status.CANCELLED);
    // Until the agent answers the Cancel with Trailers the stream is not free: a new call waits.
    const next = echo('after cancel');
    expect((await session.expectNext('demand')).offers).to.equal(1);
    expect(stack.broker.registry.counts().idleOffers).to.equal(0);
    // Frames of the cancelled call still in flight are dropped by the broker, not errors.
    offer.send({ kind: 'message', data: Buffer.from('late') });
    offer.send({
      kind: 'trailers',
      trailers: { code: Status.CANCELLED, message: 'cancelled by the originator', metadata: [] },
    });
    const start = await offer.answerEcho([], true);
    expect(start.method).to.equal(ECHO.unary);
    expect((await next).response.toString()).to.equal('after cancel');
    expect(offer.status).to.equal(undefined);
  });

  it(
    'an agent that never answers Cancel with Trailers ' + 'has the offer ended by the broker after the timeout',
    async () => {
      const { offer } = await withOneOffer([1, 2]);
      stack.broker.registry.cancelTrailersTimeoutMs = 300;
      try {
        const doomed = stack.caller.bidi(ECHO.bidi, stack.md());
        const doomedResult = collect(doomed);
        await offer.expectNext('start');
        doomed.cancel();
        expect((await doomedResult).status.code).to.equal(Status.CANCELLED);
        await offer.seen((f) => f.kind === 'cancel');
        expect(stack.broker.registry.counts().activeCalls).to.equal(1); // still held, waiting for Trailers
        const st = await offer.ended();
        expect(st.code).to.equal(Status.UNAVAILABLE);
        expect(st.details).to.contain('no trailers');
        await pollUntil(
          'condition',
          () => stack.broker.registry.counts().activeCalls === 0 && stack.broker.registry.counts().idleOffers === 0,
        );
        expect(stack.broker.registry.counts().sessions).to.equal(1); // a stream error, not a protocol error
      } finally {
        stack.broker.registry.cancelTrailersTimeoutMs = 30_000;
      }
    },
  );

  it(
    'a call whose answerer finishes before the client half-closes ' +
      "ends with the broker's Cancel; the stream is reused",
    async () => {
      const { offer } = await withOneOffer([1, 2]);
      const call = stack.caller.bidi(ECHO.bidi, stack.md());
      const result = collect(call);
      await offer.expectNext('start');
      offer.send({ kind: 'trailers', trailers: { code: Status.FAILED_PRECONDITION, message: 'no', metadata: [] } });
      expect((await result).status.code).to.equal(Status.FAILED_PRECONDITION);
      expect((await offer.expectNext('cancel')).reason).to.equal('call completed');
      await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === 1);
      const next = echo('next');
      await offer.answerEcho([], true);
      expect((await next).response.toString()).to.equal('next');
    },
  );

  it('an answerer frame between two calls of a reused stream is a protocol error that ends the session', async () => {
    const { session, offer } = await withOneOffer([1, 2]);
    const call = echo('a');
    await offer.answerEcho([], true);
    await call;
    // The agent (answerer) cannot start calls; an answerer frame before the next Start is an error.
    offer.send({ kind: 'headers', metadata: [] });
    expect((await offer.ended()).code).to.equal(Status.INTERNAL);
    expect((await session.ended()).code).to.equal(Status.INTERNAL);
  });

  it('a version-1 agent is still served one call per offer: the broker ends the offer after the call', async () => {
    const { session, offer, version } = await withOneOffer([1]);
    expect(version).to.equal(1);
    const call = echo('v1');
    await offer.answerEcho(); // half-closes, as a version-1 agent does
    expect((await call).response.toString()).to.equal('v1');
    expect((await offer.ended()).code).to.equal(Status.OK);
    // The offer is gone: the next call needs a new one.
    const next = echo('v1 again').catch((e: ServiceError) => e);
    expect((await session.expectNext('demand')).offers).to.equal(1);
    expect(((await next) as ServiceError).code).to.equal(Status.UNAVAILABLE);
  });

  it(
    'the broker retires a reused offer that has been idle past the TTL, ' + 'counting idle time from its last call',
    async () => {
      const { offer } = await withOneOffer([1, 2]);
      const call = echo('r');
      await offer.answerEcho([], true);
      await call;
      await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === 1);
      const [idle] = stack.broker.registry.allSessions()[0]!.idle;
      expect(Date.now() - idle!.idleSinceMs).to.be.lessThan(1000); // reset by the release
      expect(stack.broker.registry.retireIdle(60_000)).to.equal(0);
      expect(stack.broker.registry.retireIdle(60_000, Date.now() + 61_000)).to.equal(1);
      expect((await offer.ended()).code).to.equal(Status.OK);
      expect(stack.broker.registry.counts().idleOffers).to.equal(0);
    },
  );

  it(
    'an agent withdraws an idle reused offer by half-closing it: ' + 'the broker ends it with OK and forgets it',
    async () => {
      const { offer } = await withOneOffer([1, 2]);
      const call = echo('w');
      await offer.answerEcho([], true);
      await call;
      await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === 1);
      offer.end();
      expect((await offer.ended()).code).to.equal(Status.OK);
      await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === 0);
      expect(stack.broker.registry.counts().activeCalls).to.equal(0);
    },
  );

  it(
    'a version-3 agent that says Drain gets no more calls; the broker ends its idle offers and keeps the session ' +
      'until the agent leaves',
    async () => {
      const { session, offer, version } = await withOneOffer([1, 2, 3]);
      expect(version).to.equal(3);
      session.send({ kind: 'drain', reason: 'leaving' });
      // The broker ends the idle offer itself (status OK): that is the agent's cue to close.
      expect((await offer.ended()).code).to.equal(Status.OK);
      expect(stack.broker.registry.canServe('site-a')).to.equal(false);
      expect(stack.broker.registry.counts().sessions).to.equal(1);
      // A caller now waits for another tunnel of the agent, and fails when none comes.
      const err = await echo('nobody').then(
        () => undefined,
        (e: ServiceError) => e,
      );
      expect(err?.code).to.equal(Status.UNAVAILABLE);
      expect(err?.details).to.contain('opened no tunnel stream');
    },
  );

  it('Drain from a version-2 agent is a protocol error that ends its session', async () => {
    const { session } = await withOneOffer([1, 2]);
    session.send({ kind: 'drain', reason: 'not in version 2' });
    expect((await session.ended()).code).to.equal(Status.INTERNAL);
    await pollUntil('condition', () => stack.broker.registry.counts().sessions === 0);
  });

  it('an offer half-closed in the middle of a call fails that call with UNAVAILABLE, and only that call', async () => {
    const { offer } = await withOneOffer([1, 2]);
    const call = stack.caller.bidi(ECHO.bidi, stack.md());
    const result = collect(call);
    await offer.expectNext('start');
    offer.end();
    const r = await result;
    expect(r.status.code).to.equal(Status.UNAVAILABLE);
    expect(r.status.details).to.contain('ended before the call completed');
    await pollUntil(
      'condition',
      () => stack.broker.registry.counts().activeCalls === 0 && stack.broker.registry.counts().sessions === 1,
    );
  });

  it('end to end, the real agent answers 40 calls at concurrency 8 on the offers it already had', async () => {
    await stack.startAgent({ minIdleOffers: 8 });
    try {
      await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === 8);
      expect(stack.broker.registry.allSessions()[0]!.protocolVersion).to.equal(PROTOCOL_VERSION);
      const before = new Set(idleStreams());
      let next = 0;
      await Promise.all(
        Array.from({ length: 8 }, async () => {
          while (next < 40) {
            const text = `m${next++}`;
            expect((await echo(text)).response.toString()).to.equal(text);
          }
        }),
      );
      await pollUntil('condition', () => stack.broker.registry.counts().activeCalls === 0);
      const after = idleStreams();
      expect(after.length).to.be.at.least(8);
      // Pool top-ups may add offers, but every call ran on a stream that carries calls again.
      expect(after.filter((s) => before.has(s)).length).to.equal(8);
      expect(stack.siteUpstream.calls.filter((c) => c.method === ECHO.unary).length).to.be.at.least(40);
    } finally {
      await stack.agent.stop();
    }
  });
});
