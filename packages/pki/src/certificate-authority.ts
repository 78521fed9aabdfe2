import type { webcrypto } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { writeFileAtomic } from './atomic-write';
import {
  DEFAULT_KEY_ALGORITHM,
  assertKeyAlgorithm,
  generateKey,
  importSigningKey,
  signingAlgorithm,
  type GeneratedKey,
  type KeyAlgorithm,
} from './key-algorithm';
import {
  CA_SUBDIR,
  MANIFEST_FILE,
  PKI_FORMAT_VERSION,
  TRUST_BUNDLE_FILE,
  clearPkiCache,
  type CaKind,
  type CaRecord,
  type PkiManifest,
} from './pki-dir';
import { PkiError } from './pki-error';
import { randomSerialHex } from './serial-number';
import { assertPositiveMs, assertTrustDomain } from './validation';
import { x509 } from './x509-provider';

const DAY_MS = 86_400_000;

/** Trust domain used when none is given. */
export const DEFAULT_TRUST_DOMAIN = 'burrow.local';
/** Default root CA lifetime: 10 years (3650 days). */
export const DEFAULT_ROOT_TTL_MS = 3650 * DAY_MS;
/** Default issuing CA lifetime: 1 year (365 days). */
export const DEFAULT_ISSUING_TTL_MS = 365 * DAY_MS;
/**
 * Every certificate's notBefore is set this far in the past so that a peer whose clock runs
 * slightly behind the issuer's accepts a certificate the moment it is issued.
 */
export const NOT_BEFORE_BACKDATE_MS = 60_000;

/** Options for {@link initPki}. */
export interface InitOptions {
  /** PKI directory; created with mode 0700 if missing. Must be absent, empty, or not yet initialised. */
  dir: string;
  /** SPIFFE trust domain, a lower-case DNS-like name. Default 'burrow.local'. */
  trustDomain?: string;
  /** Key algorithm of the CAs and default for leaves. Default 'ecdsa-p256'. */
  keyAlgorithm?: KeyAlgorithm;
  /** Root CA lifetime. Default 10 years. */
  rootTtlMs?: number;
  /** Issuing CA lifetime. Default 1 year; never extends past the root's notAfter. */
  issuingTtlMs?: number;
}

/** A CA certificate and key in memory, before or after being written to disk. */
export interface CaMaterial {
  readonly id: string;
  readonly kind: CaKind;
  readonly keyAlgorithm: KeyAlgorithm;
  readonly certPem: string;
  readonly keyPem: string;
  readonly skiHex: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly parentId?: string;
}

/** Parameters shared by {@link createRootCa} and {@link createIssuingCa}. */
export interface CreateCaOptions {
  readonly trustDomain: string;
  readonly keyAlgorithm: KeyAlgorithm;
  readonly ttlMs: number;
  /** Issue time in ms since the epoch; default now. */
  readonly nowMs?: number;
}

/**
 * Creates a self-signed root CA: CA=true pathLen=1 (it signs issuing CAs only, which sign
 * leaves), keyCertSign+cRLSign, SKI. Used by {@link initPki}; exported for CA rotation.
 */
export async function createRootCa(opts: CreateCaOptions): Promise<CaMaterial> {
  const key = await generateKey(opts.keyAlgorithm);
  const { privateKey } = await importSigningKey(key.pkcs8Pem, opts.keyAlgorithm, 'root key');
  const { notBefore, notAfter } = validity(opts.nowMs ?? Date.now(), opts.ttlMs);
  const name = caName(opts.trustDomain, 'Root', key.skiHex);
  return signCaCertificate({
    kind: 'root',
    key,
    subject: name,
    issuer: name,
    validity: { notBefore, notAfter },
    signer: { privateKey, keyAlgorithm: opts.keyAlgorithm },
    extensions: caExtensions(1, key.skiHex),
  });
}

/**
 * Creates an issuing CA signed by `root`: CA=true pathLen=0, keyCertSign+cRLSign, SKI and
 * AKI. Its notAfter is clamped to the root's, since a chain is only valid while every
 * certificate in it is. Used by {@link initPki}; exported for CA rotation.
 */
