import * as path from 'node:path';
import { writeFileAtomic } from './atomic-write';
import { NOT_BEFORE_BACKDATE_MS, pemWithNewline, validity } from './certificate-authority';
import { appendIssuedLeaf } from './issued-log';
import { assertKeyAlgorithm, generateKey, type KeyAlgorithm } from './key-algorithm';
import { certificatePem, signLeafDer, type ExtendedKeyUsage } from './leaf-der';
import { loadPki, signerFor, signingMaterialOf, type LoadedPki } from './pki-dir';
import { loadRevocations, type RevocationList } from './revocation';
import { isValidId } from '@burrow/tunnel/dist/ids';
import { PkiError } from './pki-error';
import { securePrivateDir, type PrivateDirOutcome } from './private-dir';
import { randomSerialHex } from './serial-number';
import { spiffeIdFor } from './spiffe-id';
import { assertIpAddress, assertName, assertPositiveMs, assertRole, normalizeDnsName, type Role } from './validation';

/** Leaf lifetime when none is given: 24 hours (step-ca's and Linkerd's default). */
export const DEFAULT_LEAF_TTL_MS = 24 * 3_600_000;

/** Options for {@link issueCertificate}. */
export interface IssueOptions {
  /** PKI directory created by initPki. */
  dir: string;
  role: Role;
  /**
   * Agent, service or broker name (see NAME_PATTERN), the last segment of its SPIFFE ID
   * (`spiffe://<td>/<role>/<name>`). For a broker it is its broker id; when empty it defaults to
   * the broker's first DNS name (else its first IP address) if that is a valid name.
   */
  name: string;
  /** DNS SANs. Brokers only; a broker needs at least one DNS name or IP address. */
  dns?: string[];
  /** IP address SANs. Brokers only. */
  ip?: string[];
  /** Lifetime. Default 24 h; clamped to the issuing CA's notAfter. */
  ttlMs?: number;
  /** Key algorithm of the new key. Default: the PKI's. */
  keyAlgorithm?: KeyAlgorithm;
}

/** A freshly issued leaf certificate and its key. */
export interface IssuedCertificate {
  /** Leaf certificate followed by the issuing CA certificate, PEM: pass as `cert` to node:tls. */
  certPem: string;
  /** The leaf's private key, PKCS#8 PEM: pass as `key` to node:tls. */
  keyPem: string;
  /** Trust bundle, the root CA certificate(s), PEM: pass as `ca` to node:tls. */
  caPem: string;
  /** The single URI SAN, e.g. `spiffe://burrow.local/agent/site-a`. */
  spiffeId: string;
  /** 32 upper-case hex digits, as Node's X509Certificate.serialNumber prints it. */
  serialHex: string;
  /** Expiry, as written into the certificate (whole seconds). */
  notAfter: Date;
  /** Id of the issuing CA that signed it (`issuing-<ski16>`, as in pki.json and `rotate status`). */
  issuerCaId: string;
  /** Version of the trust bundle in `caPem`. */
  bundleVersion: number;
}

/**
 * Extended key usages per role, only what each role does: agents and services (callers) only dial
 * out; brokers serve agents and callers and dial their peers. No Burrow listener serves with a
 * service certificate (platform upstreams are reached in plaintext from the broker), so a service
 * certificate cannot pass for a server at the TLS layer either.
 */
const EXTENDED_KEY_USAGES: Readonly<Record<Role, readonly ExtendedKeyUsage[]>> = {
  agent: ['clientAuth'],
  broker: ['serverAuth', 'clientAuth'],
  service: ['clientAuth'],
};

/**
 * Issues a leaf certificate in the SPIFFE X509-SVID profile from the PKI in `opts.dir`,
 * generating a new key pair: an empty subject (no CN a hostname check could fall back to) and a
 * critical subjectAltName with exactly one URI SAN (the SPIFFE ID) plus, for brokers, DNS/IP
 * SANs; CA=false; keyUsage digitalSignature (plus keyEncipherment for RSA); EKU by role;
 * 128-bit random serial; notBefore one minute in the past.
 *
 * The issuing CA is the one that currently signs the role (see the rotation phases: agents and
 * services are "clients", brokers "servers"). Every issued leaf is recorded in the issued-leaf
 * log (serial, role, name, issuing CA, validity) before it is returned.
 *
 * The loaded CA is cached per directory, so repeated calls cost about one key generation
 * and one signature.
 *
 * @throws PkiError on bad options, an uninitialised directory, an expired issuing CA or a banned agent.
 */
