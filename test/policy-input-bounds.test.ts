import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { status as Status } from '@grpc/grpc-js';
import { BurrowCallError, BurrowClient } from '@burrow/client';
import { API_CODECS, POLICY_METHODS, type JsonObject } from '@burrow/tunnel';
import { httpsJson } from './helpers/https-json';
import { examplePolicyConfig } from './helpers/policy-fixture';
import { AGENT_ID, Stack } from './helpers/stack';

const ordinary = {
  subject: { type: 'User', id: 'carol' },
  action: { name: 'edit' },
  resource: { type: 'Document', id: 'atlas-design' },
};

/** `{"a": {"a": ... {"a": true}}}`, `levels` objects deep. */
function nested(levels: number): JsonObject {
  let value: JsonObject = { a: true };
  for (let i = 1; i < levels; i++) value = { a: value };
  return value;
}

/**
 * Issue 13 item 12: a policy request's size, nesting and value count are bounded before it is
 * decoded or evaluated, on both bindings (the agent's gRPC PolicyDecisionService and the AuthZEN
 * HTTP binding at the broker); malformed input is 400 / INVALID_ARGUMENT naming the problem; the
 * PDP metadata never repeats the request's Host header.
 */
describe('policy requests: bounded before evaluation, malformed input refused', function () {
  this.timeout(60_000);
  let stack: Stack;
  let client: BurrowClient;
  let tmp: string;
  const http = (): { cert: Stack['serviceCert']; ca: string } => ({
    cert: stack.serviceCert,
    ca: stack.serviceCert.ca,
  });
  const EVALUATION = `/agents/${AGENT_ID}/access/v1/evaluation`;

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), 'burrow-bounds-'));
    const policy = examplePolicyConfig(path.join(tmp, 'audit.jsonl'));
    stack = await Stack.start({ broker: { authzenListen: '127.0.0.1:0' }, agent: { policy } });
    const tls = { certFile: stack.serviceCert.cert, keyFile: stack.serviceCert.key, caFile: stack.serviceCert.ca };
    client = new BurrowClient({ broker: stack.apiAddress, tls, serverName: 'localhost', timeoutMs: 30_000 });
  });
  after(async () => {
    client?.close();
    await stack?.stop();
    rmSync(tmp, { recursive: true, force: true });
  });

  /** Latency of one ordinary decision, in ms. */
  async function timedDecision(): Promise<number> {
    const started = performance.now();
    const answer = await client.evaluate(AGENT_ID, ordinary);
    expect(answer.decision).to.equal(true);
    return performance.now() - started;
  }

  it("a 1 M-element set is refused quickly, naming the bound, and another caller's decisions stay fast", async () => {
    const baseline: number[] = [];
    for (let i = 0; i < 5; i++) baseline.push(await timedDecision());
    const huge = { ...ordinary, context: { tags: Array.from({ length: 1_000_000 }, (_, i) => i) } };
    // Encoded before the clock starts: the test's own encoding is not the agent's cost.
    const message = API_CODECS.evaluationRequest.encode(huge);
    const body = JSON.stringify(huge);

    const started = performance.now();
    const viaGrpc = stack.caller.unary(POLICY_METHODS.evaluate, message, stack.md()).then(
      () => undefined,
      (e: { code: number; details: string }) => ({ ...e, ms: performance.now() - started }),
    );
    const viaHttp = httpsJson(stack.authzenAddress, 'POST', EVALUATION, { ...http(), rawBody: body }).then((r) => ({
      ...r,
      ms: performance.now() - started,
    }));
    const during: number[] = [];
    for (let i = 0; i < 10; i++) during.push(await timedDecision());
    const [grpcErr, httpRes] = await Promise.all([viaGrpc, viaHttp]);

    const max = (xs: number[]): number => Math.round(Math.max(...xs) * 10) / 10;
    const p50 = (xs: number[]): number => {
      const sorted = [...xs].sort((a, b) => a - b);
      return Math.round(sorted[Math.floor(xs.length / 2)]! * 10) / 10;
    };
    const mb = (n: number): string => (n / 1e6).toFixed(1);
    console.log(
      `      1M-element request (${mb(message.length)} MB protobuf, ${mb(body.length)} MB JSON): ` +
        `gRPC answered in ${Math.round(grpcErr?.ms ?? -1)} ms, HTTP ${httpRes.status} ` +
        `in ${Math.round(httpRes.ms)} ms; ` +
        `another caller's decision: p50 ${p50(baseline)} / max ${max(baseline)} ms before, ` +
        `p50 ${p50(during)} / max ${max(during)} ms during`,
    );
    expect(grpcErr, 'the gRPC request must be refused').to.not.equal(undefined);
    expect(grpcErr!.code).to.equal(Status.INVALID_ARGUMENT);
    expect(grpcErr!.details).to.match(/policy requests may be at most 262144 bytes/);
    expect(httpRes.status, JSON.stringify(httpRes.body)).to.equal(413);
    expect(httpRes.body.error.message).to.include('65536 bytes');
    expect(grpcErr!.ms).to.be.below(5_000);
    expect(httpRes.ms).to.be.below(5_000);
    expect(max(during), "another caller's decision latency during the attack").to.be.below(1_000);
  });

  it('more values than the bound, under the byte bound, is 400 and INVALID_ARGUMENT naming the bound', async () => {
    // 12,000 booleans: 60 KB of JSON, 48 KB of protobuf, under both byte bounds.
    const many = { ...ordinary, context: { tags: Array.from({ length: 12_000 }, () => true) } };
    const viaHttp = await httpsJson(stack.authzenAddress, 'POST', EVALUATION, { ...http(), body: many });
    expect(viaHttp.status, JSON.stringify(viaHttp.body)).to.equal(400);
    expect(viaHttp.body.error.message).to.match(/more than 10000 values/);
    const viaGrpc = await client.evaluate(AGENT_ID, many).then(
      () => undefined,
      (e: BurrowCallError) => e,
    );
    expect(viaGrpc?.code).to.equal(Status.INVALID_ARGUMENT);
    expect(viaGrpc?.details).to.match(/more than 10000 values/);
  });

  it('nesting over the bound is 400 over HTTP and INVALID_ARGUMENT over gRPC, naming the bound', async () => {
    const deep = { ...ordinary, context: nested(20) };
    const viaGrpc = await client.evaluate(AGENT_ID, deep).then(
      () => undefined,
      (e: BurrowCallError) => e,
    );
    expect(viaGrpc, 'depth 20 must be refused').to.be.instanceOf(BurrowCallError);
    expect(viaGrpc!.code).to.equal(Status.INVALID_ARGUMENT);
    expect(viaGrpc!.details).to.match(/may nest at most 16 levels/);
    for (const levels of [20, 5_000]) {
      // Written out, not stringified: the test must not recurse 5,000 deep itself.
      const context = `${'{"a":'.repeat(levels)}true${'}'.repeat(levels)}`;
      const body = `${JSON.stringify(ordinary).slice(0, -1)},"context":${context}}`;
      const res = await httpsJson(stack.authzenAddress, 'POST', EVALUATION, { ...http(), rawBody: body });
      expect(res.status, `depth ${levels}: ${JSON.stringify(res.body).slice(0, 300)}`).to.equal(400);
      expect(res.body.error.code).to.equal('INVALID_ARGUMENT');
      expect(res.body.error.message).to.match(/may nest at most 16 levels/);
    }
    // A request within the bound still gets its decision.
    expect((await client.evaluate(AGENT_ID, { ...ordinary, context: nested(10) })).decision).to.equal(true);
  });

  it('a path with %ZZ and a body that is not JSON are 400 naming the problem, never 500', async () => {
    const targets = [
      ['POST', '/agents/%ZZ/access/v1/evaluation'],
      ['GET', '/agents/%ZZ/.well-known/authzen-configuration'],
    ];
    for (const [method, target] of targets) {
      const body = method === 'POST' ? { body: ordinary } : {};
      const res = await httpsJson(stack.authzenAddress, method!, target!, { ...http(), ...body });
      expect(res.status, `${method} ${target}: ${JSON.stringify(res.body)}`).to.equal(400);
      expect(res.body.error.message).to.include('percent-encoding');
    }
    const notJson = await httpsJson(stack.authzenAddress, 'POST', `${EVALUATION}s`, { ...http(), rawBody: '[[[' });
    expect(notJson.status).to.equal(400);
    expect(notJson.body.error.message).to.match(/^body is not JSON/);
  });

  it("the PDP metadata never repeats the request's Host header", async () => {
    const res = await httpsJson(stack.authzenAddress, 'GET', `/agents/${AGENT_ID}/.well-known/authzen-configuration`, {
      ...http(),
      headers: { host: 'evil.example' },
    });
    expect(res.status).to.equal(200);
    expect(JSON.stringify(res.body)).to.not.include('evil.example');
    expect(res.body.access_evaluation_endpoint).to.match(/\/agents\/site-a\/access\/v1\/evaluation$/);
  });
});
