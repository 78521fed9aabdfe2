import { createHash } from 'node:crypto';

/** Bounds of {@link VerifiedTokens}. */
export const VERIFIED_TOKEN_CACHE = {
  /** Longest a verified token is reused without verifying it again (never past its `exp`). */
  ttlMs: 30_000,
  /** Most tokens remembered; the oldest goes first. */
  maxEntries: 10_000,
} as const;

interface Entry {
  claims: Record<string, unknown>;
  untilMs: number;
}

/**
 * Tokens the verifier accepted by signature recently, with their claims, per audience list. A
 * gateway asks about every request, and a client sends the same token with each of them: verifying
 * its signature again each time would be most of a check's cost. An entry lives
 * {@link VERIFIED_TOKEN_CACHE}.ttlMs at most and never past the token's `exp`; the verifier empties
 * the cache whenever its key set changes (a key removed from the JWKS stops its tokens at once).
 * Introspected tokens are not kept (they follow the introspection cache and its TTL), nor are
 * refusals: a refused token is verified again, and answered the same. Keys are SHA-256 digests, so
 * memory is bounded by the entry count, not by token sizes.
 */
export class VerifiedTokens {
  private readonly entries = new Map<string, Entry>();

  constructor(
    private readonly clock: () => number = Date.now,
    private readonly ttlMs: number = VERIFIED_TOKEN_CACHE.ttlMs,
    private readonly maxEntries: number = VERIFIED_TOKEN_CACHE.maxEntries,
  ) {}

  // The audiences are part of the key: a token accepted for one audience says nothing of another.
  private static keyOf(token: string, audiences: readonly string[]): string {
    return createHash('sha256').update(audiences.join('\n')).update('\0').update(token).digest('base64');
  }

  /** The claims of a token verified for `audiences` within its lifetime here, else undefined. */
  get(token: string, audiences: readonly string[]): Record<string, unknown> | undefined {
    if (this.entries.size === 0) return undefined;
    const key = VerifiedTokens.keyOf(token, audiences);
    const e = this.entries.get(key);
    if (!e) return undefined;
    if (this.clock() >= e.untilMs) {
      this.entries.delete(key);
      return undefined;
    }
    return e.claims;
  }

  /** Remembers a token the verifier accepted for `audiences`, until `expiresAt` at the latest. */
  set(token: string, audiences: readonly string[], claims: Record<string, unknown>, expiresAt: Date | undefined): void {
    if (this.ttlMs <= 0 || this.maxEntries <= 0) return;
    const now = this.clock();
    const untilMs = Math.min(now + this.ttlMs, expiresAt ? expiresAt.getTime() : Number.POSITIVE_INFINITY);
    if (untilMs <= now) return;
    const key = VerifiedTokens.keyOf(token, audiences);
    this.entries.delete(key);
    if (this.entries.size >= this.maxEntries) this.entries.delete(this.entries.keys().next().value as string);
    this.entries.set(key, { claims, untilMs });
  }

  /** Forgets every token (the key set changed). */
  clear(): void {
    this.entries.clear();
  }

  get size(): number {
    return this.entries.size;
  }
}
