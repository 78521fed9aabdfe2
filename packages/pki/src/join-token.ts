/**
 * Join tokens: one-time secrets an operator hands to a new agent (`burrow-pki token create`).
 *
 * Format (one line, URL-safe):
 *
 *   burrow-join-v1.<tokenId>.<secret>.<pin>[~<pin>...]
 *
 * - tokenId: 16 lower-case hex digits (64 random bits); names the token in logs and on disk.
 * - secret: 43 base64url characters (256 random bits). Stored only as its SHA-256.
 * - pin: SHA-256 (lower-case hex) of the DER SubjectPublicKeyInfo of a root CA in the trust bundle
 *   (kubeadm's discovery-token-ca-cert-hash): the agent trusts a broker whose chain contains it,
 *   with nothing else installed. The first pin is the root of the CA that signs broker
 *   certificates when the token is made; during a CA rotation the other trusted root follows, so
 *   a token made before `update-servers` still finds its CA after it.
 *
 * A self-contained token (what `burrow-pki token create` prints) also says where to enroll:
 *
 *   burrow-join-v2.<tokenId>.<secret>.<pin>[~<pin>...].<where>
 *
 * - where: base64url (no padding) of the JSON `{"brokers":["HOST:PORT",...],"serverName":"NAME"}`
 *   (serverName optional): the broker agent listeners to enroll at and the TLS name to expect. It
 *   is not secret and not signed: a tampered address only leads to a broker that cannot show the
 *   pinned CA, and the agent refuses that one. v1 tokens (no `where`) are still accepted.
 *
 * On disk: `D/tokens/<tokenId>.json` ({@link StoredJoinToken}). Consuming writes
 * `D/tokens/used/<tokenId>.json` with link(2), which fails if that file exists: of any number of
 * concurrent consumers, in one process or many sharing the directory, exactly one succeeds.
 * Then the unused file is removed. The used record keeps the SHA-256 of the public key the token
 * was consumed for and the certificate issued for it, so an agent that failed after the broker
 * answered (a full disk, a dropped connection) can present the same token with the same key again,
 * within the token's lifetime, and get the same certificate; any other key is refused.
 */
import { createHash, randomBytes, timingSafeEqual, X509Certificate } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { idProblem } from '@burrow/tunnel/dist/ids';
import { writeFileAtomic } from './atomic-write';
import { loadPki, serverSigningCaIdOf, type LoadedPki } from './pki-dir';
import { PkiError } from './pki-error';
import { loadRevocations } from './revocation';
import { assertName, assertPositiveMs } from './validation';

export const TOKEN_PREFIX = 'burrow-join-v1';
/** Prefix of a self-contained token (one that also names the brokers and the TLS server name). */
export const TOKEN_PREFIX_V2 = 'burrow-join-v2';
export const TOKENS_SUBDIR = 'tokens';
/** Join token lifetime when none is given: 1 hour. */
export const DEFAULT_JOIN_TOKEN_TTL_MS = 3_600_000;
/** Used-token records are kept this long after the token's expiry, so reuse reads 'used', then deleted. */
const USED_RETENTION_MS = 7 * 86_400_000;

const TOKEN_PATTERN = new RegExp(
  '^burrow-join-v([12])\\.([0-9a-f]{16})\\.([A-Za-z0-9_-]{43})\\.([0-9a-f]{64}(?:~[0-9a-f]{64})*)' +
    '(?:\\.([A-Za-z0-9_-]{1,4096}))?$',
);

/** Why an enrollment token was refused. */
export type EnrollmentFailureReason = 'malformed' | 'unknown' | 'expired' | 'used' | 'banned';

/** A join token was refused. `reason` tells which way; the message never contains the secret. */
export class EnrollmentError extends PkiError {
  override readonly name: string = 'EnrollmentError';

