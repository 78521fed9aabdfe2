import { createHash, createPrivateKey, createPublicKey, generateKeyPair, webcrypto, type KeyObject } from 'node:crypto';
import { readTlv, type Tlv } from './der';
import { PkiError } from './pki-error';

/** Key types Burrow can generate. ECDSA P-256 is the default, as in step-ca, SPIRE, Teleport and Linkerd. */
export type KeyAlgorithm = 'ecdsa-p256' | 'ed25519' | 'rsa-2048';

/** All supported key algorithms, default first. */
export const KEY_ALGORITHMS: readonly KeyAlgorithm[] = ['ecdsa-p256', 'ed25519', 'rsa-2048'];

/** The key algorithm used when none is given. */
export const DEFAULT_KEY_ALGORITHM: KeyAlgorithm = 'ecdsa-p256';

/** A freshly generated key pair in the forms the PKI needs. */
export interface GeneratedKey {
  readonly keyAlgorithm: KeyAlgorithm;
  /** DER SubjectPublicKeyInfo, placed into the certificate. */
  readonly spkiDer: Buffer;
  /** Private key as unencrypted PKCS#8 PEM. */
  readonly pkcs8Pem: string;
  /** Subject key identifier (RFC 5280 method 1: SHA-1 of the public key bits), lower-case hex. */
  readonly skiHex: string;
}

const KEY_ENCODING = {
  publicKeyEncoding: { type: 'spki', format: 'der' },
  privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
} as const;

type EncodedPairCallback = (err: Error | null, publicKey: Buffer, privateKey: string) => void;

/** Promise wrapper; util.promisify's overloads for generateKeyPair do not type-check with encodings. */
function generateEncoded(
  start: (done: EncodedPairCallback) => void,
): Promise<{ publicKey: Buffer; privateKey: string }> {
  return new Promise((resolve, reject) => {
    start((err, publicKey, privateKey) => (err ? reject(err) : resolve({ publicKey, privateKey })));
  });
}

/** Throws a PkiError unless `value` is one of {@link KEY_ALGORITHMS}. */
export function assertKeyAlgorithm(value: unknown, field = 'keyAlgorithm'): asserts value is KeyAlgorithm {
  if (!KEY_ALGORITHMS.includes(value as KeyAlgorithm)) {
    throw new PkiError(`${field}: must be one of ${KEY_ALGORITHMS.join(', ')} (got '${String(value)}')`);
  }
}

/**
 * Generates a key pair with node:crypto. node:crypto rather than WebCrypto because it is
 * several times faster for P-256, and because asking for encoded output makes libuv's thread
 * pool do the DER/PEM encoding too, off the event loop.
 */
export async function generateKey(keyAlgorithm: KeyAlgorithm): Promise<GeneratedKey> {
  let pair: { publicKey: Buffer; privateKey: string };
  switch (keyAlgorithm) {
    case 'ecdsa-p256':
      pair = await generateEncoded((done) => generateKeyPair('ec', { namedCurve: 'P-256', ...KEY_ENCODING }, done));
      break;
    case 'ed25519':
      pair = await generateEncoded((done) => generateKeyPair('ed25519', KEY_ENCODING, done));
      break;
    case 'rsa-2048':
      pair = await generateEncoded((done) =>
        generateKeyPair('rsa', { modulusLength: 2048, publicExponent: 0x10001, ...KEY_ENCODING }, done),
      );
      break;
    default:
      assertKeyAlgorithm(keyAlgorithm);
      throw new Error('unreachable');
  }
  return {
    keyAlgorithm,
    spkiDer: pair.publicKey,
    pkcs8Pem: pair.privateKey,
    skiHex: subjectKeyIdHex(pair.publicKey),
  };
}

type ImportParams = webcrypto.RsaHashedImportParams | webcrypto.EcKeyImportParams | webcrypto.Algorithm;
type SignParams = webcrypto.Algorithm | webcrypto.EcdsaParams;

// One row per algorithm so that the import and signature parameters of a key cannot drift apart.
interface WebCryptoParams {
  readonly importKey: ImportParams;
  readonly sign: SignParams;
}
const WEBCRYPTO_PARAMS: Readonly<Record<KeyAlgorithm, WebCryptoParams>> = {
  'ecdsa-p256': { importKey: { name: 'ECDSA', namedCurve: 'P-256' }, sign: { name: 'ECDSA', hash: 'SHA-256' } },
  ed25519: { importKey: { name: 'Ed25519' }, sign: { name: 'Ed25519' } },
  'rsa-2048': {
    importKey: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' },
    sign: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' },
  },
};

