import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { status as Status } from '@grpc/grpc-js';
import { Registry } from 'prom-client';
import type { JWTPayload, JWTVerifyGetKey, JWTVerifyOptions } from 'jose';
import {
  BurrowError,
  ConfigError,
  SpanKind,
  endSpan,
  silentLogger,
  startChildSpan,
  statusName,
  toBurrowError,
  type Logger,
  type TraceParent,
} from '@burrow/tunnel';
import { AuthnMetrics, type AuthnResult } from './authn-metrics';
import { VerifiedTokens } from './verified-tokens';
import { HttpClient } from './http-client';
import { IntrospectionClient, type IntrospectionAnswer, type IntrospectionOptions } from './introspection-client';
import { loadJose, type JoseModule } from './jose-loader';
import { JwksFileLoader } from './jwks-file-loader';
import type { JwksKeySet } from './jwks-key-set';
import { JwksSource } from './jwks-source';
import { JwksUrlLoader } from './jwks-url-loader';
import { DEFAULT_TOKEN_ALGORITHMS, parseTokenAlgorithms } from './token-algorithms';
import { TokenRefusal, refusalOfJoseError } from './token-refusal';

/** How the site's tokens are judged; every field but `issuers` has a default. */
export interface TokenVerifierSettings {
  /** JWKS file (air-gapped sites); reloaded when it changes. Exclusive with `jwksUrl`. */
  jwksFile?: string;
  /** HTTP(S) URL of the site's JWKS; fetched at start, on unknown keys and every `jwksMaxAgeMs`. */
  jwksUrl?: string;
  /** Fewest milliseconds between two JWKS loads caused by unknown `kid`s; default 30 s. */
  jwksRefreshMinIntervalMs?: number;
  /** Background JWKS reload period; default 10 min. */
  jwksMaxAgeMs?: number;
  /** Timeout of one JWKS fetch; default 5 s. */
  jwksTimeoutMs?: number;
  /** Accepted `iss` values, exact match. Required when any key source is configured. */
  issuers?: string[];
  /** Audiences checked when a request names none (a token must carry at least one of them). */
  audiences?: string[];
  /**
   * The only audiences this agent accepts, whatever the caller asks for; default none (any audience a
   * request names). When set, a request naming another audience is refused (`audience: ...`), a token
   * must carry one of them, and every entry of `audiences` must be one of them.
   */
  allowedAudiences?: string[];
  /**
   * Accept JWTs that carry no `exp` (tokens that never expire). Default false: a JWT without `exp`
   * is refused (`malformed: token has no "exp" claim ...`). Introspection answers are not affected.
   */
  allowTokensWithoutExp?: boolean;
  /** Allowed JWS algorithms; default {@link DEFAULT_TOKEN_ALGORITHMS}. `none` and HS* are a config error. */
  algorithms?: string[];
  /** Tolerance for `exp` and `nbf`; default 60 s, at most 5 min. */
  clockSkewMs?: number;
  /** Claim holding the groups (an array of strings; a dotted path reaches into objects); default `groups`. */
  groupsClaim?: string;
  /** Claims a token must carry besides `iss`, `aud` (and, for JWTs, `exp`), e.g. ['sub']; default none. */
  requiredClaims?: string[];
  /** Longest token accepted, in UTF-8 bytes; default 16 KiB. */
  maxTokenBytes?: number;
  /** RFC 7662 endpoint for opaque tokens (anything that is not a three-part compact JWS). */
  introspection?: IntrospectionOptions;
}

/** {@link TokenVerifierSettings} plus what the agent passes in. */
export interface TokenVerifierOptions extends TokenVerifierSettings {
  logger?: Logger;
  /** Registry the `burrow_agent_authn_*` metrics go to; a private one when omitted. */
  registry?: Registry;
  /** Milliseconds since the epoch; token times are checked against it. Default Date.now. */
  clock?: () => number;
}

