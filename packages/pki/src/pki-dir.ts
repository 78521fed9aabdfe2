/**
 * On-disk layout of a Burrow PKI directory (`burrow-pki --dir D`), and loading it.
 *
 * ```text
 * D/                        mode 0700; holds CA private keys
 *   pki.json                manifest (below); written last by init, so its presence means "initialised"
 *   ca-bundle.crt           trust bundle: every trusted root CA certificate, PEM, concatenated
 *                           (a copy for outside tools; the manifest is authoritative, see trustBundle())
 *   ca/                     mode 0700; CA material under versioned names, one pair per CA
 *     root-<ski16>.crt      root CA certificate (self-signed)
 *     root-<ski16>.key      its PKCS#8 private key, mode 0600
 *     issuing-<ski16>.crt   issuing CA certificate, signed by a root
 *     issuing-<ski16>.key   its PKCS#8 private key, mode 0600
 *   .lock                   held (O_EXCL create) while `rotate` or `revoke` rewrites shared state
 *   tokens/                 mode 0700; created by the first `token create`
 *     <tokenId>.json        an unused join token: agent id, SHA-256 of the secret, expiry (never the secret)
 *     used/<tokenId>.json   written with link(2) (fails if it exists) when a token is consumed: single use
 *   issued/<caId>/<day>.jsonl  every leaf an issuing CA signed, one JSON line each (serial, role, name,
 *                           issuedAt, notBefore, notAfter), appended with O_APPEND; <day> is the UTC
 *                           issue date; files whose leaves have all expired are pruned by rotate/revoke
 *   agents/<agentId>.json   last state a broker recorded for an agent (recordAgentState)
 *   revocations.json        revoked serials and agent ids (with time and ban flag), versioned
 * ```
 * `<ski16>` is the first 16 hex digits of the CA's subject key identifier, so each new key
 * gets new file names and CA rotation only adds files and rewrites the manifest and bundle;
 * nothing that a running process may be reading is ever overwritten in place. Only init
 * creates `ca/`, `ca-bundle.crt` and `pki.json`; every other entry is created on first use.
 *
 * `pki.json` (see {@link PkiManifest}) lists every trusted CA (`cas`) with its files, parent and
 * validity, names the issuing CA that signs agent and service leaves (`signingCaId`) and the one
 * that signs broker leaves (`serverSigningCaId`, default the same), the trust bundle version
 * and, during a CA rotation, its phase. Every root in `cas` is in the trust bundle; CAs removed
 * by `rotate finish` or `rotate rollback` move to `retiredCas`. Readers ignore fields they do
 * not know, and fields added after format 1 are optional with defaults, so a manifest written
 * by init before rotation existed reads as phase standby, bundle version 1. An incompatible
 * change bumps `formatVersion`, and older code then refuses the directory instead of misreading it.
 *
 * Every file is written atomically (temporary file in the same directory, fsync, rename).
 */
import { X509Certificate, type webcrypto, type KeyObject } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { certificateSubjectDer } from './der';
import { assertKeyAlgorithm, importSigningKey, type KeyAlgorithm } from './key-algorithm';
import { PkiError } from './pki-error';
import { assertTrustDomain } from './validation';
import { x509 } from './x509-provider';

/** Manifest file name inside the PKI directory. */
export const MANIFEST_FILE = 'pki.json';
/** Default trust bundle file name inside the PKI directory. */
export const TRUST_BUNDLE_FILE = 'ca-bundle.crt';
/** Sub-directory holding CA certificates and keys. */
export const CA_SUBDIR = 'ca';
/** Current manifest format. */
export const PKI_FORMAT_VERSION = 1;

/** A root CA signs only issuing CAs; an issuing CA signs leaves. */
export type CaKind = 'root' | 'issuing';

/** One CA as recorded in the manifest. Paths are relative to the PKI directory. */
export interface CaRecord {
  /** Stable identifier, `<kind>-<first 16 hex digits of the SKI>`. */
  readonly id: string;
  readonly kind: CaKind;
  readonly keyAlgorithm: KeyAlgorithm;
  /** Certificate file, PEM, relative to the PKI directory. */
  readonly certFile: string;
  /** PKCS#8 private key file, PEM, mode 0600, relative to the PKI directory. */
  readonly keyFile: string;
  /** For an issuing CA: the id of the root that signed it. */
  readonly parentId?: string;
  /** Subject key identifier, lower-case hex. */
  readonly skiHex: string;
  /** ISO 8601. */
  readonly notBefore: string;
  /** ISO 8601. */
  readonly notAfter: string;
}

