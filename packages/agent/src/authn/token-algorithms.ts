import { ConfigError } from '@burrow/tunnel';

/**
 * JWS algorithms the verifier accepts when none are configured: the asymmetric ones identity
 * providers sign with. ES512 and Ed25519 may be configured; they are off by default because few
 * providers issue them.
 */
export const DEFAULT_TOKEN_ALGORITHMS: readonly string[] = [
  'RS256',
  'RS384',
  'RS512',
  'PS256',
  'PS384',
  'PS512',
  'ES256',
  'ES384',
  'EdDSA',
];

/** Every algorithm that may be configured: asymmetric signatures only. */
export const SUPPORTED_TOKEN_ALGORITHMS: readonly string[] = [...DEFAULT_TOKEN_ALGORITHMS, 'ES512', 'Ed25519'];

/**
 * Checks an allowed-algorithms list (a comma-separated string or an array). `none` and every HS*
 * algorithm are refused even when asked for: a site verifies with public keys only, and allowing a
 * MAC algorithm is how a public key ends up used as an HMAC secret. Throws {@link ConfigError}
 * naming `field`.
 */
export function parseTokenAlgorithms(field: string, value: string | readonly string[]): string[] {
  const list = (typeof value === 'string' ? value.split(',') : [...value]).map((a) => a.trim()).filter((a) => a !== '');
  if (list.length === 0) throw new ConfigError(field, 'names no algorithm');
  for (const alg of list) {
    if (alg.toLowerCase() === 'none' || /^HS\d+$/i.test(alg)) {
      throw new ConfigError(
        field,
        `${alg} is refused: tokens must be signed with a private key and verified with a public one`,
      );
    }
    if (!SUPPORTED_TOKEN_ALGORITHMS.includes(alg))
      throw new ConfigError(field, `"${alg}" is not one of ${SUPPORTED_TOKEN_ALGORITHMS.join(', ')}`);
  }
  return [...new Set(list)];
}