/** The verdict on one token, shaped like burrow.auth.v1.AuthenticateResponse. */
export interface AuthenticationResult {
  authenticated: boolean;
  /** The `sub` claim; empty when not authenticated or absent. */
  subject: string;
  /** From the groups claim when it is an array of strings; empty otherwise. */
  groups: string[];
  /** Every claim of the token (or of the introspection answer, less `active`); empty when refused. */
  claims: Record<string, unknown>;
  /** The token's `exp`; undefined when it has none or is refused. */
  expiresAt?: Date;
  /** Empty when authenticated; otherwise a stable word, `: ` and details (see {@link TokenRefusal}). */
  reason: string;
}

/** A key jose verifies with (the type its key lookups resolve to). */
type VerifyKey = Awaited<ReturnType<JWTVerifyGetKey>>;

export const TOKEN_VERIFIER_DEFAULTS = {
  jwksRefreshMinIntervalMs: 30_000,
  jwksMaxAgeMs: 600_000,
  jwksTimeoutMs: 5_000,
  clockSkewMs: 60_000,
  groupsClaim: 'groups',
  maxTokenBytes: 16 * 1024,
};
export const MAX_CLOCK_SKEW_MS = 5 * 60_000;
const BASE64URL = /^[A-Za-z0-9_-]*$/;

/**
 * Verifies the site's tokens for the agent's built-in burrow.auth.v1.AuthenticationService.
 *
 * Compact JWS tokens are verified with the site's public keys (a JWKS file or URL) by jose; other
 * tokens go to the RFC 7662 introspection endpoint when one is configured. Key-type confusion is
 * ruled out by construction: only asymmetric algorithms can be allowed, the algorithm is checked
 * against the allowed list before any key is looked up, and a key is only used for the algorithm
 * family of its own key type.
 *
 * Create with {@link TokenVerifier.create}; it loads the keys before it resolves. Emits `keys`
 * (JwksKeySet) when a new key set is in use and `jwks-failed` (Error) when a load failed.
 */
export class TokenVerifier extends EventEmitter {
  readonly metrics: AuthnMetrics;
  private readonly logger: Logger;
  private readonly clock: () => number;
  private readonly issuers: string[];
  private readonly audiences: string[];
  private readonly allowedAudiences: string[];
  /** What jose checks for presence in a JWT: `requiredClaims`, plus `exp` unless exp-less tokens are allowed. */
  private readonly jwtRequiredClaims: string[];
  private readonly algorithms: string[];
  private readonly clockSkewMs: number;
  private readonly groupsPath: string;
  private readonly requiredClaims: string[];
  private readonly maxTokenBytes: number;
  private readonly http = new HttpClient();
  private readonly keySource: JwksSource | undefined;
  private readonly introspection: IntrospectionClient | undefined;
  /** Tokens accepted by signature lately: a gateway asks about every request a client makes with one. */
  private readonly verified: VerifiedTokens;

  private constructor(
    private readonly jose: JoseModule,
    options: TokenVerifierOptions,
  ) {
    super();
    this.logger = options.logger ?? silentLogger();
    this.clock = options.clock ?? Date.now;
    this.metrics = new AuthnMetrics(options.registry ?? new Registry());
    const configured = Boolean(options.jwksFile || options.jwksUrl || options.introspection);
    if (options.jwksFile && options.jwksUrl)
      throw new ConfigError('jwksUrl', 'cannot be combined with jwksFile: name one key source');
    this.issuers = (options.issuers ?? []).filter((i) => i !== '');
    if (configured && this.issuers.length === 0)
      throw new ConfigError('issuers', 'name at least one accepted token issuer');
    this.audiences = (options.audiences ?? []).filter((a) => a !== '');
    this.allowedAudiences = (options.allowedAudiences ?? []).filter((a) => a !== '');
    const stray = this.audiences.find((a) => this.allowedAudiences.length > 0 && !this.allowedAudiences.includes(a));
    if (stray !== undefined) {
      const pinned = this.allowedAudiences.join(', ');
      throw new ConfigError('audiences', `"${stray}" is not one of the allowed audiences (${pinned})`);
    }
    this.algorithms = parseTokenAlgorithms('algorithms', options.algorithms ?? DEFAULT_TOKEN_ALGORITHMS);
    this.clockSkewMs = options.clockSkewMs ?? TOKEN_VERIFIER_DEFAULTS.clockSkewMs;
    if (!(this.clockSkewMs >= 0 && this.clockSkewMs <= MAX_CLOCK_SKEW_MS))
      throw new ConfigError('clockSkewMs', `must be from 0 to ${MAX_CLOCK_SKEW_MS} ms`);
    this.groupsPath = options.groupsClaim ?? TOKEN_VERIFIER_DEFAULTS.groupsClaim;
    if (this.groupsPath === '') throw new ConfigError('groupsClaim', 'must not be empty');
    this.requiredClaims = options.requiredClaims ?? [];
    // A JWT without exp never expires: one leaked token would be good forever. Required by default.
    const expRequired = options.allowTokensWithoutExp !== true;
    this.jwtRequiredClaims = [...new Set([...this.requiredClaims, ...(expRequired ? ['exp'] : [])])];
    this.maxTokenBytes = options.maxTokenBytes ?? TOKEN_VERIFIER_DEFAULTS.maxTokenBytes;

    this.keySource = this.createKeySource(jose, options);
    this.verified = new VerifiedTokens(this.clock);
    this.keySource?.on('keys', (set: JwksKeySet) => {
      // A key removed from the set stops its tokens at once.
      this.verified.clear();
      this.emit('keys', set);
    });
    this.keySource?.on('failed', (err: Error) => this.emit('jwks-failed', err));
    this.introspection = this.createIntrospectionClient(options);
  }

