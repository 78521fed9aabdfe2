import { expect } from 'chai';
import { status as Status, type ServiceError } from '@grpc/grpc-js';
import { CallLimiter, LimitExceededError } from '@burrow/broker';
import { ECHO } from './helpers/echo-upstream';
import { httpsJson } from './helpers/https-json';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { AGENT_ID, Stack } from './helpers/stack';
import { pollUntil } from './helpers/wait';

const failure = (p: Promise<unknown>): Promise<ServiceError | undefined> =>
  p.then(
    () => undefined,
    (e: ServiceError) => e,
  );

describe('broker admission: call limits', () => {
  it('CallLimiter: concurrency per key is released exactly once and rate refills with time', () => {
    let nowMs = 0;
    const limiter = new CallLimiter(
      { caller: { maxConcurrent: 2, ratePerSecond: 0 }, agent: { maxConcurrent: 0, ratePerSecond: 3 } },
      () => nowMs,
    );
    const r1 = limiter.admit('svc-a', 'site-1');
    const r2 = limiter.admit('svc-a', 'site-2');
    expect(() => limiter.admit('svc-a', 'site-3'))
      .to.throw(LimitExceededError)
      .with.property('limit', 'caller_concurrency');
    // Another caller is not affected by svc-a's concurrency.
    const r3 = limiter.admit('svc-b', 'site-1');
    r1();
    r1(); // a second release must not free a second slot
    const r4 = limiter.admit('svc-a', 'site-1');
    expect(() => limiter.admit('svc-a', 'site-1')).to.throw(LimitExceededError);
    // site-1 has used its 3 tokens (r1, r3, r4); the refused call above took none.
    expect(() => limiter.admit('svc-c', 'site-1'))
      .to.throw(LimitExceededError)
      .with.property('limit', 'agent_rate');
    nowMs += 400; // 1.2 tokens back
    const r5 = limiter.admit('svc-c', 'site-1');
    expect(() => limiter.admit('svc-d', 'site-1'))
      .to.throw(LimitExceededError)
      .with.property('limit', 'agent_rate');
    for (const r of [r2, r3, r4, r5]) r();
    nowMs += 10_000;
    limiter.sweep();
    expect(limiter.trackedKeys).to.equal(0);
  });

  describe('through a broker', () => {
    let stack: Stack;
    before(async () => {
      stack = await Stack.start({
        broker: {
          limits: { caller: { maxConcurrent: 0, ratePerSecond: 0 }, agent: { maxConcurrent: 2, ratePerSecond: 0 } },
        },
      });
    });
    after(async () => {
      await stack.stop();
    });

    it(
      'the call past the per-agent concurrency limit gets RESOURCE_EXHAUSTED, ' + 'and the slot frees when a call ends',
      async () => {
        const hanging = [0, 1].map(() => {
          const call = stack.caller.client.makeUnaryRequest(
            ECHO.hang,
            (b: Buffer) => b,
            (b: Buffer) => b,
            Buffer.from('x'),
            stack.md(),
            () => {},
          );
          return call;
        });
        await pollUntil('condition', () => stack.siteUpstream.active === 2);
        const err = await failure(stack.caller.unary(ECHO.unary, Buffer.from('third'), stack.md()));
        expect(err?.code).to.equal(Status.RESOURCE_EXHAUSTED);
        expect(err?.details).to.include(`agent "${AGENT_ID}" has 2 calls in flight`);
        hanging[0]!.cancel();
        await pollUntil('condition', () => stack.siteUpstream.active === 1);
        const ok = await stack.caller.unary(ECHO.unary, Buffer.from('fits again'), stack.md());
        expect(ok.response.toString()).to.equal('fits again');
        hanging[1]!.cancel();
        await pollUntil('condition', () => stack.siteUpstream.active === 0);
        const text = await (await fetch(`${stack.adminUrl}/metrics`)).text();
        expect(text).to.match(/burrow_broker_limited_calls_total\{limit="agent_concurrency"\} 1/);
      },
    );
  });
});

describe('broker admission: per-caller rate', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({
      broker: {
        limits: { caller: { maxConcurrent: 0, ratePerSecond: 2 }, agent: { maxConcurrent: 0, ratePerSecond: 0 } },
      },
    });
  });
  after(async () => {
    await stack.stop();
  });

  it('a caller over its rate gets RESOURCE_EXHAUSTED; another caller is still served', async () => {
    const results = await Promise.all(
      [0, 1, 2, 3].map(() => failure(stack.caller.unary(ECHO.unary, Buffer.from('r'), stack.md()))),
    );
    const refused = results.filter((e) => e?.code === Status.RESOURCE_EXHAUSTED);
    // The bucket holds 2; 4 calls at once cannot all pass, and at most ~0 tokens refill meanwhile.
    expect(refused.length).to.be.at.least(1);
    expect(refused[0]!.details).to.match(/caller spiffe:\/\/.+\/service\/platform-svc exceeded 2 calls per second/);
    const other = new RawClient(stack.apiAddress, mtlsCredentials(await stack.pki.issue('service', 'other-svc')));
    try {
      const ok = await other.unary(ECHO.unary, Buffer.from('mine'), stack.md());
      expect(ok.response.toString()).to.equal('mine');
    } finally {
      other.close();
    }
  });
});