  constructor(
    readonly reason: EnrollmentFailureReason,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** A join token as created. */
export interface JoinTokenInfo {
  /** The one-line token to hand to the agent. */
  token: string;
  tokenId: string;
  agentId: string;
  expiresAt: Date;
}

/** The parts of a join token. */
export interface ParsedJoinToken {
  tokenId: string;
  secret: string;
  /** Pin (SHA-256 of the DER SubjectPublicKeyInfo, lower-case hex) of the root CA to trust first. */
  caPinSha256: string;
  /** Every pin in the token, `caPinSha256` first (more than one only during a CA rotation). */
  caPinsSha256: string[];
  /** Broker agent listeners (HOST:PORT) a v2 token names; empty for a v1 token. */
  brokers: string[];
  /** TLS name to expect in the broker certificate, if the token names one. */
  serverName?: string;
}

/** Contents of `D/tokens/<tokenId>.json`. */
export interface StoredJoinToken {
  readonly tokenId: string;
  readonly agentId: string;
  /** SHA-256 of the secret, lower-case hex. */
  readonly secretSha256: string;
  readonly createdAt: string;
  readonly expiresAt: string;
  /** In used/ only. */
  readonly consumedAt?: string;
  /** In used/ only: SHA-256 (hex) of the DER SubjectPublicKeyInfo of the key the token was consumed for. */
  readonly publicKeySha256?: string;
  /** In used/ only: the certificate chain (PEM) issued for that key, once issued. */
  readonly certificatePem?: string;
}

/**
 * SHA-256 pin (lower-case hex) of a CA certificate: the hash of its DER SubjectPublicKeyInfo. Uses the first
 * certificate in `certPem`.
 */
export function caPinOf(certPem: string): string {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(certPem);
  } catch (err) {
    throw new PkiError(`cert: not a readable certificate (${(err as Error).message})`, { cause: err });
  }
  return createHash('sha256')
    .update(cert.publicKey.export({ type: 'spki', format: 'der' }))
    .digest('hex');
}

/** Pins of every root CA in the current trust bundle (an agent accepts a broker chaining to any). */
export async function trustBundlePins(dir: string): Promise<string[]> {
  const pki = await loadPki(dir);
  return pki.trustedRoots.map((root) => caPinOf(root.certPem));
}

/** Pins for a new token: the root above the CA that signs brokers first, then the other trusted roots. */
function tokenPins(pki: LoadedPki): string[] {
  const serverRootId = pki.manifest.cas.find((ca) => ca.id === serverSigningCaIdOf(pki.manifest))?.parentId;
  const roots = [...pki.trustedRoots].sort(
    (a, b) => Number(b.record.id === serverRootId) - Number(a.record.id === serverRootId),
  );
  return roots.map((root) => caPinOf(root.certPem));
}

/**
 * Creates a single-use join token bound to `agentId`, valid for `ttlMs` (default 1 h). Only
 * the SHA-256 of its secret is stored.
 *
 * @throws PkiError on a bad agent id or ttl, an uninitialised directory, or a banned agent id.
 */
export async function createJoinToken(opts: {
  dir: string;
  agentId: string;
  ttlMs?: number;
  /** Broker agent listeners (HOST:PORT): given, the token is self-contained (v2). */
  brokers?: readonly string[];
  /** TLS name the agent expects in the broker certificate (v2 only). */
  serverName?: string;
}): Promise<JoinTokenInfo> {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  assertName(opts.agentId, 'agent-id');
  const where = encodeWhere(opts.brokers ?? [], opts.serverName);
  const ttlMs = opts.ttlMs ?? DEFAULT_JOIN_TOKEN_TTL_MS;
  assertPositiveMs(ttlMs, 'ttl');
  const pki = await loadPki(opts.dir);
  if ((await loadRevocations(pki.dir)).isAgentBanned(opts.agentId)) {
    throw new PkiError(`agent-id: agent "${opts.agentId}" is banned; no join token is created for it`);
  }
  const tokensDir = path.join(pki.dir, TOKENS_SUBDIR);
  await fs.mkdir(path.join(tokensDir, 'used'), { recursive: true, mode: 0o700 });
  const nowMs = Date.now();
  const tokenId = randomBytes(8).toString('hex');
  const secret = randomBytes(32).toString('base64url');
  const expiresAt = new Date(nowMs + ttlMs);
  const stored: StoredJoinToken = {
    tokenId,
    agentId: opts.agentId,
    secretSha256: sha256Hex(secret),
    createdAt: new Date(nowMs).toISOString(),
    expiresAt: expiresAt.toISOString(),
  };
  // noClobber: a (64-bit) id collision fails instead of replacing another token.
  await writeFileAtomic(path.join(tokensDir, `${tokenId}.json`), `${JSON.stringify(stored, null, 2)}\n`, {
    mode: 0o600,
    noClobber: true,
  });
  // Pruning reads every token file, so do it at most once an hour per process (and so once per CLI run).
  if (nowMs - (lastPruneMs.get(tokensDir) ?? -Infinity) >= 3_600_000) {
    lastPruneMs.set(tokensDir, nowMs);
    await pruneTokens(tokensDir, nowMs).catch(() => undefined);
  }
  const pins = tokenPins(pki).join('~');
  return {
    token:
      where === undefined
        ? `${TOKEN_PREFIX}.${tokenId}.${secret}.${pins}`
        : `${TOKEN_PREFIX_V2}.${tokenId}.${secret}.${pins}.${where}`,
    tokenId,
    agentId: opts.agentId,
    expiresAt,
  };
}

/** A broker address a token may carry: HOST:PORT, the host a name or an IP ([v6] in brackets). */
const BROKER_ADDRESS = /^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):\d{1,5}$/;
const SERVER_NAME = /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/;