  /** The JWKS file or URL source of `options`, or undefined for neither. Throws ConfigError for a bad URL. */
  private createKeySource(jose: JoseModule, options: TokenVerifierOptions): JwksSource | undefined {
    const timing = {
      refreshMinIntervalMs: options.jwksRefreshMinIntervalMs ?? TOKEN_VERIFIER_DEFAULTS.jwksRefreshMinIntervalMs,
      maxAgeMs: options.jwksMaxAgeMs ?? TOKEN_VERIFIER_DEFAULTS.jwksMaxAgeMs,
      clock: this.clock,
    };
    if (options.jwksFile) {
      return new JwksSource(jose, new JwksFileLoader(options.jwksFile), timing, this.metrics, this.logger);
    }
    if (options.jwksUrl) {
      const url = httpUrl('jwksUrl', options.jwksUrl);
      return new JwksSource(
        jose,
        new JwksUrlLoader(url, this.http, options.jwksTimeoutMs ?? TOKEN_VERIFIER_DEFAULTS.jwksTimeoutMs),
        timing,
        this.metrics,
        this.logger,
      );
    }
    return undefined;
  }

  /** The introspection client of `options`, or undefined without one; reads the client secret now. */
  private createIntrospectionClient(options: TokenVerifierOptions): IntrospectionClient | undefined {
    if (!options.introspection) return undefined;
    const intro = options.introspection;
    httpUrl('introspection.url', intro.url);
    if (intro.clientSecretFile !== undefined && intro.clientId === undefined)
      throw new ConfigError('introspection.clientId', 'is required with a client secret');
    return new IntrospectionClient(
      intro,
      intro.clientSecretFile === undefined ? undefined : readSecret(intro.clientSecretFile),
      this.http,
      this.clock,
    );
  }

  /**
   * Validates `options`, loads jose and the keys, and starts watching the key source. Rejects with
   * a {@link ConfigError} for settings that cannot work and for a JWKS file that cannot be read at
   * start (an air-gapped site has no other source). An unreachable JWKS URL does not reject: the
   * verifier starts, answers UNAVAILABLE while no keys are known, and keeps trying.
   */
  static async create(options: TokenVerifierOptions): Promise<TokenVerifier> {
    const verifier = new TokenVerifier(await loadJose(), options);
    if (verifier.keySource) {
      const loaded = await verifier.keySource.start();
      if (!loaded && options.jwksFile) {
        const why = verifier.keySource.lastError;
        verifier.close();
        throw new ConfigError('jwks', `${options.jwksFile}: ${why ?? 'no keys'}`);
      }
    }
    return verifier;
  }

  /** Usable keys in the current JWKS (0 before a load succeeded or without a key source). */
  get keyCount(): number {
    return this.keySource?.keys()?.count ?? 0;
  }

