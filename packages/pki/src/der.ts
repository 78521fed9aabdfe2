/** The few DER primitives the PKI reads and writes by hand (CSRs, public keys, leaf certificates). */

/** Position of one TLV: its first byte, its content's first byte, and the byte after it. */
export interface Tlv {
  readonly start: number;
  readonly contentStart: number;
  readonly end: number;
}

/** Reads the TLV at `offset`, which must have tag `expectedTag`. Throws a plain Error when malformed. */
export function readTlv(der: Uint8Array, offset: number, expectedTag: number): Tlv {
  if (der[offset] !== expectedTag) throw new Error(`expected DER tag 0x${expectedTag.toString(16)} at byte ${offset}`);
  let length = der[offset + 1];
  let contentStart = offset + 2;
  if (length === undefined) throw new Error('truncated');
  if (length & 0x80) {
    const lengthBytes = length & 0x7f;
    if (lengthBytes === 0 || lengthBytes > 4) throw new Error(`unsupported DER length at byte ${offset}`);
    length = 0;
    for (let i = 0; i < lengthBytes; i++) length = length * 256 + (der[contentStart + i] ?? 0);
    contentStart += lengthBytes;
  }
  const end = contentStart + length;
  if (end > der.length) throw new Error('truncated');
  return { start: offset, contentStart, end };
}

/** One DER TLV with a definite length. */
export function tlv(tag: number, ...content: Uint8Array[]): Buffer {
  const length = content.reduce((n, c) => n + c.length, 0);
  let header: Buffer;
  if (length < 0x80) header = Buffer.of(tag, length);
  else if (length < 0x100) header = Buffer.of(tag, 0x81, length);
  else if (length < 0x10000) header = Buffer.of(tag, 0x82, length >> 8, length & 0xff);
  else header = Buffer.of(tag, 0x83, length >> 16, (length >> 8) & 0xff, length & 0xff);
  return Buffer.concat([header, ...content]);
}

/** The subject Name of a DER certificate, exactly as encoded there. */
export function certificateSubjectDer(certDer: Uint8Array): Buffer {
  // Certificate ::= SEQUENCE {
  //   tbsCertificate SEQUENCE { [0] version, serial, signature, issuer, validity, subject, ... }, ... }
  const cert = readTlv(certDer, 0, 0x30);
  const tbs = readTlv(certDer, cert.contentStart, 0x30);
  const version = readTlv(certDer, tbs.contentStart, 0xa0);
  const serial = readTlv(certDer, version.end, 0x02);
  const signature = readTlv(certDer, serial.end, 0x30);
  const issuer = readTlv(certDer, signature.end, 0x30);
  const validity = readTlv(certDer, issuer.end, 0x30);
  const subject = readTlv(certDer, validity.end, 0x30);
  return Buffer.from(certDer.subarray(subject.start, subject.end));
}