/** The `where` part of a v2 token, or undefined for none (no brokers and no server name). */
function encodeWhere(brokers: readonly string[], serverName: string | undefined): string | undefined {
  for (const broker of brokers) {
    const port = Number(/:(\d+)$/.exec(broker)?.[1]);
    if (!BROKER_ADDRESS.test(broker) || !(port >= 1 && port <= 65535)) {
      throw new PkiError(`broker: "${broker}" is not HOST:PORT (e.g. broker.example.com:8443, [::1]:8443)`);
    }
  }
  if (serverName !== undefined && !SERVER_NAME.test(serverName)) {
    throw new PkiError(`server-name: "${serverName}" is not a DNS name`);
  }
  if (brokers.length === 0) {
    if (serverName !== undefined) throw new PkiError('server-name: needs --broker (the token names both or neither)');
    return undefined;
  }
  const where: { brokers: string[]; serverName?: string } = { brokers: [...brokers] };
  if (serverName !== undefined) where.serverName = serverName;
  return Buffer.from(JSON.stringify(where)).toString('base64url');
}

function decodeWhere(encoded: string): { brokers: string[]; serverName?: string } {
  let where: { brokers?: unknown; serverName?: unknown };
  try {
    where = JSON.parse(Buffer.from(encoded, 'base64url').toString('utf8'));
  } catch {
    throw new EnrollmentError('malformed', 'token: malformed join token: its broker part is not readable');
  }
  const brokers = Array.isArray(where?.brokers) ? where.brokers : [];
  if (
    brokers.length === 0 ||
    !brokers.every((b) => typeof b === 'string' && BROKER_ADDRESS.test(b)) ||
    (where.serverName !== undefined && (typeof where.serverName !== 'string' || !SERVER_NAME.test(where.serverName)))
  ) {
    throw new EnrollmentError('malformed', 'token: malformed join token: its broker part names no valid HOST:PORT');
  }
  return where.serverName === undefined ? { brokers } : { brokers, serverName: where.serverName as string };
}

/**
 * Splits a join token into its parts.
 *
 * @throws EnrollmentError (reason 'malformed', a PkiError) if it is not a Burrow join token; the message does not
 * repeat the token.
 */
export function parseJoinToken(token: string): ParsedJoinToken {
  const match = TOKEN_PATTERN.exec(typeof token === 'string' ? token.trim() : '');
  if (match === null) {
    const hint =
      typeof token === 'string' && !token.trim().startsWith(`${TOKEN_PREFIX}.`)
        ? ` (it must start with '${TOKEN_PREFIX_V2}.' or '${TOKEN_PREFIX}.')`
        : '';
    throw new EnrollmentError(
      'malformed',
      `token: malformed join token${hint}; expected ${TOKEN_PREFIX_V2}.<16 hex id>.<43-character secret>` +
        '.<64 hex CA pin>.<brokers>, as burrow-pki token create prints it',
    );
  }
  const [, version, tokenId, secret, pins, where] = match as unknown as [
    string,
    string,
    string,
    string,
    string,
    string | undefined,
  ];
  const caPinsSha256 = pins.split('~');
  const parsed: ParsedJoinToken = { tokenId, secret, caPinSha256: caPinsSha256[0]!, caPinsSha256, brokers: [] };
  if ((version === '1') !== (where === undefined)) {
    const parts = version === '1' ? 'four' : 'five';
    throw new EnrollmentError(
      'malformed',
      `token: malformed join token: a burrow-join-v${version} token has ${parts} parts`,
    );
  }
  return where === undefined ? parsed : { ...parsed, ...decodeWhere(where) };
}

