/**
 * CA rotation in Teleport's phases, on a PKI directory shared by `burrow-pki` and brokers.
 *
 * | phase          | trust bundle | signs agents/services | signs brokers |
 * | -------------- | ------------ | --------------------- | ------------- |
 * | standby        | old          | old                   | old           |
 * | init           | old + new    | old                   | old           |
 * | update-clients | old + new    | new                   | old           |
 * | update-servers | old + new    | new                   | new           |
 * | (finish)       | new          | new                   | new           |  → standby
 * | (rollback)     | old          | old                   | old           |  → standby
 *
 * "old" and "new" are each a root CA plus an issuing CA under it; `init` creates the new pair
 * with the lifetimes of the current one. Every phase change rewrites pki.json (under the PKI lock)
 * and bumps the bundle version; brokers polling the directory pick it up. `finish` waits until
 * the last leaf the old issuing CA signed (per the issued-leaf log) has expired, unless forced.
 * `rollback` works from any phase before finish; leaves the new CA signed stop being trusted.
 */
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { writeFileAtomic } from './atomic-write';
import { createIssuingCa, createRootCa, recordForCa, type CaMaterial } from './certificate-authority';
import { pruneIssuedLogs, validLeavesOf } from './issued-log';
import { withPkiLock } from './lock';
import {
  MANIFEST_FILE,
  bundleVersionOf,
  clearPkiCache,
  loadCaCertificate,
  loadPki,
  readManifest,
  serverSigningCaIdOf,
  type CaRecord,
  type PkiManifest,
  type RetiredCaRecord,
  type RotationRecord,
} from './pki-dir';
import { PkiError } from './pki-error';
import { assertName } from './validation';

/** Where a rotation stands. 'standby' means no rotation in progress. */
export type RotationPhase = 'standby' | 'init' | 'update-clients' | 'update-servers';
/** What `rotate` can do. */
export type RotateAction = 'init' | 'update-clients' | 'update-servers' | 'finish' | 'rollback';
export const ROTATE_ACTIONS: readonly RotateAction[] = [
  'init',
  'update-clients',
  'update-servers',
  'finish',
  'rollback',
];

/** One CA in {@link RotationState}. */
export interface RotationCaState {
  id: string;
  kind: 'root' | 'issuing';
  notAfter: Date;
  /** Its root is in the trust bundle (always true for CAs listed; retired CAs are not listed). */
  inBundle: boolean;
  /** Issuing CAs: signs agent and service certificates now. */
  signsClients: boolean;
  /** Issuing CAs: signs broker certificates now. */
  signsServers: boolean;
}

/** The rotation phase, the trusted CAs and the bundle version. */
export interface RotationState {
  phase: RotationPhase;
  bundleVersion: number;
  cas: RotationCaState[];
  /** Things the operator should know about the change just made (rollback only, so far). */
  warnings?: string[];
}

/** Options for {@link rotate}. */
export interface RotateOptions {
  dir: string;
  action: RotateAction;
  /** finish: remove the old CA even though leaves it signed are still valid. */
  force?: boolean;
  /** Time of the change (and for finish, the time against which old leaves must have expired). Default now. */
  nowMs?: number;
  /** init: lifetimes of the new root and issuing CA. Default: those of the current ones. */
  rootTtlMs?: number;
  issuingTtlMs?: number;
}

const NEXT: Readonly<Record<'update-clients' | 'update-servers' | 'finish', RotationPhase>> = {
  'update-clients': 'init',
  'update-servers': 'update-clients',
  finish: 'update-servers',
};

/**
 * Moves the CA rotation of `dir` one phase on (or back, with 'rollback'). Returns the new state.
 *
 * @throws PkiError for an illegal transition (naming the current phase and what to run instead),
 *   for 'finish' while leaves of the old CA are still valid (naming when the last expires) unless
 *   `force`, or for an uninitialised directory.
 */
