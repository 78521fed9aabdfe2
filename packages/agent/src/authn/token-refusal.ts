/**
 * The stable first words of a refusal's reason (proto/burrow/auth/v1/auth.proto,
 * AuthenticateResponse.reason). Callers branch on these; the text after the colon is for people.
 */
export type RefusalWord = 'expired' | 'not_yet_valid' | 'audience' | 'issuer' | 'unknown_key' | 'algorithm' | 'signature' | 'malformed' | 'inactive';

/** A token the site does not accept, and why. Not an error: the answer is authenticated=false. */
export class TokenRefusal {
  constructor(readonly word: RefusalWord, readonly details: string) {}

  /** `word: details`, the form the proto prescribes. */
  get reason(): string {
    return `${this.word}: ${this.details}`;
  }
}

interface JoseErrorLike { code?: unknown; claim?: unknown; reason?: unknown; message?: unknown }

/**
 * Turns what jose throws while verifying a JWT into a refusal, or returns undefined for anything
 * that is not a verdict about the token (a bug, a broken key), which the caller reports as an
 * error instead.
 */
export function refusalOfJoseError(err: unknown): TokenRefusal | undefined {
  const e = (err ?? {}) as JoseErrorLike;
  const message = typeof e.message === 'string' ? e.message : String(err);
  switch (e.code) {
    case 'ERR_JWT_EXPIRED':
      return new TokenRefusal('expired', message);
    case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
      if (e.claim === 'nbf' && e.reason === 'check_failed') return new TokenRefusal('not_yet_valid', message);
      if (e.claim === 'aud') return new TokenRefusal('audience', message);
      if (e.claim === 'iss') return new TokenRefusal('issuer', message);
      return new TokenRefusal('malformed', message);
    case 'ERR_JOSE_ALG_NOT_ALLOWED':
      return new TokenRefusal('algorithm', message);
    case 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED':
      return new TokenRefusal('signature', 'signature verification failed');
    case 'ERR_JWKS_NO_MATCHING_KEY':
      return new TokenRefusal('unknown_key', message);
    case 'ERR_JOSE_NOT_SUPPORTED':
      // Raised for a `crit` extension jose does not implement: the token demands processing the
      // site cannot do, so it is not a token this site can accept.
      return new TokenRefusal('malformed', message);
    case 'ERR_JWS_INVALID':
    case 'ERR_JWT_INVALID':
      return new TokenRefusal('malformed', message);
    default:
      return undefined;
  }
}
