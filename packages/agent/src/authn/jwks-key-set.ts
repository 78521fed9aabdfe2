import { createHash, createPublicKey } from 'node:crypto';
import type { JWK, JWTVerifyGetKey } from 'jose';
import type { JoseModule } from './jose-loader';

// JWK members that only private (or symmetric) keys carry.
const PRIVATE_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'oth', 'k', 'priv'];
const MIN_RSA_BITS = 2048;

/** A key lookup as jose's `jwtVerify` takes it. */
export type KeyLookup = JWTVerifyGetKey;

/**
 * One loaded JSON Web Key Set: the public keys a site signs tokens with. Immutable; a reload builds
 * a new one and swaps it in, so a verification in flight keeps the set it started with.
 */
export class JwksKeySet {
  private constructor(
    /** Key lookup for jose: by `kid` and algorithm family; imported keys are cached per key. */
    readonly lookup: KeyLookup,
    /** Usable keys in the set. */
    readonly count: number,
    /** SHA-256 of the document the set was built from: a reload of identical bytes changes nothing. */
    readonly digest: string,
    /** Why each skipped key was skipped, for the log. */
    readonly skipped: string[],
  ) {}

  /**
   * Builds a key set from a JWKS document (the bytes of a file or an HTTP answer). Throws an Error
   * saying what is wrong when the document is not a JWKS at all. Keys that cannot be used for
   * verification are left out and listed in {@link skipped}: symmetric keys (`oct`), keys
   * carrying private members (a JWKS that holds a signing key is a misconfiguration worth seeing,
   * not something to quietly use), RSA keys under 2048 bits, and keys Node cannot parse.
   */
  static parse(jose: JoseModule, bytes: Buffer): JwksKeySet {
    let doc: unknown;
    try {
      doc = JSON.parse(bytes.toString('utf8'));
    } catch (err) {
      throw new Error(`not JSON (${(err as Error).message})`);
    }
    if (typeof doc !== 'object' || doc === null || !Array.isArray((doc as { keys?: unknown }).keys)) {
      throw new Error('not a JWKS: expected an object with a "keys" array');
    }
    const usable: JWK[] = [];
    const skipped: string[] = [];
    (doc as { keys: unknown[] }).keys.forEach((candidate, index) => {
      const problem = unusableBecause(candidate);
      const name =
        typeof (candidate as JWK | null)?.kid === 'string' ? `kid "${(candidate as JWK).kid}"` : `key #${index}`;
      if (problem) skipped.push(`${name}: ${problem}`);
      else usable.push(candidate as JWK);
    });
    const lookup = jose.createLocalJWKSet({ keys: usable }) as KeyLookup;
    return new JwksKeySet(lookup, usable.length, createHash('sha256').update(bytes).digest('hex'), skipped);
  }
}

/** Why a JWKS member cannot verify signatures here, or undefined when it can. */
function unusableBecause(jwk: unknown): string | undefined {
  if (typeof jwk !== 'object' || jwk === null || Array.isArray(jwk)) return 'not a JSON object';
  const key = jwk as JWK & Record<string, unknown>;
  if (key.kty === 'oct') return 'a symmetric key; only public keys verify tokens';
  if (PRIVATE_MEMBERS.some((m) => m in key)) return 'holds private key material; publish only the public key';
  if (key.use !== undefined && key.use !== 'sig') return `use is "${String(key.use)}", not "sig"`;
  try {
    const parsed = createPublicKey({ key: key as import('node:crypto').JsonWebKey, format: 'jwk' });
    const bits = parsed.asymmetricKeyDetails?.modulusLength;
    if (bits !== undefined && bits < MIN_RSA_BITS)
      return `RSA key of ${bits} bits; at least ${MIN_RSA_BITS} are required`;
  } catch (err) {
    return `not a usable public key (${(err as Error).message})`;
  }
  return undefined;
}
