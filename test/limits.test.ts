import { randomBytes } from 'node:crypto';
import { expect } from 'chai';
import { status as Status, type ServiceError } from '@grpc/grpc-js';
import { pollUntil } from './helpers/wait';
import { ECHO } from './helpers/echo-upstream';
import { collect } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';

const MiB = 1024 * 1024;
const failure = (p: Promise<unknown>): Promise<ServiceError> =>
  p.then(
    () => {
      throw new Error('call succeeded');
    },
    (e: ServiceError) => e,
  );

describe('message size limits', () => {
  describe('default limit (16 MiB)', () => {
    let stack: Stack;
    before(async () => {
      stack = await Stack.start();
    });
    after(async () => {
      await stack?.stop();
    });

    it('a 16 MiB message crosses both ways, byte-exact', async () => {
      const payload = randomBytes(16 * MiB);
      const res = await stack.caller.unary(ECHO.unary, payload, stack.md());
      expect(res.response.equals(payload)).to.equal(true);
      const back = await stack.siteClient.unary(ECHO.unary, payload);
      expect(back.response.equals(payload)).to.equal(true);
    });

    it('a larger one fails that call with RESOURCE_EXHAUSTED and the tunnel lives on', async () => {
      const err = await failure(stack.caller.unary(ECHO.unary, Buffer.alloc(16 * MiB + 1), stack.md()));
      expect(err.code).to.equal(Status.RESOURCE_EXHAUSTED);
      const ok = await stack.caller.unary(ECHO.unary, Buffer.from('after'), stack.md());
      expect(ok.response.toString()).to.equal('after');
    });
  });

  describe('configured limit (1 MiB)', () => {
    let stack: Stack;
    before(async () => {
      stack = await Stack.start({ broker: { maxMessageBytes: MiB }, agent: { maxMessageBytes: MiB } });
    });
    after(async () => {
      await stack?.stop();
    });

    it('a request over the limit fails with RESOURCE_EXHAUSTED in both directions', async () => {
      expect((await failure(stack.caller.unary(ECHO.unary, Buffer.alloc(MiB + 1), stack.md()))).code).to.equal(
        Status.RESOURCE_EXHAUSTED,
      );
      expect((await failure(stack.siteClient.unary(ECHO.unary, Buffer.alloc(MiB + 1)))).code).to.equal(
        Status.RESOURCE_EXHAUSTED,
      );
    });

    it('a response over the limit fails with RESOURCE_EXHAUSTED, and other calls carry on', async () => {
      const call = stack.caller.bidi(ECHO.serverStream, stack.md());
      call.write(Buffer.from(JSON.stringify({ count: 1, size: MiB + 10 })));
      call.end();
      const r = await collect(call);
      expect(r.status.code).to.equal(Status.RESOURCE_EXHAUSTED);
      const ok = await stack.caller.unary(ECHO.unary, Buffer.alloc(MiB), stack.md());
      expect(ok.response.length).to.equal(MiB);
    });
  });
});

describe('no head-of-line blocking', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start();
  });
  after(async () => {
    await stack?.stop();
  });

  it('a call whose reader stopped neither blocks other calls nor holds unbounded memory', async () => {
    // The stalled call asks for 256 MiB and never reads past its first message.
    const stalled = stack.caller.bidi(ECHO.serverStream, stack.md());
    stalled.write(Buffer.from(JSON.stringify({ count: 4096, size: 64 * 1024 })));
    stalled.end();
    await new Promise<void>((resolve) =>
      stalled.once('data', () => {
        stalled.pause();
        resolve();
      }),
    );
    // Backpressure must reach the upstream: it can only have produced what the windows and
    // buffers of three hops hold.
    await pollUntil('the stalled call streaming', () => stack.siteUpstream.streamedBytes > 0);
    const before = stack.siteUpstream.streamedBytes;

    // Meanwhile, other calls on the same agent — unary and a large bidi transfer — complete.
    const unary = await Promise.all(
      Array.from({ length: 200 }, (_, i) => stack.caller.unary(ECHO.unary, Buffer.from(`u${i}`), stack.md())),
    );
    expect(unary.map((r) => r.response.toString())).to.deep.equal(Array.from({ length: 200 }, (_, i) => `u${i}`));
    const big = stack.caller.bidi(ECHO.serverStream, stack.md());
    big.write(Buffer.from(JSON.stringify({ count: 256, size: 64 * 1024 })));
    big.end();
    const r = await collect(big);
    expect(r.status.code).to.equal(Status.OK);
    expect(r.messages).to.have.length(256);

    // The stalled call stayed stalled, and what its upstream produced is bounded (~2 MiB here out of
    // 256 MiB asked for), so the memory it holds is bounded too.
    const heldBytes = stack.siteUpstream.streamedBytes - 256 * 64 * 1024;
    expect(heldBytes).to.be.lessThan(8 * MiB);
    expect(before).to.be.lessThan(8 * MiB);
    stalled.cancel();
    await collect(stalled);
  });

  it('when one of several large bidi transfers ends, the others do not stall', async () => {
    const transfers = Array.from({ length: 4 }, (_, i) => {
      const call = stack.caller.bidi(ECHO.serverStream, stack.md());
      call.write(Buffer.from(JSON.stringify({ count: 64 * (i + 1), size: 64 * 1024 })));
      call.end();
      return collect(call);
    });
    const results = await Promise.all(transfers);
    results.forEach((r, i) => {
      expect(r.status.code).to.equal(Status.OK);
      expect(r.messages).to.have.length(64 * (i + 1));
    });
  });
});