  /**
   * Judges one token. Resolves with authenticated=false and a reason for a token the site does not
   * accept; rejects with a {@link BurrowError} only when no verdict is possible: INVALID_ARGUMENT
   * (empty or oversized token), UNAVAILABLE (key source or introspection endpoint unreachable and
   * no keys known), FAILED_PRECONDITION (nothing configured, or no audience to check).
   * `audience`, when not empty, replaces the configured audiences; with `allowedAudiences` set it
   * must be one of them, or the token is refused (`audience: ...`) without being looked at.
   */
  async authenticate(token: string, audience = '', trace?: TraceParent): Promise<AuthenticationResult> {
    const startedAt = performance.now();
    let result: AuthnResult = 'error';
    let reason = '';
    try {
      const verdict = await this.judge(token, audience, trace);
      if (verdict instanceof TokenRefusal) {
        result = 'refused';
        reason = verdict.word;
        this.logger.debug('token refused', { reason: verdict.reason });
        return { authenticated: false, subject: '', groups: [], claims: {}, reason: verdict.reason };
      }
      result = 'authenticated';
      return verdict;
    } catch (err) {
      const error = toBurrowError(err, 'token verification failed');
      reason = statusName(error.code).toLowerCase();
      this.logger.warn('token cannot be judged', { status: statusName(error.code), error: error.message });
      throw error;
    } finally {
      this.metrics.requests.inc({ result, reason });
      this.metrics.duration.observe({ result }, (performance.now() - startedAt) / 1000);
    }
  }

  /** Stops the JWKS watcher and timers and closes pooled HTTP connections. Idempotent. */
  close(): void {
    this.keySource?.close();
    this.http.close();
  }

  private async judge(
    token: string,
    audience: string,
    trace: TraceParent | undefined,
  ): Promise<AuthenticationResult | TokenRefusal> {
    if (typeof token !== 'string' || token === '') throw new BurrowError(Status.INVALID_ARGUMENT, 'token is empty');
    const bytes = Buffer.byteLength(token, 'utf8');
    if (bytes > this.maxTokenBytes)
      throw new BurrowError(Status.INVALID_ARGUMENT, `token is ${bytes} bytes; the limit is ${this.maxTokenBytes}`);
    if (!this.keySource && !this.introspection) {
      throw new BurrowError(
        Status.FAILED_PRECONDITION,
        'this agent verifies no tokens: start it with --jwks, --jwks-url or --introspection-url',
      );
    }
    if (audience !== '' && this.allowedAudiences.length > 0 && !this.allowedAudiences.includes(audience)) {
      // The caller must not pick an audience the site did not pin: a token minted for another site
      // service would pass a check against the audience its presenter chose.
      const pinned = this.allowedAudiences.join(', ');
      const asked = JSON.stringify(audience);
      return new TokenRefusal('audience', `the requested audience ${asked} is not one this agent accepts (${pinned})`);
    }
    const defaults = this.audiences.length > 0 ? this.audiences : this.allowedAudiences;
    const audiences = audience !== '' ? [audience] : defaults;
    if (audiences.length === 0) {
      // Accepting a token meant for any audience would let a token issued to one site service be
      // replayed against another; refuse to judge rather than skip the check.
      throw new BurrowError(
        Status.FAILED_PRECONDITION,
        'no audience to check: the request names none and the agent has no --token-audience',
      );
    }
    const parts = token.split('.');
    if (parts.length === 3 && this.keySource) {
      // jose checks the signature before it decodes the payload, so a payload that is not base64url
      // would be reported as a bad signature; it is a malformed token, and cheaper to say so first.
      const bad = parts.findIndex((p, i) => !BASE64URL.test(p) || (p === '' && i < 2));
      if (bad >= 0)
        return new TokenRefusal('malformed', `the ${['header', 'payload', 'signature'][bad]} is not base64url`);
      return this.verifyJwt(this.keySource, token, audiences, trace);
    }
    if (this.introspection) return this.judgeIntrospected(this.introspection, token, audiences);
    return new TokenRefusal(
      'malformed',
      `not a compact JWS (${parts.length} dot-separated parts, expected 3) and no introspection endpoint is configured`,
    );
  }

