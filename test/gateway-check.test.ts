import { expect } from 'chai';
import { writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { status as Status } from '@grpc/grpc-js';
import {
  BuiltinServices,
  TokenVerifier,
  loadJose,
  parseGatewayMapping,
  type BuiltinServicesOptions,
  type GatewayMapping,
  type JoseModule,
  VerifiedTokens,
} from '@burrow/agent';
import { PolicyEngine } from '@burrow/policy';
import { API_CODECS, type BurrowError, POLICY_METHODS, type JsonObject } from '@burrow/tunnel';
import { PolicyFixture, capturingLogger, entity } from './helpers/policy-fixture';
import { AUD, ISS, jwksOf, makeKey, signToken, type TestKey } from './helpers/token-fixture';

const POLICIES = `
@id("read-docs")
@reason("readers may read documents")
permit (principal, action == Action::"read", resource is Doc);

@id("tenant-beta")
@advice("log")
@advice_ignored("x")
permit (principal, action == Action::"read", resource is Doc) when { context has beta && context.beta };

@id("anonymous-public")
permit (principal == User::"anonymous", action == Action::"view", resource is Page);

@id("mesh-peer")
permit (principal is Workload, action, resource is Route) when { context has client };

@id("no-secrets")
@reason("secrets are never served")
forbid (principal, action, resource) when { resource has secret && resource.secret };
`;

/**
 * Check at the agent, driven through the built-in services' dispatcher with real engines (a
 * PolicyEngine on temp files, a TokenVerifier on a JWKS file): the flow, the sources of the
 * mapping, the errors and the one log line per decision.
 */
describe('gateway Check at the agent', function () {
  this.timeout(20_000);
  let fixture: PolicyFixture;
  let engine: PolicyEngine;
  let verifier: TokenVerifier;
  let jose: JoseModule;
  let key: TestKey;

  before(async () => {
    fixture = new PolicyFixture({ 'site.cedar': POLICIES }, [entity('Doc', 'vault', { secret: true })]);
    jose = await loadJose();
    key = await makeKey(jose, 'ES256', 'k1');
    const jwks = path.join(fixture.root, 'jwks.json');
    writeFileSync(jwks, jwksOf(key));
    engine = await PolicyEngine.open({ policiesDir: fixture.policiesDir, entitiesFile: fixture.entitiesFile });
    verifier = await TokenVerifier.create({ jwksFile: jwks, issuers: [ISS], audiences: [AUD] });
  });
  after(async () => {
    verifier?.close();
    await engine?.close();
    fixture?.cleanup();
  });

  const services = (mapping: GatewayMapping | undefined, opts: Partial<BuiltinServicesOptions> = {}) =>
    new BuiltinServices({
      authenticator: verifier,
      policy: {
        evaluate: (r, o) => engine.evaluate(r, o) as unknown as JsonObject,
        evaluations: (r, o) => engine.evaluations(r, o) as unknown as JsonObject,
      },
      gatewayMapping: mapping,
      ...opts,
    });
  const mappingOf = (...lines: string[]): GatewayMapping => parseGatewayMapping(lines.join('\n'), 'gw.conf');
  const check = async (b: BuiltinServices, req: JsonObject): Promise<JsonObject> => {
    const handler = b.handlerFor(POLICY_METHODS.check)!;
    const ctx = { deadlineMs: Infinity, signal: new AbortController().signal, callId: '1', caller: 'spiffe://x' };
    return API_CODECS.checkResponse.decode(await handler(API_CODECS.checkRequest.encode(req), ctx));
  };
  const failure = (p: Promise<unknown>): Promise<BurrowError> =>
    p.then(
      () => {
        throw new Error('resolved');
      },
      (e: BurrowError) => e,
    );

  const DOCS = [
    'token required',
    'subject.type User',
    'subject.id claim:sub',
    'route GET /docs/{name} action=read resource=Doc::"{name}"',
    'default deny',
    'context.beta query:beta as bool',
    'context.tenant header:x-tenant',
    'header x-burrow-user-name claim:profile.name',
  ];

  it('allows with the reasons of the deciding policies, advice when one carries it, and mapped headers', async () => {
    const b = services(mappingOf(...DOCS));
    const token = await signToken(jose, key, { profile: { name: 'Zoë\r\nX-Evil: 1' } });
    const plain = await check(b, { method: 'GET', path: '/docs/readme', token });
    expect(plain.verdict).to.equal('ALLOW');
    expect(plain.reasons).to.deep.equal(['readers may read documents']);
    expect(plain.advice ?? []).to.deep.equal([]);
    // Characters outside printable ASCII are percent-encoded: no claim can add a header line.
    expect((plain.headers as JsonObject)['x-burrow-user-name']).to.equal('Zo%C3%AB%0D%0AX-Evil: 1');
    const beta = await check(b, { method: 'GET', path: '/docs/readme?beta=true', token });
    expect(beta.advice).to.deep.equal(['log']);
    expect(beta.policies).to.deep.equal(['read-docs', 'tenant-beta']);
    expect((beta.headers as JsonObject)['x-burrow-advice']).to.equal('log');
    const badBool = await check(b, { method: 'GET', path: '/docs/readme?beta=yes', token });
    expect(badBool.verdict).to.equal('DENY');
    expect(badBool.reasons).to.deep.equal(['context.beta: query:beta is "yes", not true or false']);
  });

  it('a forbid decides a deny with its own @reason, and no upstream headers', async () => {
    const r = await check(services(mappingOf(...DOCS)), {
      method: 'GET',
      path: '/docs/vault',
      token: await signToken(jose, key),
    });
    expect(r.verdict).to.equal('DENY');
    expect(r.reasons).to.deep.equal(['secrets are never served']);
    expect(r.policies).to.deep.equal(['no-secrets']);
    expect(r.headers ?? {}).to.deep.equal({});
    expect(r.subject).to.deep.equal({ type: 'User', id: 'alice' });
  });

  it('decodes path segments, refuses dot segments and bad encoding, matches the rest of a path', async () => {
    const b = services(
      mappingOf(
        'token none',
        'subject.type Workload',
        'subject.id source_principal',
        'route * /svc/{rest*} action={method} resource=Route::"{rest}"',
        'default deny',
        'context.client source_address',
      ),
    );
    const base = { method: 'post', source_principal: 'spiffe://td/ns/a', source_address: '10.0.0.1' };
    const ok = await check(b, { ...base, path: '/svc/a%2Fb/c?x=1' });
    expect(ok.verdict, JSON.stringify(ok)).to.equal('ALLOW');
    expect(ok.subject).to.deep.equal({ type: 'Workload', id: 'spiffe://td/ns/a' });
    for (const p of ['/svc/../admin', '/svc/%2e%2e/admin', '/svc/%zz']) {
      const r = await check(b, { ...base, path: p });
      expect(r.verdict, p).to.equal('DENY');
      expect(String(r.reasons), p).to.match(/"\." or "\.\." segments|not valid percent-encoding/);
    }
    const noPrincipal = await check(b, { method: 'GET', path: '/svc/x' });
    expect(noPrincipal.verdict).to.equal('DENY');
    expect(noPrincipal.reasons).to.deep.equal(['subject.id (source_principal) is absent']);
  });

  it('token optional: no token is the anonymous subject, a bad token is still UNAUTHENTICATED', async () => {
    const b = services(
      mappingOf(
        'token optional',
        'anonymous User::"anonymous"',
        'subject.type User',
        'subject.id claim:sub',
        'route GET /pages/{p} action=view resource=Page::"{p}"',
        'default deny',
      ),
    );
    const anon = await check(b, { method: 'GET', path: '/pages/home' });
    expect(anon.verdict).to.equal('ALLOW');
    expect(anon.subject).to.deep.equal({ type: 'User', id: 'anonymous' });
    const bad = await check(b, { method: 'GET', path: '/pages/home', token: 'not.a.jwt' });
    expect(bad.verdict).to.equal('UNAUTHENTICATED');
    expect(bad.token_reason).to.match(/^malformed: /);
    const huge = await check(b, { method: 'GET', path: '/pages/home', token: 'a'.repeat(17_000) });
    expect(huge.verdict, 'an oversized token is a 401, not an error').to.equal('UNAUTHENTICATED');
    expect(huge.token_reason).to.match(/^malformed: token is 17000 bytes/);
  });

  it('logs one line per decision with its id, never the token or its claims', async () => {
    const { logger, records } = capturingLogger();
    const b = services(mappingOf(...DOCS), { logger });
    const token = await signToken(jose, key, { secret_claim: 'do-not-log' });
    const r = await check(b, { method: 'GET', path: '/docs/readme?beta=true', token, request_id: 'rq-7' });
    const lines = records.filter((rec) => rec.message === 'gateway decision');
    expect(lines).to.have.length(1);
    expect(lines[0]).to.include({ decision_id: r.decision_id, request_id: 'rq-7', verdict: 'ALLOW', subject: 'alice' });
    expect(lines[0]!.advice).to.deep.equal(['log']);
    expect(lines[0]!.duration_ms).to.be.a('number');
    const text = JSON.stringify(records);
    expect(text).to.not.include(token);
    expect(text).to.not.include('do-not-log');
    await check(b, { method: 'GET', path: '/docs/readme', token, request_id: 'r'.repeat(10_000) });
    const long = records.filter((rec) => rec.message === 'gateway decision')[1]!;
    expect(long.request_id, 'a request id is bounded in the log').to.have.length(128);
  });

  it('a mapped request the engine refuses is a deny naming the problem, and a warning for the site', async () => {
    const { logger, records } = capturingLogger();
    const b = services(
      mappingOf('token none', 'subject.type header:x-kind', 'subject.id "x"', 'default action=read resource=Doc::"d"'),
      { logger },
    );
    const r = await check(b, { method: 'GET', path: '/', headers: { 'x-kind': 'Not A Type' } });
    expect(r.verdict).to.equal('DENY');
    expect(String(r.reasons)).to.match(/^the mapped request cannot be evaluated: .*Not A Type/);
    const warning = records.find((rec) => rec.level === 'warn');
    expect(warning?.message).to.equal('gateway mapping made a request the policies cannot evaluate; denied');
    expect(warning?.decision_id).to.equal(r.decision_id);
  });

  it('FAILED_PRECONDITION naming the flag: no mapping, no policies, a token mapping without a verifier', async () => {
    const noMapping = await failure(check(services(undefined), { method: 'GET', path: '/' }));
    expect(noMapping.code).to.equal(Status.FAILED_PRECONDITION);
    expect(noMapping.message).to.include('--gateway-mapping FILE');
    const noPolicy = await failure(
      check(services(mappingOf(...DOCS), { policy: undefined }), { method: 'GET', path: '/' }),
    );
    expect(noPolicy.code).to.equal(Status.FAILED_PRECONDITION);
    expect(noPolicy.message).to.include('--policies DIR');
    const noVerifier = await failure(
      check(services(mappingOf(...DOCS), { authenticator: undefined }), { method: 'GET', path: '/' }),
    );
    expect(noVerifier.code).to.equal(Status.FAILED_PRECONDITION);
    expect(noVerifier.message).to.include('--jwks');
  });

  it('INVALID_ARGUMENT over the header bound, for a bad method and a path without "/"', async () => {
    const b = services(mappingOf(...DOCS));
    const big = { 'x-big': 'a'.repeat(64 * 1024) };
    for (const [req, text] of [
      [{ method: 'GET', path: '/docs/a', headers: big }, 'at most 65536 bytes'],
      [{ method: 'GE T', path: '/docs/a' }, 'is not an HTTP method'],
      [{ method: 'GET', path: 'docs/a' }, 'does not start with "/"'],
    ] as [JsonObject, string][]) {
      const err = await failure(check(b, req));
      expect(err.code, text).to.equal(Status.INVALID_ARGUMENT);
      expect(err.message).to.include(text);
    }
  });

  it('the verifier remembers accepted tokens (not refusals), per audiences, until the TTL or exp', async () => {
    const jwksFile = path.join(fixture.root, 'jwks.json');
    const fresh = await TokenVerifier.create({ jwksFile, issuers: [ISS], audiences: [AUD] });
    try {
      const b = services(mappingOf(...DOCS), { authenticator: fresh });
      const token = await signToken(jose, key);
      for (let i = 0; i < 3; i++)
        expect((await check(b, { method: 'GET', path: '/docs/a', token })).verdict).to.equal('ALLOW');
      expect(fresh.rememberedTokens, 'one entry for three checks with one token').to.equal(1);
      for (let i = 0; i < 2; i++) await check(b, { method: 'GET', path: '/docs/a', token: 'bad.token.x' });
      expect(fresh.rememberedTokens, 'refusals are not remembered').to.equal(1);
      await fresh.authenticate(token, AUD);
      expect(fresh.rememberedTokens, 'the same audience list (the configured one): the same entry').to.equal(1);
    } finally {
      fresh.close();
    }
    let now = 1_000_000;
    const cache = new VerifiedTokens(() => now, 30_000, 2);
    const aud = ['a'];
    cache.set('t1', aud, { sub: 'a' }, new Date(now + 10_000));
    cache.set('t2', aud, { sub: 'b' }, undefined);
    expect(cache.get('t1', aud)).to.deep.equal({ sub: 'a' });
    expect(cache.get('t1', ['b']), 'another audience').to.equal(undefined);
    now += 10_000;
    expect(cache.get('t1', aud), 'never past exp').to.equal(undefined);
    expect(cache.get('t2', aud)).to.deep.equal({ sub: 'b' });
    now += 20_000;
    expect(cache.get('t2', aud), 'never past the TTL').to.equal(undefined);
    cache.set('a', aud, {}, undefined);
    cache.set('b', aud, {}, undefined);
    cache.set('c', aud, {}, undefined);
    expect(cache.size, 'bounded').to.equal(2);
    expect(cache.get('a', aud), 'the oldest went first').to.equal(undefined);
    cache.set('expired', aud, {}, new Date(now - 1));
    expect(cache.get('expired', aud)).to.equal(undefined);
  });
});