/** The WebCrypto import/sign parameters for a CA key of the given algorithm. */
export function webCryptoAlgorithm(keyAlgorithm: KeyAlgorithm): ImportParams {
  // A fresh object per call, as callers may hand it on to WebCrypto.
  return { ...WEBCRYPTO_PARAMS[keyAlgorithm].importKey };
}

/**
 * Signature parameters for certificates signed by a CA key of the given algorithm (always SHA-256 where a hash
 * applies).
 */
export function signingAlgorithm(keyAlgorithm: KeyAlgorithm): SignParams {
  return { ...WEBCRYPTO_PARAMS[keyAlgorithm].sign };
}

/**
 * Reports which of Burrow's key algorithms a key is, or undefined for anything else
 * (another curve, another RSA size). Used to check that files on disk match the manifest.
 */
export function keyAlgorithmOf(key: KeyObject): KeyAlgorithm | undefined {
  const details = key.asymmetricKeyDetails ?? {};
  switch (key.asymmetricKeyType) {
    case 'ec':
      return details.namedCurve === 'prime256v1' || details.namedCurve === 'P-256' ? 'ecdsa-p256' : undefined;
    case 'ed25519':
      return 'ed25519';
    case 'rsa':
      return details.modulusLength === 2048 ? 'rsa-2048' : undefined;
    default:
      return undefined;
  }
}

/**
 * Imports a PKCS#8 PEM private key as a non-extractable WebCrypto signing key, checking that
 * it is of the expected algorithm. Returns the key, its public half as DER SPKI, and the
 * node:crypto KeyObject (for node:crypto's sign, which the leaf hot path uses).
 */
export async function importSigningKey(
  pkcs8Pem: string,
  keyAlgorithm: KeyAlgorithm,
  field: string,
): Promise<{ privateKey: webcrypto.CryptoKey; spkiDer: Buffer; keyObject: KeyObject }> {
  let keyObject: KeyObject;
  try {
    keyObject = createPrivateKey(pkcs8Pem);
  } catch (err) {
    throw new PkiError(`${field}: not a readable private key (${(err as Error).message})`, { cause: err });
  }
  const actual = keyAlgorithmOf(keyObject);
  if (actual !== keyAlgorithm) {
    throw new PkiError(
      `${field}: key is ${actual ?? keyObject.asymmetricKeyType ?? 'unknown'}, manifest says ${keyAlgorithm}`,
    );
  }
  const pkcs8Der = keyObject.export({ type: 'pkcs8', format: 'der' });
  // Non-extractable: once loaded for signing, the key cannot be exported from this process's WebCrypto handle.
  const privateKey = await webcrypto.subtle.importKey('pkcs8', pkcs8Der, webCryptoAlgorithm(keyAlgorithm), false, [
    'sign',
  ]);
  const spkiDer = createPublicKey(keyObject).export({ type: 'spki', format: 'der' });
  return { privateKey, spkiDer, keyObject };
}

/**
 * RFC 5280 §4.2.1.2 method 1 key identifier: SHA-1 over the subjectPublicKey BIT STRING contents.
 * Computed here with a tiny DER walk because @peculiar/x509's helper re-parses the whole SPKI
 * through its ASN.1 schema, which cost ~0.5 ms per leaf.
 */
export function subjectKeyIdHex(spkiDer: Uint8Array): string {
  // SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
  let bits: Tlv;
  try {
    const outer = readTlv(spkiDer, 0, 0x30);
    const algorithm = readTlv(spkiDer, outer.contentStart, 0x30);
    bits = readTlv(spkiDer, algorithm.end, 0x03);
  } catch (err) {
    throw new PkiError('publicKey: malformed SubjectPublicKeyInfo', { cause: err });
  }
  // First content byte of a BIT STRING is the unused-bits count (0 for keys); skip it.
  return createHash('sha1')
    .update(spkiDer.subarray(bits.contentStart + 1, bits.end))
    .digest('hex');
}
