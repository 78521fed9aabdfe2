// Leaves built by hand (packages/pki/src/leaf-der.ts) against @peculiar/x509, and the cached CA
// signing material across a CA rotation.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { X509Certificate, webcrypto } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  KEY_ALGORITHMS,
  createCsr,
  issueCertificate,
  loadPki,
  rotate,
  signCsr,
  type KeyAlgorithm,
  type Role,
} from '@burrow/pki';
import { readTlv } from '@burrow/pki/dist/der';
import {
  certificatePem,
  leafTbsDer,
  signLeafDer,
  type ExtendedKeyUsage,
  type LeafTemplate,
} from '@burrow/pki/dist/leaf-der';
import { generateKey, signingAlgorithm } from '@burrow/pki/dist/key-algorithm';
import { signingMaterialOf } from '@burrow/pki/dist/pki-dir';
import { PkiFixture, splitPem } from './helpers/pki-fixture';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
const PKI_CLI = path.join(path.dirname(require.resolve('@burrow/pki/package.json')), 'dist', 'cli.js');

/** The tbsCertificate bytes of a DER certificate. */
function tbsOf(der: Uint8Array): Buffer {
  const outer = readTlv(der, 0, 0x30);
  const tbs = readTlv(der, outer.contentStart, 0x30);
  return Buffer.from(der.subarray(tbs.start, tbs.end));
}

const EKU_OIDS: Record<ExtendedKeyUsage, string> = {
  serverAuth: x509.ExtendedKeyUsage.serverAuth,
  clientAuth: x509.ExtendedKeyUsage.clientAuth,
};

/** The same leaf through @peculiar/x509 (empty subject, critical SAN), as issue.ts built it before leaf-der.ts. */
async function peculiarLeaf(
  t: LeafTemplate,
  caKey: webcrypto.CryptoKey,
  caKeyAlgorithm: KeyAlgorithm,
): Promise<x509.X509Certificate> {
  return x509.X509CertificateGenerator.create({
    serialNumber: t.serialHex,
    subject: [],
    issuer: new x509.Name(new Uint8Array(t.issuerDer).buffer),
    notBefore: t.notBefore,
    notAfter: t.notAfter,
    publicKey: t.spkiDer,
    signingKey: caKey,
    signingAlgorithm: signingAlgorithm(caKeyAlgorithm),
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(
        x509.KeyUsageFlags.digitalSignature | (t.keyEncipherment ? x509.KeyUsageFlags.keyEncipherment : 0),
        true,
      ),
      new x509.ExtendedKeyUsageExtension(
        t.extendedKeyUsages.map((u) => EKU_OIDS[u]),
        false,
      ),
      new x509.SubjectAlternativeNameExtension(
        [
          ...t.uris.map((value): x509.JsonGeneralName => ({ type: 'url', value })),
          ...t.dns.map((value): x509.JsonGeneralName => ({ type: 'dns', value })),
          ...t.ips.map((value): x509.JsonGeneralName => ({ type: 'ip', value })),
        ],
        true,
      ),
      new x509.SubjectKeyIdentifierExtension(t.subjectKeyIdHex),
      new x509.AuthorityKeyIdentifierExtension(t.authorityKeyIdHex),
    ],
  });
}

describe('pki leaf DER', function () {
  this.timeout(60_000);
  const pkis = new Map<KeyAlgorithm, PkiFixture>();
  before(async () => {
    for (const keyAlgorithm of KEY_ALGORITHMS) pkis.set(keyAlgorithm, await PkiFixture.create({ keyAlgorithm }));
  });
  after(() => {
    for (const p of pkis.values()) p.cleanup();
  });

  const cases: {
    what: string;
    role: Role;
    cn: string;
    dns: string[];
    ips: string[];
    ekus: ExtendedKeyUsage[];
    notAfter: Date;
  }[] = [
    {
      what: 'an agent',
      role: 'agent',
      cn: 'site-a',
      dns: [],
      ips: [],
      ekus: ['clientAuth'],
      notAfter: new Date('2031-05-06T07:08:09Z'),
    },
    {
      what: "a name with '_'",
      role: 'agent',
      cn: 'site_b',
      dns: [],
      ips: [],
      ekus: ['clientAuth'],
      notAfter: new Date('2031-05-06T07:08:09Z'),
    },
    {
      what: 'a broker with DNS, IPv4 and IPv6 names, valid past 2049 (GeneralizedTime)',
      role: 'broker',
      cn: 'broker.example.com',
      dns: ['broker.example.com', 'b2.example.com'],
      ips: ['127.0.0.1', '::1', '2001:db8::7:1', 'fe80:1:2:3:4:5:6:7', '1::'],
      ekus: ['serverAuth', 'clientAuth'],
      notAfter: new Date('2051-01-02T03:04:05Z'),
    },
  ];
  for (const caKeyAlgorithm of KEY_ALGORITHMS) {
    for (const subjectKeyAlgorithm of KEY_ALGORITHMS) {
      for (const c of cases) {
        it(
          `encodes ${c.what} (${subjectKeyAlgorithm} key, ${caKeyAlgorithm} CA) exactly as @peculiar/x509 does, ` +
            `and signs it`,
          async () => {
            const pki = await loadPki(pkis.get(caKeyAlgorithm)!.pkiDir);
            const material = signingMaterialOf(pki);
            const key = await generateKey(subjectKeyAlgorithm);
            const template: LeafTemplate = {
              serialHex: '0123456789ABCDEF0123456789ABCDEF',
              issuerDer: material.subjectDer,
              notBefore: new Date('2026-01-02T03:04:05Z'),
              notAfter: c.notAfter,
              spkiDer: key.spkiDer,
              keyEncipherment: subjectKeyAlgorithm === 'rsa-2048',
              extendedKeyUsages: c.ekus,
              uris: [`spiffe://burrow.local/${c.role}/${c.cn}`],
              dns: c.dns,
              ips: c.ips,
              subjectKeyIdHex: key.skiHex,
              authorityKeyIdHex: pki.signingCa.record.skiHex,
            };
            const reference = await peculiarLeaf(template, material.privateKey, caKeyAlgorithm);
            expect(leafTbsDer(template, caKeyAlgorithm).toString('hex')).to.equal(
              tbsOf(new Uint8Array(reference.rawData)).toString('hex'),
            );

            const der = signLeafDer(template, material.signingKey, caKeyAlgorithm);
            const cert = new X509Certificate(certificatePem(der));
            expect(cert.verify(pki.signingCa.certificate.publicKey)).to.equal(true);
            expect(cert.checkIssued(pki.signingCa.certificate)).to.equal(true);
            expect(
              await new x509.X509Certificate(der).verify({
                publicKey: await new x509.X509Certificate(pki.signingCa.certPem).publicKey.export(),
              }),
            ).to.equal(true);
          },
        );
      }
    }
  }

  it('encodes an IPv4-mapped IPv6 address as its 16 bytes (where @peculiar/x509 does not)', async () => {
    const { pkiDir: dir } = pkis.get('ecdsa-p256')!;
    const issued = await issueCertificate({
      dir,
      role: 'broker',
      name: 'broker',
      ip: ['::ffff:192.0.2.33', '2001:db8::1.2.3.4'],
    });
    const leaf = new X509Certificate(splitPem(issued.certPem)[0]!);
    expect(leaf.subjectAltName).to.equal(
      'URI:spiffe://burrow.local/broker/broker, IP Address:0:0:0:0:0:FFFF:C000:221, IP ' +
        'Address:2001:DB8:0:0:0:0:102:304',
    );
  });
});

