/**
 * Revocation: `D/revocations.json`, written under the PKI lock by `burrow-pki revoke`, polled by
 * brokers through {@link loadRevocations} (one stat(2) when unchanged), and exported as CRLs.
 *
 * Two kinds of entries:
 * - a serial: that certificate is revoked;
 * - an agent id with a time T: every certificate of that agent whose issuance time
 *   (notBefore + 60 s, the backdate) is at or before T is revoked; with `banned`, every
 *   certificate of that agent is, and enrollment of that id is refused. Certificates issued to the
 *   id after T are fine (issuance makes sure their notBefore + 60 s is after T, despite whole-second
 *   notBefore). The serials of that agent's still-valid leaves found in the issued-leaf log are
 *   also added as serial entries, so CRLs list them.
 *
 * Serial numbers: stored and printed as upper-case hex without separators (Node's
 * `X509Certificate.serialNumber` form); input and comparisons are case-insensitive and ignore ':'
 * separators and leading zeros (a serial is an integer).
 */
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { writeFileAtomic } from './atomic-write';
import { NOT_BEFORE_BACKDATE_MS } from './certificate-authority';
import { pruneIssuedLogs, readAllIssuedLeaves, type IssuedLeafRecord } from './issued-log';
import { signingAlgorithm } from './key-algorithm';
import { withPkiLock } from './lock';
import { loadCaCertificate, loadCaSigningMaterial, readManifest } from './pki-dir';
import { PkiError } from './pki-error';
import { assertName, type Role } from './validation';
import { x509 } from './x509-provider';

export const REVOCATIONS_FILE = 'revocations.json';

/** One revoked serial in revocations.json. */
export interface RevokedSerialRecord {
  /** Upper-case hex. */
  readonly serialHex: string;
  /** ISO 8601. */
  readonly revokedAt: string;
  /** From the issued-leaf log, when the serial was found there. */
  readonly issuerCaId?: string;
  readonly role?: Role;
  readonly name?: string;
  readonly notAfter?: string;
  /** How it got here: `revoke --serial`, or `revoke --agent-id`. */
  readonly via: 'serial' | 'agent';
}

/** One revoked agent id in revocations.json. */
export interface RevokedAgentRecord {
  readonly agentId: string;
  /** ISO 8601 with milliseconds: certificates issued at or before this are revoked. */
  readonly revokedAt: string;
  /** Also refuse enrollment (and every certificate) of this id. */
  readonly banned: boolean;
}

/** Contents of revocations.json. */
export interface RevocationsFile {
  /** +1 on every change; 0 means "no file". */
  readonly version: number;
  readonly updatedAt: string;
  readonly serials: readonly RevokedSerialRecord[];
  readonly agents: readonly RevokedAgentRecord[];
}

/** What brokers check on every new connection and renewal. Immutable snapshot. */
export interface RevocationList {
  /** revocations.json version (0 when nothing was ever revoked). Changes whenever the list does. */
  readonly version: number;
  /**
   * True if the certificate is revoked: by serial, or (role 'agent') because its agent id was
   * revoked at or after its issuance time (notBefore + 60 s), or the id is banned.
   */
  isCertificateRevoked(c: { role: string; name: string; serialHex: string; notBeforeMs: number }): boolean;
  /** True if the agent id is banned (enrollment refused). */
  isAgentBanned(agentId: string): boolean;
  /** The agent-id revocation, if any. */
  agentRevocation(agentId: string): { revokedAt: Date; banned: boolean } | undefined;
}

/** Canonical comparison form of a serial: upper-case hex, no separators, no leading zeros. */
export function serialKey(serialHex: string): string {
  return serialHex
    .replace(/[:\s]/g, '')
    .toUpperCase()
    .replace(/^0+(?=.)/, '');
}

/**
 * Validates and normalises a serial given by a user: hex digits, optionally ':'-separated,
 * any case, at most 20 bytes (RFC 5280). Returns upper-case hex without separators.
 */
export function normalizeSerialHex(value: unknown, field = 'serial'): string {
  const text = typeof value === 'string' ? value.trim().replace(/:/g, '') : '';
  if (!/^[0-9a-fA-F]{1,40}$/.test(text)) {
    throw new PkiError(
      `${field}: must be a certificate serial number in hex, e.g. 3F2A…, at most 40 digits (got '${String(value)}')`,
    );
  }
  return text.toUpperCase();
}

class Revocations implements RevocationList {
  private readonly serials: Set<string>;
  private readonly agents: Map<string, { revokedAtMs: number; banned: boolean }>;

