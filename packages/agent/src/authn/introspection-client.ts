import { createHash } from 'node:crypto';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError } from '@burrow/tunnel';
import type { HttpClient, HttpRequestError } from './http-client';

/** Settings of the RFC 7662 introspection endpoint that judges opaque tokens. */
export interface IntrospectionOptions {
  /** The endpoint, e.g. `https://idp.site.internal/oauth2/introspect`. */
  url: string;
  /** The agent's client id at the endpoint (HTTP Basic user, or a `client_id` form field without a secret). */
  clientId?: string;
  /** File holding the client secret (trailing newline ignored); requires `clientId`. */
  clientSecretFile?: string;
  /** Whole request, connect to last byte; default 5 s. */
  timeoutMs?: number;
  /**
   * How long an `active: true` answer is reused for the same token, never past its `exp`; default 30 s, 0 turns the
   * cache off.
   */
  cacheTtlMs?: number;
  /** Most cached answers; the oldest goes first; default 10,000. */
  maxCacheEntries?: number;
}

export const INTROSPECTION_DEFAULTS = { timeoutMs: 5_000, cacheTtlMs: 30_000, maxCacheEntries: 10_000 };
const MAX_ANSWER_BYTES = 256 * 1024;

/** An introspection answer: `active` and whatever the endpoint says about the token. */
export type IntrospectionAnswer = Record<string, unknown> & { active: boolean };

/**
 * RFC 7662 client. Answers `active: true` are cached (keyed by the token's SHA-256, so the cache
 * holds no token) for `cacheTtlMs`, bounded by the token's `exp`: a revoked token is honoured for at
 * most that long. Inactive answers are never cached, so a token that becomes valid is seen at once.
 */
export class IntrospectionClient {
  private readonly url: URL;
  private readonly headers: Record<string, string>;
  private readonly formClientId: string | undefined;
  private readonly timeoutMs: number;
  private readonly cacheTtlMs: number;
  private readonly maxCacheEntries: number;
  /** token digest -> answer and the clock time it stops being reused; insertion order = age. */
  private readonly cache = new Map<string, { answer: IntrospectionAnswer; untilMs: number }>();

  /** Throws an Error naming the option when `options` cannot work (bad URL, unreadable secret). */
  constructor(
    options: IntrospectionOptions,
    clientSecret: string | undefined,
    private readonly http: HttpClient,
    private readonly clock: () => number,
  ) {
    this.url = new URL(options.url);
    this.timeoutMs = options.timeoutMs ?? INTROSPECTION_DEFAULTS.timeoutMs;
    this.cacheTtlMs = options.cacheTtlMs ?? INTROSPECTION_DEFAULTS.cacheTtlMs;
    this.maxCacheEntries = options.maxCacheEntries ?? INTROSPECTION_DEFAULTS.maxCacheEntries;
    this.headers = { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' };
    if (options.clientId !== undefined && clientSecret !== undefined) {
      // RFC 6749 2.3.1: both parts are form-encoded before they are joined and base64-encoded.
      const basic = Buffer.from(`${encodeURIComponent(options.clientId)}:${encodeURIComponent(clientSecret)}`).toString(
        'base64',
      );
      this.headers.authorization = `Basic ${basic}`;
    }
    this.formClientId = clientSecret === undefined ? options.clientId : undefined;
  }

  get description(): string {
    return `introspection-url ${this.url.href}`;
  }

  /**
   * Asks the endpoint about `token`. Rejects with a {@link BurrowError}: UNAVAILABLE when the
   * endpoint cannot be reached, times out, fails (5xx) or answers something that is not an
   * introspection answer; FAILED_PRECONDITION when it refuses the agent's own credentials
   * (401/403), which no retry will fix.
   */
  async introspect(token: string): Promise<IntrospectionAnswer> {
    const key = createHash('sha256').update(token).digest('base64url');
    const now = this.clock();
    const cached = this.cache.get(key);
    if (cached && cached.untilMs > now) return cached.answer;
    if (cached) this.cache.delete(key);

    const form = new URLSearchParams({ token, token_type_hint: 'access_token' });
    if (this.formClientId !== undefined) form.set('client_id', this.formClientId);
    let res: Awaited<ReturnType<HttpClient['request']>>;
    try {
      res = await this.http.request({
        method: 'POST',
        url: this.url,
        headers: this.headers,
        body: form.toString(),
        timeoutMs: this.timeoutMs,
        maxBodyBytes: MAX_ANSWER_BYTES,
      });
    } catch (err) {
      throw new BurrowError(
        Status.UNAVAILABLE,
        `introspection endpoint ${this.url.href} cannot be reached: ${(err as HttpRequestError).message}`,
        err,
      );
    }
    if (res.status === 401 || res.status === 403) {
      throw new BurrowError(
        Status.FAILED_PRECONDITION,
        `introspection endpoint ${this.url.href} refused the agent's client credentials (HTTP ${res.status})`,
      );
    }
    if (res.status !== 200)
      throw new BurrowError(Status.UNAVAILABLE, `introspection endpoint ${this.url.href} failed: HTTP ${res.status}`);
    let answer: unknown;
    try {
      answer = JSON.parse(res.body.toString('utf8'));
    } catch (err) {
      throw new BurrowError(
        Status.UNAVAILABLE,
        `introspection endpoint ${this.url.href} answered with something that is not JSON`,
        err,
      );
    }
    if (typeof answer !== 'object' || answer === null || typeof (answer as { active?: unknown }).active !== 'boolean') {
      throw new BurrowError(
        Status.UNAVAILABLE,
        `introspection endpoint ${this.url.href} answered without a boolean "active"`,
      );
    }
    const result = answer as IntrospectionAnswer;
    if (result.active) this.remember(key, result, now);
    return result;
  }

  private remember(key: string, answer: IntrospectionAnswer, now: number): void {
    let untilMs = now + this.cacheTtlMs;
    if (typeof answer.exp === 'number') untilMs = Math.min(untilMs, answer.exp * 1000);
    if (untilMs <= now) return;
    if (this.cache.size >= this.maxCacheEntries) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(key, { answer, untilMs });
  }
}
