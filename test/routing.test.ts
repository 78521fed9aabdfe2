import { expect } from 'chai';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import { silentLogger } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { freePort } from './helpers/free-port';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';

const failure = (p: Promise<unknown>): Promise<ServiceError> =>
  p.then(
    () => {
      throw new Error('call succeeded');
    },
    (e: ServiceError) => e,
  );

describe('routing', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({ broker: { agentWaitMs: 1_000 } });
  });
  after(async () => {
    await stack?.stop();
  });

  it('names the agent with the burrow-agent-id metadata', async () => {
    const res = await stack.caller.unary(ECHO.unary, Buffer.from('by metadata'), stack.md());
    expect(res.response.toString()).to.equal('by metadata');
  });

  it('names the agent with the authority <id>.agent, so a stock client needs only a target change', async () => {
    const client = new RawClient(stack.apiAddress, mtlsCredentials(stack.serviceCert), {
      'grpc.default_authority': 'site-a.agent',
      'grpc.ssl_target_name_override': 'localhost',
    });
    try {
      const res = await client.unary(ECHO.unary, Buffer.from('by authority'), new Metadata());
      expect(res.response.toString()).to.equal('by authority');
    } finally {
      client.close();
    }
  });

  it("a caller at the agent listener: refused naming that listener and the caller API's port", async () => {
    const client = new RawClient(stack.agentAddress, mtlsCredentials(stack.serviceCert), {
      'grpc.ssl_target_name_override': 'localhost',
    });
    try {
      const err = await failure(client.unary(ECHO.unary, Buffer.from('x'), stack.md()));
      const apiPort = stack.apiAddress.split(':').pop();
      expect(err.code, err.details).to.equal(Status.PERMISSION_DENIED);
      expect(err.details).to.equal(
        `this is the broker's agent listener (agents connect here); call the caller API on port ${apiPort}`,
      );
    } finally {
      client.close();
    }
  });

  it('no agent named: INVALID_ARGUMENT', async () => {
    const err = await failure(stack.caller.unary(ECHO.unary, Buffer.from('x'), new Metadata()));
    expect(err.code).to.equal(Status.INVALID_ARGUMENT);
    expect(err.details).to.match(/burrow-agent-id/);
  });

  it('an agent that is not connected: waits up to the configured time, then UNAVAILABLE naming it', async () => {
    const started = Date.now();
    const err = await failure(stack.caller.unary(ECHO.unary, Buffer.from('x'), stack.md({}, 'site-nowhere')));
    expect(err.code).to.equal(Status.UNAVAILABLE);
    expect(err.details).to.match(/agent "site-nowhere" is not connected/);
    expect(Date.now() - started).to.be.at.least(900);
    expect(stack.broker.registry.counts().waiters).to.equal(0);
    expect(stack.broker.registry.entryCount).to.equal(1);
  });

  it('a caller deadline shorter than the wait: UNAVAILABLE naming the agent, before the deadline', async () => {
    const started = Date.now();
    const err = await failure(
      stack.caller.unary(ECHO.unary, Buffer.from('x'), stack.md({}, 'site-nowhere'), { deadline: Date.now() + 200 }),
    );
    expect(err.code, err.details).to.equal(Status.UNAVAILABLE);
    expect(err.details).to.match(/agent "site-nowhere" is not connected .*before the caller's deadline/);
    expect(Date.now() - started).to.be.below(200);
  });

  it('an agent that connects while a call waits for it gets the call', async () => {
    const cert = await stack.pki.issue('agent', 'site-late');
    const pending = stack.caller.unary(ECHO.unary, Buffer.from('late'), stack.md({}, 'site-late'), {
      deadline: Date.now() + 5_000,
    });
    const late = new Agent(
      {
        ...AGENT_DEFAULTS,
        brokers: [stack.agentAddress],
        tlsCertFile: cert.cert,
        tlsKeyFile: cert.key,
        caFile: cert.ca,
        upstreams: [{ service: '*', address: stack.siteUpstream.address }],
      },
      silentLogger(),
    );
    try {
      await late.start();
      expect((await pending).response.toString()).to.equal('late');
    } finally {
      await late.stop();
    }
  });

  it('a caller that cancels while waiting for an agent leaves no waiter behind', async () => {
    const call = stack.caller.bidi(ECHO.bidi, stack.md({}, 'site-nowhere'));
    call.on('error', () => {});
    await new Promise<void>((resolve) => {
      const t = setInterval(() => {
        if (stack.broker.registry.counts().waiters === 1) {
          clearInterval(t);
          resolve();
        }
      }, 5);
    });
    call.cancel();
    await new Promise<void>((resolve) => call.on('status', () => resolve()));
    await new Promise<void>((resolve) => {
      const t = setInterval(() => {
        if (stack.broker.registry.counts().waiters === 0) {
          clearInterval(t);
          resolve();
        }
      }, 5);
    });
    expect(stack.broker.registry.entryCount).to.equal(1);
  });

  it('an invalid agent id is refused with INVALID_ARGUMENT', async () => {
    const err = await failure(stack.caller.unary(ECHO.unary, Buffer.from('x'), stack.md({}, 'bad id with spaces')));
    expect(err.code).to.equal(Status.INVALID_ARGUMENT);
  });
});

