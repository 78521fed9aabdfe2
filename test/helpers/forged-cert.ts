// Certificates signed by a test PKI's issuing CA but made directly with @peculiar/x509, bypassing
// every check burrow-pki makes when it issues: a CN and EKUs of our choosing (as older releases
// issued them), names that break the id grammar. What a listener or client must refuse on its own.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { mkdirSync, writeFileSync } from 'node:fs';
import { randomBytes, webcrypto } from 'node:crypto';
import * as path from 'node:path';
import { loadPki } from '@burrow/pki';
import { signingAlgorithm } from '@burrow/pki/dist/key-algorithm';
import { signingMaterialOf } from '@burrow/pki/dist/pki-dir';
import type { CertFiles } from './pki-fixture';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

export interface ForgedLeaf {
  /** URI SANs (usually one SPIFFE id). */
  uris: string[];
  /** Subject CN; none when absent. */
  cn?: string;
  dns?: string[];
  ip?: string[];
  ekus: ('serverAuth' | 'clientAuth')[];
}

/** Signs `leaf` with the issuing CA of the PKI in `pkiDir` and writes tls.crt/tls.key/ca.crt to `outDir`. */
export async function forgeLeaf(pkiDir: string, outDir: string, leaf: ForgedLeaf): Promise<CertFiles> {
  const pki = await loadPki(pkiDir);
  const material = signingMaterialOf(pki);
  const algorithm = { name: 'ECDSA', namedCurve: 'P-256' };
  const keys = (await webcrypto.subtle.generateKey(algorithm, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const eku = { serverAuth: x509.ExtendedKeyUsage.serverAuth, clientAuth: x509.ExtendedKeyUsage.clientAuth };
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: `01${randomBytes(15).toString('hex')}`,
    subject: leaf.cn ? [{ CN: [leaf.cn] }] : [],
    issuer: new x509.Name(new Uint8Array(material.subjectDer).buffer),
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 3_600_000),
    publicKey: keys.publicKey,
    signingKey: material.privateKey,
    signingAlgorithm: signingAlgorithm(pki.signingCa.record.keyAlgorithm),
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension(
        leaf.ekus.map((u) => eku[u]),
        false,
      ),
      new x509.SubjectAlternativeNameExtension(
        [
          ...leaf.uris.map((value): x509.JsonGeneralName => ({ type: 'url', value })),
          ...(leaf.dns ?? []).map((value): x509.JsonGeneralName => ({ type: 'dns', value })),
          ...(leaf.ip ?? []).map((value): x509.JsonGeneralName => ({ type: 'ip', value })),
        ],
        !leaf.cn,
      ),
      new x509.AuthorityKeyIdentifierExtension(pki.signingCa.record.skiHex),
    ],
  });
  const pkcs8 = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey))
    .toString('base64')
    .match(/.{1,64}/g)!
    .join('\n');
  mkdirSync(outDir, { recursive: true, mode: 0o700 });
  const files = {
    cert: path.join(outDir, 'tls.crt'),
    key: path.join(outDir, 'tls.key'),
    ca: path.join(outDir, 'ca.crt'),
  };
  writeFileSync(files.cert, `${cert.toString('pem')}\n${pki.signingCa.certPem.trimEnd()}\n`);
  writeFileSync(files.key, `-----BEGIN PRIVATE KEY-----\n${pkcs8}\n-----END PRIVATE KEY-----\n`, { mode: 0o600 });
  writeFileSync(files.ca, pki.trustBundlePem);
  return files;
}