export async function issueCertificate(opts: IssueOptions): Promise<IssuedCertificate> {
  const request = validateLeafRequest(opts);
  const pki = await loadPki(opts.dir);
  const keyAlgorithm = opts.keyAlgorithm ?? pki.keyAlgorithm;
  assertKeyAlgorithm(keyAlgorithm);
  const revocations = await assertNotBanned(pki.dir, request);
  const key = await generateKey(keyAlgorithm);
  const issued = await signLeaf(pki, request, { spkiDer: key.spkiDer, skiHex: key.skiHex, keyAlgorithm }, revocations);
  return { ...issued, keyPem: key.pkcs8Pem };
}

/** A validated leaf request. */
export interface LeafRequest {
  readonly role: Role;
  /** The name in the SPIFFE ID (for brokers, the given one or the default). */
  readonly name: string;
  readonly dns: readonly string[];
  readonly ip: readonly string[];
  readonly ttlMs: number;
}

/** Checks and normalises the identity part of a leaf request (shared by issueCertificate and signCsr). */
export function validateLeafRequest(opts: Omit<IssueOptions, 'keyAlgorithm'>): LeafRequest {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  const { role } = opts;
  assertRole(role);
  const dns = unique((opts.dns ?? []).map((d) => normalizeDnsName(d)));
  const ip = unique(opts.ip ?? []);
  for (const a of ip) assertIpAddress(a);
  if (role === 'broker') {
    if (dns.length === 0 && ip.length === 0) {
      throw new PkiError('dns: a broker certificate needs at least one DNS name (--dns) or IP address (--ip)');
    }
    const name = opts.name === undefined || opts.name === '' ? defaultBrokerName(dns, ip) : opts.name;
    assertName(name);
    const ttlMs = opts.ttlMs ?? DEFAULT_LEAF_TTL_MS;
    assertPositiveMs(ttlMs, 'ttlMs');
    return { role, name, dns, ip, ttlMs };
  } else {
    if (opts.name === undefined || opts.name === '') throw new PkiError(`name: is required for role ${role}`);
    assertName(opts.name);
    // The identity of agents and services is their SPIFFE ID alone; hostnames would invite
    // hostname-based trust decisions that bypass it.
    if (dns.length > 0) throw new PkiError(`dns: only broker certificates carry DNS names (role is ${role})`);
    if (ip.length > 0) throw new PkiError(`ip: only broker certificates carry IP addresses (role is ${role})`);
  }
  const ttlMs = opts.ttlMs ?? DEFAULT_LEAF_TTL_MS;
  assertPositiveMs(ttlMs, 'ttlMs');
  return { role, name: opts.name ?? '', dns, ip, ttlMs };
}

/** Refuses a banned agent; returns the revocation list it read (agents only), for {@link signLeaf}. */
export async function assertNotBanned(absDir: string, request: LeafRequest): Promise<RevocationList | undefined> {
  if (request.role !== 'agent') return undefined;
  const revocations = await loadRevocations(absDir);
  if (revocations.isAgentBanned(request.name)) {
    throw new PkiError(
      `name: agent "${request.name}" is banned (burrow-pki revoke --ban); no certificate is issued to it`,
    );
  }
  return revocations;
}

/**
 * Signs a leaf for `request` with the given public key, using the CA that currently signs the
 * role, records it in the issued-leaf log and returns it (without a private key).
 * `revocations`: the list the caller just checked the request against (read here if not given).
 */