describe('concurrency', () => {
  let stack: Stack;
  // Everything (caller, broker, agent, upstreams) shares this process and its 2 cores here, and the
  // agent's SETTINGS_MAX_CONCURRENT_STREAMS makes the broker queue calls past it, so a burst may take
  // seconds; this test is about correctness, `make bench` about speed.
  before(async () => {
    stack = await Stack.start({ broker: { agentWaitMs: 15_000 } });
  });
  after(async () => {
    await stack?.stop();
  });

  it('1,000 concurrent calls through one agent complete correctly', async () => {
    const payloads = Array.from({ length: 1000 }, (_, i) => Buffer.from(`call-${i}-${randomBytes(8).toString('hex')}`));
    const results = await Promise.all(
      payloads.map((p) => stack.caller.unary(ECHO.unary, p, stack.md(), { deadline: Date.now() + 20_000 })),
    );
    results.forEach((r, i) => {
      expect(r.response.equals(payloads[i]!)).to.equal(true);
    });
    // Every call stream ended and was accounted for: nothing is active, nothing waits.
    await pollUntil('no active calls', () => stack.broker.registry.counts().activeCalls === 0);
    expect(stack.broker.registry.counts().waiters).to.equal(0);
    expect(stack.agent.brokerTargets().map((t) => t.callsInFlight)).to.deep.equal([0]);
  });

  it('1,000 concurrent calls from site clients complete correctly', async () => {
    const results = await Promise.all(
      Array.from({ length: 1000 }, (_, i) => stack.siteClient.unary(ECHO.unary, Buffer.from(`s${i}`))),
    );
    results.forEach((r, i) => {
      expect(r.response.toString()).to.equal(`s${i}`);
    });
  });
});

describe("the agent's concurrency limit (--max-concurrent-calls)", () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({ agent: { maxConcurrentCalls: 3 } });
  });
  after(async () => {
    await stack?.stop();
  });

  it('calls past the limit wait for a free stream (SETTINGS_MAX_CONCURRENT_STREAMS), then succeed', async () => {
    let most = 0;
    const onCall = (): void => {
      most = Math.max(most, stack.siteUpstream.active);
    };
    stack.siteUpstream.on('call', onCall);
    try {
      // Three calls hold every call stream the agent allows; the fourth and fifth must queue, not fail.
      const held = Array.from({ length: 3 }, () => stack.caller.bidi(ECHO.bidi, stack.md()));
      for (const c of held) c.write(Buffer.from('hold'));
      await Promise.all(held.map((c) => new Promise((resolve) => c.once('data', resolve))));
      expect(stack.siteUpstream.active).to.equal(3);
      const queued = [0, 1].map((i) =>
        stack.caller.unary(ECHO.unary, Buffer.from(`q${i}`), stack.md(), { deadline: Date.now() + 10_000 }),
      );
      const settled = Promise.allSettled(queued);
      // The queued calls have not reached the upstream while the three are held.
      const raced = await Promise.race([settled, new Promise((resolve) => setTimeout(resolve, 300, 'waiting'))]);
      expect(raced, 'calls past the limit finished while every stream was held').to.equal('waiting');
      expect(stack.siteUpstream.active).to.equal(3);
      for (const c of held) c.end();
      await Promise.all(held.map((c) => collect(c)));
      const answers = await Promise.all(queued);
      expect(answers.map((r) => r.response.toString())).to.deep.equal(['q0', 'q1']);
      // Many more than the limit at once: all succeed, never more than 3 at the upstream.
      const burst = await Promise.all(
        Array.from({ length: 60 }, (_, i) => stack.caller.unary(ECHO.unary, Buffer.from(`b${i}`), stack.md())),
      );
      expect(burst.map((r) => r.response.toString())).to.deep.equal(Array.from({ length: 60 }, (_, i) => `b${i}`));
      expect(most).to.equal(3);
    } finally {
      stack.siteUpstream.off('call', onCall);
    }
  });
});
