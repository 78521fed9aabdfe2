import { expect } from 'chai';
import { once } from 'node:events';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { createPublicKey, randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { status as Status } from '@grpc/grpc-js';
import { Registry } from 'prom-client';
import { BurrowError, ConfigError } from '@burrow/tunnel';
import {
  TokenVerifier,
  authnConfigFromArgs,
  loadJose,
  type AuthenticationResult,
  type JoseModule,
  type TokenVerifierOptions,
} from '@burrow/agent';
import { freePorts } from './helpers/free-port';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { AGENT_CLI, killAll, runCli, startAgent, tlsArgs } from './helpers/processes';
import { expectNoLeaks, snapshotResources, type ResourceSnapshot } from './helpers/leaks';
import {
  AUD,
  ISS,
  TestHttpServer,
  jwksOf,
  makeKey,
  signToken,
  writeAtomically,
  type TestKey,
} from './helpers/token-fixture';

const b64url = (text: string | Buffer): string => Buffer.from(text).toString('base64url');

/** Resolves to the BurrowError `promise` rejects with; fails the test if it resolves. */
async function rejection(promise: Promise<unknown>): Promise<BurrowError> {
  try {
    await promise;
  } catch (err) {
    expect(err).to.be.instanceOf(BurrowError);
    return err as BurrowError;
  }
  throw new Error('expected a rejection');
}

function expectRefused(result: AuthenticationResult, word: string): void {
  expect(result.authenticated, `reason: ${result.reason}`).to.equal(false);
  expect(result.reason).to.match(new RegExp(`^${word}: \\S`));
  expect(result).to.include({ subject: '' });
  expect(result.groups).to.deep.equal([]);
  expect(result.claims).to.deep.equal({});
  expect(result.expiresAt).to.equal(undefined);
}

async function metricValue(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const metric = (await registry.getMetricsAsJSON()).find((m) => m.name === name);
  const values = (metric?.values ?? []) as Array<{
    value: number;
    labels: Record<string, string | number>;
    metricName?: string;
  }>;
  return values
    .filter(
      (v) =>
        (v.metricName === undefined || v.metricName === name || v.metricName === `${name}_count`) &&
        Object.entries(labels).every(([k, l]) => v.labels[k] === l),
    )
    .reduce((sum, v) => sum + v.value, 0);
}

describe('authn: TokenVerifier (agent token verification)', function () {
  this.timeout(30_000);
  let jose: JoseModule;
  let es: TestKey;
  let rs: TestKey;
  let rotated: TestKey;
  let stranger: TestKey;
  let dir: string;
  let jwksFile: string;
  let baseline: ResourceSnapshot;
  const opened: TokenVerifier[] = [];
  const servers: TestHttpServer[] = [];

  before(async () => {
    jose = await loadJose();
    [es, rs, rotated, stranger] = await Promise.all([
      makeKey(jose, 'ES256', 'site-es-1'),
      makeKey(jose, 'RS256', 'site-rs-1'),
      makeKey(jose, 'ES256', 'site-es-2'),
      makeKey(jose, 'ES256', 'not-the-site'),
    ]);
    dir = mkdtempSync(path.join(tmpdir(), 'burrow-authn-'));
    jwksFile = path.join(dir, 'jwks.json');
  });
  after(() => rmSync(dir, { recursive: true, force: true }));
  beforeEach(() => {
    writeAtomically(jwksFile, jwksOf(es, rs));
    baseline = snapshotResources();
  });
  afterEach(async () => {
    for (const v of opened.splice(0)) v.close();
    await Promise.all(servers.splice(0).map((s) => s.close()));
    await expectNoLeaks(baseline);
  });

  async function verifier(options: Partial<TokenVerifierOptions> = {}): Promise<TokenVerifier> {
    const v = await TokenVerifier.create({
      jwksFile,
      issuers: [ISS],
      audiences: [AUD],
      registry: new Registry(),
      ...options,
    });
    opened.push(v);
    return v;
  }

  async function server(): Promise<TestHttpServer> {
    const s = await TestHttpServer.start();
    servers.push(s);
    return s;
  }

  describe('JWT verification against a JWKS file', () => {
    it('accepts a valid ES256 token: subject, groups, every claim, expiresAt', async () => {
      const v = await verifier();
      const nowS = Math.floor(Date.now() / 1000);
      const token = await signToken(jose, es, { tenant: 'acme', exp: nowS + 300 }, {}, nowS);
      const result = await v.authenticate(token, '');
      expect(result).to.deep.include({ authenticated: true, subject: 'alice', groups: ['ops', 'dev'], reason: '' });
      expect(v.rememberedTokens, 'accepted by signature: remembered').to.equal(1);
      expect(result.claims).to.deep.equal({
        iss: ISS,
        aud: AUD,
        sub: 'alice',
        groups: ['ops', 'dev'],
        iat: nowS,
        exp: nowS + 300,
        tenant: 'acme',
      });
      expect(result.expiresAt?.getTime()).to.equal((nowS + 300) * 1000);
    });

    it('accepts a valid RS256 token; one without exp only with allowTokensWithoutExp (no expiresAt)', async () => {
      const v = await verifier();
      expect((await v.authenticate(await signToken(jose, rs), AUD)).authenticated).to.equal(true);
      const noExp = await signToken(jose, rs, { exp: undefined });
      const refused = await v.authenticate(noExp, AUD);
      expectRefused(refused, 'malformed');
      expect(refused.reason).to.include('"exp"');
      const lenient = await verifier({ allowTokensWithoutExp: true });
      const result = await lenient.authenticate(noExp, AUD);
      expect(result.authenticated, result.reason).to.equal(true);
      expect(result.expiresAt).to.equal(undefined);
    });

    it('reads groups from a configured claim, including a dotted path into an object', async () => {
      const v = await verifier({ groupsClaim: 'realm_access.roles' });
      const result = await v.authenticate(
        await signToken(jose, es, { realm_access: { roles: ['admin', 7, 'viewer'] } }),
      );
      expect(result.groups).to.deep.equal(['admin', 'viewer']);
    });

    it('refuses an expired token (expired) and one not yet valid (not_yet_valid)', async () => {
      const v = await verifier();
      const nowS = Math.floor(Date.now() / 1000);
      expectRefused(await v.authenticate(await signToken(jose, es, { exp: nowS - 3600 })), 'expired');
      expectRefused(await v.authenticate(await signToken(jose, es, { nbf: nowS + 3600 })), 'not_yet_valid');
    });

    it('honours the clock skew at both edges, and no further', async () => {
      const nowS = 1_900_000_000;
      const clock = (): number => nowS * 1000;
      const lenient = await verifier({ clock, clockSkewMs: 60_000 });
      const strict = await verifier({ clock, clockSkewMs: 0 });
      const sign = (claims: Record<string, unknown>): Promise<string> =>
        signToken(jose, es, { iat: nowS - 100, ...claims }, {}, nowS);
      const expiredWithin = await sign({ exp: nowS - 30 });
      const expiredBeyond = await sign({ exp: nowS - 90 });
      const earlyWithin = await sign({ nbf: nowS + 30 });
      const earlyBeyond = await sign({ nbf: nowS + 90 });
      expect((await lenient.authenticate(expiredWithin)).authenticated).to.equal(true);
      expectRefused(await lenient.authenticate(expiredBeyond), 'expired');
      expect((await lenient.authenticate(earlyWithin)).authenticated).to.equal(true);
      expectRefused(await lenient.authenticate(earlyBeyond), 'not_yet_valid');
      expectRefused(await strict.authenticate(expiredWithin), 'expired');
      expectRefused(await strict.authenticate(earlyWithin), 'not_yet_valid');
    });

    it('refuses a wrong audience or none (audience); the request audience replaces the configured ones', async () => {
      const v = await verifier();
      expectRefused(await v.authenticate(await signToken(jose, es, { aud: 'another-api' })), 'audience');
      expectRefused(await v.authenticate(await signToken(jose, es, { aud: undefined })), 'audience');
      const forOther = await signToken(jose, es, { aud: ['another-api', 'third'] });
      expect((await v.authenticate(forOther, 'another-api')).authenticated).to.equal(true);
      expectRefused(await v.authenticate(await signToken(jose, es), 'another-api'), 'audience');
    });

    it('answers FAILED_PRECONDITION when there is no audience to check at all', async () => {
      const v = await verifier({ audiences: [] });
      const token = await signToken(jose, es);
      expect((await rejection(v.authenticate(token, ''))).code).to.equal(Status.FAILED_PRECONDITION);
      expect((await v.authenticate(token, AUD)).authenticated).to.equal(true);
    });

    it('refuses a wrong or missing issuer (issuer); a second configured issuer is accepted', async () => {
      const v = await verifier({ issuers: [ISS, 'https://idp2.site.test'] });
      expectRefused(await v.authenticate(await signToken(jose, es, { iss: 'https://evil.test' })), 'issuer');
      expectRefused(await v.authenticate(await signToken(jose, es, { iss: `${ISS}/` })), 'issuer');
      expectRefused(await v.authenticate(await signToken(jose, es, { iss: undefined })), 'issuer');
      expect(
        (await v.authenticate(await signToken(jose, es, { iss: 'https://idp2.site.test' }))).authenticated,
      ).to.equal(true);
    });

    it('enforces required claims (malformed when one is missing)', async () => {
      const v = await verifier({ requiredClaims: ['sub', 'exp'] });
      expectRefused(await v.authenticate(await signToken(jose, es, { sub: undefined })), 'malformed');
      expectRefused(await v.authenticate(await signToken(jose, es, { exp: undefined })), 'malformed');
    });

    it('refuses a token signed by a key the site does not have (unknown_key)', async () => {
      const v = await verifier();
      const result = await v.authenticate(await signToken(jose, stranger));
      expectRefused(result, 'unknown_key');
      expect(result.reason).to.contain('"not-the-site"');
    });

    it('refuses alg none (algorithm)', async () => {
      const v = await verifier();
      const unsecured = new jose.UnsecuredJWT({ sub: 'alice', groups: ['admin'] })
        .setIssuer(ISS)
        .setAudience(AUD)
        .setExpirationTime('10m')
        .encode();
      expect(unsecured.split('.')).to.have.length(3);
      expectRefused(await v.authenticate(unsecured), 'algorithm');
      // The same with the site's kid, as a forger would write it.
      const payload = unsecured.split('.')[1]!;
      expectRefused(
        await v.authenticate(`${b64url(JSON.stringify({ alg: 'none', kid: es.kid }))}.${payload}.`),
        'algorithm',
      );
    });

    it('refuses HS256 "signed" with the site\'s RSA public key as the HMAC secret (algorithm)', async () => {
      const v = await verifier();
      const publicPem = createPublicKey({
        key: rs.publicJwk as import('node:crypto').JsonWebKey,
        format: 'jwk',
      }).export({ type: 'spki', format: 'pem' });
      for (const secret of [Buffer.from(publicPem), Buffer.from(JSON.stringify(rs.publicJwk))]) {
        const forged = await new jose.SignJWT({ iss: ISS, aud: AUD, sub: 'mallory', groups: ['admin'] })
          .setProtectedHeader({ alg: 'HS256', kid: rs.kid })
          .setExpirationTime('10m')
          .sign(new Uint8Array(secret));
        expectRefused(await v.authenticate(forged), 'algorithm');
      }
    });

    it('refuses none and HS* as configured algorithms: a config error, before anything runs', async () => {
      for (const algorithms of [['HS256'], ['ES256', 'none'], ['hs512']]) {
        let thrown: unknown;
        try {
          await verifier({ algorithms });
        } catch (err) {
          thrown = err;
        }
        expect(thrown).to.be.instanceOf(ConfigError);
        expect((thrown as ConfigError).field).to.equal('algorithms');
      }
    });

    it('refuses an algorithm that is not allowed even with the right key (algorithm)', async () => {
      const v = await verifier({ algorithms: ['ES256'] });
      expectRefused(await v.authenticate(await signToken(jose, rs)), 'algorithm');
    });

    it('refuses a tampered payload and a tampered signature (signature)', async () => {
      const v = await verifier();
      const [header, payload, signature] = (await signToken(jose, es)).split('.') as [string, string, string];
      const claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as Record<string, unknown>;
      const promoted = b64url(JSON.stringify({ ...claims, groups: ['admin'] }));
      expectRefused(await v.authenticate(`${header}.${promoted}.${signature}`), 'signature');
      const sig = Buffer.from(signature, 'base64url');
      sig[10]! ^= 0x01;
      expectRefused(await v.authenticate(`${header}.${payload}.${sig.toString('base64url')}`), 'signature');
      const rsToken = (await signToken(jose, rs)).split('.');
      expectRefused(await v.authenticate(`${rsToken[0]}.${rsToken[1]}.${b64url(randomBytes(256))}`), 'signature');
    });

    it('refuses malformed tokens (malformed): two parts, bad base64, non-JSON header or payload', async () => {
      const v = await verifier();
      const [header, payload, signature] = (await signToken(jose, es)).split('.') as [string, string, string];
      expectRefused(await v.authenticate(`${header}.${payload}`), 'malformed');
      expectRefused(await v.authenticate(`${header}$.${payload}.${signature}`), 'malformed');
      expectRefused(await v.authenticate(`${header}.${payload}!.${signature}`), 'malformed');
      expectRefused(await v.authenticate(`${b64url('not json')}.${payload}.${signature}`), 'malformed');
      expectRefused(await v.authenticate(`${b64url('[1,2]')}.${payload}.${signature}`), 'malformed');
      const notJsonPayload = await new jose.CompactSign(Buffer.from('not json'))
        .setProtectedHeader({ alg: 'ES256', kid: es.kid })
        .sign(es.privateKey);
      expectRefused(await v.authenticate(notJsonPayload), 'malformed');
      expectRefused(await v.authenticate('a.b.c.d.e'), 'malformed');
    });

    it('refuses a token whose crit header names an extension the site does not understand', async () => {
      const v = await verifier();
      const token = await signToken(
        jose,
        es,
        {},
        { crit: ['urn:example:must-understand'], 'urn:example:must-understand': true },
      );
      const result = await v.authenticate(token);
      expectRefused(result, 'malformed');
      expect(result.reason).to.contain('urn:example:must-understand');
    });

    it(
      'answers INVALID_ARGUMENT for an empty or oversized token, ' + 'FAILED_PRECONDITION when nothing is configured',
      async () => {
        const v = await verifier({ maxTokenBytes: 4096 });
        expect((await rejection(v.authenticate(''))).code).to.equal(Status.INVALID_ARGUMENT);
        const big = await signToken(jose, es, { padding: 'x'.repeat(5000) });
        const oversized = await rejection(v.authenticate(big));
        expect(oversized.code).to.equal(Status.INVALID_ARGUMENT);
        expect(oversized.message).to.match(/bytes; the limit is 4096/);
        const defaultLimit = await verifier();
        expect((await rejection(defaultLimit.authenticate('a'.repeat(16 * 1024 + 1)))).code).to.equal(
          Status.INVALID_ARGUMENT,
        );
        const nothing = await verifier({ jwksFile: undefined, issuers: [] });
        expect((await rejection(nothing.authenticate(await signToken(jose, es)))).code).to.equal(
          Status.FAILED_PRECONDITION,
        );
      },
    );

    it('a JWKS file that cannot be read at start is a config error naming jwks', async () => {
      writeFileSync(jwksFile, '{"not": "a jwks"}');
      let thrown: unknown;
      try {
        await verifier();
      } catch (err) {
        thrown = err;
      }
      expect(thrown).to.be.instanceOf(ConfigError);
      expect((thrown as Error).message).to.match(/^jwks: .*not a JWKS/);
    });

    it('leaves out symmetric and private keys in the JWKS and counts only usable ones', async () => {
      const privateJwk = await jose.exportJWK(stranger.privateKey as Parameters<JoseModule['exportJWK']>[0]);
      writeAtomically(
        jwksFile,
        JSON.stringify({
          keys: [
            es.publicJwk,
            { kty: 'oct', k: b64url('secret'), kid: 'hmac' },
            { ...privateJwk, kid: stranger.kid, alg: 'ES256' },
          ],
        }),
      );
      const v = await verifier();
      expect(v.keyCount).to.equal(1);
      expectRefused(await v.authenticate(await signToken(jose, stranger)), 'unknown_key');
    });

    it(
      'reloads the JWKS file when it changes (rotation without ' +
        'restart) and keeps the last good keys on a bad write',
      async () => {
        const registry = new Registry();
        const v = await verifier({ registry });
        const rotatedToken = await signToken(jose, rotated);
        expectRefused(await v.authenticate(rotatedToken), 'unknown_key');
        const reloaded = once(v, 'keys');
        writeAtomically(jwksFile, jwksOf(es, rotated));
        await reloaded;
        expect(v.keyCount).to.equal(2);
        expect((await v.authenticate(rotatedToken)).authenticated).to.equal(true);
        expectRefused(await v.authenticate(await signToken(jose, rs)), 'unknown_key');

        const failed = once(v, 'jwks-failed');
        writeAtomically(jwksFile, '{ truncated');
        await failed;
        expect((await v.authenticate(rotatedToken)).authenticated).to.equal(true);
        expect(await metricValue(registry, 'burrow_agent_authn_jwks_refresh_total', { result: 'ok' })).to.equal(2);
        expect(await metricValue(registry, 'burrow_agent_authn_jwks_refresh_total', { result: 'failed' })).to.equal(1);
        expect(await metricValue(registry, 'burrow_agent_authn_jwks_keys')).to.equal(2);
      },
    );
  });

  describe('JWT verification against a JWKS URL', () => {
    const T0 = 1_900_000_000_000;

    it(
      'fetches at start, picks up a rotated key on an unknown kid, and refetches at most once per interval under ' +
        'a flood of unknown kids',
      async () => {
        const idp = await server();
        idp.serveJson(jwksOf(es));
        let nowMs = T0;
        const v = await verifier({
          jwksFile: undefined,
          jwksUrl: `${idp.url}/jwks`,
          jwksRefreshMinIntervalMs: 30_000,
          clock: () => nowMs,
        });
        expect(idp.requests).to.equal(1);
        const token = (key: TestKey, claims: Record<string, unknown> = {}): Promise<string> =>
          signToken(jose, key, claims, {}, Math.floor(nowMs / 1000));
        expect((await v.authenticate(await token(es))).authenticated).to.equal(true);

        // The site rotates: the new key is published, tokens signed with it arrive.
        idp.serveJson(jwksOf(es, rotated));
        const rotatedToken = await token(rotated);
        // Within the interval after the start fetch, an unknown kid does not refetch.
        expectRefused(await v.authenticate(rotatedToken), 'unknown_key');
        expect(idp.requests).to.equal(1);
        nowMs += 30_001;
        expect((await v.authenticate(rotatedToken)).authenticated).to.equal(true);
        expect(idp.requests).to.equal(2);

        // A flood of made-up kids, concurrent and then sequential: one refetch for the interval.
        nowMs += 30_001;
        const floodKeys = await Promise.all(
          Array.from({ length: 20 }, (_, i) => makeKey(jose, 'ES256', `made-up-${i}`)),
        );
        const floodTokens = await Promise.all(floodKeys.map((k) => token(k)));
        const results = await Promise.all(floodTokens.map((t) => v.authenticate(t)));
        for (const r of results) expectRefused(r, 'unknown_key');
        expect(idp.requests).to.equal(3);
        for (const t of floodTokens) expectRefused(await v.authenticate(t), 'unknown_key');
        expect(idp.requests).to.equal(3);
        // Known keys are not slowed down or refetched meanwhile.
        expect((await v.authenticate(await token(es))).authenticated).to.equal(true);
        nowMs += 30_001;
        expectRefused(await v.authenticate(floodTokens[0]!), 'unknown_key');
        expect(idp.requests).to.equal(4);
      },
    );

    it('answers UNAVAILABLE while the key server cannot be reached and no keys are known, then recovers', async () => {
      const [closedPort] = await freePorts(1);
      const down = await verifier({ jwksFile: undefined, jwksUrl: `http://127.0.0.1:${closedPort!}/jwks` });
      const error = await rejection(down.authenticate(await signToken(jose, es)));
      expect(error.code).to.equal(Status.UNAVAILABLE);
      expect(error.message).to.match(/ECONNREFUSED/);

      const idp = await server();
      idp.serveJson('{"error":"starting"}', 503);
      let nowMs = Date.now();
      const recovering = await verifier({ jwksFile: undefined, jwksUrl: `${idp.url}/jwks`, clock: () => nowMs });
      const token = await signToken(jose, es);
      expect((await rejection(recovering.authenticate(token))).message).to.match(/HTTP 503/);
      idp.serveJson(jwksOf(es));
      // Still within the refetch interval: no request to the server, still no keys.
      expect((await rejection(recovering.authenticate(token))).code).to.equal(Status.UNAVAILABLE);
      expect(idp.requests).to.equal(1);
      nowMs += 30_001;
      expect((await recovering.authenticate(token)).authenticated).to.equal(true);
      expect(idp.requests).to.equal(2);
    });

    it(
      'keeps the last good keys when the key server goes down: ' +
        'known keys verify, unknown kids are refused, not errors',
      async () => {
        const idp = await server();
        idp.serveJson(jwksOf(es));
        let nowMs = Date.now();
        const v = await verifier({ jwksFile: undefined, jwksUrl: `${idp.url}/jwks`, clock: () => nowMs });
        await idp.close();
        nowMs += 30_001;
        expectRefused(await v.authenticate(await signToken(jose, rotated)), 'unknown_key');
        expect((await v.authenticate(await signToken(jose, es))).authenticated).to.equal(true);
      },
    );

    it('reloads in the background every jwksMaxAgeMs, and close() stops it', async () => {
      const idp = await server();
      idp.serveJson(jwksOf(es));
      const v = await verifier({ jwksFile: undefined, jwksUrl: `${idp.url}/jwks`, jwksMaxAgeMs: 50 });
      idp.serveJson(jwksOf(es, rotated));
      await once(v, 'keys');
      expect(v.keyCount).to.equal(2);
      await idp.waitForRequests(3);
      v.close();
      // The leak check in afterEach fails if a timer is left.
    });
  });

  describe('opaque tokens: RFC 7662 introspection', () => {
    interface Seen {
      authorization?: string;
      form: URLSearchParams;
    }
    let idp: TestHttpServer;
    let seen: Seen[];
    let secretFile: string;
    let nowMs: number;

    beforeEach(async () => {
      idp = await server();
      seen = [];
      nowMs = Date.now();
      secretFile = path.join(dir, 'client-secret');
      writeFileSync(secretFile, 's3cr:t\n');
      idp.handler = (req, body, res) => {
        const form = new URLSearchParams(body);
        seen.push({ authorization: req.headers.authorization, form });
        const nowS = Math.floor(nowMs / 1000);
        const answers: Record<string, unknown> = {
          'opaque-active': {
            active: true,
            sub: 'svc-billing',
            groups: ['billing'],
            exp: nowS + 600,
            iss: ISS,
            aud: AUD,
            scope: 'read',
          },
          'opaque-short': { active: true, sub: 'svc-billing', exp: nowS + 2 },
          'opaque-inactive': { active: false },
          'opaque-other-issuer': { active: true, sub: 'x', iss: 'https://elsewhere.test' },
          'opaque-other-audience': { active: true, sub: 'x', aud: ['someone-else'] },
        };
        const token = form.get('token') ?? '';
        if (token === 'opaque-hang') return; // never answers; the client's timeout must end the wait
        if (token === 'opaque-500') return void res.writeHead(500).end('boom');
        if (token === 'opaque-401') return void res.writeHead(401).end();
        if (token === 'opaque-garbage')
          return void res.writeHead(200, { 'content-type': 'application/json' }).end('{"active":"yes"}');
        res
          .writeHead(200, { 'content-type': 'application/json' })
          .end(JSON.stringify(answers[token] ?? { active: false }));
      };
    });

    const introspecting = (options: Partial<TokenVerifierOptions> = {}): Promise<TokenVerifier> =>
      verifier({
        jwksFile: undefined,
        clock: () => nowMs,
        introspection: {
          url: `${idp.url}/introspect`,
          clientId: 'burrow agent',
          clientSecretFile: secretFile,
          timeoutMs: 300,
        },
        ...options,
      });

    it(
      'accepts an active token with its subject, groups, claims ' +
        'and exp; sends the client credentials; caches the answer',
      async () => {
        const v = await introspecting();
        const result = await v.authenticate('opaque-active');
        expect(result).to.deep.include({
          authenticated: true,
          subject: 'svc-billing',
          groups: ['billing'],
          reason: '',
        });
        expect(result.claims).to.include({ scope: 'read', iss: ISS });
        expect(result.claims).to.not.have.property('active');
        expect(result.expiresAt).to.be.instanceOf(Date);
        expect(seen).to.have.length(1);
        expect(seen[0]!.form.get('token_type_hint')).to.equal('access_token');
        const basic = Buffer.from(seen[0]!.authorization!.replace(/^Basic /, ''), 'base64').toString('utf8');
        expect(basic).to.equal('burrow%20agent:s3cr%3At');
        expect((await v.authenticate('opaque-active')).authenticated).to.equal(true);
        expect(seen, 'the second answer came from the cache').to.have.length(1);
        // The cache is per audience-neutral answer: another audience is checked again, not refetched.
        expectRefused(await v.authenticate('opaque-active', 'another-api'), 'audience');
        expect(seen).to.have.length(1);
      },
    );

    it("never caches past the token's exp, and refuses an answer whose exp has passed", async () => {
      const v = await introspecting({ introspection: { url: `${idp.url}/introspect`, cacheTtlMs: 60_000 } });
      expect((await v.authenticate('opaque-short')).authenticated).to.equal(true);
      nowMs += 1_000;
      expect((await v.authenticate('opaque-short')).authenticated).to.equal(true);
      expect(seen).to.have.length(1);
      nowMs += 62_000 + 2_000;
      // The cached answer ran out with exp; the endpoint's fresh answer is checked against the clock too.
      expect((await v.authenticate('opaque-short')).authenticated).to.equal(true);
      expect(seen).to.have.length(2);
      expect(seen[0]!.form.get('client_id')).to.equal(null);
    });

    it(
      'refuses inactive tokens (inactive) without caching them, ' + 'and checks iss and aud when the answer has them',
      async () => {
        const v = await introspecting();
        expectRefused(await v.authenticate('opaque-inactive'), 'inactive');
        expectRefused(await v.authenticate('opaque-inactive'), 'inactive');
        expect(seen).to.have.length(2);
        expectRefused(await v.authenticate('opaque-other-issuer'), 'issuer');
        expectRefused(await v.authenticate('opaque-other-audience'), 'audience');
      },
    );

    it(
      'answers UNAVAILABLE when the endpoint is down, fails, times out or answers nonsense; FAILED_PRECONDITION ' +
        'when it refuses the agent',
      async () => {
        const v = await introspecting();
        const startedAt = performance.now();
        const timedOut = await rejection(v.authenticate('opaque-hang'));
        expect(timedOut.code).to.equal(Status.UNAVAILABLE);
        expect(timedOut.message).to.match(/no answer within 300 ms/);
        expect(performance.now() - startedAt).to.be.below(10_000);
        expect((await rejection(v.authenticate('opaque-500'))).code).to.equal(Status.UNAVAILABLE);
        expect((await rejection(v.authenticate('opaque-garbage'))).code).to.equal(Status.UNAVAILABLE);
        expect((await rejection(v.authenticate('opaque-401'))).code).to.equal(Status.FAILED_PRECONDITION);
        await idp.close();
        const down = await rejection(v.authenticate('opaque-active'));
        expect(down.code).to.equal(Status.UNAVAILABLE);
        expect(down.message).to.match(/cannot be reached/);
      },
    );

    it('sends only non-JWS tokens to introspection when a JWKS is configured too', async () => {
      const v = await introspecting({ jwksFile });
      expect((await v.authenticate(await signToken(jose, es))).authenticated).to.equal(true);
      expect((await v.authenticate('opaque-active')).authenticated).to.equal(true);
      expect(seen.map((s) => s.form.get('token'))).to.deep.equal(['opaque-active']);
      // Without introspection, an opaque token is malformed.
      const jwksOnly = await verifier();
      expectRefused(await jwksOnly.authenticate('opaque-active'), 'malformed');
    });
  });

  describe('metrics', () => {
    it('counts requests by result and stable reason, times them, and counts JWKS loads and keys', async () => {
      const registry = new Registry();
      const v = await verifier({ registry });
      const nowS = Math.floor(Date.now() / 1000);
      await v.authenticate(await signToken(jose, es));
      await v.authenticate(await signToken(jose, rs));
      await v.authenticate(await signToken(jose, es, { exp: nowS - 3600 }));
      await v.authenticate(await signToken(jose, es, { aud: 'x' }));
      await v.authenticate(await signToken(jose, stranger));
      await rejection(v.authenticate(''));
      const requests = 'burrow_agent_authn_requests_total';
      expect(await metricValue(registry, requests, { result: 'authenticated' })).to.equal(2);
      expect(await metricValue(registry, requests, { result: 'refused', reason: 'expired' })).to.equal(1);
      expect(await metricValue(registry, requests, { result: 'refused', reason: 'audience' })).to.equal(1);
      expect(await metricValue(registry, requests, { result: 'refused', reason: 'unknown_key' })).to.equal(1);
      expect(await metricValue(registry, requests, { result: 'error', reason: 'invalid_argument' })).to.equal(1);
      const text = await registry.metrics();
      expect(text).to.match(/burrow_agent_authn_duration_seconds_count\{result="authenticated"\} 2/);
      expect(text).to.match(/burrow_agent_authn_duration_seconds_count\{result="refused"\} 3/);
      expect(await metricValue(registry, 'burrow_agent_authn_jwks_refresh_total', { result: 'ok' })).to.equal(1);
      expect(await metricValue(registry, 'burrow_agent_authn_jwks_keys')).to.equal(2);
    });
  });

  describe('latency (cached key)', () => {
    it('measures p50 and p99 of ES256 and RS256 verification', async function () {
      this.timeout(60_000);
      const v = await verifier();
      for (const key of [es, rs]) {
        const token = await signToken(jose, key);
        for (let i = 0; i < 50; i++) await v.authenticate(token);
        const samples: number[] = [];
        for (let i = 0; i < 1000; i++) {
          const t = performance.now();
          const r = await v.authenticate(token);
          samples.push(performance.now() - t);
          expect(r.authenticated).to.equal(true);
        }
        samples.sort((a, b) => a - b);
        const p = (q: number): string => `${(samples[Math.floor(q * (samples.length - 1))]! * 1000).toFixed(0)} µs`;
        console.log(
          `      ${key.alg} verification: p50 ${p(0.5)}, p99 ${p(0.99)} (${samples.length} tokens, cached key)`,
        );
        // Generous bound only: the machine is shared; this catches a key re-import per token.
        expect(samples[Math.floor(samples.length / 2)]!).to.be.below(50);
      }
    });
  });
});

describe('authn: agent flags (authnConfigFromArgs)', () => {
  let dir: string;
  let jwks: string;
  before(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'burrow-authn-flags-'));
    jwks = path.join(dir, 'jwks.json');
    writeFileSync(jwks, '{"keys":[]}');
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const fieldOf = (args: Record<string, unknown>): string => {
    try {
      authnConfigFromArgs(args);
    } catch (err) {
      expect(err).to.be.instanceOf(ConfigError);
      expect((err as Error).message).to.not.contain('\n');
      return (err as ConfigError).field;
    }
    throw new Error('expected a ConfigError');
  };

  it('is off without a key source, and builds typed settings with defaults', () => {
    expect(authnConfigFromArgs({})).to.equal(undefined);
    const settings = authnConfigFromArgs({
      jwks,
      'token-issuer': ['https://a', 'https://b,https://c'],
      'token-audience': 'api',
      'token-clock-skew': '90s',
      'token-required-claims': 'sub, exp',
      'token-allowed-audience': ['api,other'],
    });
    expect(settings).to.deep.include({
      jwksFile: jwks,
      issuers: ['https://a', 'https://b', 'https://c'],
      audiences: ['api'],
      allowedAudiences: ['api', 'other'],
      allowTokensWithoutExp: false,
      clockSkewMs: 90_000,
      groupsClaim: 'groups',
      requiredClaims: ['sub', 'exp'],
    });
    expect(authnConfigFromArgs({ jwks, 'token-issuer': 'i', 'token-allow-without-exp': true })).to.deep.include({
      allowTokensWithoutExp: true,
      allowedAudiences: [],
    });
    expect(settings!.algorithms).to.include('ES256').and.not.include('HS256');
    const intro = authnConfigFromArgs({
      'introspection-url': 'https://idp.site/introspect',
      'token-issuer': 'https://a',
      'introspection-client-id': 'agent',
    });
    expect(intro!.introspection).to.deep.include({
      url: 'https://idp.site/introspect',
      clientId: 'agent',
      timeoutMs: 5000,
      cacheTtlMs: 30_000,
    });
  });

  it('names the flag of every bad value', () => {
    expect(fieldOf({ jwks })).to.equal('token-issuer');
    expect(fieldOf({ 'token-issuer': 'https://a' })).to.equal('token-issuer');
    expect(fieldOf({ jwks: '/nonexistent/jwks.json', 'token-issuer': 'i' })).to.equal('jwks');
    expect(fieldOf({ jwks, 'jwks-url': 'http://x/jwks', 'token-issuer': 'i' })).to.equal('jwks-url');
    expect(fieldOf({ 'jwks-url': 'ftp://x/jwks', 'token-issuer': 'i' })).to.equal('jwks-url');
    expect(fieldOf({ jwks, 'token-issuer': 'i', 'token-algorithms': 'RS256,HS256' })).to.equal('token-algorithms');
    expect(fieldOf({ jwks, 'token-issuer': 'i', 'token-algorithms': 'none' })).to.equal('token-algorithms');
    expect(fieldOf({ jwks, 'token-issuer': 'i', 'token-algorithms': 'RS257' })).to.equal('token-algorithms');
    expect(fieldOf({ jwks, 'token-issuer': 'i', 'token-clock-skew': '6m' })).to.equal('token-clock-skew');
    expect(fieldOf({ jwks, 'token-issuer': 'i', 'token-clock-skew': 'soon' })).to.equal('token-clock-skew');
    expect(fieldOf({ jwks, 'token-issuer': 'i', 'token-groups-claim': ' ' })).to.equal('token-groups-claim');
    const unpinned = { jwks, 'token-issuer': 'i', 'token-audience': 'x', 'token-allowed-audience': 'y' };
    expect(fieldOf(unpinned)).to.equal('token-audience');
    expect(fieldOf({ 'introspection-url': 'not a url', 'token-issuer': 'i' })).to.equal('introspection-url');
    expect(
      fieldOf({ 'introspection-url': 'http://x/i', 'token-issuer': 'i', 'introspection-client-secret-file': jwks }),
    ).to.equal('introspection-client-id');
    expect(
      fieldOf({
        'introspection-url': 'http://x/i',
        'token-issuer': 'i',
        'introspection-client-id': 'a',
        'introspection-client-secret-file': '/nonexistent',
      }),
    ).to.equal('introspection-client-secret-file');
    expect(fieldOf({ jwks, 'token-issuer': 'i', 'introspection-client-id': 'a' })).to.equal('introspection-client-id');
    expect(
      fieldOf({ jwks, 'token-issuer': 'i', 'introspection-url': 'http://x/i', 'introspection-timeout': '2m' }),
    ).to.equal('introspection-timeout');
  });
});