export async function createIssuingCa(opts: CreateCaOptions & { readonly root: CaMaterial }): Promise<CaMaterial> {
  const { root } = opts;
  const key = await generateKey(opts.keyAlgorithm);
  const { privateKey: rootKey } = await importSigningKey(root.keyPem, root.keyAlgorithm, 'root key');
  const rootCert = new x509.X509Certificate(root.certPem);
  const nowMs = opts.nowMs ?? Date.now();
  if (root.notAfter.getTime() <= nowMs)
    throw new PkiError(`root: CA ${root.id} expired at ${root.notAfter.toISOString()}`);
  const { notBefore, notAfter } = validity(nowMs, opts.ttlMs, root.notAfter);
  return signCaCertificate({
    kind: 'issuing',
    key,
    subject: caName(opts.trustDomain, 'Issuing', key.skiHex),
    issuer: rootCert.subjectName,
    validity: { notBefore, notAfter },
    signer: { privateKey: rootKey, keyAlgorithm: root.keyAlgorithm },
    extensions: [...caExtensions(0, key.skiHex), new x509.AuthorityKeyIdentifierExtension(root.skiHex)],
    parentId: root.id,
  });
}

type CertificateName = x509.X509CertificateCreateWithKeyParams['issuer'];

/** What sets a root CA certificate apart from an issuing one; {@link signCaCertificate} does the rest. */
interface CaCertificateSpec {
  readonly kind: CaKind;
  /** The CA's own, freshly generated key. */
  readonly key: GeneratedKey;
  readonly subject: CertificateName;
  readonly issuer: CertificateName;
  readonly validity: { readonly notBefore: Date; readonly notAfter: Date };
  /** The key that signs the certificate: the CA's own for a root, the root's for an issuing CA. */
  readonly signer: { readonly privateKey: webcrypto.CryptoKey; readonly keyAlgorithm: KeyAlgorithm };
  readonly extensions: x509.Extension[];
  /** Id of the signing CA; absent for a self-signed root. */
  readonly parentId?: string;
}

/** Signs a CA certificate (random serial) and returns it with its key as {@link CaMaterial}. */
async function signCaCertificate(spec: CaCertificateSpec): Promise<CaMaterial> {
  const { key, validity } = spec;
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerialHex(),
    subject: spec.subject,
    issuer: spec.issuer,
    notBefore: validity.notBefore,
    notAfter: validity.notAfter,
    publicKey: key.spkiDer,
    signingKey: spec.signer.privateKey,
    signingAlgorithm: signingAlgorithm(spec.signer.keyAlgorithm),
    extensions: spec.extensions,
  });
  return {
    id: caId(spec.kind, key.skiHex),
    kind: spec.kind,
    keyAlgorithm: key.keyAlgorithm,
    certPem: pemWithNewline(cert.toString('pem')),
    keyPem: key.pkcs8Pem,
    skiHex: key.skiHex,
    notBefore: validity.notBefore,
    notAfter: validity.notAfter,
    // A root has no parent: leave the key out rather than set it to undefined.
    ...(spec.parentId === undefined ? {} : { parentId: spec.parentId }),
  };
}

/**
 * Creates a new PKI in `opts.dir`: a root CA, an issuing CA signed by it, the trust bundle
 * and the manifest (layout in pki-dir.ts). The directory is created (or tightened) to 0700
 * and private keys are written 0600.
 *
 * @throws PkiError if the directory is already initialised or not empty, or on bad options.
 */