describe('AuthZEN HTTP binding (transport and errors)', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({ broker: { authzenListen: '127.0.0.1:0' } });
  });
  after(async () => {
    await stack.stop();
  });

  const request = {
    subject: { type: 'User', id: 'alice' },
    action: { name: 'read' },
    resource: { type: 'Document', id: 'd1' },
  };

  it('serves the PDP metadata for an agent', async () => {
    const res = await httpsJson(stack.authzenAddress, 'GET', `/agents/${AGENT_ID}/.well-known/authzen-configuration`, {
      cert: stack.serviceCert,
      ca: stack.serviceCert.ca,
    });
    expect(res.status).to.equal(200);
    // Relative to the metadata URL: the broker never builds URLs from the request's Host header.
    expect(res.body.policy_decision_point).to.equal(`/agents/${AGENT_ID}`);
    expect(res.body.access_evaluation_endpoint).to.equal(`/agents/${AGENT_ID}/access/v1/evaluation`);
    expect(res.body.access_evaluations_endpoint).to.match(/\/access\/v1\/evaluations$/);
  });

  it(
    'carries an evaluation to the agent: without policies it answers FAILED_PRECONDITION, mapped to 400 with the ' +
      'gRPC code and message',
    async () => {
      const res = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
        cert: stack.serviceCert,
        ca: stack.serviceCert.ca,
        body: request,
        headers: { 'x-request-id': 'req-42' },
      });
      expect(res.status).to.equal(400);
      expect(res.body.error.code).to.equal('FAILED_PRECONDITION');
      expect(res.body.error.message).to.include('--policies');
      expect(res.headers['x-request-id']).to.equal('req-42');
    },
  );

  it('answers bad requests with a clear error and no call', async () => {
    const base = { cert: stack.serviceCert, ca: stack.serviceCert.ca };
    const notJson = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
      ...base,
      rawBody: '{"subject":',
    });
    expect(notJson.status).to.equal(400);
    expect(notJson.body.error.message).to.match(/^body is not JSON/);
    const wrongShape = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
      ...base,
      body: { subject: 'alice' },
    });
    expect(wrongShape.status).to.equal(400);
    expect(wrongShape.body.error.message).to.equal('subject: must be a JSON object');
    const badId = await httpsJson(stack.authzenAddress, 'POST', '/agents/bad%20id/access/v1/evaluation', {
      ...base,
      body: request,
    });
    expect(badId.status).to.equal(400);
    expect(badId.body.error.message).to.include('is not a valid agent id');
    const notFound = await httpsJson(stack.authzenAddress, 'POST', '/evaluation', { ...base, body: request });
    expect(notFound.status).to.equal(404);
    const wrongMethod = await httpsJson(stack.authzenAddress, 'GET', `/agents/${AGENT_ID}/access/v1/evaluation`, base);
    expect(wrongMethod.status).to.equal(405);
    expect(wrongMethod.headers.allow).to.equal('POST');
    const wrongType = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
      ...base,
      rawBody: 'x',
      headers: { 'content-type': 'text/plain' },
    });
    expect(wrongType.status).to.equal(415);
  });

  it("an agent that is not connected: 503 naming the agent, after the broker's wait", async () => {
    const res = await httpsJson(stack.authzenAddress, 'POST', '/agents/nobody-here/access/v1/evaluation', {
      cert: stack.serviceCert,
      ca: stack.serviceCert.ca,
      body: request,
    });
    expect(res.status).to.equal(503);
    expect(res.body.error.code).to.equal('UNAVAILABLE');
    expect(res.body.error.message).to.include('nobody-here');
  });

  it('refuses a client without a certificate at the TLS handshake, and an agent certificate with 403', async () => {
    const err = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
      ca: stack.serviceCert.ca,
      body: request,
    }).then(
      () => undefined,
      (e: Error) => e,
    );
    expect(err, 'a request without a client certificate must fail').to.be.instanceOf(Error);
    const asAgent = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
      cert: stack.agentCert,
      ca: stack.serviceCert.ca,
      body: request,
    });
    expect(asAgent.status).to.equal(403);
    expect(asAgent.body.error.message).to.include('a service certificate is required');
  });
});
