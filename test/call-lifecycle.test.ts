import { once } from 'node:events';
import { expect } from 'chai';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import { ECHO, type EchoUpstream, type SeenCall } from './helpers/echo-upstream';
import { type RawClient, collect } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';
import { TcpProxy } from './helpers/tcp-proxy';
import { pollUntil } from './helpers/wait';

const failure = (p: Promise<unknown>): Promise<ServiceError> =>
  p.then(
    () => {
      throw new Error('call succeeded');
    },
    (e: ServiceError) => e,
  );

/** Deadlines, cancellation, half-close and peers that vanish mid-call. */
describe('call lifecycle', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start();
  });
  after(async () => {
    await stack?.stop();
  });

  for (const dir of ['caller -> agent', 'site -> platform'] as const) {
    const client = (): RawClient => (dir === 'caller -> agent' ? stack.caller : stack.siteClient);
    const upstream = (): EchoUpstream => (dir === 'caller -> agent' ? stack.siteUpstream : stack.platformUpstream);
    // Each test marks its calls, so calls still arriving from an earlier test are not mistaken for its own.
    let caseCounter = 0;
    let caseId = '';
    const md = (): Metadata => {
      const m = dir === 'caller -> agent' ? stack.md() : new Metadata();
      m.set('x-case', caseId);
      return m;
    };
    beforeEach(() => {
      caseId = `${dir}-${++caseCounter}`;
    });
    const nextCall = (): Promise<SeenCall> =>
      new Promise((resolve) => {
        const on = (c: SeenCall): void => {
          if (c.metadata.get('x-case')[0] === caseId) {
            upstream().off('call', on);
            resolve(c);
          }
        };
        upstream().on('call', on);
      });
    const nextCancel = (): Promise<SeenCall> =>
      new Promise((resolve) => {
        const on = (c: SeenCall): void => {
          if (c.metadata.get('x-case')[0] === caseId) {
            upstream().off('cancelled', on);
            resolve(c);
          }
        };
        upstream().on('cancelled', on);
      });

    describe(dir, () => {
      it('the far side gets the remaining time, and an expired deadline cancels it', async () => {
        const timeoutMs = 1500;
        const deadline = Date.now() + timeoutMs;
        const seen = nextCall();
        const cancelled = nextCancel();
        const err = failure(client().unary(ECHO.hang, Buffer.from('x'), md(), { deadline }));
        const call = await seen;
        // The upstream's deadline is the caller's. gRPC sends a relative timeout on every hop, so each
        // of the three hops may shift it later by its transit time (as one direct hop would); allow
        // that, and nothing like the full timeout again. The allowance is generous because this
        // machine's 2 cores are shared with other builds: +100 ms failed there at load 12-16.
        expect(call.deadline).to.be.at.most(deadline + timeoutMs / 3);
        expect(call.deadline).to.be.at.least(deadline - 500);
        expect((await err).code).to.equal(Status.DEADLINE_EXCEEDED);
        await cancelled;
        expect(call.cancelled).to.equal(true);
      });

      it('a client cancel reaches the upstream', async () => {
        const seen = nextCall();
        const call = client().bidi(ECHO.hang, md());
        call.write(Buffer.from('x'));
        await seen;
        const cancelled = nextCancel();
        call.cancel();
        const r = await collect(call);
        expect(r.status.code).to.equal(Status.CANCELLED);
        await cancelled;
      });
    });
  }

  it('a call with no deadline on a hung upstream is not given one', async () => {
    const seen = once(stack.siteUpstream, 'call') as Promise<[SeenCall]>;
    const call = stack.caller.bidi(ECHO.hang, stack.md());
    call.write(Buffer.from('x'));
    const [s] = await seen;
    expect(s.deadline).to.equal(Infinity);
    const cancelled = once(stack.siteUpstream, 'cancelled');
    call.cancel();
    await collect(call);
    await cancelled;
  });

  it('1,000 cancels racing with responses leave no call, stream or waiter behind', async () => {
    const calls = Array.from({ length: 1000 }, (_, i) => {
      const call = stack.caller.bidi(i % 2 ? ECHO.bidi : ECHO.hang, stack.md());
      call.write(Buffer.from(`m${i}`));
      return call;
    });
    const results = calls.map((c) => collect(c));
    // Cancel in a different order from creation, some immediately, some after a response.
    calls.forEach((c, i) => {
      if (i % 3 === 0) c.cancel();
      else setImmediate(() => c.cancel());
    });
    const statuses = await Promise.all(results);
    for (const r of statuses) expect([Status.OK, Status.CANCELLED]).to.include(r.status.code);
    await pollUntil(
      'condition',
      () => stack.broker.registry.counts().activeCalls === 0 && stack.siteUpstream.active === 0,
    );
    expect(stack.broker.registry.counts().waiters).to.equal(0);
    expect(stack.broker.registry.entryCount).to.equal(1);
  });
});

