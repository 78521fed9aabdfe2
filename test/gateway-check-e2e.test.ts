import { expect } from 'chai';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { status as Status } from '@grpc/grpc-js';
import { loadGatewayMapping, loadJose, type JoseModule } from '@burrow/agent';
import { BurrowCallError, BurrowClient, type CheckRequest, type CheckResponse } from '@burrow/client';
import type { CertFiles } from './helpers/pki-fixture';
import { CALL_CLI, killAll, runCli } from './helpers/processes';
import { AGENT_ID, Stack } from './helpers/stack';
import { AUD, ISS, jwksOf, makeKey, signToken, writeAtomically, type TestKey } from './helpers/token-fixture';
import { pollUntil } from './helpers/wait';

const EXAMPLE = path.resolve(__dirname, '..', '..', 'examples', 'package-proxy');
const DAY_S = 86_400;

/**
 * The package-proxy example end to end: a platform-side gateway asks a site, through a real broker
 * and tunnel (gRPC, mTLS with a service certificate), whether a package may be pulled; the agent
 * verifies the token with the site's keys, maps the request with examples/package-proxy's gateway
 * mapping and decides with its policies: allow, deny, quarantine (allow with advice), or
 * unauthenticated.
 */
describe('gateway Check through the broker: the package-proxy example', function () {
  this.timeout(30_000);
  let stack: Stack;
  let client: BurrowClient;
  let jose: JoseModule;
  let key: TestKey;
  let tmp: string;

  const clientFor = (cert: CertFiles): BurrowClient =>
    new BurrowClient({
      broker: stack.apiAddress,
      tls: { certFile: cert.cert, keyFile: cert.key, caFile: cert.ca },
      serverName: 'localhost',
      maxAttempts: 1,
    });

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), 'burrow-gateway-'));
    jose = await loadJose();
    key = await makeKey(jose, 'ES256', 'site-key-1');
    writeFileSync(path.join(tmp, 'jwks.json'), jwksOf(key));
    // The broker lets platform-svc ask the site's decision service, and nobody else.
    writeFileSync(
      path.join(tmp, 'callers.cedar'),
      '@id("platform-svc-decides")\npermit(principal == Service::"platform-svc", action, resource)\n' +
        '  when { context.service == "burrow.policy.v1.PolicyDecisionService" };\n',
    );
    stack = await Stack.start({
      broker: { callerPolicy: { policiesDir: tmp } },
      agent: {
        authn: { jwksFile: path.join(tmp, 'jwks.json'), issuers: [ISS], audiences: [AUD] },
        policy: {
          policiesDir: path.join(EXAMPLE, 'policies'),
          entitiesFile: path.join(EXAMPLE, 'entities.json'),
          schemaFile: path.join(EXAMPLE, 'schema.cedarschema'),
          cacheTtlMs: 5_000,
          auditLog: path.join(tmp, 'audit.jsonl'),
        },
        gatewayMapping: loadGatewayMapping(path.join(EXAMPLE, 'gateway-mapping.conf')),
      },
    });
    client = clientFor(stack.serviceCert);
  });
  after(async () => {
    await killAll();
    client?.close();
    await stack?.stop();
    rmSync(tmp, { recursive: true, force: true });
  });

  const pull = async (pkgPath: string, extra: Partial<CheckRequest> = {}): Promise<CheckResponse> =>
    client.check(AGENT_ID, {
      method: 'GET',
      path: pkgPath,
      host: 'proxy.site.test',
      token: await signToken(jose, key),
      request_id: 'req-1',
      ...extra,
    });
  const aged = (days: number): Partial<CheckRequest> => ({ headers: { 'X-Package-Age-Days': String(days) } });

  it('allows a week-old package from a trusted registry, with the subject and decision id upstream', async () => {
    const r = await pull('/packages/npm/lodash', aged(30));
    expect(r.verdict, JSON.stringify(r)).to.equal('ALLOW');
    expect(r.subject).to.deep.equal({ type: 'User', id: 'alice' });
    expect(r.policies).to.deep.equal(['pull-trusted']);
    expect(r.advice).to.deep.equal([]);
    expect(r.decision_id).to.match(/^[0-9a-f-]{36}$/);
    expect(r.headers['x-burrow-decision-id']).to.equal(r.decision_id);
    expect(r.headers['x-burrow-subject']).to.equal('alice');
    expect(r.headers['x-burrow-groups']).to.equal('ops,dev');
    expect(r.headers).to.not.have.property('x-burrow-advice');
    const again = await pull('/packages/npm/lodash', aged(30));
    expect(again.decision_id, 'one id per decision, cached or not').to.not.equal(r.decision_id);
    // The site's audit log ties the evaluation to the check (and to the gateway that asked).
    const record = await pollUntil('the decision in the audit log', () =>
      readFileSync(path.join(tmp, 'audit.jsonl'), 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>)
        .find((rec) => rec.decision_id === r.decision_id),
    );
    expect(record).to.include({ decision: 'allow', caller: `spiffe://${stack.pki.trustDomain}/service/platform-svc` });
  });

  it('quarantines a package younger than 7 days (allow, with advice in the fields and a header)', async () => {
    const r = await pull('/packages/pypi/requests2', aged(2));
    expect(r.verdict, JSON.stringify(r)).to.equal('ALLOW');
    expect(r.advice).to.deep.equal(['quarantine']);
    expect(r.headers['x-burrow-advice']).to.equal('quarantine');
    expect(r.policies).to.deep.equal(['pull-quarantined']);
    const unknownAge = await pull('/packages/pypi/requests2');
    expect(unknownAge.advice, 'an unknown age is quarantined too').to.deep.equal(['quarantine']);
  });

  it('denies a known-malicious package (forbid wins over the permits), scoped names decoded', async () => {
    for (const p of ['/packages/npm/event-stream-4.0.0-flatmap', '/packages/npm/@evil%2Flodash']) {
      const r = await pull(p, aged(400));
      expect(r.verdict, `${p}: ${JSON.stringify(r)}`).to.equal('DENY');
      expect(r.policies).to.deep.equal(['deny-known-malicious']);
      expect(r.headers, 'no upstream headers on deny').to.deep.equal({});
    }
  });

  it('denies an untrusted registry (default deny), a path no route maps, and an age that is no number', async () => {
    const untrusted = await pull('/packages/sketchy/lodash', aged(30));
    expect(untrusted.verdict).to.equal('DENY');
    expect(untrusted.policies).to.deep.equal([]);
    expect(untrusted.reasons.join()).to.include('default deny');
    const unmapped = await pull('/admin/settings');
    expect(unmapped.verdict).to.equal('DENY');
    expect(unmapped.reasons.join()).to.include('no route of the gateway mapping matches GET /admin/settings');
    const badAge = await pull('/packages/npm/lodash', { headers: { 'x-package-age-days': 'old' } });
    expect(badAge.verdict).to.equal('DENY');
    expect(badAge.reasons.join()).to.include('context.package_age_days: header:x-package-age-days is "old"');
  });

  it('answers UNAUTHENTICATED for a missing, an expired or a forged token, with the reason word first', async () => {
    const missing = await pull('/packages/npm/lodash', { ...aged(30), token: '' });
    expect(missing.verdict).to.equal('UNAUTHENTICATED');
    expect(missing.token_reason).to.match(/^missing: /);
    expect(missing.subject, 'no subject when unauthenticated').to.equal(undefined);
    const nowS = Math.floor(Date.now() / 1000);
    const expiredToken = await signToken(jose, key, { iat: nowS - 2 * DAY_S, exp: nowS - DAY_S });
    const expired = await pull('/packages/npm/lodash', { ...aged(30), token: expiredToken });
    expect(expired.verdict).to.equal('UNAUTHENTICATED');
    expect(expired.token_reason).to.match(/^expired: /);
    const other = await makeKey(jose, 'ES256', 'site-key-1');
    const forged = await pull('/packages/npm/lodash', { ...aged(30), token: await signToken(jose, other) });
    expect(forged.verdict).to.equal('UNAUTHENTICATED');
    expect(forged.token_reason).to.match(/^signature: /);
  });

  it('is INVALID_ARGUMENT without a method or path, or over the path bound', async () => {
    for (const [req, text] of [
      [{ method: 'GET', path: '' }, 'path is required'],
      [{ method: '', path: '/x' }, 'method is required'],
      [{ method: 'GET', path: `/${'a'.repeat(9000)}` }, 'at most 8192 bytes'],
    ] as [CheckRequest, string][]) {
      const err = await client.check(AGENT_ID, req).then(
        () => undefined,
        (e: BurrowCallError) => e,
      );
      expect(err, text).to.be.instanceOf(BurrowCallError);
      expect(err!.code).to.equal(Status.INVALID_ARGUMENT);
      expect(err!.details).to.include(text);
    }
  });

  it('a key removed from the JWKS stops its tokens at once, though Check remembers verified tokens', async () => {
    const jwks = path.join(tmp, 'jwks.json');
    const token = await signToken(jose, key);
    expect((await pull('/packages/npm/lodash', { ...aged(30), token })).verdict).to.equal('ALLOW');
    const successor = await makeKey(jose, 'ES256', 'site-key-2');
    writeAtomically(jwks, jwksOf(successor));
    try {
      // The agent reloads the file when it changes; the remembered token must not outlive the
      // reload (it would for 30 s otherwise, far past this wait).
      const refused = await pollUntil('the removed key refused', async () => {
        const r = await pull('/packages/npm/lodash', { ...aged(30), token });
        return r.verdict === 'UNAUTHENTICATED' && r;
      });
      expect(refused.token_reason).to.match(/^unknown_key: /);
    } finally {
      writeAtomically(jwks, jwksOf(key, successor));
      await pollUntil('the key back', async () => (await pull('/packages/npm/lodash', aged(30))).verdict === 'ALLOW');
    }
  });

  it("refuses a caller the broker's caller policy does not allow, before the site is asked", async () => {
    const intruder = clientFor(await stack.pki.issue('service', 'intruder'));
    try {
      const err = await intruder.check(AGENT_ID, { method: 'GET', path: '/packages/npm/lodash' }).then(
        () => undefined,
        (e: BurrowCallError) => e,
      );
      expect(err).to.be.instanceOf(BurrowCallError);
      expect(err!.code).to.equal(Status.PERMISSION_DENIED);
    } finally {
      intruder.close();
    }
  });

  describe('burrow-call check', () => {
    const call = (args: string[], env: Record<string, string> = {}) =>
      runCli(CALL_CLI, ['check', ...target(), ...args], env, 30_000);
    const target = (): string[] => [
      '--broker',
      stack.apiAddress,
      '--cert-dir',
      path.dirname(stack.serviceCert.cert),
      '--agent',
      AGENT_ID,
    ];

    it('allow: the verdict, decision id, subject, reasons and headers; exit 0', async () => {
      const token = await signToken(jose, key);
      const r = await call(['--path', '/packages/npm/lodash', '--header', 'X-Package-Age-Days=30'], {
        BURROW_CALL_TOKEN: token,
      });
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      expect(r.stdout).to.match(/^allow {2}decision [0-9a-f-]{36}\n {2}subject: User::"alice"\n/);
      expect(r.stdout).to.include('  reason: the package comes from a trusted registry and is at least 7 days old\n');
      expect(r.stdout).to.include('  header: x-burrow-subject: alice\n');
    });

    it('quarantine with --json and --token-file: advice in the object; exit 0', async () => {
      const file = path.join(tmp, 'token');
      writeFileSync(file, `${await signToken(jose, key)}\n`);
      const r = await call(['--path', '/packages/npm/brand-new', '--token-file', file, '--json']);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      const j = JSON.parse(r.stdout);
      expect(j).to.include({ verdict: 'ALLOW' });
      expect(j.advice).to.deep.equal(['quarantine']);
      expect(j.headers['x-burrow-advice']).to.equal('quarantine');
    });

    it('deny exits 20, unauthenticated 21, a gRPC error its status, a bad flag 2', async () => {
      const token = await signToken(jose, key);
      const deny = await call(['--path', '/packages/sketchy/x', '--token', token]);
      expect(deny.exit.code, deny.stderrLines.join('\n')).to.equal(20);
      expect(deny.stdout).to.match(/^deny {2}decision /);
      const unauth = await call(['--path', '/packages/npm/lodash']);
      expect(unauth.exit.code).to.equal(21);
      expect(unauth.stdout).to.include('  token: missing: ');
      const invalid = await call(['--path', 'no-slash', '--token', token]);
      expect(invalid.exit.code).to.equal(Status.INVALID_ARGUMENT);
      expect(invalid.stderrLines).to.deep.equal([
        'burrow-call: INVALID_ARGUMENT: check request: path "no-slash" does not start with "/"',
      ]);
      const badFlag = await call(['--path', '/x', '--header', 'novalue']);
      expect(badFlag.exit.code).to.equal(2);
      expect(badFlag.stderrLines).to.deep.equal(['burrow-call: header: "novalue" is not NAME=VALUE']);
    });
  });
});
