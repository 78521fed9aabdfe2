/**
 * Leaf certificates encoded directly as DER and signed with node:crypto, for the issuing hot
 * path (signCsr, issueCertificate). Building the same certificate through @peculiar/x509 cost
 * about a third of an enrollment's CPU in its ASN.1 object model (parse every extension back,
 * serialise the tree, go through WebCrypto to sign); a leaf has one fixed profile, so it is
 * assembled here from a few byte strings. test/pki-leaf-der.test.ts checks that the
 * to-be-signed part is byte for byte what @peculiar/x509 produces for the same inputs.
 *
 * CA certificates and CRLs, made rarely, still go through @peculiar/x509.
 */
import { sign, type KeyObject } from 'node:crypto';
import { isIPv4 } from 'node:net';
import { tlv } from './der';
import type { KeyAlgorithm } from './key-algorithm';

/** Extended key usage OIDs. */
export type ExtendedKeyUsage = 'serverAuth' | 'clientAuth';

/** Everything a leaf says; the caller has validated and normalised it. */
export interface LeafTemplate {
  /** 32 hex digits, first byte 0x01-0x7f (randomSerialHex). */
  readonly serialHex: string;
  /** The issuing CA's subject, DER, exactly as in its certificate. */
  readonly issuerDer: Uint8Array;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** The subject's public key, DER SubjectPublicKeyInfo. */
  readonly spkiDer: Uint8Array;
  /** keyEncipherment as well as digitalSignature (RSA subject keys). */
  readonly keyEncipherment: boolean;
  readonly extendedKeyUsages: readonly ExtendedKeyUsage[];
  readonly uris: readonly string[];
  readonly dns: readonly string[];
  readonly ips: readonly string[];
  readonly subjectKeyIdHex: string;
  readonly authorityKeyIdHex: string;
}

const hex = (h: string): Buffer => Buffer.from(h, 'hex');

const OID = {
  basicConstraints: hex('551d13'),
  keyUsage: hex('551d0f'),
  extKeyUsage: hex('551d25'),
  subjectAltName: hex('551d11'),
  subjectKeyIdentifier: hex('551d0e'),
  authorityKeyIdentifier: hex('551d23'),
  serverAuth: hex('2b06010505070301'),
  clientAuth: hex('2b06010505070302'),
} as const;

/** AlgorithmIdentifier (DER) and node:crypto digest of the signature a CA key of each algorithm makes. */
const SIGNATURE: Readonly<Record<KeyAlgorithm, { algorithmDer: Buffer; digest: string | null }>> = {
  // ecdsa-with-SHA256 (no parameters)
  'ecdsa-p256': { algorithmDer: hex('300a06082a8648ce3d040302'), digest: 'sha256' },
  // id-Ed25519 (no parameters)
  ed25519: { algorithmDer: hex('300506032b6570'), digest: null },
  // sha256WithRSAEncryption, NULL parameters
  'rsa-2048': { algorithmDer: hex('300d06092a864886f70d01010b0500'), digest: 'sha256' },
};

/** The TBSCertificate of a leaf, DER. */
export function leafTbsDer(t: LeafTemplate, caKeyAlgorithm: KeyAlgorithm): Buffer {
  const sans = [
    ...t.uris.map((v) => tlv(0x86, Buffer.from(v, 'ascii'))),
    ...t.dns.map((v) => tlv(0x82, Buffer.from(v, 'ascii'))),
    ...t.ips.map((v) => tlv(0x87, ipBytes(v))),
  ];
  const extensions = [
    extension(OID.basicConstraints, true, hex('3000')),
    // BIT STRING: digitalSignature (bit 0), plus keyEncipherment (bit 2).
    extension(OID.keyUsage, true, t.keyEncipherment ? hex('030205a0') : hex('03020780')),
    extension(OID.extKeyUsage, false, tlv(0x30, ...t.extendedKeyUsages.map((u) => tlv(0x06, OID[u])))),
    // Critical: the subject is empty, and then RFC 5280 (4.1.2.6) wants the SANs marked so.
    extension(OID.subjectAltName, true, tlv(0x30, ...sans)),
    extension(OID.subjectKeyIdentifier, false, tlv(0x04, hex(t.subjectKeyIdHex))),
    extension(OID.authorityKeyIdentifier, false, tlv(0x30, tlv(0x80, hex(t.authorityKeyIdHex)))),
  ];
  return tlv(
    0x30,
    hex('a003020102'), // version [0] v3
    tlv(0x02, hex(t.serialHex)),
    SIGNATURE[caKeyAlgorithm].algorithmDer,
    t.issuerDer,
    tlv(0x30, time(t.notBefore), time(t.notAfter)),
    // An empty subject: names live in the SANs only, so no hostname check can fall back to a CN.
    hex('3000'),
    t.spkiDer,
    tlv(0xa3, tlv(0x30, ...extensions)),
  );
}

/** Builds and signs a leaf: the certificate, DER. */
export function signLeafDer(t: LeafTemplate, caKey: KeyObject, caKeyAlgorithm: KeyAlgorithm): Buffer {
  const tbs = leafTbsDer(t, caKeyAlgorithm);
  const { algorithmDer, digest } = SIGNATURE[caKeyAlgorithm];
  // ECDSA signatures come DER-encoded (node:crypto's default dsaEncoding), as X.509 wants them.
  const signature = sign(digest, tbs, caKey);
  return tlv(0x30, tbs, algorithmDer, tlv(0x03, Buffer.of(0), signature));
}

/** PEM of a DER certificate, 64 characters a line, no trailing newline (as @peculiar/x509 writes it). */
export function certificatePem(der: Uint8Array): string {
  const lines =
    Buffer.from(der)
      .toString('base64')
      .match(/.{1,64}/g) ?? [];
  return `-----BEGIN CERTIFICATE-----\n${lines.join('\n')}\n-----END CERTIFICATE-----`;
}

function extension(oid: Buffer, critical: boolean, value: Buffer): Buffer {
  return tlv(0x30, tlv(0x06, oid), ...(critical ? [hex('0101ff')] : []), tlv(0x04, value));
}

/** RFC 5280: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, Zulu. */
function time(date: Date): Buffer {
  const iso = date.toISOString(); // YYYY-MM-DDTHH:MM:SS.sssZ
  const digits = `${iso.slice(0, 19).replace(/[-T:]/g, '')}Z`;
  return date.getUTCFullYear() < 2050
    ? tlv(0x17, Buffer.from(digits.slice(2), 'ascii'))
    : tlv(0x18, Buffer.from(digits, 'ascii'));
}

/** The 4 or 16 bytes of a validated IPv4 or IPv6 address. */
function ipBytes(address: string): Buffer {
  if (isIPv4(address)) return Buffer.from(address.split('.').map(Number));
  // An IPv4 tail (::ffff:192.0.2.1) is the last two 16-bit groups.
  const v6 = address.replace(
    /(\d+)\.(\d+)\.(\d+)\.(\d+)$/,
    (_, a, b, c, d) => `${((Number(a) << 8) | Number(b)).toString(16)}:${((Number(c) << 8) | Number(d)).toString(16)}`,
  );
  const groups = (s: string): number[] => (s === '' ? [] : s.split(':').map((g) => parseInt(g, 16)));
  const [head = '', tail] = v6.split('::');
  const before = groups(head);
  const after = tail === undefined ? [] : groups(tail);
  const all = [...before, ...new Array<number>(8 - before.length - after.length).fill(0), ...after];
  const out = Buffer.alloc(16);
  all.forEach((g, i) => {
    out.writeUInt16BE(g, i * 2);
  });
  return out;
}