  constructor(readonly file: RevocationsFile) {
    this.serials = new Set(file.serials.map((s) => serialKey(s.serialHex)));
    this.agents = new Map(
      file.agents.map((a) => [a.agentId, { revokedAtMs: Date.parse(a.revokedAt), banned: a.banned }]),
    );
  }

  get version(): number {
    return this.file.version;
  }

  isCertificateRevoked(c: { role: string; name: string; serialHex: string; notBeforeMs: number }): boolean {
    if (this.serials.has(serialKey(String(c.serialHex)))) return true;
    if (c.role !== 'agent') return false;
    const agent = this.agents.get(c.name);
    if (agent === undefined) return false;
    return agent.banned || c.notBeforeMs + NOT_BEFORE_BACKDATE_MS <= agent.revokedAtMs;
  }

  isAgentBanned(agentId: string): boolean {
    return this.agents.get(agentId)?.banned ?? false;
  }

  agentRevocation(agentId: string): { revokedAt: Date; banned: boolean } | undefined {
    const agent = this.agents.get(agentId);
    return agent === undefined ? undefined : { revokedAt: new Date(agent.revokedAtMs), banned: agent.banned };
  }
}

const EMPTY: RevocationsFile = { version: 0, updatedAt: new Date(0).toISOString(), serials: [], agents: [] };

const cache = new Map<string, { stamp: string; list: Revocations }>();

/**
 * The revocation list of `dir`. Cheap when unchanged: one stat(2) of revocations.json, and the
 * same object as last time is returned (compare `version`, or the object itself). An absent
 * file means nothing is revoked.
 *
 * @throws PkiError if the file exists but cannot be read or parsed (callers keep their last list).
 */
export async function loadRevocations(dir: string): Promise<RevocationList> {
  return loadRevocationsInternal(path.resolve(dir));
}

async function loadRevocationsInternal(absDir: string): Promise<Revocations> {
  const file = path.join(absDir, REVOCATIONS_FILE);
  const stamp = await fs.stat(file).then(
    (s) => `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`,
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return 'missing';
      throw new PkiError(`${REVOCATIONS_FILE}: cannot stat ${file} (${err.message})`, { cause: err });
    },
  );
  const cached = cache.get(absDir);
  if (cached !== undefined && cached.stamp === stamp) return cached.list;
  const list = new Revocations(stamp === 'missing' ? EMPTY : await readRevocationsFile(file));
  cache.set(absDir, { stamp, list });
  return list;
}

async function readRevocationsFile(file: string): Promise<RevocationsFile> {
  let raw: unknown;
  try {
    raw = JSON.parse(await fs.readFile(file, 'utf8'));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return EMPTY;
    throw new PkiError(`${REVOCATIONS_FILE}: cannot read ${file} (${(err as Error).message})`, { cause: err });
  }
  const r = (typeof raw === 'object' && raw !== null ? raw : {}) as Partial<RevocationsFile>;
  if (!Number.isSafeInteger(r.version) || !Array.isArray(r.serials) || !Array.isArray(r.agents)) {
    throw new PkiError(`${REVOCATIONS_FILE}: not a Burrow revocation list (${file})`);
  }
  return r as RevocationsFile;
}

/** Options for {@link revoke}. */
export interface RevokeOptions {
  dir: string;
  /** Revoke every certificate issued to this agent id up to now. */
  agentId?: string;
  /** Revoke one certificate (hex, any case, ':' separators allowed). */
  serialHex?: string;
  /** With agentId: also refuse enrollment of this id from now on. */
  ban?: boolean;
  /** Revocation time, ms since the epoch. Default now. */
  nowMs?: number;
}

/** What {@link revokeDetailed} did, for the CLI's summary. */
export interface RevokeResult {
  readonly version: number;
  /** Serials added to the list now (found in the issued-leaf log, or given). */
  readonly serials: readonly string[];
  /** For --serial: whether the issued-leaf log knew it (and so which CRL lists it). */
  readonly serialKnown?: boolean;
}

/**
 * Revokes a certificate by serial, or every certificate of an agent id issued up to now (and
 * with `ban`, all of them and future enrollment). Brokers polling the directory refuse those
 * certificates for renewal and new connections and close their tunnels.
 *
 * @throws PkiError on bad options or an uninitialised directory.
 */
export async function revoke(opts: RevokeOptions): Promise<void> {
  await revokeDetailed(opts);
}

