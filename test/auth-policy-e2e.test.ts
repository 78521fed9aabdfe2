import { expect } from 'chai';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { status as Status } from '@grpc/grpc-js';
import { loadJose, type JoseModule } from '@burrow/agent';
import { BurrowCallError, BurrowClient } from '@burrow/client';
import { ECHO } from './helpers/echo-upstream';
import { httpsJson } from './helpers/https-json';
import { EXAMPLES_DIR } from './helpers/policy-fixture';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { AGENT_ID, Stack } from './helpers/stack';
import { AUD, ISS, jwksOf, makeKey, signToken, type TestKey } from './helpers/token-fixture';
import { pollUntil } from './helpers/wait';

const REQUESTS_DIR = path.join(EXAMPLES_DIR, 'requests');
// biome-ignore lint/suspicious/noExplicitAny: the example files are AuthZEN JSON of several shapes
const exampleRequest = (name: string): any => JSON.parse(readFileSync(path.join(REQUESTS_DIR, name), 'utf8'));

/**
 * The reason Burrow exists, end to end: a platform service asks a site, through a broker and the
 * tunnel, to verify a token and to decide policy questions, and the agent answers from the site's
 * own keys and Cedar policies (examples/policy). Real sockets, real mTLS, real engines.
 */
describe('auth and policy through the tunnel', function () {
  this.timeout(30_000);
  let stack: Stack;
  let client: BurrowClient;
  let jose: JoseModule;
  let key: TestKey;
  let tmp: string;
  let auditFile: string;

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), 'burrow-authz-'));
    jose = await loadJose();
    key = await makeKey(jose, 'ES256', 'site-key-1');
    writeFileSync(path.join(tmp, 'jwks.json'), jwksOf(key));
    auditFile = path.join(tmp, 'audit.jsonl');
    stack = await Stack.start({
      broker: { authzenListen: '127.0.0.1:0' },
      agent: {
        authn: { jwksFile: path.join(tmp, 'jwks.json'), issuers: [ISS], audiences: [AUD] },
        policy: {
          policiesDir: path.join(EXAMPLES_DIR, 'policies'),
          entitiesFile: path.join(EXAMPLES_DIR, 'entities.json'),
          schemaFile: path.join(EXAMPLES_DIR, 'schema.cedarschema'),
          cacheTtlMs: 5_000,
          auditLog: auditFile,
        },
      },
    });
    client = new BurrowClient({
      broker: stack.apiAddress,
      tls: { certFile: stack.serviceCert.cert, keyFile: stack.serviceCert.key, caFile: stack.serviceCert.ca },
      serverName: 'localhost',
    });
  });
  after(async () => {
    client?.close();
    await stack?.stop();
    rmSync(tmp, { recursive: true, force: true });
  });

  it(
    'every example request gets the decision its file name promises, ' + 'over gRPC and over the AuthZEN HTTP binding',
    async () => {
      const files = readdirSync(REQUESTS_DIR).filter((f) => /^(permit|deny)-.*\.json$/.test(f));
      expect(files.length).to.be.at.least(2);
      for (const f of files) {
        const expected = f.startsWith('permit-');
        const viaGrpc = await client.evaluate(AGENT_ID, exampleRequest(f));
        expect(viaGrpc.decision, `${f} over gRPC`).to.equal(expected);
        expect(viaGrpc.context?.reason, f).to.be.a('string').and.not.equal('');
        if (expected) expect(viaGrpc.context?.policies, f).to.be.an('array').that.is.not.empty;
        const viaHttp = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
          cert: stack.serviceCert,
          ca: stack.serviceCert.ca,
          body: exampleRequest(f),
        });
        expect(viaHttp.status, `${f} over HTTP: ${JSON.stringify(viaHttp.body)}`).to.equal(200);
        expect(viaHttp.body.decision, `${f} over HTTP`).to.equal(expected);
        expect(viaHttp.body.context.policies).to.deep.equal(viaGrpc.context?.policies);
      }
    },
  );

  it(
    'evaluations: defaults merged, answered in order, ' + 'and the stop semantics honoured, over both bindings',
    async () => {
      const batch = exampleRequest('evaluations-batch.json');
      const all = await client.evaluations(AGENT_ID, batch);
      expect(all.evaluations).to.have.length(batch.evaluations.length);
      const decisions = all.evaluations.map((e) => e.decision);
      const viaHttp = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluations`, {
        cert: stack.serviceCert,
        ca: stack.serviceCert.ca,
        body: batch,
      });
      expect(viaHttp.status).to.equal(200);
      expect(viaHttp.body.evaluations.map((e: { decision: boolean }) => e.decision)).to.deep.equal(decisions);
      // Each item alone gives the same answer as in the batch (defaults applied the same way).
      for (const [i, item] of batch.evaluations.entries()) {
        const single = await client.evaluate(AGENT_ID, {
          subject: item.subject ?? batch.subject,
          action: item.action ?? batch.action,
          resource: item.resource ?? batch.resource,
          context: item.context ?? batch.context,
        });
        expect(single.decision, `item ${i}`).to.equal(decisions[i]);
      }
      const firstDeny = decisions.indexOf(false);
      expect(firstDeny, 'the example batch has a deny').to.be.at.least(0);
      const stopped = await client.evaluations(AGENT_ID, {
        ...batch,
        options: { evaluations_semantic: 'deny_on_first_deny' },
      });
      expect(stopped.evaluations.map((e) => e.decision)).to.deep.equal(decisions.slice(0, firstDeny + 1));
      const firstPermit = decisions.indexOf(true);
      const permitStop = await client.evaluations(AGENT_ID, {
        ...batch,
        options: { evaluations_semantic: 'permit_on_first_permit' },
      });
      expect(permitStop.evaluations.map((e) => e.decision)).to.deep.equal(decisions.slice(0, firstPermit + 1));
    },
  );

  it('explain mode says which policy decided; a bad type name is INVALID_ARGUMENT naming it', async () => {
    const permit = exampleRequest('permit-owner-edits.json');
    const explained = await client.evaluate(AGENT_ID, { ...permit, explain: true });
    expect(explained.decision).to.equal(true);
    expect(explained.context?.explanation, JSON.stringify(explained.context)).to.be.an('object');
    const err = await client.evaluate(AGENT_ID, { ...permit, subject: { type: 'Not A Type', id: 'x' } }).then(
      () => undefined,
      (e: BurrowCallError) => e,
    );
    expect(err).to.be.instanceOf(BurrowCallError);
    expect(err!.code).to.equal(Status.INVALID_ARGUMENT);
    expect(err!.details).to.include('Not A Type');
    expect(err!.attempts, 'INVALID_ARGUMENT is not retried').to.equal(1);
  });

  it('every decision is audited with the caller identity the broker verified', async () => {
    await client.evaluate(AGENT_ID, exampleRequest('permit-owner-edits.json'));
    let lines: Record<string, unknown>[] = [];
    await pollUntil('condition', () => {
      try {
        lines = readFileSync(auditFile, 'utf8')
          .trim()
          .split('\n')
          .filter(Boolean)
          .map((l) => JSON.parse(l) as Record<string, unknown>);
      } catch {
        return false;
      }
      return lines.some((l) => typeof l.caller === 'string' && /\/service\/platform-svc$/.test(l.caller));
    });
    const line = lines.find((l) => typeof l.caller === 'string')!;
    expect(line.input_sha256).to.match(/^[0-9a-f]{64}$/);
    expect(JSON.stringify(line)).not.to.include('alice', 'the audit log records a digest of the input, not the input');
  });

  it('verifies a site token and refuses expired, wrong-audience and tampered ones with a stable reason', async () => {
    const good = await signToken(jose, key, { sub: 'alice', groups: ['ops'] });
    const ok = await client.authenticate(AGENT_ID, good);
    expect(ok).to.include({ authenticated: true, subject: 'alice', reason: '' });
    expect(ok.groups).to.deep.equal(['ops']);
    expect(ok.claims.iss).to.equal(ISS);
    expect(ok.expiresAt!.getTime()).to.be.greaterThan(Date.now());
    const nowS = Math.floor(Date.now() / 1000);
    const expired = await client.authenticate(
      AGENT_ID,
      await signToken(jose, key, { exp: nowS - 3600, iat: nowS - 7200 }),
    );
    expect(expired.authenticated).to.equal(false);
    expect(expired.reason).to.match(/^expired: /);
    expect(expired.claims).to.deep.equal({});
    const wrongAud = await client.authenticate(AGENT_ID, good, 'another-api');
    expect(wrongAud.reason).to.match(/^audience: /);
    const [h, p, s] = good.split('.');
    const tampered = await client.authenticate(
      AGENT_ID,
      `${h}.${Buffer.from(JSON.stringify({ iss: ISS, aud: AUD, sub: 'root' })).toString('base64url')}.${s}`,
    );
    expect(tampered.reason).to.match(/^signature: /);
    expect(p).to.be.a('string');
    const empty = await client.authenticate(AGENT_ID, '').then(
      () => undefined,
      (e: BurrowCallError) => e,
    );
    expect(empty?.code).to.equal(Status.INVALID_ARGUMENT);
  });

  it('an unknown method of a built-in service is UNIMPLEMENTED and the tunnel lives on', async () => {
    const raw = new RawClient(stack.apiAddress, mtlsCredentials(stack.serviceCert));
    try {
      const err = await raw.unary('/burrow.policy.v1.PolicyDecisionService/Nope', Buffer.alloc(0), stack.md()).then(
        () => undefined,
        (e: { code: number; details: string }) => e,
      );
      expect(err?.code).to.equal(Status.UNIMPLEMENTED);
      expect(err?.details).to.include('no method Nope');
      const echo = await raw.unary(ECHO.unary, Buffer.from('still here'), stack.md());
      expect(echo.response.toString()).to.equal('still here');
    } finally {
      raw.close();
    }
  });
});

describe('caller authorization at the broker (Cedar policy)', function () {
  this.timeout(30_000);
  let stack: Stack;
  let tmp: string;

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), 'burrow-callers-'));
    mkdirSync(path.join(tmp, 'policies'));
    writeFileSync(
      path.join(tmp, 'policies', 'callers.cedar'),
      [
        '// The platform service may ask site-a anything about policy, and nothing else.',
        '@id("platform-policy-questions")',
        'permit(principal == Service::"platform-svc", action, resource in Site::"eu")',
        '  when { context.service == "burrow.policy.v1.PolicyDecisionService" };',
        '// The echo tester may call the echo service on any agent.',
        '@id("echo-tester")',
        'permit(principal == Service::"echo-tester", action, resource)',
        '  when { context.service == "burrow.test.Echo" };',
      ].join('\n'),
    );
    writeFileSync(
      path.join(tmp, 'entities.json'),
      JSON.stringify([
        { uid: { type: 'Agent', id: AGENT_ID }, attrs: {}, parents: [{ type: 'Site', id: 'eu' }] },
        { uid: { type: 'Site', id: 'eu' }, attrs: {}, parents: [] },
      ]),
    );
    stack = await Stack.start({
      broker: {
        authzenListen: '127.0.0.1:0',
        callerPolicy: { policiesDir: path.join(tmp, 'policies'), entitiesFile: path.join(tmp, 'entities.json') },
      },
      agent: {
        policy: {
          policiesDir: path.join(EXAMPLES_DIR, 'policies'),
          entitiesFile: path.join(EXAMPLES_DIR, 'entities.json'),
          cacheTtlMs: 0,
          auditLog: path.join(tmp, 'audit.jsonl'),
        },
      },
    });
  });
  after(async () => {
    await stack?.stop();
    rmSync(tmp, { recursive: true, force: true });
  });

  it('allows what the policy permits and denies the rest with PERMISSION_DENIED, logged and counted', async () => {
    const client = new BurrowClient({
      broker: stack.apiAddress,
      tls: { certFile: stack.serviceCert.cert, keyFile: stack.serviceCert.key, caFile: stack.serviceCert.ca },
      serverName: 'localhost',
    });
    try {
      const allowed = await client.evaluate(AGENT_ID, exampleRequest('permit-owner-edits.json'));
      expect(allowed.decision).to.equal(true);
      const denied = await client.authenticate(AGENT_ID, 'x.y.z').then(
        () => undefined,
        (e: BurrowCallError) => e,
      );
      expect(denied?.code).to.equal(Status.PERMISSION_DENIED);
      expect(denied?.details).to.match(
        /service\/platform-svc may not call \/burrow\.auth\.v1\.AuthenticationService\/Authenticate on agent "site-a"/,
      );
      const raw = await stack.caller.unary(ECHO.unary, Buffer.from('x'), stack.md()).then(
        () => undefined,
        (e: { code: number }) => e,
      );
      expect(raw?.code).to.equal(Status.PERMISSION_DENIED);
      // The same policy applies on the HTTP binding.
      const httpAllowed = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
        cert: stack.serviceCert,
        ca: stack.serviceCert.ca,
        body: exampleRequest('permit-owner-edits.json'),
      });
      expect(httpAllowed.status).to.equal(200);
    } finally {
      client.close();
    }
    const tester = new RawClient(stack.apiAddress, mtlsCredentials(await stack.pki.issue('service', 'echo-tester')));
    try {
      const ok = await tester.unary(ECHO.unary, Buffer.from('allowed'), stack.md());
      expect(ok.response.toString()).to.equal('allowed');
      const err = await tester
        .unary('/burrow.policy.v1.PolicyDecisionService/Evaluate', Buffer.alloc(0), stack.md())
        .then(
          () => undefined,
          (e: { code: number }) => e,
        );
      expect(err?.code).to.equal(Status.PERMISSION_DENIED);
      const httpDenied = await httpsJson(stack.authzenAddress, 'POST', `/agents/${AGENT_ID}/access/v1/evaluation`, {
        cert: await stack.pki.issue('service', 'echo-tester'),
        ca: stack.serviceCert.ca,
        body: exampleRequest('permit-owner-edits.json'),
      });
      expect(httpDenied.status).to.equal(403);
    } finally {
      tester.close();
    }
    const metrics = await (await fetch(`${stack.adminUrl}/metrics`)).text();
    expect(metrics).to.match(/burrow_broker_authz_decisions_total\{decision="deny"\} [1-9]/);
    expect(metrics).to.match(/burrow_broker_authz_decisions_total\{decision="allow"\} [1-9]/);
  });
});