/** Contents of `pki.json`. */
export interface PkiManifest {
  readonly formatVersion: typeof PKI_FORMAT_VERSION;
  readonly trustDomain: string;
  /** Default key algorithm for leaves and for new CAs. */
  readonly keyAlgorithm: KeyAlgorithm;
  /** ISO 8601. */
  readonly createdAt: string;
  readonly cas: readonly CaRecord[];
  /** Id of the issuing CA in `cas` that signs new agent and service ("client") leaves. */
  readonly signingCaId: string;
  /** Id of the issuing CA in `cas` that signs broker ("server") leaves. Default: `signingCaId`. */
  readonly serverSigningCaId?: string;
  /** Trust bundle file (every trusted root), relative to the PKI directory. */
  readonly trustBundleFile: string;
  /** Trust bundle version: 1 after init, +1 on every rotation phase change. Default 1. */
  readonly bundleVersion?: number;
  /** Present while a CA rotation is in progress. */
  readonly rotation?: RotationRecord;
  /** CAs that left the trust bundle (rotation finished or rolled back), for history and logs. */
  readonly retiredCas?: readonly RetiredCaRecord[];
}

/** A rotation in progress, as recorded in the manifest. */
export interface RotationRecord {
  readonly phase: 'init' | 'update-clients' | 'update-servers';
  /** The issuing and root CA being replaced. */
  readonly oldIssuingCaId: string;
  readonly oldRootCaId: string;
  /** The issuing and root CA created by `rotate init`. */
  readonly newIssuingCaId: string;
  readonly newRootCaId: string;
  /** ISO 8601. */
  readonly startedAt: string;
  /** ISO 8601, time of the last phase change. */
  readonly phaseChangedAt: string;
}

/** A CA that is no longer trusted. */
export interface RetiredCaRecord extends CaRecord {
  /** ISO 8601. */
  readonly retiredAt: string;
  readonly retiredBy: 'finish' | 'rollback';
}

/** A CA certificate loaded from disk (public parts only). */
export interface LoadedCa {
  readonly record: CaRecord;
  readonly certPem: string;
  /** Parsed with node:crypto, for cheap checks (`verify`, `checkIssued`, `publicKey`). */
  readonly certificate: X509Certificate;
  readonly notBefore: Date;
  readonly notAfter: Date;
}

/**
 * A PKI directory loaded into memory, as returned by {@link loadPki}.
 * The signing CA's private key is held internally and never exposed on this object.
 */
export interface LoadedPki {
  /** Absolute path of the PKI directory. */
  readonly dir: string;
  readonly manifest: PkiManifest;
  readonly trustDomain: string;
  readonly keyAlgorithm: KeyAlgorithm;
  /** The trust bundle (root CA certificates, PEM) that peers should trust. */
  readonly trustBundlePem: string;
  /** Version of the trust bundle (manifest `bundleVersion`, default 1). */
  readonly bundleVersion: number;
  /** The roots in the trust bundle, in manifest order. */
  readonly trustedRoots: readonly LoadedCa[];
  /** The issuing CA that signs new agent and service leaves. */
  readonly signingCa: LoadedCa;
  /** The issuing CA that signs new broker leaves (the same object as signingCa outside a rotation). */
  readonly serverSigningCa: LoadedCa;
}

/** What issuance needs beyond {@link LoadedPki}; kept off the public object. */
export interface SigningMaterial {
  readonly privateKey: webcrypto.CryptoKey;
  /** The CA's subject exactly as encoded in its certificate, reused as the leaves' issuer. */
  readonly subjectName: x509.Name;
  /** The same key for node:crypto's sign (leaves, see leaf-der.ts). */
  readonly signingKey: KeyObject;
  /** The CA's subject, DER, exactly as encoded in its certificate. */
  readonly subjectDer: Buffer;
}

const signingMaterials = new WeakMap<LoadedCa, SigningMaterial>();

