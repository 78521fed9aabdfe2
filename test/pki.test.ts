import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { X509Certificate, createPrivateKey, createPublicKey } from 'node:crypto';
import * as fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import {
  DEFAULT_LEAF_TTL_MS,
  KEY_ALGORITHMS,
  NOT_BEFORE_BACKDATE_MS,
  PkiError,
  ROLES,
  initPki,
  issueCertificate,
  loadPki,
  parseDuration,
  parseSpiffeId,
  spiffeIdFor,
  writeIssued,
  type IssuedCertificate,
  type KeyAlgorithm,
  type Role,
} from '@burrow/pki';
import { makeTempDir, PkiFixture, splitPem, tlsOptions } from './helpers/pki-fixture';

const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';
const EXPECTED_EKUS: Record<Role, string[]> = {
  agent: [CLIENT_AUTH],
  broker: [CLIENT_AUTH, SERVER_AUTH].sort(),
  // Callers only dial out; no Burrow listener serves with a service certificate.
  service: [CLIENT_AUTH],
};
const CLI = path.join(path.dirname(require.resolve('@burrow/pki/package.json')), 'dist', 'cli.js');

/** Asserts that `fn` rejects with a PkiError whose message matches `pattern`. */
async function expectPkiError(fn: () => Promise<unknown>, pattern: RegExp): Promise<PkiError> {
  let caught: unknown;
  try {
    await fn();
  } catch (err) {
    caught = err;
  }
  expect(caught, 'expected a PkiError').to.be.instanceOf(PkiError);
  expect((caught as PkiError).message).to.match(pattern);
  expect((caught as PkiError).message).not.to.include('\n');
  return caught as PkiError;
}