export async function rotate(opts: RotateOptions): Promise<RotationState> {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  if (!ROTATE_ACTIONS.includes(opts.action)) {
    throw new PkiError(`action: must be one of ${ROTATE_ACTIONS.join(', ')}, or status (got '${String(opts.action)}')`);
  }
  const absDir = path.resolve(opts.dir);
  const nowMs = opts.nowMs ?? Date.now();
  await readManifest(absDir); // clear error for a directory that is not a PKI, before taking the lock
  return withPkiLock(absDir, `rotate ${opts.action}`, async () => {
    const manifest = await readManifest(absDir);
    const phase: RotationPhase = manifest.rotation?.phase ?? 'standby';
    const warnings: string[] = [];
    let next: PkiManifest;
    switch (opts.action) {
      case 'init':
        next = await initRotation(absDir, manifest, phase, nowMs, opts);
        break;
      case 'update-clients':
      case 'update-servers':
      case 'finish': {
        const rotation = manifest.rotation;
        if (rotation === undefined || phase !== NEXT[opts.action]) throw illegal(opts.action, phase);
        if (opts.action === 'update-clients')
          next = phaseChange(manifest, rotation, 'update-clients', nowMs, { signingCaId: rotation.newIssuingCaId });
        else if (opts.action === 'update-servers')
          next = phaseChange(manifest, rotation, 'update-servers', nowMs, {
            serverSigningCaId: rotation.newIssuingCaId,
          });
        else next = await finishRotation(absDir, manifest, rotation, nowMs, Boolean(opts.force));
        break;
      }
      case 'rollback': {
        const rotation = manifest.rotation;
        if (rotation === undefined)
          throw new PkiError(`rotate rollback: no rotation in progress (phase standby); nothing to roll back`);
        next = retire(manifest, [rotation.newRootCaId, rotation.newIssuingCaId], 'rollback', nowMs, {
          signingCaId: rotation.oldIssuingCaId,
          serverSigningCaId: rotation.oldIssuingCaId,
        });
        const leaves = await validLeavesOf(absDir, rotation.newIssuingCaId, nowMs);
        if (leaves.count > 0) {
          warnings.push(
            `${leaves.count} certificate(s) signed by the new CA ${rotation.newIssuingCaId} (valid ` +
              `until ${leaves.lastNotAfter!.toISOString()} at the latest) are no longer trusted; their holders ` +
              `must renew with a certificate from ${rotation.oldIssuingCaId}, or enroll again`,
          );
        }
        break;
      }
    }
    await commit(absDir, next);
    await pruneIssuedLogs(absDir, nowMs).catch(() => undefined);
    const state = await stateOf(absDir, next);
    return warnings.length > 0 ? { ...state, warnings } : state;
  });
}

function illegal(action: RotateAction, phase: RotationPhase): PkiError {
  const nextStep: Record<RotationPhase, string> = {
    standby: "no rotation is in progress; start one with 'rotate init'",
    init: "run 'rotate update-clients' next (or 'rotate rollback')",
    'update-clients': "run 'rotate update-servers' next (or 'rotate rollback')",
    'update-servers': "run 'rotate finish' next (or 'rotate rollback')",
  };
  return new PkiError(`rotate ${action}: not allowed in phase ${phase}; ${nextStep[phase]}`);
}