/** {@link revoke}, returning what it added. */
export async function revokeDetailed(opts: RevokeOptions): Promise<RevokeResult> {
  const serial = checkRevokeOptions(opts);
  const nowMs = opts.nowMs ?? Date.now();
  const absDir = path.resolve(opts.dir);
  await readManifest(absDir); // a clear error for a directory that is not a PKI

  return withPkiLock(absDir, 'revoke', async () => {
    const current = await readRevocationsFile(path.join(absDir, REVOCATIONS_FILE));
    const draft: RevocationDraft = {
      now: new Date(nowMs).toISOString(),
      serials: [...current.serials],
      agents: [...current.agents],
      have: new Set(current.serials.map((s) => serialKey(s.serialHex))),
      added: [],
    };
    const leaves = await readAllIssuedLeaves(absDir);
    let serialKnown: boolean | undefined;
    if (serial !== undefined) serialKnown = addSerial(draft, serial, leaves);
    else addAgent(draft, opts.agentId!, Boolean(opts.ban), leaves, nowMs);

    const next: RevocationsFile = {
      version: current.version + 1,
      updatedAt: draft.now,
      // Entries of certificates that have expired no longer matter; keep the file small.
      serials: draft.serials.filter((s) => s.notAfter === undefined || Date.parse(s.notAfter) > nowMs),
      agents: draft.agents,
    };
    await writeFileAtomic(path.join(absDir, REVOCATIONS_FILE), `${JSON.stringify(next, null, 2)}\n`, { mode: 0o644 });
    await pruneIssuedLogs(absDir, nowMs).catch(() => undefined);
    return { version: next.version, serials: draft.added, ...(serialKnown === undefined ? {} : { serialKnown }) };
  });
}

/**
 * Rejects inconsistent {@link RevokeOptions} before anything is read or locked.
 * @returns the normalised serial for a revocation by serial, undefined for one by agent id.
 */
function checkRevokeOptions(opts: RevokeOptions): string | undefined {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  const hasAgent = opts.agentId !== undefined && opts.agentId !== '';
  const hasSerial = opts.serialHex !== undefined && opts.serialHex !== '';
  if (hasAgent === hasSerial)
    throw new PkiError('revoke: give exactly one of agent id (--agent-id) or serial (--serial)');
  if (opts.ban && !hasAgent) throw new PkiError('ban: only applies to an agent id (--agent-id)');
  if (hasAgent) assertName(opts.agentId, 'agent-id');
  return hasSerial ? normalizeSerialHex(opts.serialHex) : undefined;
}

/** The revocation list being changed under the PKI lock by {@link revokeDetailed}. */
interface RevocationDraft {
  /** Revocation time of new entries (ISO 8601). */
  readonly now: string;
  readonly serials: RevokedSerialRecord[];
  readonly agents: RevokedAgentRecord[];
  /** serialKey of every serial in `serials`, so none is listed twice. */
  readonly have: Set<string>;
  /** Serials added by this call, for the result. */
  readonly added: string[];
}

/**
 * Lists one serial, with its issuer and lifetime when the issued-leaf log knows it.
 * @returns whether the log knew it.
 */
function addSerial(draft: RevocationDraft, serial: string, leaves: readonly IssuedLeafRecord[]): boolean {
  const leaf = leaves.find((l) => serialKey(l.serialHex) === serialKey(serial));
  if (!draft.have.has(serialKey(serial))) {
    draft.serials.push({
      serialHex: leaf?.serialHex.toUpperCase() ?? serial,
      revokedAt: draft.now,
      ...(leaf === undefined
        ? {}
        : { issuerCaId: leaf.issuerCaId, role: leaf.role, name: leaf.name, notAfter: leaf.notAfter }),
      via: 'serial',
    });
    draft.added.push(serial);
  }
  return leaf !== undefined;
}

/**
 * Records the agent's revocation (never moving an earlier one back, never lifting a ban) and
 * lists the serials of its unexpired certificates issued up to then (all of them when banned).
 */
function addAgent(
  draft: RevocationDraft,
  agentId: string,
  ban: boolean,
  leaves: readonly IssuedLeafRecord[],
  nowMs: number,
): void {
  const index = draft.agents.findIndex((a) => a.agentId === agentId);
  const previous = index >= 0 ? draft.agents[index] : undefined;
  const revokedAtMs = Math.max(nowMs, previous === undefined ? -Infinity : Date.parse(previous.revokedAt));
  const record: RevokedAgentRecord = {
    agentId,
    revokedAt: new Date(revokedAtMs).toISOString(),
    banned: ban || (previous?.banned ?? false),
  };
  if (index >= 0) draft.agents[index] = record;
  else draft.agents.push(record);
  for (const leaf of leaves) {
    if (leaf.role !== 'agent' || leaf.name !== agentId) continue;
    if (Date.parse(leaf.notAfter) <= nowMs) continue; // expired: nothing to revoke
    if (!record.banned && Date.parse(leaf.issuedAt) > revokedAtMs) continue;
    if (draft.have.has(serialKey(leaf.serialHex))) continue;
    draft.have.add(serialKey(leaf.serialHex));
    draft.serials.push({
      serialHex: leaf.serialHex.toUpperCase(),
      revokedAt: draft.now,
      issuerCaId: leaf.issuerCaId,
      role: leaf.role,
      name: leaf.name,
      notAfter: leaf.notAfter,
      via: 'agent',
    });
    draft.added.push(leaf.serialHex.toUpperCase());
  }
}