export async function initPki(opts: InitOptions): Promise<void> {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  const trustDomain = opts.trustDomain ?? DEFAULT_TRUST_DOMAIN;
  assertTrustDomain(trustDomain);
  const keyAlgorithm = opts.keyAlgorithm ?? DEFAULT_KEY_ALGORITHM;
  assertKeyAlgorithm(keyAlgorithm);
  const rootTtlMs = opts.rootTtlMs ?? DEFAULT_ROOT_TTL_MS;
  assertPositiveMs(rootTtlMs, 'rootTtlMs');
  const issuingTtlMs = opts.issuingTtlMs ?? DEFAULT_ISSUING_TTL_MS;
  assertPositiveMs(issuingTtlMs, 'issuingTtlMs');

  const absDir = path.resolve(opts.dir);
  await prepareEmptyDir(absDir, opts.dir);

  const nowMs = Date.now();
  const root = await createRootCa({ trustDomain, keyAlgorithm, ttlMs: rootTtlMs, nowMs });
  const issuing = await createIssuingCa({ trustDomain, keyAlgorithm, ttlMs: issuingTtlMs, nowMs, root });

  // mkdir without `recursive` fails if ca/ exists, which makes it a lock: of two concurrent
  // inits of the same directory exactly one gets past this point.
  const caDir = path.join(absDir, CA_SUBDIR);
  try {
    await fs.mkdir(caDir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new PkiError(`dir: ${opts.dir} is already initialised or being initialised`, { cause: err });
    }
    throw err;
  }
  try {
    const cas: CaRecord[] = [];
    for (const ca of [root, issuing]) {
      const record = recordForCa(ca);
      await writeFileAtomic(path.join(absDir, record.keyFile), ca.keyPem, { mode: 0o600 });
      await writeFileAtomic(path.join(absDir, record.certFile), ca.certPem, { mode: 0o644 });
      cas.push(record);
    }
    await writeFileAtomic(path.join(absDir, TRUST_BUNDLE_FILE), root.certPem, { mode: 0o644 });
    const manifest: PkiManifest = {
      formatVersion: PKI_FORMAT_VERSION,
      trustDomain,
      keyAlgorithm,
      createdAt: new Date(nowMs).toISOString(),
      cas,
      signingCaId: issuing.id,
      trustBundleFile: TRUST_BUNDLE_FILE,
    };
    // Manifest last: its presence is what marks the directory as initialised.
    await writeFileAtomic(path.join(absDir, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`, {
      mode: 0o644,
      noClobber: true,
    });
  } catch (err) {
    // Leave the directory as we found it (empty) so the operator can simply retry.
    await fs.rm(caDir, { recursive: true, force: true }).catch(() => undefined);
    await fs.rm(path.join(absDir, TRUST_BUNDLE_FILE), { force: true }).catch(() => undefined);
    throw err;
  }
  clearPkiCache(absDir);
}

/** Ensures `absDir` exists, is empty and is mode 0700, creating it if needed. */
async function prepareEmptyDir(absDir: string, shownAs: string): Promise<void> {
  let entries: string[];
  try {
    entries = await fs.readdir(absDir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      await fs.mkdir(absDir, { recursive: true, mode: 0o700 });
      return;
    }
    if (code === 'ENOTDIR') throw new PkiError(`dir: ${shownAs} exists and is not a directory`);
    throw new PkiError(`dir: cannot read ${shownAs} (${(err as Error).message})`, { cause: err });
  }
  if (entries.includes(MANIFEST_FILE))
    throw new PkiError(`dir: ${shownAs} is already initialised (${MANIFEST_FILE} exists)`);
  // Refuse a non-empty directory: init tightens its mode and CA keys should not share a
  // directory with unrelated files (or with a half-finished earlier init).
  if (entries.length > 0) throw new PkiError(`dir: ${shownAs} is not empty; init needs a new or empty directory`);
  await fs.chmod(absDir, 0o700);
}

/** The manifest record of a CA written under `ca/` with its versioned names. */
export function recordForCa(ca: CaMaterial): CaRecord {
  return {
    id: ca.id,
    kind: ca.kind,
    keyAlgorithm: ca.keyAlgorithm,
    certFile: `${CA_SUBDIR}/${ca.id}.crt`,
    keyFile: `${CA_SUBDIR}/${ca.id}.key`,
    ...(ca.parentId === undefined ? {} : { parentId: ca.parentId }),
    skiHex: ca.skiHex,
    notBefore: ca.notBefore.toISOString(),
    notAfter: ca.notAfter.toISOString(),
  };
}

function caId(kind: CaKind, skiHex: string): string {
  return `${kind}-${skiHex.slice(0, 16)}`;
}

/**
 * CA subject: O=<trust domain>, CN=Burrow <Root|Issuing> CA <ski8>. The key-id suffix gives
 * each generation a distinct subject, so after a rotation old and new CAs are not confused by
 * tools that match issuers by name.
 */
function caName(trustDomain: string, label: 'Root' | 'Issuing', skiHex: string): x509.JsonName {
  return [{ O: [trustDomain] }, { CN: [`Burrow ${label} CA ${skiHex.slice(0, 8)}`] }];
}

function caExtensions(pathLength: number, skiHex: string): x509.Extension[] {
  return [
    new x509.BasicConstraintsExtension(true, pathLength, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
    new x509.SubjectKeyIdentifierExtension(skiHex),
  ];
}

/**
 * notBefore = now - {@link NOT_BEFORE_BACKDATE_MS}; notAfter = now + ttl, clamped to
 * `limit`. Both are truncated to whole seconds, the precision X.509 stores, so the Dates
 * returned equal what the certificate says.
 */
export function validity(nowMs: number, ttlMs: number, limit?: Date): { notBefore: Date; notAfter: Date } {
  const toSecond = (ms: number): Date => new Date(Math.floor(ms / 1000) * 1000);
  const notAfterMs = Math.min(nowMs + ttlMs, limit?.getTime() ?? Number.POSITIVE_INFINITY);
  return { notBefore: toSecond(nowMs - NOT_BEFORE_BACKDATE_MS), notAfter: toSecond(notAfterMs) };
}

/** @peculiar/x509 PEM has no trailing newline; concatenated bundles need one between certificates. */
export function pemWithNewline(pem: string): string {
  return pem.endsWith('\n') ? pem : `${pem}\n`;
}