  private async verifyJwt(
    source: JwksSource,
    token: string,
    audiences: string[],
    trace: TraceParent | undefined,
  ): Promise<AuthenticationResult | TokenRefusal> {
    const known = this.verified.get(token, audiences);
    if (known) return this.accepted(known);
    let keys = source.keys();
    if (!keys) {
      await refreshKeys(source, trace);
      keys = source.keys();
      if (!keys)
        throw new BurrowError(
          Status.UNAVAILABLE,
          `no token signing keys: ${source.description}: ${source.lastError ?? 'not loaded yet'}`,
        );
    }
    const options: JWTVerifyOptions = {
      issuer: this.issuers,
      audience: audiences,
      algorithms: this.algorithms,
      clockTolerance: this.clockSkewMs / 1000,
      requiredClaims: this.jwtRequiredClaims,
      currentDate: new Date(this.clock()),
    };
    let outcome = await this.verifyWithKeys(keys, token, options);
    if (outcome instanceof TokenRefusal && outcome.word === 'unknown_key' && (await refreshKeys(source, trace))) {
      // The key set changed: a rotated-in key is now known.
      outcome = await this.verifyWithKeys(source.keys()!, token, options);
    }
    if (outcome instanceof TokenRefusal) {
      if (outcome.word === 'unknown_key') return new TokenRefusal('unknown_key', this.describeKeyOf(token));
      return outcome;
    }
    const result = this.accepted(outcome);
    this.verified.set(token, audiences, outcome, result.expiresAt);
    return result;
  }

  /** How many accepted tokens are remembered now (tests). */
  get rememberedTokens(): number {
    return this.verified.size;
  }

  /** One verification against one key set; a verdict, never a rejection, for the token's faults. */
  private async verifyWithKeys(
    keys: JwksKeySet,
    token: string,
    options: JWTVerifyOptions,
  ): Promise<JWTPayload | TokenRefusal> {
    try {
      return (await this.jose.jwtVerify(token, keys.lookup, options)).payload;
    } catch (err) {
      if ((err as { code?: string }).code === 'ERR_JWKS_MULTIPLE_MATCHING_KEYS') {
        // No `kid` and several keys of the right type: the one that verifies is the signer.
        return this.verifyWithEach(err as AsyncIterable<VerifyKey>, token, options);
      }
      return this.refusalOrThrow(err, options);
    }
  }