describe('authn: burrow-agent run token flags (real processes)', function () {
  this.timeout(30_000);
  let pki: PkiFixture;
  let cert: CertFiles;
  let jwks: string;
  let base: string[];

  before(async () => {
    pki = await PkiFixture.create();
    cert = await pki.issue('agent', 'site-a');
    jwks = path.join(pki.root, 'jwks.json');
    writeFileSync(jwks, '{"keys":[]}');
    const [closedPort] = await freePorts(1);
    base = ['run', '--broker', `127.0.0.1:${closedPort!}`, ...tlsArgs(cert)];
  });
  afterEach(() => killAll());
  after(() => pki?.cleanup());

  async function expectOneLineError(args: string[], field: string, env: Record<string, string> = {}): Promise<string> {
    const { exit, stderrLines, stdout } = await runCli(AGENT_CLI, [...base, ...args], env);
    expect(exit, stderrLines.join('\n')).to.deep.equal({ code: 2, signal: null });
    expect(stderrLines).to.have.length(1);
    expect(stderrLines[0]).to.match(new RegExp(`^burrow-agent: ${field}: \\S`));
    expect(stdout).to.equal('');
    return stderrLines[0]!;
  }

  it('lists the token flags in run --help', async () => {
    const { exit, stdout } = await runCli(AGENT_CLI, ['run', '--help']);
    expect(exit.code).to.equal(0);
    for (const flag of [
      '--jwks ',
      '--jwks-url',
      '--token-issuer',
      '--token-audience',
      '--token-allowed-audience',
      '--token-allow-without-exp',
      '--token-algorithms',
      '--token-clock-skew',
      '--token-groups-claim',
      '--introspection-url',
      '--introspection-client-id',
      '--introspection-client-secret-file',
    ]) {
      expect(stdout).to.contain(flag);
    }
  });

  it(
    'a refused algorithm, from a flag, the environment or the config file, ' + 'is one line naming token-algorithms',
    async () => {
      const line = await expectOneLineError(
        ['--jwks', jwks, '--token-issuer', ISS, '--token-algorithms', 'RS256,HS256'],
        'token-algorithms',
      );
      expect(line).to.contain('HS256 is refused');
      await expectOneLineError(['--jwks', jwks, '--token-issuer', ISS], 'token-algorithms', {
        BURROW_AGENT_TOKEN_ALGORITHMS: 'none',
      });
      const config = path.join(pki.root, 'agent.yaml');
      writeFileSync(config, `jwks: ${jwks}\ntoken-issuer:\n  - ${ISS}\ntoken-algorithms: HS512\n`);
      await expectOneLineError(['--config', config], 'token-algorithms');
    },
  );

  it(
    'other bad token settings name their flag: skew over 5m (env), ' + 'a missing issuer, a secret without a client id',
    async () => {
      await expectOneLineError(['--jwks', jwks, '--token-issuer', ISS], 'token-clock-skew', {
        BURROW_AGENT_TOKEN_CLOCK_SKEW: '10m',
      });
      await expectOneLineError(['--jwks-url', 'http://127.0.0.1:1/jwks'], 'token-issuer');
      await expectOneLineError(
        [
          '--introspection-url',
          'http://127.0.0.1:1/i',
          '--token-issuer',
          ISS,
          '--introspection-client-secret-file',
          jwks,
        ],
        'introspection-client-id',
      );
      await expectOneLineError(['--token-audience', AUD], 'token-audience');
      const unpinned = ['--jwks', jwks, '--token-issuer', ISS, '--token-audience', AUD];
      await expectOneLineError(unpinned, 'token-audience', { BURROW_AGENT_TOKEN_ALLOWED_AUDIENCE: 'other' });
    },
  );

  it('starts with token settings from the config file and the environment together', async () => {
    const config = path.join(pki.root, 'agent-ok.yaml');
    writeFileSync(
      config,
      `jwks: ${jwks}\ntoken-issuer:\n  - ${ISS}\n  - https://idp2.site.test\n` +
        `token-audience: ${AUD}\ntoken-groups-claim: roles\ntoken-allowed-audience:\n  - ${AUD}\n`,
    );
    // Reaching "agent started" means the whole configuration was accepted; afterEach ends it.
    const { started } = await startAgent([...base.slice(1), '--config', config], {
      BURROW_AGENT_TOKEN_CLOCK_SKEW: '2m',
      BURROW_AGENT_TOKEN_ALGORITHMS: 'ES256,EdDSA',
      BURROW_AGENT_TOKEN_ALLOW_WITHOUT_EXP: 'true',
    });
    expect(started.message).to.equal('agent started');
  });
});

