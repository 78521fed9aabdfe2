/**
 * On-disk layout of a Burrow PKI directory (`burrow-pki --dir D`), and loading it.
 *
 * ```text
 * D/                      mode 0700; holds CA private keys
 *   pki.json              manifest (below); written last by init, so its presence means "initialised"
 *   ca-bundle.crt         trust bundle: every trusted root CA certificate, PEM, concatenated
 *   ca/                   mode 0700; CA material under versioned names, one pair per CA
 *     root-<ski16>.crt    root CA certificate (self-signed)
 *     root-<ski16>.key    its PKCS#8 private key, mode 0600
 *     issuing-<ski16>.crt issuing CA certificate, signed by a root
 *     issuing-<ski16>.key its PKCS#8 private key, mode 0600
 *   tokens/, crl/         reserved for enrollment tokens and revocation lists (not created yet)
 * ```
 * `<ski16>` is the first 16 hex digits of the CA's subject key identifier, so each new key
 * gets new file names and CA rotation only adds files and rewrites the manifest and bundle;
 * nothing that a running process may be reading is ever overwritten in place.
 *
 * `pki.json` (see {@link PkiManifest}) lists every CA (`cas`) with its files, parent and
 * validity, names the issuing CA that signs new leaves (`signingCaId`) and the bundle file.
 * Readers ignore fields they do not know, so later features (rotation state per CA, token
 * and CRL bookkeeping) can add fields without a format change; an incompatible change bumps
 * `formatVersion`, and older code then refuses the directory instead of misreading it.
 *
 * Every file is written atomically (temporary file in the same directory, fsync, rename).
 */
import { X509Certificate, webcrypto } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
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
  /** Id of the issuing CA in `cas` that signs new leaf certificates. */
  readonly signingCaId: string;
  /** Trust bundle file (every trusted root), relative to the PKI directory. */
  readonly trustBundleFile: string;
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
  /** The issuing CA that signs new leaves. */
  readonly signingCa: LoadedCa;
}

/** What issuance needs beyond {@link LoadedPki}; kept off the public object. */
export interface SigningMaterial {
  readonly privateKey: webcrypto.CryptoKey;
  /** The CA's subject exactly as encoded in its certificate, reused as the leaves' issuer. */
  readonly subjectName: x509.Name;
}

const signingMaterials = new WeakMap<LoadedPki, SigningMaterial>();

/** Returns the private signing material for a PKI loaded by {@link loadPki}. Internal. */
export function signingMaterialOf(pki: LoadedPki): SigningMaterial {
  const material = signingMaterials.get(pki);
  if (material === undefined) throw new PkiError('dir: PKI object was not produced by loadPki');
  return material;
}

interface CacheEntry {
  /** Absolute paths whose stat stamps make up `stamp`, manifest first. */
  readonly files: readonly string[];
  readonly stamp: string;
  readonly pki: Promise<LoadedPki>;
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
    const stamp = await stampOf(cached.files);
    if (stamp === cached.stamp) return cached.pki;
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
  const signing = manifest.cas.find((ca) => ca.id === manifest.signingCaId);
  if (signing === undefined || signing.kind !== 'issuing') {
    throw new PkiError(`${MANIFEST_FILE}: signingCaId '${manifest.signingCaId}' is not an issuing CA in cas`);
  }
  const files = [
    manifestPath,
    resolveInside(absDir, signing.certFile, 'certFile'),
    resolveInside(absDir, signing.keyFile, 'keyFile'),
    resolveInside(absDir, manifest.trustBundleFile, 'trustBundleFile'),
  ];
  // Stamp before reading: if a file changes while we read, the next call sees a new stamp and reloads.
  const stamp = await stampOf(files);
  const pki = loadFiles(absDir, manifest, signing, files);
  cache.set(absDir, { files, stamp, pki });
  pki.catch(() => {
    if (cache.get(absDir)?.pki === pki) cache.delete(absDir);
  });
  return pki;
}

async function loadFiles(absDir: string, manifest: PkiManifest, signing: CaRecord, files: readonly string[]): Promise<LoadedPki> {
  const [, certPath, keyPath, bundlePath] = files as [string, string, string, string];
  const [certPem, keyPem, trustBundlePem] = await Promise.all([
    readText(certPath, signing.certFile),
    readText(keyPath, signing.keyFile),
    readText(bundlePath, manifest.trustBundleFile),
  ]);
  let certificate: X509Certificate;
  let parsed: x509.X509Certificate;
  try {
    certificate = new X509Certificate(certPem);
    parsed = new x509.X509Certificate(certPem);
  } catch (err) {
    throw new PkiError(`${signing.certFile}: not a readable certificate (${(err as Error).message})`, { cause: err });
  }
  if (!certificate.ca) throw new PkiError(`${signing.certFile}: is not a CA certificate`);
  const { privateKey, spkiDer } = await importSigningKey(keyPem, signing.keyAlgorithm, signing.keyFile);
  // A key that does not match the certificate would produce leaves nobody can verify; catch it here once.
  const certSpki = certificate.publicKey.export({ type: 'spki', format: 'der' });
  if (!certSpki.equals(spkiDer)) {
    throw new PkiError(`${signing.keyFile}: private key does not match ${signing.certFile}`);
  }
  const pki: LoadedPki = {
    dir: absDir,
    manifest,
    trustDomain: manifest.trustDomain,
    keyAlgorithm: manifest.keyAlgorithm,
    trustBundlePem,
    signingCa: {
      record: signing,
      certPem,
      certificate,
      notBefore: new Date(certificate.validFrom),
      notAfter: new Date(certificate.validTo),
    },
  };
  signingMaterials.set(pki, { privateKey, subjectName: parsed.subjectName });
  return pki;
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
      throw new PkiError(`dir: ${dir} is not an initialised Burrow PKI (no ${MANIFEST_FILE}); run 'burrow-pki init' first`);
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
    return bad(`unsupported formatVersion ${JSON.stringify(m.formatVersion)} (this version of burrow-pki reads ${PKI_FORMAT_VERSION})`);
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
    if (c.kind !== 'root' && c.kind !== 'issuing') bad(`cas entry ${JSON.stringify(c.id)} has kind ${JSON.stringify(c.kind)}`);
    assertKeyAlgorithm(c.keyAlgorithm, `${MANIFEST_FILE}: cas entry ${String(c.id)} keyAlgorithm`);
  }
  return raw as PkiManifest;
}

/** Resolves a manifest-relative path, refusing anything that would leave the PKI directory. */
function resolveInside(absDir: string, relative: string, field: string): string {
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