  private async verifyWithEach(
    candidates: AsyncIterable<VerifyKey>,
    token: string,
    options: JWTVerifyOptions,
  ): Promise<JWTPayload | TokenRefusal> {
    for await (const key of candidates) {
      try {
        return (await this.jose.jwtVerify(token, key, options)).payload;
      } catch (err) {
        if ((err as { code?: string }).code !== 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED')
          return this.refusalOrThrow(err, options);
      }
    }
    return new TokenRefusal('signature', 'signature verification failed with every candidate key');
  }

  private refusalOrThrow(err: unknown, options: JWTVerifyOptions): TokenRefusal {
    const refusal = refusalOfJoseError(err, { issuers: this.issuers, audiences: options.audience as string[] });
    if (refusal) return refusal;
    throw new BurrowError(Status.INTERNAL, `token verification failed: ${(err as Error).message ?? String(err)}`, err);
  }

  private describeKeyOf(token: string): string {
    try {
      const header = this.jose.decodeProtectedHeader(token);
      return (
        `no key in the site's key set ` +
        `matches ${header.kid === undefined ? 'a token without kid' : `kid "${String(header.kid)}"`} ` +
        `for ${String(header.alg)}`
      );
    } catch {
      return "no key in the site's key set matches the token";
    }
  }

  private judgeIntrospected(
    client: IntrospectionClient,
    token: string,
    audiences: string[],
  ): Promise<AuthenticationResult | TokenRefusal> {
    return client.introspect(token).then((answer) => this.checkIntrospected(answer, audiences));
  }

  /**
   * The endpoint vouches for the token, but its answer is checked like a JWT's claims wherever it
   * carries them: a cached answer outlives neither `exp` nor the skew, and `iss` and `aud`, when
   * present, must match. Endpoints that omit `aud` leave the audience to them.
   */
  private checkIntrospected(answer: IntrospectionAnswer, audiences: string[]): AuthenticationResult | TokenRefusal {
    if (!answer.active)
      return new TokenRefusal(
        'inactive',
        'the introspection endpoint reports the token inactive (expired, revoked or unknown)',
      );
    const nowS = this.clock() / 1000;
    const skewS = this.clockSkewMs / 1000;
    if (typeof answer.exp === 'number' && answer.exp <= nowS - skewS)
      return new TokenRefusal('expired', 'introspection answer "exp" is in the past');
    if (typeof answer.nbf === 'number' && answer.nbf > nowS + skewS)
      return new TokenRefusal('not_yet_valid', 'introspection answer "nbf" is in the future');
    if (answer.iss !== undefined && !this.issuers.includes(answer.iss as string))
      return new TokenRefusal('issuer', `issuer ${JSON.stringify(answer.iss)} is not accepted`);
    if (answer.aud === undefined && this.allowedAudiences.length > 0) {
      const pinned = this.allowedAudiences.join(', ');
      return new TokenRefusal('audience', `the introspection answer has no "aud"; this agent accepts only ${pinned}`);
    }
    if (answer.aud !== undefined) {
      const tokenAudiences = Array.isArray(answer.aud) ? answer.aud : [answer.aud];
      if (!audiences.some((a) => tokenAudiences.includes(a)))
        return new TokenRefusal(
          'audience',
          `token audience ${JSON.stringify(answer.aud)} does not include ${audiences.join(' or ')}`,
        );
    }
    for (const claim of this.requiredClaims) {
      if (!(claim in answer))
        return new TokenRefusal('malformed', `introspection answer lacks the required "${claim}" claim`);
    }
    const { active: _active, ...claims } = answer;
    return this.accepted(claims);
  }

  private accepted(claims: Record<string, unknown>): AuthenticationResult {
    return {
      authenticated: true,
      subject: typeof claims.sub === 'string' ? claims.sub : '',
      groups: stringArray(claimAt(claims, this.groupsPath)),
      claims,
      expiresAt: typeof claims.exp === 'number' ? new Date(claims.exp * 1000) : undefined,
      reason: '',
    };
  }
}

/** A claim by name, or, when no claim has that exact name, by dotted path (`realm_access.roles`). */
function claimAt(claims: Record<string, unknown>, path: string): unknown {
  if (Object.hasOwn(claims, path)) return claims[path];
  let node: unknown = claims;
  for (const part of path.split('.')) {
    if (typeof node !== 'object' || node === null || !Object.hasOwn(node, part)) return undefined;
    node = (node as Record<string, unknown>)[part];
  }
  return node;
}

function stringArray(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === 'string') : [];
}

/** Parses an http: or https: URL; anything else is a ConfigError naming `field`. */
export function httpUrl(field: string, value: string): URL {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigError(field, `"${value}" is not a URL`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:')
    throw new ConfigError(field, `"${value}" is not an http: or https: URL`);
  return url;
}

function readSecret(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(
      'introspection.clientSecretFile',
      `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`,
    );
  }
  const secret = text.replace(/\r?\n$/, '');
  if (secret === '') throw new ConfigError('introspection.clientSecretFile', `${file} is empty`);
  return secret;
}

/**
 * `source.refreshForUnknownKey()`, with a CLIENT span "jwks fetch" under the call's span when the
 * call waits for a fetch (one it started or one in flight; none when the refresh is rate-limited).
 */
async function refreshKeys(source: JwksSource, trace: TraceParent | undefined): Promise<boolean> {
  const refreshed = source.refreshForUnknownKey();
  if (!trace || !source.loading) return refreshed;
  const span = startChildSpan(trace.tracing, 'jwks fetch', trace.span, SpanKind.CLIENT, {
    'burrow.jwks.source': source.description,
  });
  try {
    const swapped = await refreshed;
    span.setAttribute('burrow.jwks.changed', swapped);
    return swapped;
  } finally {
    endSpan(span);
  }
}