async function initRotation(
  absDir: string,
  manifest: PkiManifest,
  phase: RotationPhase,
  nowMs: number,
  opts: RotateOptions,
): Promise<PkiManifest> {
  if (phase !== 'standby') {
    throw new PkiError(
      `rotate init: a rotation is already in progress (phase ${phase}); finish it ('rotate finish') or roll it ` +
        `back ('rotate rollback') first`,
    );
  }
  const oldIssuing = manifest.cas.find((ca) => ca.id === manifest.signingCaId)!;
  const oldRoot = manifest.cas.find((ca) => ca.id === oldIssuing.parentId && ca.kind === 'root');
  if (oldRoot === undefined) throw new PkiError(`${MANIFEST_FILE}: issuing CA ${oldIssuing.id} has no root in cas`);
  // Same lifetimes as the CAs being replaced (notBefore is backdated by a minute), unless given.
  const lifetime = (ca: CaRecord): number => Date.parse(ca.notAfter) - Date.parse(ca.notBefore) - 60_000;
  const rootTtlMs = opts.rootTtlMs ?? lifetime(oldRoot);
  const issuingTtlMs = opts.issuingTtlMs ?? lifetime(oldIssuing);
  for (const [field, ms] of [
    ['rootTtlMs', rootTtlMs],
    ['issuingTtlMs', issuingTtlMs],
  ] as const) {
    if (!Number.isSafeInteger(ms) || ms <= 0)
      throw new PkiError(`${field}: must be a positive whole number of milliseconds (got ${ms})`);
  }
  const common = { trustDomain: manifest.trustDomain, keyAlgorithm: manifest.keyAlgorithm, nowMs };
  const root = await createRootCa({ ...common, ttlMs: rootTtlMs });
  const issuing = await createIssuingCa({ ...common, ttlMs: issuingTtlMs, root });
  const records: CaRecord[] = [];
  for (const ca of [root, issuing] as CaMaterial[]) {
    const record = recordForCa(ca);
    // noClobber: CA files are never replaced, whatever happens.
    await writeFileAtomic(path.join(absDir, record.keyFile), ca.keyPem, { mode: 0o600, noClobber: true });
    await writeFileAtomic(path.join(absDir, record.certFile), ca.certPem, { mode: 0o644, noClobber: true });
    records.push(record);
  }
  const at = new Date(nowMs).toISOString();
  const rotation: RotationRecord = {
    phase: 'init',
    oldIssuingCaId: oldIssuing.id,
    oldRootCaId: oldRoot.id,
    newIssuingCaId: issuing.id,
    newRootCaId: root.id,
    startedAt: at,
    phaseChangedAt: at,
  };
  return { ...manifest, cas: [...manifest.cas, ...records], bundleVersion: bundleVersionOf(manifest) + 1, rotation };
}

function phaseChange(
  manifest: PkiManifest,
  rotation: RotationRecord,
  phase: RotationRecord['phase'],
  nowMs: number,
  signers: { signingCaId?: string; serverSigningCaId?: string },
): PkiManifest {
  return {
    ...manifest,
    signingCaId: signers.signingCaId ?? manifest.signingCaId,
    serverSigningCaId: signers.serverSigningCaId ?? serverSigningCaIdOf(manifest),
    bundleVersion: bundleVersionOf(manifest) + 1,
    rotation: { ...rotation, phase, phaseChangedAt: new Date(nowMs).toISOString() },
  };
}

async function finishRotation(
  absDir: string,
  manifest: PkiManifest,
  rotation: RotationRecord,
  nowMs: number,
  force: boolean,
): Promise<PkiManifest> {
  const leaves = await validLeavesOf(absDir, rotation.oldIssuingCaId, nowMs);
  if (leaves.count > 0 && !force) {
    const last = leaves.lastNotAfter!;
    throw new PkiError(
      `rotate finish: ${leaves.count} certificate(s) signed by the old CA ${rotation.oldIssuingCaId} are still ` +
        `valid, the last until ${last.toISOString()} (in ${humanDuration(last.getTime() - nowMs)}); run finish ` +
        `after that, or with --force to drop the old CA now and break those certificates`,
    );
  }
  return retire(manifest, [rotation.oldRootCaId, rotation.oldIssuingCaId], 'finish', nowMs, {
    signingCaId: rotation.newIssuingCaId,
    serverSigningCaId: rotation.newIssuingCaId,
  });
}

