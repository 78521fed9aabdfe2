import { X509Certificate } from 'node:crypto';
import { ID_GRAMMAR, isValidId } from './ids';

/** The three kinds of certificate holder in Burrow. */
export type PeerRole = 'agent' | 'broker' | 'service';

/** Who is on the other end of a connection, from its verified certificate. */
export interface PeerIdentity {
  trustDomain: string;
  role: PeerRole;
  /** Agent id, service name or broker name (the broker's id): the last segment of the SPIFFE id. */
  name: string;
  spiffeId: string;
  /** Certificate expiry, ms since the epoch; the broker closes tunnels whose peer cert expired. */
  notAfterMs: number;
  /** Start of validity, ms since the epoch (revocation by agent id compares it). */
  notBeforeMs: number;
  serialHex: string;
}

// spiffe://<trust domain>/<role>/<name>; the name is checked against the id grammar (ids.ts).
const SPIFFE = /^spiffe:\/\/([a-z0-9.-]+)\/(agent|service|broker)\/([^/]*)$/;

/**
 * Parses one SPIFFE id of a Burrow role, `spiffe://<td>/{agent,service,broker}/<name>`; undefined
 * when it is not one, including when the name breaks the id grammar ({@link spiffeIdProblem} says
 * why). Brokers name themselves like the other roles: an id without a name (`.../broker`, which
 * every broker once shared) is refused, so a peer cannot pass for a broker by role alone.
 */
export function parseSpiffeId(uri: string): Omit<PeerIdentity, 'notAfterMs' | 'notBeforeMs' | 'serialHex'> | undefined {
  const m = SPIFFE.exec(uri);
  if (!m || !isValidId(m[3])) return undefined;
  return { trustDomain: m[1]!, role: m[2] as PeerRole, name: m[3]!, spiffeId: uri };
}

/** Why `uri` is not a Burrow SPIFFE id, or undefined when it is one. */
export function spiffeIdProblem(uri: string): string | undefined {
  if (parseSpiffeId(uri)) return undefined;
  const shown = uri.length > 120 ? `${uri.slice(0, 120)}… (${uri.length} characters)` : uri;
  const m = SPIFFE.exec(uri);
  if (m) return `${shown}: the name breaks the id grammar (${ID_GRAMMAR})`;
  return `${shown} is not spiffe://<trust-domain>/{agent,service,broker}/<name>`;
}

/** The URI SANs of a certificate, as Node prints them. */
export function uriSansOf(cert: X509Certificate): string[] {
  return (cert.subjectAltName ?? '')
    .split(', ')
    .filter((s) => s.startsWith('URI:'))
    .map((s) => s.slice(4));
}

/**
 * Why a certificate (DER) has no Burrow identity, for one-line refusals naming what the peer
 * presented; undefined when it has one.
 */
export function certificateIdentityProblem(der: Buffer): string | undefined {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(der);
  } catch {
    return 'the certificate cannot be parsed';
  }
  const uris = uriSansOf(cert);
  if (uris.length === 0) return 'the certificate has no URI SAN (a Burrow SPIFFE id)';
  if (uris.length > 1) {
    return `the certificate has ${uris.length} URI SANs (${uris.join(', ').slice(0, 300)}); Burrow needs exactly one`;
  }
  const problem = spiffeIdProblem(uris[0]!);
  return problem === undefined ? undefined : `its URI SAN ${problem}`;
}

/**
 * Reads the identity of a peer certificate (DER). The certificate must carry exactly one URI SAN,
 * a Burrow SPIFFE id: a certificate with none, several, or a foreign one has no identity here,
 * whatever else it says (the CN is never used). Chain and expiry were verified by TLS already.
 */