/**
 * Consumes a join token atomically and resolves the agent id it is bound to. Of several
 * concurrent calls with one token (in any number of processes sharing `dir`), exactly one
 * consumes it; the others reject with reason 'used', except a call for the same `publicKeySha256`
 * within the token's lifetime: that one is a retry of the same enrollment and resolves again, with
 * the certificate {@link recordTokenCertificate} stored for it (if any yet) in `certificatePem`.
 *
 * @throws EnrollmentError with reason 'malformed', 'unknown' (no such id, or wrong secret),
 *   'expired', 'used' or 'banned'; messages name the token id and agent, never the secret.
 */
export async function consumeJoinToken(opts: {
  dir: string;
  token: string;
  nowMs?: number;
  /** SHA-256 (hex) of the DER SubjectPublicKeyInfo the certificate will be issued for. */
  publicKeySha256?: string;
}): Promise<{ agentId: string; certificatePem?: string }> {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  const parsed = parseJoinToken(opts.token);
  const nowMs = opts.nowMs ?? Date.now();
  const { tokenFile, usedFile, name } = tokenPaths(opts.dir, parsed.tokenId);
  const absDir = path.resolve(opts.dir);

  const stored = await readMatchingToken(tokenFile, usedFile, parsed.secret, name);
  if (stored.consumedAt !== undefined) return replay(absDir, stored, opts.publicKeySha256, name, nowMs);
  await assertConsumable(absDir, stored, name, nowMs);
  const winner = await recordConsumed(usedFile, stored, opts.publicKeySha256, name, nowMs);
  if (winner !== undefined) return replay(absDir, winner, opts.publicKeySha256, name, nowMs);
  await fs.unlink(tokenFile).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw err;
  });
  return { agentId: stored.agentId };
}

/**
 * Stores the certificate issued for a consumed token in its used record, so a retry with the same
 * key gets it back. Call after {@link consumeJoinToken} resolved without a certificate.
 */
export async function recordTokenCertificate(opts: {
  dir: string;
  token: string;
  certificatePem: string;
}): Promise<void> {
  const parsed = parseJoinToken(opts.token);
  const { usedFile, name } = tokenPaths(opts.dir, parsed.tokenId);
  const used = await readStored(usedFile);
  if (used === undefined || !secretMatches(used, parsed.secret)) throw new PkiError(`token: ${name} is not consumed`);
  const record: StoredJoinToken = { ...used, certificatePem: opts.certificatePem };
  await writeFileAtomic(usedFile, `${JSON.stringify(record, null, 2)}\n`, { mode: 0o600 });
}

function tokenPaths(dir: string, tokenId: string): { tokenFile: string; usedFile: string; name: string } {
  const tokensDir = path.join(path.resolve(dir), TOKENS_SUBDIR);
  return {
    tokenFile: path.join(tokensDir, `${tokenId}.json`),
    usedFile: path.join(tokensDir, 'used', `${tokenId}.json`),
    name: `join token ${tokenId}`,
  };
}

/**
 * A token presented again: the same enrollment retried (same key, token still valid) resolves, anything
 * else is 'used'.
 */
async function replay(
  absDir: string,
  used: StoredJoinToken,
  publicKeySha256: string | undefined,
  name: string,
  nowMs: number,
): Promise<{ agentId: string; certificatePem?: string }> {
  if (publicKeySha256 === undefined || used.publicKeySha256 !== publicKeySha256) throw usedError(name, used);
  // Still a live token for an allowed agent: a ban or the expiry ends the retry window too.
  await assertConsumable(absDir, used, name, nowMs);
  return used.certificatePem === undefined
    ? { agentId: used.agentId }
    : { agentId: used.agentId, certificatePem: used.certificatePem };
}

/**
 * The token record whose secret matches: the pending one, or else the used one (`consumedAt` set). A token
 * already consumed is reported as used only to a caller that proves it knows the secret; to anyone else it
 * is 'unknown'.
 */
async function readMatchingToken(
  tokenFile: string,
  usedFile: string,
  secret: string,
  name: string,
): Promise<StoredJoinToken> {
  const stored = await readStored(tokenFile);
  if (stored === undefined) {
    const used = await readStored(usedFile);
    if (used !== undefined && secretMatches(used, secret)) return used;
    throw new EnrollmentError(
      'unknown',
      `token: unknown ${name}: it was never created in this PKI directory, or was deleted`,
    );
  }
  if (!secretMatches(stored, secret)) {
    throw new EnrollmentError('unknown', `token: unknown ${name}: its secret does not match`);
  }
  return stored;
}