function mode(file: string): number {
  return fs.statSync(file).mode & 0o777;
}

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a program to completion, capturing output; never rejects on a non-zero exit. */
function run(
  command: string,
  args: string[],
  options: { env?: NodeJS.ProcessEnv; cwd?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      env: options.env ?? process.env,
      cwd: options.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Environment for the CLI without any inherited BURROW_PKI_* variables. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BURROW_PKI_')) env[k] = v;
  return { ...env, ...extra };
}

/** `openssl verify` of leaf against the trust bundle, with the issuing CA as untrusted intermediate. */
async function opensslVerify(
  workDir: string,
  issued: IssuedCertificate,
  purpose?: 'sslclient' | 'sslserver',
): Promise<RunResult> {
  const [leafPem, issuingPem] = splitPem(issued.certPem);
  const leafFile = path.join(workDir, 'leaf.pem');
  const issuingFile = path.join(workDir, 'issuing.pem');
  const caFile = path.join(workDir, 'ca.crt');
  fs.writeFileSync(leafFile, leafPem!);
  fs.writeFileSync(issuingFile, issuingPem!);
  fs.writeFileSync(caFile, issued.caPem);
  const args = ['verify', '-x509_strict', '-CAfile', caFile, '-untrusted', issuingFile];
  if (purpose) args.push('-purpose', purpose);
  return run('openssl', [...args, leafFile]);
}

describe('pki', () => {
  let tempRoot: string;

  before(() => {
    tempRoot = makeTempDir('burrow-pki-test-');
  });
  after(() => {
    fs.rmSync(tempRoot, { recursive: true, force: true });
  });

  let dirCounter = 0;
  /** A fresh, not yet existing path inside this run's temp root. */
  const freshDir = (label: string): string => path.join(tempRoot, `${label}-${++dirCounter}`);

  describe('parseDuration', () => {
    const valid: Array<[string, number]> = [
      ['90s', 90_000],
      ['15m', 900_000],
      ['24h', 86_400_000],
      ['7d', 604_800_000],
      ['1h30m', 5_400_000],
      ['1d2h3m4s5ms', 93_784_005],
      ['250ms', 250],
      ['0s', 0],
      [' 10m ', 600_000],
      ['3650d', 315_360_000_000],
    ];
    for (const [text, ms] of valid) {
      it(`parses '${text}' as ${ms} ms`, () => {
        expect(parseDuration(text)).to.equal(ms);
      });
    }

    const invalid = [
      '',
      '5x',
      '90',
      'h',
      '1.5h',
      '-5m',
      '+5m',
      '30m1h',
      '1h1h',
      '1h 30m',
      '1H',
      '5 m',
      'abc',
      '9999999999999999999d',
    ];
    for (const text of invalid) {
      it(`rejects '${text}' with a PkiError naming it`, () => {
        expect(() => parseDuration(text))
          .to.throw(PkiError)
          .with.property('message')
          .that.includes(`'${text}'`);
      });
    }
  });

  describe('spiffeIdFor / parseSpiffeId', () => {
    it('builds the three id shapes, each with its name (brokers too)', () => {
      expect(spiffeIdFor('burrow.local', 'agent', 'site-a')).to.equal('spiffe://burrow.local/agent/site-a');
      expect(spiffeIdFor('burrow.local', 'service', 'authz')).to.equal('spiffe://burrow.local/service/authz');
      expect(spiffeIdFor('example.org', 'broker', 'b-1')).to.equal('spiffe://example.org/broker/b-1');
    });

    it('accepts names at the edges of the pattern', () => {
      expect(spiffeIdFor('td', 'agent', 'a')).to.equal('spiffe://td/agent/a');
      expect(spiffeIdFor('td', 'agent', `a${'b'.repeat(62)}c`)).to.match(/\/agent\/ab+c$/);
      expect(spiffeIdFor('td', 'agent', 'site_1.eu-west')).to.equal('spiffe://td/agent/site_1.eu-west');
    });

    const badNames = ['', 'Site-A', '-a', 'a-', '.', '..', 'a/b', 'a b', 'é', `a${'b'.repeat(63)}c`];
    for (const name of badNames) {
      it(`rejects name '${name}'`, () => {
        expect(() => spiffeIdFor('burrow.local', 'agent', name)).to.throw(PkiError, /^name: /);
      });
    }

    for (const td of ['', 'Burrow.local', 'burrow_local', 'a..b', '-a.b', 'a.b-', 'spiffe://x']) {
      it(`rejects trust domain '${td}'`, () => {
        expect(() => spiffeIdFor(td, 'agent', 'a')).to.throw(PkiError, /^trustDomain: /);
      });
    }

    it('rejects an unknown role', () => {
      expect(() => spiffeIdFor('td', 'admin' as Role, 'a')).to.throw(PkiError, /^role: .*admin/);
    });

    it('parses what it builds and refuses anything else', () => {
      expect(parseSpiffeId('spiffe://td/agent/a1')).to.deep.equal({ trustDomain: 'td', role: 'agent', name: 'a1' });
      expect(parseSpiffeId('spiffe://td/broker/b-1')).to.deep.equal({ trustDomain: 'td', role: 'broker', name: 'b-1' });
      for (const bad of [
        'spiffe://td/broker',
        'spiffe://td/broker/B',
        'spiffe://td/agent',
        'spiffe://td/agent/A',
        'https://td/agent/a',
        'spiffe://td/other/a',
      ]) {
        expect(() => parseSpiffeId(bad), bad).to.throw(PkiError, /^spiffeId: /);
      }
    });
  });

  describe('initPki', () => {
    it('creates the layout with a 0700 directory, 0600 keys and a consistent chain', async () => {
      const dir = freshDir('init');
      await initPki({ dir, trustDomain: 'example.test' });

      expect(mode(dir)).to.equal(0o700);
      expect(mode(path.join(dir, 'ca'))).to.equal(0o700);
      const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'pki.json'), 'utf8'));
      expect(manifest).to.include({ formatVersion: 1, trustDomain: 'example.test', keyAlgorithm: 'ecdsa-p256' });
      expect(manifest.cas).to.have.length(2);
      const rootRec = manifest.cas.find((c: { kind: string }) => c.kind === 'root');
      const issuingRec = manifest.cas.find((c: { kind: string }) => c.kind === 'issuing');
      expect(manifest.signingCaId).to.equal(issuingRec.id);
      expect(issuingRec.parentId).to.equal(rootRec.id);
      for (const rec of [rootRec, issuingRec]) {
        expect(mode(path.join(dir, rec.keyFile)), rec.keyFile).to.equal(0o600);
        expect(fs.readFileSync(path.join(dir, rec.keyFile), 'utf8')).to.match(/^-----BEGIN PRIVATE KEY-----\n/);
      }
      // No temp files left behind by the atomic writes.
      expect(fs.readdirSync(dir).sort()).to.deep.equal(['ca', 'ca-bundle.crt', 'pki.json']);
      expect(fs.readdirSync(path.join(dir, 'ca'))).to.have.length(4);

      const root = new X509Certificate(fs.readFileSync(path.join(dir, rootRec.certFile)));
      const issuing = new X509Certificate(fs.readFileSync(path.join(dir, issuingRec.certFile)));
      const bundle = splitPem(fs.readFileSync(path.join(dir, 'ca-bundle.crt'), 'utf8'));
      expect(bundle).to.have.length(1);
      expect(new X509Certificate(bundle[0]!).fingerprint256).to.equal(root.fingerprint256);

      expect(root.ca).to.equal(true);
      expect(root.checkIssued(root)).to.equal(true);
      expect(root.verify(root.publicKey)).to.equal(true);
      expect(issuing.ca).to.equal(true);
      expect(issuing.checkIssued(root)).to.equal(true);
      expect(issuing.verify(root.publicKey)).to.equal(true);
      expect(issuing.subject).to.include('O=example.test');

      const rootP = new x509.X509Certificate(root.raw);
      const issuingP = new x509.X509Certificate(issuing.raw);
      const rootBc = rootP.getExtension(x509.BasicConstraintsExtension)!;
      expect([rootBc.ca, rootBc.pathLength, rootBc.critical]).to.deep.equal([true, 1, true]);
      const issuingBc = issuingP.getExtension(x509.BasicConstraintsExtension)!;
      expect([issuingBc.ca, issuingBc.pathLength, issuingBc.critical]).to.deep.equal([true, 0, true]);
      for (const cert of [rootP, issuingP]) {
        const ku = cert.getExtension(x509.KeyUsagesExtension)!;
        expect(ku.critical).to.equal(true);
        expect(ku.usages).to.equal(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign);
      }
      const rootSki = rootP.getExtension(x509.SubjectKeyIdentifierExtension)!.keyId;
      expect(rootSki).to.equal(rootRec.skiHex);
      expect(issuingP.getExtension(x509.AuthorityKeyIdentifierExtension)!.keyId).to.equal(rootSki);
      expect(issuingP.getExtension(x509.SubjectKeyIdentifierExtension)!.keyId).to.equal(issuingRec.skiHex);

      const now = Date.now();
      const day = 86_400_000;
      expect(new Date(root.validTo).getTime()).to.be.closeTo(now + 3650 * day, 10_000);
      expect(new Date(issuing.validTo).getTime()).to.be.closeTo(now + 365 * day, 10_000);
      expect(new Date(root.validFrom).getTime()).to.be.closeTo(now - NOT_BEFORE_BACKDATE_MS, 10_000);
    });

    it('refuses to initialise the same directory twice', async () => {
      const dir = freshDir('twice');
      await initPki({ dir });
      const before = fs.readFileSync(path.join(dir, 'pki.json'), 'utf8');
      await expectPkiError(() => initPki({ dir }), /^dir: .*already initialised/);
      expect(fs.readFileSync(path.join(dir, 'pki.json'), 'utf8')).to.equal(before);
    });

    it('lets exactly one of several concurrent inits of one directory win', async () => {
      const dir = freshDir('race');
      const results = await Promise.allSettled([initPki({ dir }), initPki({ dir }), initPki({ dir })]);
      expect(results.filter((r) => r.status === 'fulfilled')).to.have.length(1);
      for (const r of results) if (r.status === 'rejected') expect(r.reason).to.be.instanceOf(PkiError);
      // The winner's directory is complete and usable.
      const issued = await issueCertificate({ dir, role: 'agent', name: 'a' });
      expect(issued.spiffeId).to.equal('spiffe://burrow.local/agent/a');
      expect(fs.readdirSync(path.join(dir, 'ca'))).to.have.length(4);
    });

    it('refuses a non-empty directory', async () => {
      const dir = freshDir('nonempty');
      fs.mkdirSync(dir);
      fs.writeFileSync(path.join(dir, 'something'), 'x');
      await expectPkiError(() => initPki({ dir }), /^dir: .*not empty/);
    });

    it('validates its options', async () => {
      await expectPkiError(() => initPki({ dir: '' }), /^dir: /);
      await expectPkiError(
        () => initPki({ dir: freshDir('v'), trustDomain: 'Bad_Domain' }),
        /^trustDomain: .*Bad_Domain/,
      );
      await expectPkiError(
        () => initPki({ dir: freshDir('v'), keyAlgorithm: 'dsa' as KeyAlgorithm }),
        /^keyAlgorithm: .*dsa/,
      );
      await expectPkiError(() => initPki({ dir: freshDir('v'), rootTtlMs: 0 }), /^rootTtlMs: /);
      await expectPkiError(() => initPki({ dir: freshDir('v'), issuingTtlMs: -1 }), /^issuingTtlMs: /);
    });

    it('never lets the issuing CA outlive the root, nor a leaf the issuing CA', async () => {
      const dir = freshDir('clamp');
      const day = 86_400_000;
      await initPki({ dir, rootTtlMs: 2 * day, issuingTtlMs: 365 * day });
      const pki = await loadPki(dir);
      const root = new X509Certificate(pki.trustBundlePem);
      expect(pki.signingCa.certificate.validTo).to.equal(root.validTo);
      const leaf = await issueCertificate({ dir, role: 'agent', name: 'a', ttlMs: 30 * day });
      expect(leaf.notAfter.getTime()).to.equal(new Date(root.validTo).getTime());
      expect(new X509Certificate(leaf.certPem).validTo).to.equal(root.validTo);
    });
  });

  describe('issueCertificate', () => {
    const pkiDirs = new Map<KeyAlgorithm, string>();

    before(async () => {
      for (const keyAlgorithm of KEY_ALGORITHMS) {
        const dir = freshDir(`issue-${keyAlgorithm}`);
        await initPki({ dir, keyAlgorithm });
        pkiDirs.set(keyAlgorithm, dir);
      }
    });

    const cases: Array<{ pkiAlgorithm: KeyAlgorithm; leafAlgorithm?: KeyAlgorithm; role: Role }> = [];
    for (const pkiAlgorithm of KEY_ALGORITHMS) for (const role of ROLES) cases.push({ pkiAlgorithm, role });
    // Leaves need not use the CA's algorithm.
    cases.push({ pkiAlgorithm: 'ecdsa-p256', leafAlgorithm: 'ed25519', role: 'agent' });
    cases.push({ pkiAlgorithm: 'ed25519', leafAlgorithm: 'rsa-2048', role: 'broker' });

    for (const { pkiAlgorithm, leafAlgorithm, role } of cases) {
      const label = `${role} leaf${leafAlgorithm ? ` (${leafAlgorithm} key)` : ''} from a ${pkiAlgorithm} PKI`;
      it(`issues a valid ${label}`, async () => {
        const dir = pkiDirs.get(pkiAlgorithm)!;
        const keyAlgorithm = leafAlgorithm ?? pkiAlgorithm;
        const name = role === 'broker' ? 'broker-1' : `${role}-1`;
        const sanExtra =
          role === 'broker' ? { dns: ['broker.example.test', 'Localhost'], ip: ['127.0.0.1', '::1'] } : {};
        const t0 = Date.now();
        const issued = await issueCertificate({
          dir,
          role,
          name,
          ...sanExtra,
          ...(leafAlgorithm ? { keyAlgorithm } : {}),
        });
        const t1 = Date.now();

        const expectedId = `spiffe://burrow.local/${role}/${name}`;
        expect(issued.spiffeId).to.equal(expectedId);

        const pems = splitPem(issued.certPem);
        expect(pems, 'certPem = leaf + issuing CA').to.have.length(2);
        const leaf = new X509Certificate(pems[0]!);
        const issuing = new X509Certificate(pems[1]!);
        const roots = splitPem(issued.caPem).map((p) => new X509Certificate(p));
        expect(roots).to.have.length(1);
        const root = roots[0]!;

        // Chain, checked by node:crypto.
        expect(leaf.checkIssued(issuing)).to.equal(true);
        expect(leaf.verify(issuing.publicKey)).to.equal(true);
        expect(issuing.checkIssued(root)).to.equal(true);
        expect(issuing.verify(root.publicKey)).to.equal(true);
        expect(leaf.verify(root.publicKey)).to.equal(false);
        expect(leaf.ca).to.equal(false);

        // SANs: exactly one URI, the SPIFFE id; DNS/IP only for brokers.
        const sans = (leaf.subjectAltName ?? '').split(', ');
        expect(sans.filter((s) => s.startsWith('URI:'))).to.deep.equal([`URI:${expectedId}`]);
        if (role === 'broker') {
          expect(sans).to.have.members([
            `URI:${expectedId}`,
            'DNS:broker.example.test',
            'DNS:localhost',
            'IP Address:127.0.0.1',
            'IP Address:0:0:0:0:0:0:0:1',
          ]);
          expect(leaf.checkHost('broker.example.test')).to.equal('broker.example.test');
          expect(leaf.checkIP('127.0.0.1')).to.equal('127.0.0.1');
        } else {
          expect(sans).to.deep.equal([`URI:${expectedId}`]);
        }
        // No CN (an empty subject): a hostname check has nothing to fall back to.
        expect(leaf.subject ?? '').to.equal('');
        expect(leaf.checkHost(name)).to.equal(undefined);

        // Node calls the EKU list keyUsage.
        expect([...(leaf.keyUsage ?? [])].sort()).to.deep.equal(EXPECTED_EKUS[role]);

        // Validity: notBefore one minute back, notAfter 24 h ahead, in whole seconds.
        const notBefore = new Date(leaf.validFrom).getTime();
        expect(notBefore).to.be.within(t0 - NOT_BEFORE_BACKDATE_MS - 1000, t1 - NOT_BEFORE_BACKDATE_MS);
        const notAfter = new Date(leaf.validTo).getTime();
        expect(notAfter).to.equal(issued.notAfter.getTime());
        expect(notAfter).to.be.within(t0 + DEFAULT_LEAF_TTL_MS - 1000, t1 + DEFAULT_LEAF_TTL_MS);

        // Serial: 128 bits, positive, no padding byte.
        expect(leaf.serialNumber).to.equal(issued.serialHex);
        expect(issued.serialHex).to.match(/^[0-9A-F]{32}$/);
        expect(parseInt(issued.serialHex.slice(0, 2), 16)).to.be.within(1, 0x7f);

        // Extension details node:crypto does not expose.
        const parsed = new x509.X509Certificate(leaf.raw);
        const bc = parsed.getExtension(x509.BasicConstraintsExtension)!;
        expect([bc.ca, bc.critical]).to.deep.equal([false, true]);
        expect(
          parsed.getExtension(x509.SubjectAlternativeNameExtension)!.critical,
          'SAN critical (empty subject)',
        ).to.equal(true);
        const ku = parsed.getExtension(x509.KeyUsagesExtension)!;
        expect(ku.critical).to.equal(true);
        const expectedKu =
          keyAlgorithm === 'rsa-2048'
            ? x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment
            : x509.KeyUsageFlags.digitalSignature;
        expect(ku.usages).to.equal(expectedKu);
        const issuingSki = new x509.X509Certificate(issuing.raw).getExtension(
          x509.SubjectKeyIdentifierExtension,
        )!.keyId;
        expect(parsed.getExtension(x509.AuthorityKeyIdentifierExtension)!.keyId).to.equal(issuingSki);
        // SKI is RFC 5280 method 1, the same value @peculiar/x509 itself computes.
        const expectedSki = (
          await x509.SubjectKeyIdentifierExtension.create(leaf.publicKey.export({ type: 'spki', format: 'der' }))
        ).keyId;
        expect(parsed.getExtension(x509.SubjectKeyIdentifierExtension)!.keyId).to.equal(expectedSki);

        // Key: PKCS#8, the requested algorithm, matching the certificate.
        expect(issued.keyPem).to.match(/^-----BEGIN PRIVATE KEY-----\n/);
        const privateKey = createPrivateKey(issued.keyPem);
        const expectedType = { 'ecdsa-p256': 'ec', ed25519: 'ed25519', 'rsa-2048': 'rsa' }[keyAlgorithm];
        expect(privateKey.asymmetricKeyType).to.equal(expectedType);
        expect(leaf.checkPrivateKey(privateKey)).to.equal(true);
        expect(createPublicKey(privateKey).export({ type: 'spki', format: 'der' })).to.deep.equal(
          leaf.publicKey.export({ type: 'spki', format: 'der' }),
        );

        // OpenSSL's own chain validation, strict mode, with the purpose(s) the role needs.
        const work = fs.mkdtempSync(path.join(tempRoot, 'openssl-'));
        const plain = await opensslVerify(work, issued);
        expect(plain.code, plain.stdout + plain.stderr).to.equal(0);
        expect(plain.stdout).to.match(/leaf\.pem: OK/);
        const asClient = await opensslVerify(work, issued, 'sslclient');
        expect(asClient.code, asClient.stdout + asClient.stderr).to.equal(0);
        const asServer = await opensslVerify(work, issued, 'sslserver');
        if (role !== 'broker') {
          // Must fail: an agent or service certificate must not be usable to impersonate a server.
          expect(asServer.code).to.not.equal(0);
          expect(asServer.stdout + asServer.stderr).to.match(
            /unsuitable certificate purpose|unsupported certificate purpose/,
          );
        } else {
          expect(asServer.code, asServer.stdout + asServer.stderr).to.equal(0);
        }
      });
    }

    it('fails OpenSSL verification against another PKI (the verify checks are not vacuous)', async () => {
      const issued = await issueCertificate({ dir: pkiDirs.get('ecdsa-p256')!, role: 'agent', name: 'x' });
      const other = await issueCertificate({ dir: pkiDirs.get('ed25519')!, role: 'agent', name: 'x' });
      const work = fs.mkdtempSync(path.join(tempRoot, 'openssl-'));
      const result = await opensslVerify(work, { ...issued, caPem: other.caPem });
      expect(result.code).to.not.equal(0);
    });

    it('gives every certificate a different serial and key', async () => {
      const dir = pkiDirs.get('ecdsa-p256')!;
      const issued = await Promise.all(
        Array.from({ length: 50 }, (_, i) => issueCertificate({ dir, role: 'agent', name: `a${i}` })),
      );
      expect(new Set(issued.map((c) => c.serialHex)).size).to.equal(50);
      expect(new Set(issued.map((c) => c.keyPem)).size).to.equal(50);
    });

    it('honours ttlMs', async () => {
      const t0 = Date.now();
      const issued = await issueCertificate({
        dir: pkiDirs.get('ecdsa-p256')!,
        role: 'service',
        name: 's',
        ttlMs: 15 * 60_000,
      });
      expect(issued.notAfter.getTime()).to.be.within(t0 + 15 * 60_000 - 1000, Date.now() + 15 * 60_000);
    });

    it('rejects bad input with a PkiError naming the field', async () => {
      const dir = pkiDirs.get('ecdsa-p256')!;
      await expectPkiError(() => issueCertificate({ dir, role: 'broker', name: 'b' }), /^dns: .*broker/);
      await expectPkiError(() => issueCertificate({ dir, role: 'broker', name: 'b', dns: [], ip: [] }), /^dns: /);
      await expectPkiError(() => issueCertificate({ dir, role: 'agent', name: 'a', dns: ['a.example'] }), /^dns: /);
      await expectPkiError(() => issueCertificate({ dir, role: 'service', name: 's', ip: ['10.0.0.1'] }), /^ip: /);
      await expectPkiError(
        () => issueCertificate({ dir, role: 'broker', name: 'b', ip: ['300.1.1.1'] }),
        /^ip: .*300\.1\.1\.1/,
      );
      await expectPkiError(() => issueCertificate({ dir, role: 'broker', name: 'b', ip: ['fe80::1%eth0'] }), /^ip: /);
      await expectPkiError(
        () => issueCertificate({ dir, role: 'broker', name: 'b', dns: ['bad_host'] }),
        /^dns: .*bad_host/,
      );
      await expectPkiError(
        () => issueCertificate({ dir, role: 'broker', name: 'b', dns: ['*.example.com'] }),
        /^dns: /,
      );
      await expectPkiError(() => issueCertificate({ dir, role: 'agent', name: '' }), /^name: .*required/);
      await expectPkiError(() => issueCertificate({ dir, role: 'agent', name: 'Bad Name' }), /^name: .*Bad Name/);
      await expectPkiError(() => issueCertificate({ dir, role: 'nope' as Role, name: 'a' }), /^role: .*nope/);
      await expectPkiError(() => issueCertificate({ dir, role: 'agent', name: 'a', ttlMs: 0 }), /^ttlMs: /);
      await expectPkiError(() => issueCertificate({ dir, role: 'agent', name: 'a', ttlMs: 1.5 }), /^ttlMs: /);
      await expectPkiError(
        () => issueCertificate({ dir, role: 'agent', name: 'a', keyAlgorithm: 'p384' as KeyAlgorithm }),
        /^keyAlgorithm: .*p384/,
      );
      await expectPkiError(
        () => issueCertificate({ dir: freshDir('missing'), role: 'agent', name: 'a' }),
        /^dir: .*not an initialised/,
      );
    });

    it('picks up a PKI re-created at the same path (cache follows the files)', async () => {
      const dir = freshDir('recreate');
      await initPki({ dir });
      const first = await issueCertificate({ dir, role: 'agent', name: 'a' });
      // Build the replacement elsewhere and move it into place, so nothing tells the
      // library about the change except the files themselves.
      const replacement = freshDir('replacement');
      await initPki({ dir: replacement });
      fs.rmSync(dir, { recursive: true });
      fs.renameSync(replacement, dir);
      const second = await issueCertificate({ dir, role: 'agent', name: 'a' });
      expect(second.caPem).to.not.equal(first.caPem);
      const [leafPem, issuingPem] = splitPem(second.certPem);
      const leaf = new X509Certificate(leafPem!);
      expect(leaf.verify(new X509Certificate(issuingPem!).publicKey)).to.equal(true);
      expect(new X509Certificate(issuingPem!).verify(new X509Certificate(second.caPem).publicKey)).to.equal(true);
    });

    it('refuses a signing key that does not match its certificate', async () => {
      const dir = freshDir('mismatch');
      await initPki({ dir });
      const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'pki.json'), 'utf8'));
      const rootRec = manifest.cas.find((c: { kind: string }) => c.kind === 'root');
      const issuingRec = manifest.cas.find((c: { kind: string }) => c.kind === 'issuing');
      fs.copyFileSync(path.join(dir, rootRec.keyFile), path.join(dir, issuingRec.keyFile));
      await expectPkiError(() => issueCertificate({ dir, role: 'agent', name: 'a' }), /does not match/);
    });
  });

  describe('writeIssued', () => {
    let pki: PkiFixture;
    before(async () => {
      pki = await PkiFixture.create();
    });
    after(() => pki.cleanup());

    it('writes tls.crt, tls.key (0600) and ca.crt into a new 0700 directory, replacing old files', async () => {
      const out = path.join(freshDir('out'), 'nested', 'certs');
      const first = await pki.issuePem('agent', 'site-a');
      await writeIssued(out, first);
      expect(mode(out)).to.equal(0o700);
      expect(fs.readdirSync(out).sort()).to.deep.equal(['ca.crt', 'tls.crt', 'tls.key']);
      expect(mode(path.join(out, 'tls.key'))).to.equal(0o600);
      expect(fs.readFileSync(path.join(out, 'tls.crt'), 'utf8')).to.equal(first.certPem);
      expect(fs.readFileSync(path.join(out, 'tls.key'), 'utf8')).to.equal(first.keyPem);
      expect(fs.readFileSync(path.join(out, 'ca.crt'), 'utf8')).to.equal(first.caPem);

      const second = await pki.issuePem('agent', 'site-a');
      await writeIssued(out, second);
      expect(fs.readFileSync(path.join(out, 'tls.key'), 'utf8')).to.equal(second.keyPem);
      expect(fs.readFileSync(path.join(out, 'tls.crt'), 'utf8')).to.equal(second.certPem);
      expect(mode(path.join(out, 'tls.key'))).to.equal(0o600);
      expect(fs.readdirSync(out)).to.have.length(3);
    });
  });

  describe('mTLS with issued certificates', () => {
    let pki: PkiFixture;
    let otherPki: PkiFixture;
    let broker: IssuedCertificate;
    let agent: IssuedCertificate;
    let foreignAgent: IssuedCertificate;
    let server: tls.Server;
    let port: number;
    const serverSockets = new Set<tls.TLSSocket>();
    const clientErrors: Error[] = [];
    /** SANs of every client the strict server accepted. */
    const acceptedPeers: Array<string | undefined> = [];

    before(async () => {
      pki = await PkiFixture.create();
      otherPki = await PkiFixture.create();
      broker = await pki.issuePem('broker', 'broker', { ip: ['127.0.0.1'] });
      agent = await pki.issuePem('agent', 'site-a');
      foreignAgent = await otherPki.issuePem('agent', 'site-a');
      server = tls.createServer({ ...tlsOptions(broker), requestCert: true, rejectUnauthorized: true }, (socket) => {
        serverSockets.add(socket);
        socket.on('close', () => serverSockets.delete(socket));
        const peer = socket.getPeerCertificate().subjectaltname;
        acceptedPeers.push(peer);
        socket.once('data', () => socket.end(`pong ${peer}`));
      });
      server.on('tlsClientError', (err) => clientErrors.push(err));
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      port = (server.address() as AddressInfo).port;
    });

    after(async () => {
      for (const s of serverSockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      pki.cleanup();
      otherPki.cleanup();
    });

    /** Connects, sends 'ping', and reports the reply (if any), the first error (if any) and `authorized`. */
    function exchange(options: tls.ConnectionOptions): Promise<{ reply: string; error?: Error; authorized: boolean }> {
      return new Promise((resolve) => {
        const socket = tls.connect({ host: '127.0.0.1', port, ...options });
        let reply = '';
        let error: Error | undefined;
        let authorized = false;
        socket.setEncoding('utf8');
        socket.on('secureConnect', () => {
          authorized = socket.authorized;
          socket.write('ping');
        });
        socket.on('data', (d: string) => (reply += d));
        socket.on('error', (err) => (error ??= err));
        socket.on('close', () => resolve({ reply, error, authorized }));
        socket.on('end', () => socket.end());
      });
    }

    it('completes a mutual handshake between a broker (server, IP SAN) and an agent (client)', async () => {
      const result = await exchange(tlsOptions(agent));
      expect(result.error).to.equal(undefined);
      expect(result.authorized, 'client verified the broker, including its IP SAN').to.equal(true);
      expect(result.reply).to.equal('pong URI:spiffe://burrow.local/agent/site-a');
    });

    it('refuses a client certificate from another PKI', async () => {
      const errorsBefore = clientErrors.length;
      const serverErrored = new Promise<Error>((resolve) => server.once('tlsClientError', resolve));
      // Trusts the right server but presents a certificate the server does not trust.
      const result = await exchange({ ...tlsOptions(foreignAgent), ca: agent.caPem });
      await serverErrored;
      expect(clientErrors.length).to.be.greaterThan(errorsBefore);
      expect(acceptedPeers, 'server never accepted the foreign client').to.deep.equal([
        'URI:spiffe://burrow.local/agent/site-a',
      ]);
      // With TLS 1.3 the client sees secureConnect before the server's verdict, and the server
      // just drops the connection, so the failure shows as the first exchange getting no reply.
      expect(result.reply).to.equal('');
    });

    it('shows the server why: the foreign client certificate does not chain to its trust bundle', async () => {
      const verdicts: Array<{ authorized: boolean; error: string | undefined; peer: string | undefined }> = [];
      const sockets = new Set<tls.TLSSocket>();
      // rejectUnauthorized: false lets the connection through so the server can inspect the verdict.
      const permissive = tls.createServer(
        { ...tlsOptions(broker), requestCert: true, rejectUnauthorized: false },
        (socket) => {
          sockets.add(socket);
          verdicts.push({
            authorized: socket.authorized,
            error: socket.authorizationError === null ? undefined : String(socket.authorizationError),
            peer: socket.getPeerCertificate().subjectaltname,
          });
          socket.once('data', () => socket.end('pong'));
        },
      );
      await new Promise<void>((resolve) => permissive.listen(0, '127.0.0.1', resolve));
      try {
        const permissivePort = (permissive.address() as AddressInfo).port;
        await exchange({ ...tlsOptions(foreignAgent), ca: agent.caPem, port: permissivePort });
        await exchange({ ...tlsOptions(agent), port: permissivePort });
      } finally {
        for (const s of sockets) s.destroy();
        await new Promise<void>((resolve) => permissive.close(() => resolve()));
      }
      expect(verdicts).to.have.length(2);
      expect(verdicts[0]!.authorized).to.equal(false);
      expect(verdicts[0]!.error).to.match(/UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT/);
      expect(verdicts[1]).to.deep.equal({
        authorized: true,
        error: undefined,
        peer: 'URI:spiffe://burrow.local/agent/site-a',
      });
    });

    it('refuses to connect without a client certificate', async () => {
      const result = await exchange({ ca: agent.caPem });
      expect(result.reply).to.equal('');
      expect(result.error).to.be.instanceOf(Error);
    });

    it('lets the client refuse a server from another PKI', async () => {
      const result = await exchange({ ...tlsOptions(agent), ca: foreignAgent.caPem });
      expect(result.reply).to.equal('');
      expect(result.authorized).to.equal(false);
      expect((result.error as NodeJS.ErrnoException | undefined)?.code).to.match(
        /UNABLE_TO_VERIFY|SELF_SIGNED|UNABLE_TO_GET_ISSUER/,
      );
    });
  });

  describe('burrow-pki CLI', () => {
    it('runs init and issue end to end', async () => {
      const dir = freshDir('cli-pki');
      const out = freshDir('cli-out');
      const init = await run(
        process.execPath,
        [CLI, 'init', '--dir', dir, '--trust-domain', 'cli.test', '--key-algorithm', 'ed25519'],
        {
          env: cleanEnv(),
        },
      );
      expect(init.code, init.stderr).to.equal(0);
      expect(init.stderr).to.equal('');
      expect(init.stdout.trim().split('\n')).to.have.length(1);
      expect(init.stdout).to.include('cli.test');
      expect(mode(dir)).to.equal(0o700);
      expect(JSON.parse(fs.readFileSync(path.join(dir, 'pki.json'), 'utf8')).keyAlgorithm).to.equal('ed25519');

      const issue = await run(
        process.execPath,
        [
          CLI,
          'issue',
          '--dir',
          dir,
          '--role',
          'broker',
          '--name',
          'b',
          '--dns',
          'broker.cli.test',
          '--ip',
          '127.0.0.1',
          '--ttl',
          '1h30m',
          '--out',
          out,
        ],
        { env: cleanEnv() },
      );
      expect(issue.code, issue.stderr).to.equal(0);
      expect(issue.stdout.trim().split('\n')).to.have.length(1);
      expect(issue.stdout).to.include('spiffe://cli.test/broker/b');
      expect(mode(path.join(out, 'tls.key'))).to.equal(0o600);
      const [leafPem] = splitPem(fs.readFileSync(path.join(out, 'tls.crt'), 'utf8'));
      const leaf = new X509Certificate(leafPem!);
      expect(leaf.subjectAltName).to.equal('URI:spiffe://cli.test/broker/b, DNS:broker.cli.test, IP Address:127.0.0.1');
      expect(issue.stdout).to.include(leaf.serialNumber);
      const lifetimeMs = new Date(leaf.validTo).getTime() - new Date(leaf.validFrom).getTime();
      expect(lifetimeMs).to.be.closeTo(90 * 60_000 + NOT_BEFORE_BACKDATE_MS, 2000);
      const verify = await run('openssl', [
        'verify',
        '-CAfile',
        path.join(out, 'ca.crt'),
        '-untrusted',
        path.join(out, 'tls.crt'),
        '-purpose',
        'sslserver',
        path.join(out, 'tls.crt'),
      ]);
      expect(verify.code, verify.stdout + verify.stderr).to.equal(0);
    });

    it('takes every flag from BURROW_PKI_* environment variables', async () => {
      const dir = freshDir('cli-env');
      const out = freshDir('cli-env-out');
      const init = await run(process.execPath, [CLI, 'init'], {
        env: cleanEnv({ BURROW_PKI_DIR: dir, BURROW_PKI_TRUST_DOMAIN: 'env.test', BURROW_PKI_TTL: '1h' }),
      });
      expect(init.code, init.stderr).to.equal(0);
      const issue = await run(process.execPath, [CLI, 'issue'], {
        env: cleanEnv({
          BURROW_PKI_DIR: dir,
          BURROW_PKI_ROLE: 'broker',
          BURROW_PKI_DNS: 'a.env.test,b.env.test',
          BURROW_PKI_IP: '127.0.0.1',
          BURROW_PKI_TTL: '2h',
          BURROW_PKI_KEY_ALGORITHM: 'rsa-2048',
          BURROW_PKI_OUT: out,
        }),
      });
      expect(issue.code, issue.stderr).to.equal(0);
      const leaf = new X509Certificate(splitPem(fs.readFileSync(path.join(out, 'tls.crt'), 'utf8'))[0]!);
      expect(leaf.subjectAltName).to.equal(
        'URI:spiffe://env.test/broker/a.env.test, DNS:a.env.test, DNS:b.env.test, IP Address:127.0.0.1',
      );
      expect(leaf.publicKey.asymmetricKeyType).to.equal('rsa');
      const lifetimeMs = new Date(leaf.validTo).getTime() - new Date(leaf.validFrom).getTime();
      expect(lifetimeMs).to.be.closeTo(2 * 3_600_000 + NOT_BEFORE_BACKDATE_MS, 2000);

      // The command line wins over the environment.
      const override = await run(process.execPath, [CLI, 'issue', '--role', 'agent', '--name', 'site-z'], {
        env: cleanEnv({ BURROW_PKI_DIR: dir, BURROW_PKI_ROLE: 'broker', BURROW_PKI_OUT: out }),
      });
      expect(override.code, override.stderr).to.equal(0);
      expect(override.stdout).to.include('spiffe://env.test/agent/site-z');
    });

    let cliPkiDir: string;
    before(async () => {
      cliPkiDir = freshDir('cli-bad');
      await initPki({ dir: cliPkiDir });
    });

    const badInvocations: Array<{ label: string; args: () => string[]; stderr: RegExp }> = [
      {
        label: '--role nope',
        args: () => ['issue', '--dir', cliPkiDir, '--role', 'nope', '--name', 'a', '--out', freshDir('o')],
        stderr: /role: .*nope/,
      },
      {
        label: 'missing --dir',
        args: () => ['issue', '--role', 'agent', '--name', 'a', '--out', freshDir('o')],
        stderr: /dir/,
      },
      {
        label: '--ttl 5x',
        args: () => [
          'issue',
          '--dir',
          cliPkiDir,
          '--role',
          'agent',
          '--name',
          'a',
          '--ttl',
          '5x',
          '--out',
          freshDir('o'),
        ],
        stderr: /ttl: .*'5x'/,
      },
      {
        label: '--ttl 0s',
        args: () => [
          'issue',
          '--dir',
          cliPkiDir,
          '--role',
          'agent',
          '--name',
          'a',
          '--ttl',
          '0s',
          '--out',
          freshDir('o'),
        ],
        stderr: /ttl: /,
      },
      {
        label: 'broker without --dns/--ip',
        args: () => ['issue', '--dir', cliPkiDir, '--role', 'broker', '--out', freshDir('o')],
        stderr: /dns: /,
      },
      {
        label: 'agent without --name',
        args: () => ['issue', '--dir', cliPkiDir, '--role', 'agent', '--out', freshDir('o')],
        stderr: /name: .*required/,
      },
      {
        label: 'an unknown flag',
        args: () => ['issue', '--dir', cliPkiDir, '--role', 'agent', '--name', 'a', '--out', freshDir('o'), '--colour'],
        stderr: /colour/,
      },
      {
        label: 'a repeated single-valued flag',
        args: () => [
          'issue',
          '--dir',
          cliPkiDir,
          '--dir',
          cliPkiDir,
          '--role',
          'agent',
          '--name',
          'a',
          '--out',
          freshDir('o'),
        ],
        stderr: /dir: .*more than once/,
      },
      { label: 'no command', args: () => [], stderr: /command/ },
      {
        label: 'init of an initialised dir',
        args: () => ['init', '--dir', cliPkiDir],
        stderr: /dir: .*already initialised/,
      },
      {
        label: 'init with a bad trust domain',
        args: () => ['init', '--dir', freshDir('td'), '--trust-domain', 'UPPER'],
        stderr: /trustDomain: .*UPPER/,
      },
      {
        label: 'init with --key-algorithm dsa',
        args: () => ['init', '--dir', freshDir('ka'), '--key-algorithm', 'dsa'],
        stderr: /keyAlgorithm: .*dsa/,
      },
    ];
    for (const { label, args, stderr } of badInvocations) {
      it(`exits 2 with one line on stderr for ${label}`, async () => {
        const argv = args();
        const result = await run(process.execPath, [CLI, ...argv], { env: cleanEnv() });
        expect(result.code, result.stderr).to.equal(2);
        expect(result.stdout).to.equal('');
        expect(result.stderr.endsWith('\n')).to.equal(true);
        expect(result.stderr.trimEnd().split('\n')).to.have.length(1);
        expect(result.stderr).to.match(/^burrow-pki: /);
        expect(result.stderr).to.match(stderr);
        // A failed issue must not leave a half-written output directory behind.
        const outIndex = argv.indexOf('--out');
        if (outIndex >= 0) expect(fs.existsSync(argv[outIndex + 1]!)).to.equal(false);
      });
    }

    it('prints help and version', async () => {
      const help = await run(process.execPath, [CLI, '--help'], { env: cleanEnv() });
      expect(help.code).to.equal(0);
      expect(help.stdout).to.include('init').and.to.include('issue');
      const issueHelp = await run(process.execPath, [CLI, 'issue', '--help'], { env: cleanEnv() });
      expect(issueHelp.code).to.equal(0);
      expect(issueHelp.stdout).to.include('BURROW_PKI_DIR').and.to.include('--dns');
      const version = await run(process.execPath, [CLI, '--version'], { env: cleanEnv() });
      expect(version.code).to.equal(0);
      const pkgVersion = JSON.parse(
        fs.readFileSync(path.join(path.dirname(CLI), '..', 'package.json'), 'utf8'),
      ).version;
      expect(version.stdout.trim()).to.equal(pkgVersion);
    });
  });
});