export function identityOfCertificate(der: Buffer): PeerIdentity | undefined {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(der);
  } catch {
    return undefined;
  }
  const uris = uriSansOf(cert);
  if (uris.length !== 1) return undefined;
  const id = parseSpiffeId(uris[0]!);
  if (!id) return undefined;
  return {
    ...id,
    notAfterMs: Date.parse(cert.validTo),
    notBeforeMs: Date.parse(cert.validFrom),
    serialHex: cert.serialNumber.toLowerCase(),
  };
}

// Parsing a certificate costs ~0.2 ms and happens on every call and tunnel stream; the result is
// cached by the certificate's SHA-256 fingerprint, which Node computes with the peer certificate.
const MAX_CACHED_IDENTITIES = 10_000;
const cache = new Map<string, PeerIdentity | null>();

/** The part of Node's `PeerCertificate` this needs (grpc-js's `getAuthContext().sslPeerCertificate`). */
export interface PeerCertificateLike {
  raw?: Buffer;
  fingerprint256?: string;
}

// The certificate objects of connections whose peer certificate is cached per connection
// (the broker's peerCertificateOf): one lookup per object instead of a string hash of the fingerprint.
const byObject = new WeakMap<object, PeerIdentity | null>();

/** {@link identityOfCertificate} of a TLS peer certificate, memoised on the object and its fingerprint. */
export function identityOfPeerCertificate(cert: PeerCertificateLike | undefined): PeerIdentity | undefined {
  if (!cert?.raw) return undefined;
  const known = byObject.get(cert);
  if (known !== undefined) return known ?? undefined;
  const id = identityOfFingerprintedCertificate(cert.raw, cert.fingerprint256);
  byObject.set(cert, id ?? null);
  return id;
}

function identityOfFingerprintedCertificate(raw: Buffer, key: string | undefined): PeerIdentity | undefined {
  if (!key) return identityOfCertificate(raw);
  let id = cache.get(key);
  if (id === undefined) {
    id = identityOfCertificate(raw) ?? null;
    if (cache.size >= MAX_CACHED_IDENTITIES) cache.delete(cache.keys().next().value as string);
    cache.set(key, id);
  }
  return id ?? undefined;
}

/** Splits a PEM bundle into its certificates. */
export function splitPemCertificates(pem: string): X509Certificate[] {
  return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []).map(
    (p) => new X509Certificate(p),
  );
}

/**
 * Checks a certificate chain (leaf first, then intermediates) presented outside a TLS handshake
 * (the session's Credentials frame): every link signed by the next, every certificate within its
 * validity at `nowMs`, the last one signed by a CA of `trustBundlePem`. Returns the leaf's
 * identity, or throws an Error saying what failed. TLS handshakes never use this: OpenSSL
 * validates those.
 */
export function verifyCertificateChain(chainPem: string, trustBundlePem: string, nowMs = Date.now()): PeerIdentity {
  const chain = splitPemCertificates(chainPem);
  const anchors = splitPemCertificates(trustBundlePem);
  if (chain.length === 0) throw new Error('no certificate in the chain');
  for (const c of chain) {
    if (Date.parse(c.validFrom) > nowMs || Date.parse(c.validTo) <= nowMs)
      throw new Error(`certificate ${c.subject.replace(/\n/g, ', ')} is not valid now`);
  }
  for (let i = 0; i + 1 < chain.length; i++) {
    if (!chain[i]!.checkIssued(chain[i + 1]!) || !chain[i]!.verify(chain[i + 1]!.publicKey))
      throw new Error(`certificate ${i} is not signed by certificate ${i + 1}`);
    if (!chain[i + 1]!.ca) throw new Error(`certificate ${i + 1} is not a CA`);
  }
  const last = chain[chain.length - 1]!;
  const anchored = anchors.some(
    (a) => a.ca && (a.fingerprint256 === last.fingerprint256 || (last.checkIssued(a) && last.verify(a.publicKey))),
  );
  if (!anchored) throw new Error('chain does not lead to a trusted CA');
  const id = identityOfCertificate(chain[0]!.raw);
  if (!id) throw new Error('certificate has no Burrow identity');
  return id;
}