/** Returns the private signing material of a signing CA of a PKI loaded by {@link loadPki}. Internal. */
export function signingMaterialOf(pki: LoadedPki, ca: LoadedCa = pki.signingCa): SigningMaterial {
  const material = signingMaterials.get(ca);
  if (material === undefined) throw new PkiError('dir: CA object was not produced by loadPki');
  return material;
}

/** Which issuing CA signs leaves of `role` right now: brokers are servers, agents and services clients. */
export function signerFor(pki: LoadedPki, role: 'broker' | 'agent' | 'service'): LoadedCa {
  return role === 'broker' ? pki.serverSigningCa : pki.signingCa;
}

/** Manifest fields with their defaults applied. */
export function serverSigningCaIdOf(manifest: PkiManifest): string {
  return manifest.serverSigningCaId ?? manifest.signingCaId;
}

/** Manifest bundle version, default 1. */
export function bundleVersionOf(manifest: PkiManifest): number {
  return manifest.bundleVersion ?? 1;
}

interface CacheEntry {
  /** Absolute paths whose stat stamps make up `stamp`, manifest first. */
  readonly files: readonly string[];
  readonly stamp: string;
  readonly pki: Promise<LoadedPki>;
  /** A stat round in progress, which calls arriving meanwhile share. */
  checking?: Promise<string>;
}

// Loaded PKIs per absolute directory. Issuing is otherwise dominated by reading files and
// importing the CA key; re-validated on every call by stat'ing the files (cheap), so a
// rotation or re-init on disk is picked up without a restart.
const cache = new Map<string, CacheEntry>();
/** Loads in progress per absolute directory. */
const reloading = new Map<string, Promise<LoadedPki>>();

/** Forgets cached PKIs (all, or one directory). Only useful in tests and after manual edits. */
export function clearPkiCache(dir?: string): void {
  if (dir === undefined) cache.clear();
  else cache.delete(path.resolve(dir));
}

/**
 * Loads (or returns the cached copy of) the PKI in `dir`: manifest, trust bundle and the
 * signing CA with its key. The cache is keyed by directory and by the inode, size and
 * mtime of every file read, so it follows changes on disk.
 *
 * @throws PkiError if the directory is not initialised or its contents are inconsistent.
 */
export async function loadPki(dir: string): Promise<LoadedPki> {
  if (typeof dir !== 'string' || dir === '') throw new PkiError('dir: is required');
  const absDir = path.resolve(dir);
  const cached = cache.get(absDir);
  if (cached !== undefined) {
    // Concurrent issuances share one round of stat calls; a call after it ends starts another.
    cached.checking ??= stampOf(cached.files).finally(() => {
      cached.checking = undefined;
    });
    if ((await cached.checking) === cached.stamp) return cached.pki;
  }
  // Many issuances starting at once against a cold cache share one load instead of each
  // reading the files and importing the key.
  let pending = reloading.get(absDir);
  if (pending === undefined) {
    pending = reload(absDir).finally(() => reloading.delete(absDir));
    reloading.set(absDir, pending);
  }
  return pending;
}

async function reload(absDir: string): Promise<LoadedPki> {
  const manifestPath = path.join(absDir, MANIFEST_FILE);
  const manifest = await readManifest(absDir);
  const signerIds = [...new Set([manifest.signingCaId, serverSigningCaIdOf(manifest)])];
  const signers = signerIds.map((id) => manifest.cas.find((ca) => ca.id === id)!);
  const files = [
    manifestPath,
    ...signers.flatMap((ca) => [
      resolveInside(absDir, ca.certFile, 'certFile'),
      resolveInside(absDir, ca.keyFile, 'keyFile'),
    ]),
  ];
  // Stamp before reading: if a file changes while we read, the next call sees a new stamp and reloads.
  // CA files are never rewritten (new keys get new names), and every change of the set of CAs
  // or of their roles rewrites the manifest, so these files are all the stamp needs.
  const stamp = await stampOf(files);
  const pki = loadFiles(absDir, manifest, signers);
  cache.set(absDir, { files, stamp, pki });
  pki.catch(() => {
    if (cache.get(absDir)?.pki === pki) cache.delete(absDir);
  });
  return pki;
}

