/**
 * The stable first words of a refusal's reason (proto/burrow/auth/v1/auth.proto,
 * AuthenticateResponse.reason). Callers branch on these; the text after the colon is for people.
 */
export type RefusalWord =
  | 'expired'
  | 'not_yet_valid'
  | 'audience'
  | 'issuer'
  | 'unknown_key'
  | 'algorithm'
  | 'signature'
  | 'malformed'
  | 'inactive';

/** A token the site does not accept, and why. Not an error: the answer is authenticated=false. */
export class TokenRefusal {
  constructor(
    readonly word: RefusalWord,
    readonly details: string,
  ) {}

  /** `word: details`, the form the proto prescribes. */
  get reason(): string {
    return `${this.word}: ${this.details}`;
  }
}

interface JoseErrorLike {
  code?: unknown;
  claim?: unknown;
  reason?: unknown;
  message?: unknown;
  payload?: Record<string, unknown>;
}

/** What the token was checked against, so that a refusal can say what was expected. */
export interface RefusalContext {
  issuers: readonly string[];
  audiences: readonly string[];
}

const at = (seconds: unknown): string =>
  typeof seconds === 'number' && Number.isFinite(seconds) ? new Date(seconds * 1000).toISOString() : String(seconds);

/**
 * Turns what jose throws while verifying a JWT into a refusal, or returns undefined for anything
 * that is not a verdict about the token (a bug, a broken key), which the caller reports as an
 * error instead.
 */
export function refusalOfJoseError(err: unknown, context: RefusalContext): TokenRefusal | undefined {
  const e = (err ?? {}) as JoseErrorLike;
  const message = typeof e.message === 'string' ? e.message : String(err);
  const claims = e.payload ?? {};
  const missing = e.reason === 'missing';
  switch (e.code) {
    case 'ERR_JWT_EXPIRED':
      return new TokenRefusal('expired', `token expired at ${at(claims.exp)}`);
    case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
      if (e.claim === 'nbf' && e.reason === 'check_failed')
        return new TokenRefusal('not_yet_valid', `token is not valid before ${at(claims.nbf)}`);
      if (e.claim === 'aud')
        return new TokenRefusal(
          'audience',
          missing
            ? 'token has no "aud" claim'
            : `token audience ${JSON.stringify(claims.aud)} does not ` +
                `include ${context.audiences.map((a) => JSON.stringify(a)).join(' or ')}`,
        );
      if (e.claim === 'exp' && missing) {
        return new TokenRefusal('malformed', 'token has no "exp" claim; tokens that never expire are refused');
      }
      if (e.claim === 'iss')
        return new TokenRefusal(
          'issuer',
          missing ? 'token has no "iss" claim' : `issuer ${JSON.stringify(claims.iss)} is not accepted`,
        );
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