describe('peers that vanish mid-call', () => {
  let stack: Stack;
  let proxy: TcpProxy;
  before(async () => {
    stack = await Stack.start({ startAgent: false });
    const [host, port] = stack.agentAddress.split(':');
    proxy = await new TcpProxy(host!, Number(port)).start();
    await stack.startAgent({ brokers: [proxy.address], brokerServerName: 'localhost' });
  });
  after(async () => {
    await proxy?.stop();
    await stack?.stop();
  });

  it('the agent connection dying mid-call gives the caller UNAVAILABLE, and the upstream is cancelled', async () => {
    const seen = once(stack.siteUpstream, 'call');
    const call = stack.caller.bidi(ECHO.hang, stack.md());
    call.write(Buffer.from('x'));
    await seen;
    const cancelled = once(stack.siteUpstream, 'cancelled');
    proxy.cut();
    const r = await collect(call);
    expect(r.status.code).to.equal(Status.UNAVAILABLE);
    expect(r.status.details).to.match(/agent "site-a"/);
    await cancelled;
    // The agent reconnects by itself (through the proxy) and calls work again.
    await stack.agent.waitConnected(5_000);
    await pollUntil('condition', () => stack.broker.registry.counts().sessions === 1);
    const ok = await stack.caller.unary(ECHO.unary, Buffer.from('back'), stack.md());
    expect(ok.response.toString()).to.equal('back');
  });

  it('a site client call in flight when the broker connection dies gets UNAVAILABLE', async () => {
    const seen = once(stack.platformUpstream, 'call');
    const call = stack.siteClient.bidi(ECHO.hang);
    call.write(Buffer.from('x'));
    await seen;
    const cancelled = once(stack.platformUpstream, 'cancelled');
    proxy.cut();
    const r = await collect(call);
    expect(r.status.code).to.equal(Status.UNAVAILABLE);
    await cancelled;
    await stack.agent.waitConnected(5_000);
  });

  it('an upstream that dies mid-call ends the call with UNAVAILABLE naming the upstream', async () => {
    const seen = once(stack.siteUpstream, 'call');
    const call = stack.caller.bidi(ECHO.hang, stack.md());
    call.write(Buffer.from('x'));
    await seen;
    await stack.siteUpstream.stop(); // forceShutdown: resets the call's stream
    const r = await collect(call);
    // A direct grpc-js client of a server that force-shuts down sees CANCELLED ("Call cancelled"),
    // the reset code of its stream; a proxy cannot tell that from a dropped connection and says
    // UNAVAILABLE, which callers may retry (Envoy answers an upstream reset the same way).
    expect(r.status.code, r.status.details).to.equal(Status.UNAVAILABLE);
    expect(r.status.details).to.match(/upstream 127\.0\.0\.1:\d+/);
    await pollUntil('condition', () => stack.broker.registry.counts().activeCalls === 0);
  });
});