export async function signLeaf(
  pki: LoadedPki,
  request: LeafRequest,
  publicKey: { spkiDer: Uint8Array; skiHex: string; keyAlgorithm: KeyAlgorithm },
  revocations?: RevocationList,
): Promise<Omit<IssuedCertificate, 'keyPem'>> {
  const { role } = request;
  const spiffeId = spiffeIdFor(pki.trustDomain, role, request.name);
  const ca = signerFor(pki, role);
  const nowMs = Date.now();
  if (ca.notAfter.getTime() <= nowMs) {
    throw new PkiError(`dir: issuing CA ${ca.record.id} expired at ${ca.notAfter.toISOString()}; rotate the CA`);
  }
  const { signingKey: caKey, subjectDer: caSubjectDer } = signingMaterialOf(pki, ca);
  let { notBefore, notAfter } = validity(nowMs, request.ttlMs, ca.notAfter);
  if (role === 'agent')
    notBefore = afterAgentRevocation(revocations ?? (await loadRevocations(pki.dir)), request.name, notBefore, nowMs);
  const serialHex = randomSerialHex();

  const certDer = signLeafDer(
    {
      serialHex,
      issuerDer: caSubjectDer,
      notBefore,
      notAfter,
      spkiDer: publicKey.spkiDer,
      // TLS 1.2 RSA key exchange encrypts to the certificate key, which needs keyEncipherment.
      keyEncipherment: publicKey.keyAlgorithm === 'rsa-2048',
      extendedKeyUsages: EXTENDED_KEY_USAGES[role],
      uris: [spiffeId],
      dns: request.dns,
      ips: request.ip,
      subjectKeyIdHex: publicKey.skiHex,
      authorityKeyIdHex: ca.record.skiHex,
    },
    caKey,
    ca.record.keyAlgorithm,
  );

  // Recorded before the certificate leaves this function: rotation (finish) and revocation
  // rely on the log knowing every leaf a CA signed.
  await appendIssuedLeaf(pki.dir, {
    serialHex,
    role,
    name: request.name,
    issuerCaId: ca.record.id,
    issuedAt: new Date(nowMs).toISOString(),
    notBefore: notBefore.toISOString(),
    notAfter: notAfter.toISOString(),
  });
  return {
    certPem: pemWithNewline(certificatePem(certDer)) + pemWithNewline(ca.certPem),
    caPem: pki.trustBundlePem,
    spiffeId,
    serialHex,
    notAfter,
    issuerCaId: ca.record.id,
    bundleVersion: pki.bundleVersion,
  };
}

/**
 * A certificate counts as revoked by an agent-id revocation at T when notBefore + 60 s <= T.
 * notBefore has whole-second precision, so a certificate issued in the same second as (but
 * after) the revocation could look revoked; move its notBefore just past T - 60 s instead
 * (still at least 59 s in the past). A revocation dated in the future is left alone: it does
 * cover this certificate.
 */
function afterAgentRevocation(revocations: RevocationList, agentId: string, notBefore: Date, nowMs: number): Date {
  const revocation = revocations.agentRevocation(agentId);
  if (revocation === undefined) return notBefore;
  const revokedAtMs = revocation.revokedAt.getTime();
  if (revokedAtMs > nowMs || notBefore.getTime() + NOT_BEFORE_BACKDATE_MS > revokedAtMs) return notBefore;
  return new Date(Math.floor(revokedAtMs / 1000) * 1000 + 1000 - NOT_BEFORE_BACKDATE_MS);
}

/**
 * A broker's name when none is given: its first DNS name, else its first IP address, when that
 * is a valid name (a DNS name is, up to 64 characters; an IPv4 address is; an IPv6 one is not).
 * Two brokers whose certificates list the same first name share an id: give each its own --name.
 */
function defaultBrokerName(dns: readonly string[], ip: readonly string[]): string {
  const first = dns[0] ?? ip[0] ?? '';
  if (isValidId(first)) return first;
  throw new PkiError(
    `name: a broker needs a name (its broker id); its first DNS name or IP address '${first}' ` +
      'is not one: give --name',
  );
}

function unique<T>(items: readonly T[]): T[] {
  return [...new Set(items)];
}

/** File names {@link writeIssued} uses inside its output directory (the Kubernetes TLS secret convention). */
export const ISSUED_FILES = { cert: 'tls.crt', key: 'tls.key', ca: 'ca.crt' } as const;

/**
 * Writes an issued certificate to `outDir`: `tls.crt` (leaf + issuing CA), `tls.key` (0600)
 * and `ca.crt` (trust bundle). Creates `outDir` with mode 0700 if missing and tightens an
 * existing group/world accessible one to 0700 (see {@link securePrivateDir}; the outcome says
 * whether it did, for the caller to report). Each file is replaced atomically.
 *
 * Order matters for processes that reload on change: the bundle first (peers must trust a
 * new CA before anything presents a certificate from it), then the key, then the certificate
 * last, because watchers usually key on tls.crt.
 */
export async function writeIssued(
  outDir: string,
  issued: Pick<IssuedCertificate, 'certPem' | 'keyPem' | 'caPem'>,
): Promise<PrivateDirOutcome> {
  if (typeof outDir !== 'string' || outDir === '') throw new PkiError('out: is required');
  const outcome = await securePrivateDir(outDir, 'out');
  const absDir = outcome.dir;
  await writeFileAtomic(path.join(absDir, ISSUED_FILES.ca), issued.caPem, { mode: 0o644 });
  await writeFileAtomic(path.join(absDir, ISSUED_FILES.key), issued.keyPem, { mode: 0o600 });
  await writeFileAtomic(path.join(absDir, ISSUED_FILES.cert), issued.certPem, { mode: 0o644 });
  return outcome;
}