/** Refuses, without consuming it, a token whose agent id is malformed or banned, or that has expired. */
async function assertConsumable(absDir: string, stored: StoredJoinToken, name: string, nowMs: number): Promise<void> {
  // A token file edited (or written by an older release) with an id outside the grammar must not
  // be burnt for a certificate signCsr would refuse anyway: say so before consuming it.
  const idIssue = idProblem(stored.agentId);
  if (idIssue !== undefined) {
    const shown = String(stored.agentId).slice(0, 80);
    const grammar = idIssue.replace(/ \(got .*$/s, '');
    throw new EnrollmentError('malformed', `token: ${name} names agent id "${shown}", which ${grammar}`);
  }
  if ((await loadRevocations(absDir)).isAgentBanned(stored.agentId)) {
    throw new EnrollmentError('banned', `token: ${name} is for agent "${stored.agentId}", which is banned`);
  }
  const expiresAtMs = Date.parse(stored.expiresAt);
  if (!(nowMs < expiresAtMs)) {
    throw new EnrollmentError(
      'expired',
      `token: ${name} for agent "${stored.agentId}" expired at ${stored.expiresAt}; create a new one with ` +
        `'burrow-pki token create'`,
    );
  }
}

/**
 * Writes the consumed record to used/ without clobbering: the exclusive create is what lets
 * exactly one of several concurrent consumers win. Resolves undefined for the winner, and the
 * winner's record for the others (so the caller can tell a retry with the same key from reuse).
 */
async function recordConsumed(
  usedFile: string,
  stored: StoredJoinToken,
  publicKeySha256: string | undefined,
  name: string,
  nowMs: number,
): Promise<StoredJoinToken | undefined> {
  const consumed: StoredJoinToken = {
    ...stored,
    consumedAt: new Date(nowMs).toISOString(),
    ...(publicKeySha256 === undefined ? {} : { publicKeySha256 }),
  };
  try {
    await writeFileAtomic(usedFile, `${JSON.stringify(consumed, null, 2)}\n`, { mode: 0o600, noClobber: true });
    return undefined;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      const winner = await readStored(usedFile);
      if (winner === undefined) throw usedError(name, stored);
      return winner;
    }
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      // used/ missing: the directory was tampered with; recreate it and let the caller retry.
      await fs.mkdir(path.dirname(usedFile), { recursive: true, mode: 0o700 });
    }
    throw new PkiError(`token: cannot consume ${name} (${(err as Error).message})`, { cause: err });
  }
}

function usedError(name: string, record: StoredJoinToken): EnrollmentError {
  const when = record.consumedAt === undefined ? '' : ` at ${record.consumedAt}`;
  // A retry is recognised by its key: an agent that made a new key cannot reuse the token.
  const how = record.publicKeySha256 === undefined ? '' : ' with another key';
  return new EnrollmentError(
    'used',
    `token: ${name} for agent "${record.agentId}" was already ` +
      `used${how}${when}; join tokens are single use, create a new one`,
  );
}

async function readStored(file: string): Promise<StoredJoinToken | undefined> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new PkiError(`token: cannot read ${file} (${(err as Error).message})`, { cause: err });
  }
  try {
    const record = JSON.parse(text) as StoredJoinToken;
    if (
      typeof record.agentId === 'string' &&
      typeof record.secretSha256 === 'string' &&
      typeof record.expiresAt === 'string'
    )
      return record;
  } catch {
    // fall through
  }
  throw new PkiError(`token: ${file} is not a Burrow join token record`);
}

function secretMatches(record: StoredJoinToken, secret: string): boolean {
  const expected = Buffer.from(record.secretSha256, 'hex');
  const actual = createHash('sha256').update(secret).digest();
  return expected.length === actual.length && timingSafeEqual(expected, actual);
}

function sha256Hex(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

const lastPruneMs = new Map<string, number>();

/** Deletes unused tokens that expired more than a day ago, and used records past their retention. Best effort. */
async function pruneTokens(tokensDir: string, nowMs: number): Promise<void> {
  for (const [dir, keepMs] of [
    [tokensDir, 86_400_000],
    [path.join(tokensDir, 'used'), USED_RETENTION_MS],
  ] as const) {
    const names = await fs.readdir(dir).catch(() => [] as string[]);
    for (const name of names) {
      if (!/^[0-9a-f]{16}\.json$/.test(name)) continue;
      const record = await readStored(path.join(dir, name)).catch(() => undefined);
      if (record !== undefined && Date.parse(record.expiresAt) + keepMs < nowMs) {
        await fs.rm(path.join(dir, name), { force: true });
      }
    }
  }
}