describe('pki cached CA material across a rotation', function () {
  this.timeout(120_000);
  let pki: PkiFixture;
  before(async () => {
    pki = await PkiFixture.create();
  });
  after(() => pki.cleanup());

  /** Signs a CSR (agent) and issues a broker leaf; returns which issuing CA signed each, checked by signature. */
  async function issuers(): Promise<{ agent: string; broker: string }> {
    const { csrPem } = await createCsr();
    const agent = await signCsr({ dir: pki.pkiDir, csrPem, role: 'agent', name: 'site-r' });
    const broker = await issueCertificate({ dir: pki.pkiDir, role: 'broker', name: 'broker', dns: ['localhost'] });
    const signedBy = (certPem: string, issuerCaId: string): string => {
      const [leafPem, caPem] = splitPem(certPem);
      const leaf = new X509Certificate(leafPem!);
      const ca = new X509Certificate(fs.readFileSync(path.join(pki.pkiDir, 'ca', `${issuerCaId}.crt`), 'utf8'));
      expect(new X509Certificate(caPem!).fingerprint256).to.equal(ca.fingerprint256);
      expect(leaf.verify(ca.publicKey), `leaf verifies with ${issuerCaId}`).to.equal(true);
      expect(leaf.issuer).to.equal(ca.subject);
      return issuerCaId;
    };
    return { agent: signedBy(agent.certPem, agent.issuerCaId), broker: signedBy(broker.certPem, broker.issuerCaId) };
  }

  const manifest = (): {
    signingCaId: string;
    serverSigningCaId?: string;
    rotation?: { oldIssuingCaId: string; newIssuingCaId: string };
  } => JSON.parse(fs.readFileSync(path.join(pki.pkiDir, 'pki.json'), 'utf8'));

  it('signs with the CA each phase names, whether this process or another one rotated', async () => {
    const old = manifest().signingCaId;
    expect(await issuers()).to.deep.equal({ agent: old, broker: old }); // cache warm

    // Another process (the operator's burrow-pki) rotates: this process must notice on its own.
    execFileSync(process.execPath, [PKI_CLI, 'rotate', 'init', '--dir', pki.pkiDir]);
    const fresh = manifest().rotation!.newIssuingCaId;
    expect(fresh).to.not.equal(old);
    expect(await issuers()).to.deep.equal({ agent: old, broker: old });

    execFileSync(process.execPath, [PKI_CLI, 'rotate', 'update-clients', '--dir', pki.pkiDir]);
    expect(await issuers()).to.deep.equal({ agent: fresh, broker: old });

    await rotate({ dir: pki.pkiDir, action: 'update-servers' });
    expect(await issuers()).to.deep.equal({ agent: fresh, broker: fresh });

    await rotate({ dir: pki.pkiDir, action: 'finish', force: true });
    expect(manifest().signingCaId).to.equal(fresh);
    expect(await issuers()).to.deep.equal({ agent: fresh, broker: fresh });
  });

  it('goes back to the old CA on rollback', async () => {
    const current = manifest().signingCaId;
    await rotate({ dir: pki.pkiDir, action: 'init' });
    const fresh = manifest().rotation!.newIssuingCaId;
    await rotate({ dir: pki.pkiDir, action: 'update-clients' });
    expect(await issuers()).to.deep.equal({ agent: fresh, broker: current });
    execFileSync(process.execPath, [PKI_CLI, 'rotate', 'rollback', '--dir', pki.pkiDir]);
    expect(await issuers()).to.deep.equal({ agent: current, broker: current });
  });
});