/** Moves `ids` from cas to retiredCas, sets the signers, ends the rotation and bumps the version. */
function retire(
  manifest: PkiManifest,
  ids: readonly string[],
  by: RetiredCaRecord['retiredBy'],
  nowMs: number,
  signers: { signingCaId: string; serverSigningCaId: string },
): PkiManifest {
  const at = new Date(nowMs).toISOString();
  const retired = manifest.cas
    .filter((ca) => ids.includes(ca.id))
    .map((ca): RetiredCaRecord => ({ ...ca, retiredAt: at, retiredBy: by }));
  const rest: PkiManifest = { ...manifest };
  delete (rest as { rotation?: RotationRecord }).rotation;
  return {
    ...rest,
    cas: manifest.cas.filter((ca) => !ids.includes(ca.id)),
    signingCaId: signers.signingCaId,
    serverSigningCaId: signers.serverSigningCaId,
    bundleVersion: bundleVersionOf(manifest) + 1,
    retiredCas: [...(manifest.retiredCas ?? []), ...retired],
  };
}

/** Writes the manifest (the commit point), then the ca-bundle.crt copy for outside tools. */
async function commit(absDir: string, manifest: PkiManifest): Promise<void> {
  await writeFileAtomic(path.join(absDir, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`, { mode: 0o644 });
  clearPkiCache(absDir);
  const pki = await loadPki(absDir);
  await writeFileAtomic(path.join(absDir, manifest.trustBundleFile), pki.trustBundlePem, { mode: 0o644 });
}

async function stateOf(absDir: string, manifest: PkiManifest): Promise<RotationState> {
  const serverSigner = serverSigningCaIdOf(manifest);
  const cas = await Promise.all(
    manifest.cas.map(async (record): Promise<RotationCaState> => {
      // The certificate is authoritative for notAfter; the manifest copy is for humans.
      const ca = await loadCaCertificate(absDir, record);
      return {
        id: record.id,
        kind: record.kind,
        notAfter: ca.notAfter,
        inBundle: true,
        signsClients: record.id === manifest.signingCaId,
        signsServers: record.id === serverSigner,
      };
    }),
  );
  return { phase: manifest.rotation?.phase ?? 'standby', bundleVersion: bundleVersionOf(manifest), cas };
}

/** The rotation phase, trusted CAs (with notAfter, for expiry metrics) and bundle version of `dir`. */
export async function rotationState(dir: string): Promise<RotationState> {
  const pki = await loadPki(dir);
  return stateOf(pki.dir, pki.manifest);
}

/** The trust bundle PEM (every trusted root) and its version, consistent with each other. */
export async function trustBundle(dir: string): Promise<{ pem: string; version: number }> {
  const pki = await loadPki(dir);
  return { pem: pki.trustBundlePem, version: pki.bundleVersion };
}

export const AGENTS_SUBDIR = 'agents';

/** What a broker last saw of an agent. */
export interface AgentState {
  agentId: string;
  /** Trust bundle version the agent holds (as it reported, or as the broker sent it). */
  bundleVersion: number;
  /**
   * Issuing CA of its current certificate (CA id; a SHA-256 fingerprint given by the broker is translated when it
   * matches a known CA).
   */
  issuerCaId: string;
  serialHex: string;
  notAfter: Date;
  updatedAt: Date;
}

/**
 * Records what a broker just issued to (or learnt from) an agent, so `rotate status` can show
 * which agents have converged on the current bundle and issuer. One file per agent, replaced
 * atomically; the last writer wins.
 */
export async function recordAgentState(opts: {
  dir: string;
  agentId: string;
  bundleVersion: number;
  issuerCaId: string;
  serialHex: string;
  notAfter: Date;
}): Promise<void> {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  assertName(opts.agentId, 'agentId');
  if (!Number.isSafeInteger(opts.bundleVersion) || opts.bundleVersion < 0) {
    throw new PkiError(`bundleVersion: must be a whole number >= 0 (got ${String(opts.bundleVersion)})`);
  }
  if (!(opts.notAfter instanceof Date) || Number.isNaN(opts.notAfter.getTime()))
    throw new PkiError('notAfter: must be a valid Date');
  const pki = await loadPki(opts.dir);
  const issuerCaId = await canonicalCaId(pki.dir, pki.manifest, String(opts.issuerCaId ?? ''));
  const record = {
    agentId: opts.agentId,
    bundleVersion: opts.bundleVersion,
    issuerCaId,
    serialHex: String(opts.serialHex).toUpperCase(),
    notAfter: opts.notAfter.toISOString(),
    updatedAt: new Date().toISOString(),
  };
  const agentsDir = path.join(pki.dir, AGENTS_SUBDIR);
  if (!knownAgentsDirs.has(agentsDir)) {
    await fs.mkdir(agentsDir, { recursive: true, mode: 0o700 });
    knownAgentsDirs.add(agentsDir);
  }
  // Not fsync'd: a broker records this on every enrollment and renewal, agentStates skips a file
  // a crash left unreadable, and the next renewal writes it again.
  const file = path.join(agentsDir, `${opts.agentId}.json`);
  await writeFileAtomic(file, `${JSON.stringify(record)}\n`, { mode: 0o644, sync: false }).catch(
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') knownAgentsDirs.delete(agentsDir);
      throw err;
    },
  );
}

/** agents/ directories this process created or found, so recording a state does not mkdir each time. */
const knownAgentsDirs = new Set<string>();

/** Every recorded agent state, sorted by agent id. */
export async function agentStates(dir: string): Promise<AgentState[]> {
  const agentsDir = path.join(path.resolve(dir), AGENTS_SUBDIR);
  const names = await fs.readdir(agentsDir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [] as string[];
    throw new PkiError(`dir: cannot read ${agentsDir} (${err.message})`, { cause: err });
  });
  const states: AgentState[] = [];
  for (const name of names.filter((n) => n.endsWith('.json') && !n.startsWith('.')).sort()) {
    try {
      const r = JSON.parse(await fs.readFile(path.join(agentsDir, name), 'utf8')) as Record<string, unknown>;
      states.push({
        agentId: String(r.agentId),
        bundleVersion: Number(r.bundleVersion),
        issuerCaId: String(r.issuerCaId),
        serialHex: String(r.serialHex),
        notAfter: new Date(String(r.notAfter)),
        updatedAt: new Date(String(r.updatedAt)),
      });
    } catch {
      // Deleted or replaced while listing: skip.
    }
  }
  return states.sort((a, b) => (a.agentId < b.agentId ? -1 : a.agentId > b.agentId ? 1 : 0));
}

const fingerprintCache = new Map<string, string>();

/**
 * Accepts a CA id or the SHA-256 fingerprint of a CA certificate (any case, ':' optional) and returns the CA id when
 * known.
 */
async function canonicalCaId(absDir: string, manifest: PkiManifest, value: string): Promise<string> {
  const all = [...manifest.cas, ...(manifest.retiredCas ?? [])];
  if (all.some((ca) => ca.id === value)) return value;
  const hex = value.replace(/:/g, '').toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) return value;
  for (const record of all) {
    const key = `${absDir}/${record.certFile}`;
    let fingerprint = fingerprintCache.get(key);
    if (fingerprint === undefined) {
      const ca = await loadCaCertificate(absDir, record).catch(() => undefined);
      if (ca === undefined) continue;
      fingerprint = ca.certificate.fingerprint256.replace(/:/g, '').toLowerCase();
      fingerprintCache.set(key, fingerprint);
    }
    if (fingerprint === hex) return record.id;
  }
  return value;
}

/** "3 d 4 h", "5 h 2 min", "42 s". */
export function humanDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  const d = Math.floor(s / 86_400);
  const h = Math.floor((s % 86_400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d} d ${h} h`;
  if (h > 0) return `${h} h ${m} min`;
  if (m > 0) return `${m} min ${s % 60} s`;
  return `${s} s`;
}
