import { expect } from 'chai';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { status as Status } from '@grpc/grpc-js';
import { BurrowCallError, BurrowClient } from '@burrow/client';
import { httpsJson } from './helpers/https-json';
import { EXAMPLES_DIR, examplePolicyConfig } from './helpers/policy-fixture';
import { AGENT_ID, Stack } from './helpers/stack';

const exampleRequest = (name: string): Record<string, unknown> =>
  JSON.parse(readFileSync(path.join(EXAMPLES_DIR, 'requests', name), 'utf8')) as Record<string, unknown>;

/** alice is an admin (`admins-full-access` permits her everything); atlas-budget is confidential. */
const aliceReadsBudget = (context: Record<string, unknown>): Record<string, unknown> => ({
  subject: { type: 'User', id: 'alice' },
  action: { name: 'read' },
  resource: { type: 'Document', id: 'atlas-budget' },
  context,
});

function clientOf(stack: Stack): BurrowClient {
  const tls = { certFile: stack.serviceCert.cert, keyFile: stack.serviceCert.key, caFile: stack.serviceCert.ca };
  return new BurrowClient({ broker: stack.apiAddress, tls, serverName: 'localhost' });
}

/**
 * Issue 13 item 7: Cedar skips a policy whose condition fails to evaluate, so a `forbid` that
 * errors on an ill-typed context value let its permits through. Burrow fails closed: any forbid
 * that cannot be evaluated denies the request, naming the forbid. Through the real surfaces: the
 * agent's PolicyDecisionService over gRPC (broker, tunnel, agent) and the AuthZEN HTTP binding.
 */
describe('policy: a forbid that fails to evaluate denies (fail closed)', function () {
  this.timeout(30_000);

  describe('the example policies without a schema', () => {
    let stack: Stack;
    let client: BurrowClient;
    let tmp: string;

    before(async () => {
      tmp = mkdtempSync(path.join(tmpdir(), 'burrow-failclosed-'));
      const policy = examplePolicyConfig(path.join(tmp, 'audit.jsonl'));
      stack = await Stack.start({ broker: { authzenListen: '127.0.0.1:0' }, agent: { policy } });
      client = clientOf(stack);
    });
    after(async () => {
      client?.close();
      await stack?.stop();
      rmSync(tmp, { recursive: true, force: true });
    });

    for (const mfa of ['true', 1] as const) {
      it(`context {"mfa": ${JSON.stringify(mfa)}} is denied, naming confidential-requires-mfa`, async () => {
        const request = aliceReadsBudget({ mfa });
        const viaGrpc = await client.evaluate(AGENT_ID, request);
        expect(viaGrpc.decision, JSON.stringify(viaGrpc.context)).to.equal(false);
        expect(viaGrpc.context?.policies).to.deep.equal(['confidential-requires-mfa']);
        expect(viaGrpc.context?.reason)
          .to.match(/confidential-requires-mfa \(.+\)/)
          .and.include('failed to evaluate');
        const viaHttp = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
          cert: stack.serviceCert,
          ca: stack.serviceCert.ca,
          body: request,
        });
        expect(viaHttp.status, JSON.stringify(viaHttp.body)).to.equal(200);
        expect(viaHttp.body.decision).to.equal(false);
        expect(viaHttp.body.context.reason).to.include('confidential-requires-mfa');
        // Explain lists the forbid among the errors, with its place in the file.
        const explained = await client.evaluate(AGENT_ID, { ...request, explain: true });
        expect(explained.decision).to.equal(false);
        const explanation = explained.context?.explanation as
          | { errors: { policy: string; location: string }[] }
          | undefined;
        const errors = explanation?.errors ?? [];
        expect(errors.map((e) => e.policy)).to.deep.equal(['confidential-requires-mfa']);
        expect(errors[0]!.location).to.match(/guardrails\.cedar:\d+:\d+$/);
      });
    }

    it('well-typed requests keep their decisions', async () => {
      const withMfa = await client.evaluate(AGENT_ID, aliceReadsBudget({ mfa: true }));
      expect(withMfa.decision).to.equal(true);
      expect(withMfa.context?.reason).to.equal('permitted by admins-full-access');
      const withoutMfa = await client.evaluate(AGENT_ID, aliceReadsBudget({ mfa: false }));
      expect(withoutMfa.decision).to.equal(false);
      expect(withoutMfa.context?.policies).to.deep.equal(['confidential-requires-mfa']);
      expect(withoutMfa.context?.reason).to.equal('forbidden by confidential-requires-mfa');
      for (const name of ['permit-owner-edits.json', 'permit-team-reads-with-mfa.json', 'deny-other-team-edits.json']) {
        const answer = await client.evaluate(AGENT_ID, exampleRequest(name));
        expect(answer.decision, name).to.equal(name.startsWith('permit-'));
      }
    });

    it('a batch item whose forbid errors is a deny for deny_on_first_deny', async () => {
      const batch = await client.evaluations(AGENT_ID, {
        subject: { type: 'User', id: 'alice' },
        action: { name: 'read' },
        evaluations: [
          { resource: { type: 'Document', id: 'atlas-design' } },
          { resource: { type: 'Document', id: 'atlas-budget' }, context: { mfa: 'yes' } },
          { resource: { type: 'Document', id: 'press-kit' } },
        ],
        options: { evaluations_semantic: 'deny_on_first_deny' },
      });
      expect(batch.evaluations.map((e) => e.decision)).to.deep.equal([true, false]);
    });
  });

  describe('the example policies with their schema', () => {
    let stack: Stack;
    let client: BurrowClient;
    let tmp: string;

    before(async () => {
      tmp = mkdtempSync(path.join(tmpdir(), 'burrow-failclosed-schema-'));
      stack = await Stack.start({ agent: { policy: examplePolicyConfig(path.join(tmp, 'audit.jsonl'), true) } });
      client = clientOf(stack);
    });
    after(async () => {
      client?.close();
      await stack?.stop();
      rmSync(tmp, { recursive: true, force: true });
    });

    it('an ill-typed context is INVALID_ARGUMENT before any policy runs; others decide as before', async () => {
      for (const mfa of ['true', 1]) {
        const err = await client.evaluate(AGENT_ID, aliceReadsBudget({ mfa })).then(
          () => undefined,
          (e: BurrowCallError) => e,
        );
        expect(err, `mfa ${JSON.stringify(mfa)}`).to.be.instanceOf(BurrowCallError);
        expect(err!.code).to.equal(Status.INVALID_ARGUMENT);
        expect(err!.details).to.include('mfa');
      }
      expect((await client.evaluate(AGENT_ID, aliceReadsBudget({ mfa: true }))).decision).to.equal(true);
      expect((await client.evaluate(AGENT_ID, aliceReadsBudget({ mfa: false }))).decision).to.equal(false);
      const names = [
        'permit-owner-edits.json',
        'permit-support-during-incident.json',
        'deny-contractor-deletes-own.json',
      ];
      for (const name of names) {
        const answer = await client.evaluate(AGENT_ID, exampleRequest(name));
        expect(answer.decision, name).to.equal(name.startsWith('permit-'));
      }
    });
  });
});
