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
    await pollUntil('condition', () => stack.siteUpstream.streamedBytes > 0);
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
  // Everything (caller, broker, agent, upstreams) shares this process and its 2 cores here, so the
  // first burst may take seconds to grow the pool; this test is about correctness, `make bench`
  // about speed.
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
    // The pool grew on demand, and every stream went back or was retired: nothing is active.
    await pollUntil('condition', () => stack.broker.registry.counts().activeCalls === 0);
    expect(stack.broker.registry.counts().waiters).to.equal(0);
    expect(Number((await stack.broker.metrics.demandedOffers.get()).values[0]?.value ?? 0)).to.be.greaterThan(0);
  });

  it('1,000 concurrent calls from site clients complete correctly', async () => {
    const results = await Promise.all(
      Array.from({ length: 1000 }, (_, i) => stack.siteClient.unary(ECHO.unary, Buffer.from(`s${i}`))),
    );
    results.forEach((r, i) => {
      expect(r.response.toString()).to.equal(`s${i}`);
    });
  });

  it('idle streams above the minimum are retired, and calls still work afterwards', async () => {
    // Reused offers (protocol 2) serve waiting calls as they come back, so offers demanded during
    // the burst may still be arriving after it: retire once every demanded offer is in.
    await pollUntil('condition', () => stack.broker.registry.allSessions().every((s) => s.owedOffers === 0), 15_000);
    const idleBefore = stack.broker.registry.counts().idleOffers;
    expect(idleBefore).to.be.greaterThan(stack.agentConfig.minIdleOffers);
    stack.broker.registry.retireIdle(-1); // -1: also the offers that came back this millisecond
    await pollUntil('condition', () => stack.broker.registry.counts().idleOffers === stack.agentConfig.minIdleOffers);
    const ok = await stack.caller.unary(ECHO.unary, Buffer.from('after retire'), stack.md());
    expect(ok.response.toString()).to.equal('after retire');
  });
});