describe('authn: examples/auth/mint-token.js (real processes)', function () {
  this.timeout(30_000);
  const script = path.resolve(__dirname, '..', '..', 'examples', 'auth', 'mint-token.js');
  const run = async (...args: string[]): Promise<string> =>
    (await promisify(execFile)(process.execPath, [script, ...args])).stdout.trim();
  let dir: string;
  before(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'burrow-mint-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it(
    'makes keys at run time (private ones 0600, a public-only JWKS) and signs tokens the verifier accepts or ' +
      'refuses as it should',
    async () => {
      const keys = path.join(dir, 'keys');
      await run('keys', '--out', keys);
      for (const file of ['signing-key.jwk', 'signing-key-rs256.jwk'])
        expect(statSync(path.join(keys, file)).mode & 0o777, file).to.equal(0o600);
      const jwks = JSON.parse(readFileSync(path.join(keys, 'jwks.json'), 'utf8')) as {
        keys: Array<Record<string, unknown>>;
      };
      expect(jwks.keys.map((k) => k.alg)).to.deep.equal(['ES256', 'RS256']);
      for (const k of jwks.keys) expect(k).to.not.have.any.keys('d', 'p', 'q');

      const v = await TokenVerifier.create({
        jwksFile: path.join(keys, 'jwks.json'),
        issuers: [ISS],
        audiences: [AUD],
        registry: new Registry(),
      });
      try {
        const common = ['--iss', ISS, '--aud', AUD, '--sub', 'alice'];
        const good = await v.authenticate(
          await run(
            'sign',
            '--key',
            path.join(keys, 'signing-key.jwk'),
            ...common,
            '--groups',
            'ops,dev',
            '--claim',
            'tenant=acme',
          ),
        );
        expect(good).to.deep.include({ authenticated: true, subject: 'alice', groups: ['ops', 'dev'] });
        expect(good.claims.tenant).to.equal('acme');
        expect(
          (await v.authenticate(await run('sign', '--key', path.join(keys, 'signing-key-rs256.jwk'), ...common)))
            .authenticated,
        ).to.equal(true);
        expectRefused(
          await v.authenticate(
            await run('sign', '--key', path.join(keys, 'signing-key.jwk'), ...common, '--exp', '-5m'),
          ),
          'expired',
        );
        expectRefused(
          await v.authenticate(
            await run('sign', '--key', path.join(keys, 'signing-key.jwk'), ...common, '--nbf', '10m'),
          ),
          'not_yet_valid',
        );
      } finally {
        v.close();
      }
    },
  );

  it('says what is wrong in one line and exits 2', async () => {
    const err = await run(
      'sign',
      '--key',
      path.join(dir, 'missing.jwk'),
      '--iss',
      ISS,
      '--aud',
      AUD,
      '--sub',
      'a',
    ).then(
      () => undefined,
      (e: { code: number; stderr: string }) => e,
    );
    expect(err?.code).to.equal(2);
    expect(err?.stderr).to.match(/^mint-token: --key .*ENOENT\n$/);
  });
});
