import { randomBytes } from 'node:crypto';

/**
 * A fresh 128-bit random certificate serial number as 32 upper-case hex digits (the form
 * Node's `X509Certificate.serialNumber` and `getPeerCertificate().serialNumber` print).
 *
 * DER INTEGERs are signed and minimally encoded, so the first byte is forced into 0x01-0x7f:
 * top bit clear keeps the number positive without a 0x00 pad byte, and non-zero keeps the
 * encoding at exactly 16 bytes. That leaves ~127 bits of randomness, well above the 64 bits
 * the CA/Browser Forum requires to make serials unpredictable.
 */
export function randomSerialHex(): string {
  const bytes = randomBytes(16);
  bytes[0] = bytes[0]! & 0x7f || 0x01;
  return bytes.toString('hex').toUpperCase();
}