/** Reads and parses one CA certificate (public part). */
export async function loadCaCertificate(absDir: string, record: CaRecord): Promise<LoadedCa> {
  const certPem = await readText(resolveInside(absDir, record.certFile, 'certFile'), record.certFile);
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(certPem);
  } catch (err) {
    throw new PkiError(`${record.certFile}: not a readable certificate (${(err as Error).message})`, { cause: err });
  }
  if (!certificate.ca) throw new PkiError(`${record.certFile}: is not a CA certificate`);
  return {
    record,
    certPem,
    certificate,
    notBefore: new Date(certificate.validFrom),
    notAfter: new Date(certificate.validTo),
  };
}

/** Loads a CA's private key for signing (certificates or CRLs), checking it matches the certificate. */
export async function loadCaSigningMaterial(absDir: string, ca: LoadedCa): Promise<SigningMaterial> {
  const { record } = ca;
  const keyPem = await readText(resolveInside(absDir, record.keyFile, 'keyFile'), record.keyFile);
  const { privateKey, spkiDer, keyObject } = await importSigningKey(keyPem, record.keyAlgorithm, record.keyFile);
  // A key that does not match the certificate would produce leaves nobody can verify; catch it here once.
  const certSpki = ca.certificate.publicKey.export({ type: 'spki', format: 'der' });
  if (!certSpki.equals(spkiDer)) {
    throw new PkiError(`${record.keyFile}: private key does not match ${record.certFile}`);
  }
  let parsed: x509.X509Certificate;
  try {
    parsed = new x509.X509Certificate(ca.certPem);
  } catch (err) {
    throw new PkiError(`${record.certFile}: not a readable certificate (${(err as Error).message})`, { cause: err });
  }
  return {
    privateKey,
    subjectName: parsed.subjectName,
    signingKey: keyObject,
    subjectDer: certificateSubjectDer(ca.certificate.raw),
  };
}

async function loadFiles(absDir: string, manifest: PkiManifest, signers: readonly CaRecord[]): Promise<LoadedPki> {
  const roots = manifest.cas.filter((ca) => ca.kind === 'root');
  const [loadedSigners, loadedRoots] = await Promise.all([
    Promise.all(signers.map((record) => loadCaCertificate(absDir, record))),
    Promise.all(roots.map((record) => loadCaCertificate(absDir, record))),
  ]);
  const materials = await Promise.all(loadedSigners.map((ca) => loadCaSigningMaterial(absDir, ca)));
  loadedSigners.forEach((ca, i) => {
    signingMaterials.set(ca, materials[i]!);
  });
  const byId = (id: string): LoadedCa => loadedSigners.find((ca) => ca.record.id === id)!;
  return {
    dir: absDir,
    manifest,
    trustDomain: manifest.trustDomain,
    keyAlgorithm: manifest.keyAlgorithm,
    trustBundlePem: loadedRoots
      .map((root) => (root.certPem.endsWith('\n') ? root.certPem : `${root.certPem}\n`))
      .join(''),
    bundleVersion: bundleVersionOf(manifest),
    trustedRoots: loadedRoots,
    signingCa: byId(manifest.signingCaId),
    serverSigningCa: byId(serverSigningCaIdOf(manifest)),
  };
}

/** Reports whether `dir` holds an initialised PKI (its manifest exists). */
export async function isPkiInitialised(dir: string): Promise<boolean> {
  try {
    await fs.access(path.join(path.resolve(dir), MANIFEST_FILE));
    return true;
  } catch {
    return false;
  }
}

/**
 * Reads and validates `D/pki.json`.
 *
 * @throws PkiError if it is missing, unreadable, of another format version or inconsistent.
 */
export async function readManifest(dir: string): Promise<PkiManifest> {
  const manifestPath = path.join(dir, MANIFEST_FILE);
  let text: string;
  try {
    text = await fs.readFile(manifestPath, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new PkiError(
        `dir: ${dir} is not an initialised Burrow PKI (no ${MANIFEST_FILE}); run 'burrow-pki init' first`,
      );
    }
    throw new PkiError(`dir: cannot read ${manifestPath} (${(err as Error).message})`, { cause: err });
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new PkiError(`${MANIFEST_FILE}: not valid JSON (${(err as Error).message})`, { cause: err });
  }
  return validateManifest(raw);
}