/** Options for {@link writeCrl}. */
export interface WriteCrlOptions {
  dir: string;
  /** Also write the PEM here (atomically, mode 0644). */
  outFile?: string;
  /** thisUpdate, ms since the epoch. Default now. */
  nowMs?: number;
  /** nextUpdate = thisUpdate + this. Default 24 h. */
  nextUpdateMs?: number;
}

/**
 * Builds CRLs of the revoked serials, one per issuing CA currently in the trust bundle, each
 * signed by that CA and listing the serials it issued (per the issued-leaf log; a serial not
 * found there is listed in every CRL, since the issuer is unknown). Expired certificates are
 * left out. Returns the PEM blocks concatenated (issuing CA order of the manifest); with
 * `outFile`, also writes them there.
 *
 * Revocations by agent id cover certificates missing from the issued-leaf log only through the
 * broker's time rule, not through the CRL.
 */
export async function writeCrl(opts: WriteCrlOptions): Promise<string> {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  const absDir = path.resolve(opts.dir);
  const manifest = await readManifest(absDir);
  const nowMs = opts.nowMs ?? Date.now();
  const thisUpdate = new Date(Math.floor(nowMs / 1000) * 1000);
  const nextUpdate = new Date(thisUpdate.getTime() + (opts.nextUpdateMs ?? 86_400_000));
  const revocations = await loadRevocationsInternal(absDir);
  const live = revocations.file.serials.filter((s) => s.notAfter === undefined || Date.parse(s.notAfter) > nowMs);
  const pems: string[] = [];
  for (const record of manifest.cas.filter((ca) => ca.kind === 'issuing')) {
    const ca = await loadCaCertificate(absDir, record);
    const { privateKey, subjectName } = await loadCaSigningMaterial(absDir, ca);
    const entries = live
      .filter((s) => s.issuerCaId === undefined || s.issuerCaId === record.id)
      .map((s) => ({
        serialNumber: s.serialHex,
        revocationDate: new Date(Math.floor(Date.parse(s.revokedAt) / 1000) * 1000),
      }));
    const crl = await x509.X509CrlGenerator.create({
      issuer: subjectName,
      thisUpdate,
      nextUpdate,
      signingKey: privateKey,
      signingAlgorithm: signingAlgorithm(record.keyAlgorithm),
      entries,
      extensions: [
        new x509.AuthorityKeyIdentifierExtension(record.skiHex),
        // CRL number: must grow with every CRL an issuer publishes; thisUpdate in seconds does.
        new x509.Extension('2.5.29.20', false, derInteger(Math.floor(thisUpdate.getTime() / 1000))),
      ],
    });
    // OpenSSL and most tools expect the 'X509 CRL' PEM label (RFC 7468); @peculiar/x509 writes 'CRL'.
    pems.push(derToPem(crl.rawData, 'X509 CRL'));
  }
  const pem = pems.join('');
  if (opts.outFile !== undefined && opts.outFile !== '') {
    try {
      await writeFileAtomic(path.resolve(opts.outFile), pem, { mode: 0o644 });
    } catch (err) {
      throw new PkiError(`out: cannot write ${opts.outFile} (${(err as Error).message})`, { cause: err });
    }
  }
  return pem;
}

function derToPem(der: ArrayBuffer, label: string): string {
  const lines =
    Buffer.from(der)
      .toString('base64')
      .match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join('\n')}\n-----END ${label}-----\n`;
}

/** DER INTEGER of a non-negative safe integer. */
function derInteger(value: number): ArrayBuffer {
  const bytes: number[] = [];
  let v = value;
  do {
    bytes.unshift(v % 256);
    v = Math.floor(v / 256);
  } while (v > 0);
  if (bytes[0]! & 0x80) bytes.unshift(0);
  return new Uint8Array([0x02, bytes.length, ...bytes]).buffer;
}
