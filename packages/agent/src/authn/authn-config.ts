import { ConfigError, asList, parseDurationMs, requireReadableFile, stringOption } from '@burrow/tunnel';
import { INTROSPECTION_DEFAULTS } from './introspection-client';
import { DEFAULT_TOKEN_ALGORITHMS, parseTokenAlgorithms } from './token-algorithms';
import { MAX_CLOCK_SKEW_MS, TOKEN_VERIFIER_DEFAULTS, httpUrl, type TokenVerifierSettings } from './token-verifier';

/**
 * The agent's token-verification flags, spread into `burrow-agent run`'s options by cli.ts (each
 * is also a config-file key and a BURROW_AGENT_* variable there). No yargs defaults: a token flag
 * given without a key source is a mistake to report, and defaults would hide which flags were set.
 */
export const AUTHN_RUN_OPTIONS = {
  jwks: stringOption("JWKS file of the site's token signing keys (air-gapped sites); reloaded when it changes"),
  'jwks-url': stringOption(
    "HTTP(S) URL of the site's JWKS; fetched at start, on unknown key ids (at most every 30s) and every 10m",
  ),
  'token-issuer': {
    type: 'string',
    array: true,
    describe:
      'accepted token issuer (`iss`, exact match; repeatable or comma-separated); required with --jwks, ' +
      '--jwks-url or --introspection-url',
  },
  'token-audience': {
    type: 'string',
    array: true,
    describe: 'audience checked when an Authenticate request names none (repeatable or comma-separated)',
  },
  'token-allowed-audience': {
    type: 'string',
    array: true,
    describe: 'the only audiences accepted, whatever a request names (repeatable or comma-separated; default any)',
  },
  'token-allow-without-exp': {
    type: 'boolean',
    describe: 'accept JWTs that carry no exp claim and so never expire (default false: refused)',
  },
  'token-algorithms': stringOption(
    `allowed JWS algorithms, comma-separated ` +
      `(default ${DEFAULT_TOKEN_ALGORITHMS.join(',')}; none and HS* are refused)`,
  ),
  'token-clock-skew': stringOption('tolerance for exp and nbf, at most 5m (default 60s)'),
  'token-groups-claim': stringOption(
    "claim holding the caller's groups; a dotted path reaches into objects (default groups)",
  ),
  'token-required-claims': stringOption(
    'claims every token must carry besides iss, aud and (JWTs) exp, comma-separated, e.g. sub (default none)',
  ),
  'introspection-url': stringOption('RFC 7662 endpoint that judges opaque (non-JWT) tokens'),
  'introspection-client-id': stringOption("the agent's client id at the introspection endpoint"),
  'introspection-client-secret-file': stringOption(
    "file holding the agent's client secret at the introspection endpoint",
  ),
  'introspection-timeout': stringOption('timeout of one introspection request (default 5s)'),
  'introspection-cache-ttl': stringOption(
    "how long an active answer is reused, never past the token's exp; 0 turns caching off (default 30s)",
  ),
} as const;

const SOURCE_FLAGS = ['jwks', 'jwks-url', 'introspection-url'];

/** Comma-separated and repeated values, as one list without empties. */
function listOf(value: unknown): string[] {
  return asList(value)
    .flatMap((v) => v.split(','))
    .map((v) => v.trim())
    .filter((v) => v !== '');
}

function given(args: Record<string, unknown>, flag: string): boolean {
  const v = args[flag];
  return v !== undefined && v !== null && !(Array.isArray(v) && v.length === 0);
}

/**
 * Builds the token verifier's settings from parsed flags, or undefined when no key source is
 * configured (the agent then answers Authenticate with FAILED_PRECONDITION). Every problem is a
 * one-line {@link ConfigError} naming its flag.
 */
export function authnConfigFromArgs(args: Record<string, unknown>): TokenVerifierSettings | undefined {
  if (!SOURCE_FLAGS.some((f) => given(args, f))) {
    const stray = Object.keys(AUTHN_RUN_OPTIONS).find((f) => given(args, f));
    if (stray) throw new ConfigError(stray, 'has no effect without --jwks, --jwks-url or --introspection-url');
    return undefined;
  }
  if (given(args, 'jwks') && given(args, 'jwks-url'))
    throw new ConfigError('jwks-url', 'cannot be combined with --jwks: name one key source');
  const settings = tokenRulesFromArgs(args);
  applyKeySourceFlags(settings, args);
  applyClaimFlags(settings, args);
  if (given(args, 'introspection-url')) {
    settings.introspection = introspectionFromArgs(args);
  } else {
    const stray = [
      'introspection-client-id',
      'introspection-client-secret-file',
      'introspection-timeout',
      'introspection-cache-ttl',
    ].find((f) => given(args, f));
    if (stray) throw new ConfigError(stray, 'has no effect without --introspection-url');
  }
  return settings;
}