describe('routing at the agent', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({ startAgent: false });
    await stack.startAgent({
      upstreams: [
        { service: 'burrow.test.Echo', address: stack.siteUpstream.address },
        { service: 'burrow.test.Gone', address: '127.0.0.1:1' },
      ],
    });
  });
  after(async () => {
    await stack?.stop();
  });

  it('no upstream for the service at the agent: UNIMPLEMENTED naming agent and service', async () => {
    const err = await failure(stack.caller.unary('/other.Service/Method', Buffer.from('x'), stack.md()));
    expect(err.code).to.equal(Status.UNIMPLEMENTED);
    expect(err.details).to.equal('agent "site-a" has no upstream for service "other.Service"');
  });

  it('an unreachable upstream (closed port): UNAVAILABLE naming the agent, the route and the cause', async () => {
    const err = await failure(stack.caller.unary('/burrow.test.Gone/Method', Buffer.from('x'), stack.md()));
    expect(err.code).to.equal(Status.UNAVAILABLE);
    expect(err.details).to.equal(
      'agent "site-a": upstream burrow.test.Gone at 127.0.0.1:1 is unreachable (ECONNREFUSED)',
    );
  });

  it('an unreachable default route names it `*`', async () => {
    const port = await freePort(); // free: nothing listens there, a connect is refused
    const cert = await stack.pki.issue('agent', 'site-b');
    const agent = new Agent(
      {
        ...stack.agentConfigWith({ upstreams: [{ service: '*', address: `127.0.0.1:${port}` }] }),
        tlsCertFile: cert.cert,
        tlsKeyFile: cert.key,
      },
      silentLogger(),
    );
    try {
      await agent.start();
      await agent.waitConnected();
      const err = await failure(stack.caller.unary(ECHO.unary, Buffer.from('x'), stack.md({}, 'site-b')));
      expect(err.code).to.equal(Status.UNAVAILABLE);
      expect(err.details).to.equal(`agent "site-b": upstream * at 127.0.0.1:${port} is unreachable (ECONNREFUSED)`);
    } finally {
      await agent.stop();
    }
  });

  it('many calls to an unreachable upstream do not starve other calls', async () => {
    const bad = Array.from({ length: 200 }, () =>
      failure(stack.caller.unary('/burrow.test.Gone/Method', Buffer.from('x'), stack.md())),
    );
    const good = Array.from({ length: 50 }, (_, i) => stack.caller.unary(ECHO.unary, Buffer.from(`g${i}`), stack.md()));
    const [badResults, goodResults] = await Promise.all([Promise.all(bad), Promise.all(good)]);
    for (const e of badResults) expect(e.code).to.equal(Status.UNAVAILABLE);
    goodResults.forEach((r, i) => {
      expect(r.response.toString()).to.equal(`g${i}`);
    });
  });
});

describe('routing: a caller deadline (1 s) shorter than --agent-wait (5 s)', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({ broker: { agentWaitMs: 5_000 } });
  });
  after(async () => {
    await stack?.stop();
  });

  it('an offline agent: UNAVAILABLE naming it within the deadline, not DEADLINE_EXCEEDED', async () => {
    const started = Date.now();
    const err = await failure(
      stack.caller.unary(ECHO.unary, Buffer.from('x'), stack.md({}, 'site-offline'), { deadline: started + 1_000 }),
    );
    const tookMs = Date.now() - started;
    expect(err.code, err.details).to.equal(Status.UNAVAILABLE);
    expect(err.details).to.match(
      /^agent "site-offline" is not connected \(waited \d+ ms, answering before the caller's deadline\)$/,
    );
    // It waited for the agent (most of the caller's second), then answered in time.
    expect(tookMs).to.be.within(700, 999);
    expect(stack.broker.registry.counts().waiters).to.equal(0);
  });
});