function validateManifest(raw: unknown): PkiManifest {
  const bad = (what: string): never => {
    throw new PkiError(`${MANIFEST_FILE}: ${what}`);
  };
  if (typeof raw !== 'object' || raw === null) return bad('not a JSON object');
  const m = raw as Record<string, unknown>;
  if (m.formatVersion !== PKI_FORMAT_VERSION) {
    return bad(
      `unsupported formatVersion ${JSON.stringify(m.formatVersion)} (this version of burrow-pki ` +
        `reads ${PKI_FORMAT_VERSION})`,
    );
  }
  assertTrustDomain(m.trustDomain, `${MANIFEST_FILE}: trustDomain`);
  assertKeyAlgorithm(m.keyAlgorithm, `${MANIFEST_FILE}: keyAlgorithm`);
  if (typeof m.signingCaId !== 'string') bad('signingCaId must be a string');
  if (typeof m.trustBundleFile !== 'string') bad('trustBundleFile must be a string');
  if (!Array.isArray(m.cas) || m.cas.length === 0) bad('cas must be a non-empty array');
  for (const ca of m.cas as unknown[]) {
    const c = (typeof ca === 'object' && ca !== null ? ca : {}) as Record<string, unknown>;
    for (const key of ['id', 'certFile', 'keyFile', 'skiHex', 'notBefore', 'notAfter'] as const) {
      if (typeof c[key] !== 'string') bad(`cas entry ${JSON.stringify(c.id)} lacks ${key}`);
    }
    if (c.kind !== 'root' && c.kind !== 'issuing')
      bad(`cas entry ${JSON.stringify(c.id)} has kind ${JSON.stringify(c.kind)}`);
    assertKeyAlgorithm(c.keyAlgorithm, `${MANIFEST_FILE}: cas entry ${String(c.id)} keyAlgorithm`);
  }
  const cas = m.cas as CaRecord[];
  const isIssuing = (id: unknown): boolean => cas.some((ca) => ca.id === id && ca.kind === 'issuing');
  if (!isIssuing(m.signingCaId)) bad(`signingCaId '${String(m.signingCaId)}' is not an issuing CA in cas`);
  if (m.serverSigningCaId !== undefined && !isIssuing(m.serverSigningCaId)) {
    bad(`serverSigningCaId '${String(m.serverSigningCaId)}' is not an issuing CA in cas`);
  }
  if (!cas.some((ca) => ca.kind === 'root')) bad('cas has no root CA');
  if (m.bundleVersion !== undefined && (!Number.isSafeInteger(m.bundleVersion) || (m.bundleVersion as number) < 1)) {
    bad(`bundleVersion must be a positive integer (got ${JSON.stringify(m.bundleVersion)})`);
  }
  if (m.rotation !== undefined) {
    const r = (typeof m.rotation === 'object' && m.rotation !== null ? m.rotation : {}) as Record<string, unknown>;
    if (!['init', 'update-clients', 'update-servers'].includes(r.phase as string))
      bad(`rotation.phase ${JSON.stringify(r.phase)} is not a rotation phase`);
    for (const key of [
      'oldIssuingCaId',
      'oldRootCaId',
      'newIssuingCaId',
      'newRootCaId',
      'startedAt',
      'phaseChangedAt',
    ] as const) {
      if (typeof r[key] !== 'string') bad(`rotation lacks ${key}`);
    }
  }
  if (m.retiredCas !== undefined && !Array.isArray(m.retiredCas)) bad('retiredCas must be an array');
  return raw as PkiManifest;
}

/** Resolves a manifest-relative path, refusing anything that would leave the PKI directory. */
export function resolveInside(absDir: string, relative: string, field: string): string {
  if (path.isAbsolute(relative) || relative.split(/[\\/]/).includes('..')) {
    throw new PkiError(`${MANIFEST_FILE}: ${field} '${relative}' must be a path inside the PKI directory`);
  }
  return path.join(absDir, relative);
}

async function readText(absPath: string, shownAs: string): Promise<string> {
  try {
    return await fs.readFile(absPath, 'utf8');
  } catch (err) {
    throw new PkiError(`${shownAs}: cannot read ${absPath} (${(err as Error).message})`, { cause: err });
  }
}

/** inode, size and mtime of each file; a missing file stamps as 'missing' so the caller reloads and reports it. */
async function stampOf(files: readonly string[]): Promise<string> {
  const parts = await Promise.all(
    files.map((file) =>
      fs.stat(file).then(
        (s) => `${s.ino}:${s.size}:${s.mtimeMs}`,
        () => 'missing',
      ),
    ),
  );
  return parts.join('|');
}