/** Issuers, audiences, algorithms and required claims, with the defaults of the flags not given. */
function tokenRulesFromArgs(args: Record<string, unknown>): TokenVerifierSettings {
  const issuers = listOf(args['token-issuer']);
  if (issuers.length === 0)
    throw new ConfigError(
      'token-issuer',
      'is required with --jwks, --jwks-url or --introspection-url (the accepted iss value)',
    );
  const settings: TokenVerifierSettings = {
    issuers,
    audiences: listOf(args['token-audience']),
    allowedAudiences: listOf(args['token-allowed-audience']),
    allowTokensWithoutExp: args['token-allow-without-exp'] === true,
    algorithms: given(args, 'token-algorithms')
      ? parseTokenAlgorithms('token-algorithms', String(args['token-algorithms']))
      : [...DEFAULT_TOKEN_ALGORITHMS],
    clockSkewMs: TOKEN_VERIFIER_DEFAULTS.clockSkewMs,
    groupsClaim: TOKEN_VERIFIER_DEFAULTS.groupsClaim,
    requiredClaims: listOf(args['token-required-claims']),
  };
  const pinned = settings.allowedAudiences!;
  const outside = settings.audiences!.find((a) => pinned.length > 0 && !pinned.includes(a));
  if (outside !== undefined) {
    throw new ConfigError('token-audience', `"${outside}" is not one of --token-allowed-audience`);
  }
  return settings;
}

/** --jwks or --jwks-url (never both; checked before) into `settings`. */
function applyKeySourceFlags(settings: TokenVerifierSettings, args: Record<string, unknown>): void {
  if (given(args, 'jwks')) settings.jwksFile = requireReadableFile('jwks', args.jwks);
  if (given(args, 'jwks-url')) settings.jwksUrl = httpUrl('jwks-url', String(args['jwks-url'])).href;
}

/** --token-clock-skew and --token-groups-claim over their defaults in `settings`. */
function applyClaimFlags(settings: TokenVerifierSettings, args: Record<string, unknown>): void {
  if (given(args, 'token-clock-skew')) {
    settings.clockSkewMs = parseDurationMs('token-clock-skew', args['token-clock-skew']);
    if (settings.clockSkewMs > MAX_CLOCK_SKEW_MS)
      throw new ConfigError('token-clock-skew', `${String(args['token-clock-skew'])} is more than the 5m allowed`);
  }
  if (given(args, 'token-groups-claim')) {
    settings.groupsClaim = String(args['token-groups-claim']).trim();
    if (settings.groupsClaim === '') throw new ConfigError('token-groups-claim', 'must not be empty');
  }
}

/** The introspection endpoint's settings, given --introspection-url. */
function introspectionFromArgs(args: Record<string, unknown>): TokenVerifierSettings['introspection'] {
  const secretFile = given(args, 'introspection-client-secret-file')
    ? requireReadableFile('introspection-client-secret-file', args['introspection-client-secret-file'])
    : undefined;
  const clientId = given(args, 'introspection-client-id') ? String(args['introspection-client-id']) : undefined;
  if (secretFile && !clientId)
    throw new ConfigError('introspection-client-id', 'is required with --introspection-client-secret-file');
  const timeoutMs = given(args, 'introspection-timeout')
    ? parseDurationMs('introspection-timeout', args['introspection-timeout'])
    : INTROSPECTION_DEFAULTS.timeoutMs;
  if (timeoutMs < 1 || timeoutMs > 60_000) throw new ConfigError('introspection-timeout', 'must be from 1ms to 1m');
  return {
    url: httpUrl('introspection-url', String(args['introspection-url'])).href,
    clientId,
    clientSecretFile: secretFile,
    timeoutMs,
    cacheTtlMs: given(args, 'introspection-cache-ttl')
      ? parseDurationMs('introspection-cache-ttl', args['introspection-cache-ttl'])
      : INTROSPECTION_DEFAULTS.cacheTtlMs,
  };
}
