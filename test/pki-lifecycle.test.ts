/**
 * PKI lifecycle: join tokens, CSRs, CA rotation, revocation, CRLs and expiry checks
 * (packages/pki), through the library and the burrow-pki CLI.
 */
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { expect } from 'chai';
import { spawn, spawnSync } from 'node:child_process';
import { X509Certificate, createPrivateKey, createPublicKey, webcrypto } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  EnrollmentError,
  KEY_ALGORITHMS,
  NOT_BEFORE_BACKDATE_MS,
  PkiError,
  agentStates,
  caPinOf,
  checkPki,
  consumeJoinToken,
  createCsr,
  createJoinToken,
  initPki,
  issueCertificate,
  loadRevocations,
  parseJoinToken,
  recordAgentState,
  revoke,
  rotate,
  rotationState,
  signCsr,
  trustBundle,
  trustBundlePins,
  writeCrl,
  type IssuedCertificate,
  type RotationState,
} from '@burrow/pki';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

const PKI_PACKAGE_DIR = path.dirname(require.resolve('@burrow/pki/package.json'));
const CLI = path.join(PKI_PACKAGE_DIR, 'dist', 'cli.js');
const DAY_MS = 86_400_000;
/** WebCrypto key pair as @peculiar/x509 types it (the DOM CryptoKeyPair, not in this project's lib). */
type CsrKeys = x509.Pkcs10CertificateRequestCreateParams['keys'];

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a program to completion, capturing output; never rejects on a non-zero exit. */
function run(
  command: string,
  args: string[],
  options: { env?: NodeJS.ProcessEnv; input?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      env: options.env ?? cleanEnv(),
      stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin?.end(options.input);
  });
}

/** Environment without inherited BURROW_PKI_* variables. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BURROW_PKI_')) env[k] = v;
  return { ...env, ...extra };
}

const cli = (args: string[], env: Record<string, string> = {}): Promise<RunResult> =>
  run(process.execPath, [CLI, ...args], { env: cleanEnv(env) });

/** Asserts that `promise` rejects with a PkiError whose one-line message matches `pattern`. */
async function expectPkiError(promise: Promise<unknown> | (() => unknown), pattern: RegExp): Promise<PkiError> {
  let caught: unknown;
  try {
    await (typeof promise === 'function' ? promise() : promise);
  } catch (err) {
    caught = err;
  }
  expect(caught, 'expected a PkiError').to.be.instanceOf(PkiError);
  const message = (caught as PkiError).message;
  expect(message).to.match(pattern);
  expect(message).not.to.include('\n');
  return caught as PkiError;
}

/** Asserts an EnrollmentError with `reason` whose message does not contain `secret`. */
async function expectEnrollmentError(
  promise: Promise<unknown> | (() => unknown),
  reason: string,
  secret?: string,
  pattern?: RegExp,
): Promise<void> {
  const err = await expectPkiError(promise, pattern ?? /./);
  expect(err).to.be.instanceOf(EnrollmentError);
  expect((err as EnrollmentError).reason).to.equal(reason);
  if (secret !== undefined) expect(err.message).not.to.include(secret);
}

function splitPem(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----\n?/g) ?? [];
}

function leafOf(issued: { certPem: string }): X509Certificate {
  return new X509Certificate(splitPem(issued.certPem)[0]!);
}

function fingerprints(pem: string): string[] {
  return splitPem(pem).map((p) => new X509Certificate(p).fingerprint256);
}

function spkiOf(key: X509Certificate['publicKey']): Buffer {
  return key.export({ type: 'spki', format: 'der' });
}

/** Reads a CA certificate of the PKI by id. */
function caCert(dir: string, id: string): X509Certificate {
  return new X509Certificate(fs.readFileSync(path.join(dir, 'ca', `${id}.crt`)));
}

/** The issuing CA ids that sign clients and servers in `state`. */
function signers(state: RotationState): { clients: string; servers: string } {
  return {
    clients: state.cas.find((c) => c.signsClients)!.id,
    servers: state.cas.find((c) => c.signsServers)!.id,
  };
}

function roots(state: RotationState): string[] {
  return state.cas.filter((c) => c.kind === 'root').map((c) => c.id);
}

describe('pki lifecycle', function () {
  this.timeout(30_000);
  let tempRoot: string;
  let counter = 0;

  before(() => {
    tempRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'burrow-pki-lifecycle-'));
  });
  after(() => {
    fs.rmSync(tempRoot, { recursive: true, force: true });
  });

  const freshDir = (label: string): string => path.join(tempRoot, `${label}-${++counter}`);
  const newPki = async (label: string, opts: { issuingTtlMs?: number } = {}): Promise<string> => {
    const dir = freshDir(label);
    await initPki({ dir, ...opts });
    return dir;
  };
  const rootIdOf = (dir: string): string =>
    JSON.parse(fs.readFileSync(path.join(dir, 'pki.json'), 'utf8')).cas.find((c: { kind: string }) => c.kind === 'root')
      .id;

  /** `openssl verify` of a leaf against a bundle (as CAfile), with the chain's issuing CA as untrusted. */
  async function opensslVerify(
    issued: { certPem: string },
    caPem: string,
    purpose: 'sslclient' | 'sslserver',
  ): Promise<RunResult> {
    const work = fs.mkdtempSync(path.join(tempRoot, 'verify-'));
    const [leafPem, issuingPem] = splitPem(issued.certPem);
    fs.writeFileSync(path.join(work, 'leaf.pem'), leafPem!);
    fs.writeFileSync(path.join(work, 'issuing.pem'), issuingPem!);
    fs.writeFileSync(path.join(work, 'ca.pem'), caPem);
    const result = await run('openssl', [
      'verify',
      '-x509_strict',
      '-purpose',
      purpose,
      '-CAfile',
      path.join(work, 'ca.pem'),
      '-untrusted',
      path.join(work, 'issuing.pem'),
      path.join(work, 'leaf.pem'),
    ]);
    fs.rmSync(work, { recursive: true, force: true });
    return result;
  }

  describe('join tokens', () => {
    let dir: string;
    before(async () => {
      dir = await newPki('tokens');
    });

    it('creates a one-line URL-safe token that parses and is consumed once', async () => {
      const before = Date.now();
      const info = await createJoinToken({ dir, agentId: 'site-a' });
      expect(info.token).to.match(/^burrow-join-v1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}\.[0-9a-f]{64}$/);
      expect(encodeURIComponent(info.token)).to.equal(info.token);
      expect(info.agentId).to.equal('site-a');
      expect(info.expiresAt.getTime()).to.be.within(before + 3_600_000, Date.now() + 3_600_000);
      const parsed = parseJoinToken(info.token);
      expect(parsed.tokenId).to.equal(info.tokenId);
      expect(info.token).to.include(parsed.secret);
      expect(parsed.caPinSha256).to.equal(
        caPinOf(fs.readFileSync(path.join(dir, 'ca', `${rootIdOf(dir)}.crt`), 'utf8')),
      );

      expect(await consumeJoinToken({ dir, token: info.token })).to.deep.equal({ agentId: 'site-a' });
      await expectEnrollmentError(consumeJoinToken({ dir, token: info.token }), 'used', parsed.secret, /already used/);
    });

    it('honours ttlMs and refuses an expired token without consuming it', async () => {
      const info = await createJoinToken({ dir, agentId: 'site-b', ttlMs: 60_000 });
      expect(info.expiresAt.getTime()).to.be.closeTo(Date.now() + 60_000, 5_000);
      const { secret } = parseJoinToken(info.token);
      await expectEnrollmentError(
        consumeJoinToken({ dir, token: info.token, nowMs: info.expiresAt.getTime() }),
        'expired',
        secret,
        new RegExp(`expired at ${info.expiresAt.toISOString().replace(/\./g, '\\.')}`),
      );
      // The refusal did not use it up.
      expect(await consumeJoinToken({ dir, token: info.token })).to.deep.equal({ agentId: 'site-b' });
    });

    it('tells unknown ids and wrong secrets apart from used and expired tokens', async () => {
      const info = await createJoinToken({ dir, agentId: 'site-c' });
      const parsed = parseJoinToken(info.token);
      const unknownId = info.token.replace(
        parsed.tokenId,
        parsed.tokenId === '0123456789abcdef' ? 'fedcba9876543210' : '0123456789abcdef',
      );
      await expectEnrollmentError(
        consumeJoinToken({ dir, token: unknownId }),
        'unknown',
        parsed.secret,
        /unknown join token/,
      );
      const otherSecret = `${parsed.secret.slice(0, 42)}${parsed.secret.endsWith('A') ? 'B' : 'A'}`;
      const wrongSecret = info.token.replace(parsed.secret, otherSecret);
      await expectEnrollmentError(
        consumeJoinToken({ dir, token: wrongSecret }),
        'unknown',
        otherSecret,
        /secret does not match/,
      );
      // A wrong secret does not burn the token either, and after use a wrong secret is still 'unknown'.
      await consumeJoinToken({ dir, token: info.token });
      await expectEnrollmentError(consumeJoinToken({ dir, token: wrongSecret }), 'unknown');
    });

    it('refuses malformed tokens without echoing them', async () => {
      const good = (await createJoinToken({ dir, agentId: 'site-d' })).token;
      const [, id, secret, pin] = good.split('.') as [string, string, string, string];
      const malformed = [
        '',
        'hello',
        'burrow-join-v1.',
        `burrow-join-v2.${id}.${secret}.${pin}`,
        `burrow-join-v1.${id.toUpperCase()}.${secret}.${pin}`,
        `burrow-join-v1.${id}.${secret.slice(1)}.${pin}`,
        `burrow-join-v1.${id}.${secret}`,
        `burrow-join-v1.${id}.${secret}.${pin.slice(2)}`,
        `burrow-join-v1.${id}.${secret}.${pin}.extra`,
        `burrow-join-v1.${id}.${secret.slice(0, 20)}+${secret.slice(21)}.${pin}`,
        `burrow-join-v1.${id} .${secret}.${pin}`,
      ];
      for (const token of malformed) {
        const shown = JSON.stringify(token);
        let caught: unknown;
        try {
          parseJoinToken(token);
        } catch (err) {
          caught = err;
        }
        expect(caught, shown).to.be.instanceOf(EnrollmentError);
        expect((caught as EnrollmentError).reason, shown).to.equal('malformed');
        expect((caught as EnrollmentError).message, shown).to.match(/^token: malformed join token/);
        expect((caught as EnrollmentError).message, shown).not.to.include(secret.slice(0, 20));
        await expectEnrollmentError(consumeJoinToken({ dir, token }), 'malformed', secret.slice(0, 20));
      }
      await expectEnrollmentError(consumeJoinToken({ dir, token: 42 as unknown as string }), 'malformed');
    });

    it('stores only a hash of the secret, in a 0600 file', async () => {
      const info = await createJoinToken({ dir, agentId: 'site-e' });
      const { secret } = parseJoinToken(info.token);
      const grep = await run('grep', ['-r', '-F', '-l', secret, dir]);
      expect(grep.code, grep.stdout).to.equal(1); // 1 = no match
      const file = path.join(dir, 'tokens', `${info.tokenId}.json`);
      expect(fs.statSync(file).mode & 0o777).to.equal(0o600);
      const stored = JSON.parse(fs.readFileSync(file, 'utf8'));
      expect(stored).to.include({ tokenId: info.tokenId, agentId: 'site-e', expiresAt: info.expiresAt.toISOString() });
      expect(stored.secretSha256).to.match(/^[0-9a-f]{64}$/);
      // ... and after consumption too.
      await consumeJoinToken({ dir, token: info.token });
      expect((await run('grep', ['-r', '-F', '-l', secret, dir])).code).to.equal(1);
    });

    it('validates createJoinToken options', async () => {
      await expectPkiError(createJoinToken({ dir, agentId: 'Site A' }), /^agent-id: /);
      await expectPkiError(createJoinToken({ dir, agentId: 'site-f', ttlMs: 0 }), /^ttl: /);
      await expectPkiError(
        createJoinToken({ dir: freshDir('nopki'), agentId: 'site-f' }),
        /not an initialised Burrow PKI/,
      );
    });

    it('lets exactly one of 20 concurrent consumers in one process win', async () => {
      const { token } = await createJoinToken({ dir, agentId: 'site-race' });
      const results = await Promise.allSettled(Array.from({ length: 20 }, () => consumeJoinToken({ dir, token })));
      const won = results.filter((r) => r.status === 'fulfilled');
      expect(won).to.have.length(1);
      expect((won[0] as PromiseFulfilledResult<{ agentId: string }>).value).to.deep.equal({ agentId: 'site-race' });
      for (const r of results.filter((x) => x.status === 'rejected') as PromiseRejectedResult[]) {
        expect(r.reason).to.be.instanceOf(EnrollmentError);
        expect((r.reason as EnrollmentError).reason).to.equal('used');
      }
    });

    it('lets exactly one of 8 processes consuming one token at the same moment win', async () => {
      const { token } = await createJoinToken({ dir, agentId: 'site-procs' });
      // Each child loads the library, says "ready", and consumes when its stdin receives a line:
      // all of them are released by the parent at once, after every one is ready.
      const script = `
        const { consumeJoinToken } = require('@burrow/pki');
        process.stdout.write('ready\\n');
        process.stdin.once('data', () => {
          consumeJoinToken({ dir: process.env.PKI_DIR, token: process.env.JOIN_TOKEN }).then(
            (r) => process.stdout.write('OK ' + r.agentId + '\\n'),
            (e) => process.stdout.write('FAIL ' + (e.reason || e.message) + '\\n'),
          ).finally(() => process.stdin.destroy());
        });`;
      const children = Array.from({ length: 8 }, () => {
        const child = spawn(process.execPath, ['-e', script], {
          cwd: PKI_PACKAGE_DIR,
          env: cleanEnv({ PKI_DIR: dir, JOIN_TOKEN: token }),
          stdio: ['pipe', 'pipe', 'pipe'],
        });
        let out = '';
        let err = '';
        child.stdout.setEncoding('utf8');
        child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
        const ready = new Promise<void>((resolve, reject) => {
          child.stdout.on('data', (d: string) => {
            out += d;
            if (out.includes('ready\n')) resolve();
          });
          child.once('exit', (code) => reject(new Error(`child exited ${code} before ready: ${err}`)));
        });
        const done = new Promise<string>((resolve) =>
          child.once('close', () => resolve(out.replace('ready\n', '').trim() || `no output; stderr: ${err}`)),
        );
        return { child, ready, done };
      });
      try {
        await Promise.all(children.map((c) => c.ready));
        for (const c of children) c.child.stdin.write('go\n');
        const outputs = await Promise.all(children.map((c) => c.done));
        expect(
          outputs.filter((o) => o === 'OK site-procs'),
          outputs.join(' | '),
        ).to.have.length(1);
        expect(
          outputs.filter((o) => o === 'FAIL used'),
          outputs.join(' | '),
        ).to.have.length(7);
      } finally {
        for (const c of children) if (c.child.exitCode === null) c.child.kill();
      }
    });

    it('refuses tokens of a banned agent, and new tokens for it', async () => {
      const { token } = await createJoinToken({ dir, agentId: 'site-banned' });
      await revoke({ dir, agentId: 'site-banned', ban: true });
      await expectEnrollmentError(
        consumeJoinToken({ dir, token }),
        'banned',
        parseJoinToken(token).secret,
        /"site-banned".*banned/,
      );
      await expectPkiError(
        createJoinToken({ dir, agentId: 'site-banned' }),
        /^agent-id: agent "site-banned" is banned/,
      );
    });
  });

  describe('CA pins', () => {
    it(
      'caPinOf is the SHA-256 of the DER SubjectPublicKeyInfo, ' + 'as openssl computes it, and the token carries it',
      async () => {
        const dir = await newPki('pin');
        const rootFile = path.join(dir, 'ca', `${rootIdOf(dir)}.crt`);
        const openssl = await run('sh', [
          '-c',
          `openssl x509 -in '${rootFile}' -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`,
        ]);
        expect(openssl.code, openssl.stderr).to.equal(0);
        const expected = openssl.stdout.split(' ')[0]!;
        expect(expected).to.match(/^[0-9a-f]{64}$/);
        expect(caPinOf(fs.readFileSync(rootFile, 'utf8'))).to.equal(expected);
        expect(await trustBundlePins(dir)).to.deep.equal([expected]);
        const { token } = await createJoinToken({ dir, agentId: 'site-a' });
        expect(parseJoinToken(token).caPinSha256).to.equal(expected);
        expect(parseJoinToken(token).caPinsSha256).to.deep.equal([expected]);
        expect(() => caPinOf('not a certificate')).to.throw(PkiError);
      },
    );
  });

  describe('CSRs', () => {
    let dir: string;
    before(async () => {
      dir = await newPki('csr');
    });

    for (const keyAlgorithm of KEY_ALGORITHMS) {
      it(`signs a ${keyAlgorithm} CSR: the leaf carries the CSR's key and verifies with openssl`, async () => {
        const { csrPem, keyPem } = await createCsr({ keyAlgorithm });
        expect(csrPem).to.match(/^-----BEGIN CERTIFICATE REQUEST-----\n/);
        const req = await run('openssl', ['req', '-verify', '-noout'], { input: csrPem });
        expect(req.stdout + req.stderr).to.include('self-signature verify OK');
        const issued = await signCsr({ dir, csrPem, role: 'agent', name: 'site-a' });
        expect(issued).not.to.have.property('keyPem');
        const leaf = leafOf(issued);
        expect(spkiOf(leaf.publicKey).equals(spkiOf(createPublicKey(createPrivateKey(keyPem))))).to.equal(true);
        expect(leaf.checkPrivateKey(createPrivateKey(keyPem))).to.equal(true);
        expect(leaf.subjectAltName).to.equal('URI:spiffe://burrow.local/agent/site-a');
        expect(issued.spiffeId).to.equal('spiffe://burrow.local/agent/site-a');
        expect(leaf.serialNumber).to.equal(issued.serialHex);
        const verify = await opensslVerify(issued, issued.caPem, 'sslclient');
        expect(verify.code, verify.stderr + verify.stdout).to.equal(0);
      });
    }

    it('issues the identity it is told, ignoring every name, SAN and extension the CSR asks for', async () => {
      const algorithm = { name: 'ECDSA', namedCurve: 'P-256' };
      const keys = (await webcrypto.subtle.generateKey(algorithm, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
      const csr = await x509.Pkcs10CertificateRequestGenerator.create({
        name: 'CN=admin, O=evil',
        keys: keys as unknown as CsrKeys,
        signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
        extensions: [
          new x509.SubjectAlternativeNameExtension([
            { type: 'url', value: 'spiffe://burrow.local/broker/evil' },
            { type: 'dns', value: 'evil.example' },
            { type: 'ip', value: '10.0.0.1' },
          ]),
          new x509.BasicConstraintsExtension(true, 0, true),
          new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
        ],
      });
      const csrPem = csr.toString('pem');
      const issued = await signCsr({ dir, csrPem, role: 'agent', name: 'site-b', ttlMs: 3_600_000 });
      const leaf = leafOf(issued);
      expect(leaf.subject ?? '').to.equal(''); // no CN: names live in the SAN only
      expect(leaf.subjectAltName).to.equal('URI:spiffe://burrow.local/agent/site-b');
      expect(leaf.ca).to.equal(false);
      expect(leaf.keyUsage).to.deep.equal(['1.3.6.1.5.5.7.3.2']); // clientAuth only (Node lists the EKU here)
      expect(new Date(leaf.validTo).getTime()).to.be.closeTo(Date.now() + 3_600_000, 5_000);
      const csrSpki = Buffer.from(await webcrypto.subtle.exportKey('spki', keys.publicKey));
      expect(spkiOf(leaf.publicKey).equals(csrSpki)).to.equal(true);
    });

    it('issues broker certificates from CSRs with the DNS/IP SANs the caller gives', async () => {
      const { csrPem } = await createCsr();
      const issued = await signCsr({
        dir,
        csrPem,
        role: 'broker',
        name: 'broker',
        dns: ['broker.example'],
        ip: ['127.0.0.1'],
      });
      expect(leafOf(issued).subjectAltName).to.equal(
        'URI:spiffe://burrow.local/broker/broker, DNS:broker.example, IP Address:127.0.0.1',
      );
      const verify = await opensslVerify(issued, issued.caPem, 'sslserver');
      expect(verify.code, verify.stderr + verify.stdout).to.equal(0);
    });

    it('refuses a CSR whose signature was made with a different key than the one it carries', async () => {
      const algorithm = { name: 'ECDSA', namedCurve: 'P-256' };
      const a = (await webcrypto.subtle.generateKey(algorithm, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
      const b = (await webcrypto.subtle.generateKey(algorithm, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
      // Claims key A, signed with key B: whoever sends it does not hold A's private key.
      const forged = await x509.Pkcs10CertificateRequestGenerator.create({
        name: 'CN=burrow-agent',
        keys: { publicKey: a.publicKey, privateKey: b.privateKey } as unknown as CsrKeys,
        signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      });
      const csrPem = forged.toString('pem');
      expect(
        Buffer.from(forged.publicKey.rawData).equals(
          Buffer.from(await webcrypto.subtle.exportKey('spki', a.publicKey)),
        ),
      ).to.equal(true);
      // openssl agrees that it is bad, so the refusal below is not vacuous (OpenSSL 3.0 exits 0 but says so).
      const req = await run('openssl', ['req', '-verify', '-noout'], { input: csrPem });
      expect(req.stdout + req.stderr).to.include('self-signature verify failure');
      await expectPkiError(
        signCsr({ dir, csrPem, role: 'agent', name: 'site-c' }),
        /^csr: CSR signature does not verify/,
      );
    });

    it('refuses unreadable CSRs and keys of other types', async () => {
      await expectPkiError(signCsr({ dir, csrPem: '', role: 'agent', name: 'a' }), /^csr: is required/);
      await expectPkiError(
        signCsr({ dir, csrPem: 'hello', role: 'agent', name: 'a' }),
        /^csr: not a PEM certificate request/,
      );
      await expectPkiError(
        signCsr({
          dir,
          csrPem: '-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n',
          role: 'agent',
          name: 'a',
        }),
        /^csr: not a readable PKCS#10/,
      );
      const p384 = (await webcrypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-384' }, true, [
        'sign',
        'verify',
      ])) as webcrypto.CryptoKeyPair;
      const csr = await x509.Pkcs10CertificateRequestGenerator.create({
        name: 'CN=x',
        keys: p384 as unknown as CsrKeys,
        signingAlgorithm: { name: 'ECDSA', hash: 'SHA-384' },
      });
      await expectPkiError(
        signCsr({ dir, csrPem: csr.toString('pem'), role: 'agent', name: 'a' }),
        /^csr: key type ec (secp384r1|P-384) is not accepted; use one of ecdsa-p256, ed25519, rsa-2048$/,
      );
      const { csrPem } = await createCsr();
      await expectPkiError(signCsr({ dir, csrPem, role: 'agent', name: 'Bad Name' }), /^name: /);
      await expectPkiError(signCsr({ dir, csrPem, role: 'agent', name: 'a', dns: ['x.example'] }), /^dns: only broker/);
    });

    it('records every issued leaf (issueCertificate and signCsr) in the issued-leaf log', async () => {
      const own = await newPki('log');
      const a = await issueCertificate({ dir: own, role: 'agent', name: 'site-a' });
      const b = await signCsr({ dir: own, csrPem: (await createCsr()).csrPem, role: 'service', name: 'authz' });
      const c = await issueCertificate({ dir: own, role: 'broker', name: 'broker', ip: ['127.0.0.1'] });
      const issuingId = (await rotationState(own)).cas.find((x) => x.kind === 'issuing')!.id;
      expect([a.issuerCaId, b.issuerCaId, c.issuerCaId]).to.deep.equal([issuingId, issuingId, issuingId]);
      const logDir = path.join(own, 'issued', issuingId);
      const records = fs.readdirSync(logDir).flatMap((f) =>
        fs
          .readFileSync(path.join(logDir, f), 'utf8')
          .trim()
          .split('\n')
          .map((l) => JSON.parse(l)),
      );
      expect(records.map((r) => [r.serialHex, r.role, r.name, r.issuerCaId, r.notAfter])).to.deep.equal([
        [a.serialHex, 'agent', 'site-a', issuingId, a.notAfter.toISOString()],
        [b.serialHex, 'service', 'authz', issuingId, b.notAfter.toISOString()],
        [c.serialHex, 'broker', 'broker', issuingId, c.notAfter.toISOString()],
      ]);
    });
  });

  describe('CA rotation', () => {
    it('goes init → update-clients → update-servers → finish, switching trust and signers phase by phase', async () => {
      const dir = await newPki('rotation');
      const versions: number[] = [];
      const issueAll = async (): Promise<{
        agent: IssuedCertificate;
        service: IssuedCertificate;
        broker: IssuedCertificate;
        csrAgent: Omit<IssuedCertificate, 'keyPem'>;
      }> => ({
        agent: await issueCertificate({ dir, role: 'agent', name: 'site-a' }),
        service: await issueCertificate({ dir, role: 'service', name: 'authz' }),
        broker: await issueCertificate({ dir, role: 'broker', name: 'broker', ip: ['127.0.0.1'] }),
        csrAgent: await signCsr({ dir, csrPem: (await createCsr()).csrPem, role: 'agent', name: 'site-b' }),
      });
      /** Asserts which issuing CA signed each, by the certificate itself (AKI/issuer and signature). */
      const expectIssuers = (certs: Awaited<ReturnType<typeof issueAll>>, clientCa: string, serverCa: string): void => {
        for (const [label, issued, ca] of [
          ['agent', certs.agent, clientCa],
          ['service', certs.service, clientCa],
          ['csr agent', certs.csrAgent, clientCa],
          ['broker', certs.broker, serverCa],
        ] as const) {
          const issuing = caCert(dir, ca);
          expect(leafOf(issued).checkIssued(issuing), `${label} issued by ${ca}`).to.equal(true);
          expect(leafOf(issued).verify(issuing.publicKey), `${label} signed by ${ca}`).to.equal(true);
          expect(issued.issuerCaId, label).to.equal(ca);
          expect(new X509Certificate(splitPem(issued.certPem)[1]!).fingerprint256, `${label} chain`).to.equal(
            issuing.fingerprint256,
          );
        }
      };
      const expectBundle = async (rootIds: string[]): Promise<void> => {
        const bundle = await trustBundle(dir);
        expect(fingerprints(bundle.pem)).to.deep.equal(rootIds.map((id) => caCert(dir, id).fingerprint256));
        expect(fs.readFileSync(path.join(dir, 'ca-bundle.crt'), 'utf8')).to.equal(bundle.pem);
        versions.push(bundle.version);
      };
      const verifyAll = async (
        certs: Awaited<ReturnType<typeof issueAll>>,
        caPem: string,
        expected: number,
      ): Promise<void> => {
        for (const issued of [certs.agent, certs.service, certs.csrAgent])
          expect((await opensslVerify(issued, caPem, 'sslclient')).code).to.equal(expected);
        expect((await opensslVerify(certs.broker, caPem, 'sslserver')).code).to.equal(expected);
      };

      const s0 = await rotationState(dir);
      expect(s0.phase).to.equal('standby');
      expect(s0.bundleVersion).to.equal(1);
      const oldRoot = roots(s0)[0]!;
      const oldIssuing = signers(s0).clients;
      expect(signers(s0).servers).to.equal(oldIssuing);
      expect(s0.cas.every((c) => c.inBundle)).to.equal(true);
      await expectBundle([oldRoot]);
      const standbyCerts = await issueAll();
      expectIssuers(standbyCerts, oldIssuing, oldIssuing);

      // init: the new CA is trusted but signs nothing.
      const s1 = await rotate({ dir, action: 'init' });
      expect(s1.phase).to.equal('init');
      expect(s1.cas).to.have.length(4);
      const newRoot = roots(s1).find((id) => id !== oldRoot)!;
      const newIssuing = s1.cas.find((c) => c.kind === 'issuing' && c.id !== oldIssuing)!.id;
      expect(signers(s1)).to.deep.equal({ clients: oldIssuing, servers: oldIssuing });
      expect(caCert(dir, newIssuing).checkIssued(caCert(dir, newRoot))).to.equal(true);
      await expectBundle([oldRoot, newRoot]);
      expect(await trustBundlePins(dir)).to.have.length(2);
      const initCerts = await issueAll();
      expectIssuers(initCerts, oldIssuing, oldIssuing);
      expect(fingerprints(initCerts.agent.caPem)).to.have.length(2);
      // A token made now pins the root of the brokers' CA first, then the other trusted root.
      const { token } = await createJoinToken({ dir, agentId: 'site-t' });
      expect(parseJoinToken(token).caPinsSha256).to.deep.equal(
        [oldRoot, newRoot].map((id) => caPinOf(fs.readFileSync(path.join(dir, 'ca', `${id}.crt`), 'utf8'))),
      );
      expect((await rotationState(dir)).phase).to.equal('init');

      await expectPkiError(
        rotate({ dir, action: 'init' }),
        /^rotate init: a rotation is already in progress \(phase init\)/,
      );
      await expectPkiError(
        rotate({ dir, action: 'update-servers' }),
        /^rotate update-servers: not allowed in phase init; run 'rotate update-clients' next/,
      );
      await expectPkiError(rotate({ dir, action: 'finish' }), /^rotate finish: not allowed in phase init/);

      // update-clients: agents and services get the new CA; brokers keep the old one.
      const s2 = await rotate({ dir, action: 'update-clients' });
      expect(s2.phase).to.equal('update-clients');
      expect(signers(s2)).to.deep.equal({ clients: newIssuing, servers: oldIssuing });
      await expectBundle([oldRoot, newRoot]);
      const clientsCerts = await issueAll();
      expectIssuers(clientsCerts, newIssuing, oldIssuing);
      await verifyAll(clientsCerts, clientsCerts.agent.caPem, 0);
      await expectPkiError(
        rotate({ dir, action: 'finish' }),
        /not allowed in phase update-clients; run 'rotate update-servers' next/,
      );

      // update-servers: brokers too.
      const s3 = await rotate({ dir, action: 'update-servers' });
      expect(s3.phase).to.equal('update-servers');
      expect(signers(s3)).to.deep.equal({ clients: newIssuing, servers: newIssuing });
      await expectBundle([oldRoot, newRoot]);
      const serversCerts = await issueAll();
      expectIssuers(serversCerts, newIssuing, newIssuing);

      // finish: refused while a leaf of the old CA is valid, naming when the last one expires.
      const oldLeaves = [standbyCerts, initCerts]
        .flatMap((c) => [c.agent, c.service, c.broker, c.csrAgent])
        .concat([clientsCerts.broker]);
      const lastOld = new Date(Math.max(...oldLeaves.map((l) => l.notAfter.getTime())));
      const refused = await expectPkiError(
        rotate({ dir, action: 'finish' }),
        /^rotate finish: 9 certificate\(s\) signed by the old CA/,
      );
      expect(refused.message).to.include(oldIssuing);
      expect(refused.message).to.include(`until ${lastOld.toISOString()}`);
      expect(refused.message).to.include('--force');
      expect((await rotationState(dir)).phase).to.equal('update-servers');
      await expectPkiError(rotate({ dir, action: 'finish', nowMs: lastOld.getTime() - 1000 }), /still valid/);

      const s4 = await rotate({ dir, action: 'finish', nowMs: lastOld.getTime() + 1000 });
      expect(s4.phase).to.equal('standby');
      expect(s4.cas.map((c) => c.id).sort()).to.deep.equal([newIssuing, newRoot].sort());
      expect(signers(s4)).to.deep.equal({ clients: newIssuing, servers: newIssuing });
      await expectBundle([newRoot]);
      const after = await issueAll();
      expectIssuers(after, newIssuing, newIssuing);
      await verifyAll(after, after.agent.caPem, 0);
      // Old leaves no longer chain to the trust bundle; the new CA's from update-clients do.
      await verifyAll(standbyCerts, after.agent.caPem, 2);
      expect((await opensslVerify(clientsCerts.agent, after.agent.caPem, 'sslclient')).code).to.equal(0);
      const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'pki.json'), 'utf8'));
      expect(manifest.retiredCas.map((c: { id: string; retiredBy: string }) => [c.id, c.retiredBy])).to.deep.equal([
        [oldRoot, 'finish'],
        [oldIssuing, 'finish'],
      ]);
      expect(manifest.rotation).to.equal(undefined);

      expect(versions.filter((v, i) => i === 0 || v !== versions[i - 1])).to.deep.equal([1, 2, 3, 4, 5]);
      expect(s4.bundleVersion).to.equal(5);

      // A new rotation can start from here.
      expect((await rotate({ dir, action: 'init' })).bundleVersion).to.equal(6);
    });

    it('finishes with force while old leaves are still valid', async () => {
      const dir = await newPki('force');
      const old = await issueCertificate({ dir, role: 'agent', name: 'site-a' });
      for (const action of ['init', 'update-clients', 'update-servers'] as const) await rotate({ dir, action });
      await expectPkiError(
        rotate({ dir, action: 'finish' }),
        new RegExp(`the last until ${old.notAfter.toISOString().replace(/\./g, '\\.')}`),
      );
      const state = await rotate({ dir, action: 'finish', force: true });
      expect(state.phase).to.equal('standby');
      expect(state.bundleVersion).to.equal(5);
      expect(state.cas.some((c) => c.id === old.issuerCaId)).to.equal(false);
    });

    for (const from of ['init', 'update-clients', 'update-servers'] as const) {
      it(`rolls back from ${from}: the old CA signs everything again and the new root leaves the bundle`, async () => {
        const dir = await newPki(`rollback-${from}`);
        const s0 = await rotationState(dir);
        const oldRoot = roots(s0)[0]!;
        const oldIssuing = signers(s0).clients;
        const steps = ['init', 'update-clients', 'update-servers'].slice(
          0,
          ['init', 'update-clients', 'update-servers'].indexOf(from) + 1,
        ) as ('init' | 'update-clients' | 'update-servers')[];
        let state = s0;
        for (const action of steps) state = await rotate({ dir, action });
        const newIssuing = state.cas.find((c) => c.kind === 'issuing' && c.id !== oldIssuing)!.id;
        const duringRotation = await issueCertificate({ dir, role: 'agent', name: 'site-a' });
        expect(duringRotation.issuerCaId).to.equal(from === 'init' ? oldIssuing : newIssuing);

        const rolledBack = await rotate({ dir, action: 'rollback' });
        expect(rolledBack.phase).to.equal('standby');
        expect(rolledBack.bundleVersion).to.equal(state.bundleVersion + 1);
        expect(rolledBack.cas.map((c) => c.id)).to.deep.equal([oldRoot, oldIssuing]);
        expect(signers(rolledBack)).to.deep.equal({ clients: oldIssuing, servers: oldIssuing });
        const bundle = await trustBundle(dir);
        expect(fingerprints(bundle.pem)).to.deep.equal([caCert(dir, oldRoot).fingerprint256]);
        expect(await trustBundlePins(dir)).to.have.length(1);
        if (from === 'init') {
          expect(rolledBack.warnings).to.equal(undefined);
        } else {
          // The operator is told that the new CA's leaves stop being trusted.
          expect(rolledBack.warnings).to.have.length(1);
          expect(rolledBack.warnings![0]).to.match(
            new RegExp(`^1 certificate\\(s\\) signed by the new CA ${newIssuing}`),
          );
        }
        const agent = await issueCertificate({ dir, role: 'agent', name: 'site-a' });
        const broker = await issueCertificate({ dir, role: 'broker', name: 'broker', dns: ['broker.example'] });
        expect([agent.issuerCaId, broker.issuerCaId]).to.deep.equal([oldIssuing, oldIssuing]);
        expect((await opensslVerify(agent, bundle.pem, 'sslclient')).code).to.equal(0);
        expect((await opensslVerify(broker, bundle.pem, 'sslserver')).code).to.equal(0);

        await expectPkiError(rotate({ dir, action: 'rollback' }), /^rotate rollback: no rotation in progress/);
        // And a fresh rotation can start.
        expect((await rotate({ dir, action: 'init' })).phase).to.equal('init');
      });
    }

    it('serialises concurrent phase changes: of two concurrent inits one wins', async () => {
      const dir = await newPki('concurrent-rotate');
      const results = await Promise.allSettled([rotate({ dir, action: 'init' }), rotate({ dir, action: 'init' })]);
      expect(results.filter((r) => r.status === 'fulfilled')).to.have.length(1);
      const failed = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
      expect((failed.reason as Error).message).to.match(/already in progress/);
      expect((await rotationState(dir)).cas).to.have.length(4);
      expect(fs.existsSync(path.join(dir, '.lock'))).to.equal(false);
    });

    it('breaks a lock left behind by a process that died', async () => {
      const dir = await newPki('stale-lock');
      const dead = spawnSync(process.execPath, ['-e', '']);
      fs.writeFileSync(
        path.join(dir, '.lock'),
        JSON.stringify({ pid: dead.pid, host: os.hostname(), since: new Date().toISOString() }),
      );
      expect((await rotate({ dir, action: 'init' })).phase).to.equal('init');
      expect(fs.readdirSync(dir).filter((n) => n.startsWith('.lock'))).to.deep.equal([]);
    });

    it('lists agent states recorded by brokers in status (library and CLI)', async () => {
      const dir = await newPki('status');
      const a = await signCsr({ dir, csrPem: (await createCsr()).csrPem, role: 'agent', name: 'site-a' });
      await recordAgentState({
        dir,
        agentId: 'site-a',
        bundleVersion: 1,
        issuerCaId: a.issuerCaId,
        serialHex: a.serialHex,
        notAfter: a.notAfter,
      });
      await rotate({ dir, action: 'init' });
      const state = await rotate({ dir, action: 'update-clients' });
      const b = await signCsr({ dir, csrPem: (await createCsr()).csrPem, role: 'agent', name: 'site-b' });
      // A broker may report the issuer as the SHA-256 fingerprint of the issuing CA certificate.
      const bIssuerFingerprint = new X509Certificate(splitPem(b.certPem)[1]!).fingerprint256;
      await recordAgentState({
        dir,
        agentId: 'site-b',
        bundleVersion: state.bundleVersion,
        issuerCaId: bIssuerFingerprint,
        serialHex: b.serialHex.toLowerCase(),
        notAfter: b.notAfter,
      });

      const states = await agentStates(dir);
      expect(
        states.map((s) => [s.agentId, s.bundleVersion, s.issuerCaId, s.serialHex, s.notAfter.toISOString()]),
      ).to.deep.equal([
        ['site-a', 1, a.issuerCaId, a.serialHex, a.notAfter.toISOString()],
        ['site-b', 3, b.issuerCaId, b.serialHex, b.notAfter.toISOString()],
      ]);
      expect(states[0]!.updatedAt.getTime()).to.be.closeTo(Date.now(), 10_000);
      await expectPkiError(
        recordAgentState({
          dir,
          agentId: '../x',
          bundleVersion: 1,
          issuerCaId: 'x',
          serialHex: '01',
          notAfter: new Date(),
        }),
        /^agentId: /,
      );

      const text = await cli(['rotate', '--dir', dir, 'status']);
      expect(text.code, text.stderr).to.equal(0);
      expect(text.stdout).to.match(/^phase: update-clients\nbundle version: 3\n/);
      expect(text.stdout).to.match(new RegExp(`site-a +1 +${a.issuerCaId} .* no\\n`));
      expect(text.stdout).to.match(new RegExp(`site-b +3 +${b.issuerCaId} .* yes\\n`));
      expect(text.stdout).to.include('1/2 converged');
      expect(text.stdout).to.include(`old CA ${a.issuerCaId}: 1 certificate(s) still valid`);

      const json = await cli(['rotate', '--dir', dir, 'status', '--json']);
      expect(json.code, json.stderr).to.equal(0);
      const parsed = JSON.parse(json.stdout);
      expect(parsed.phase).to.equal('update-clients');
      expect(parsed.bundleVersion).to.equal(3);
      expect(parsed.cas).to.have.length(4);
      expect(parsed.agents.map((x: { agentId: string }) => x.agentId)).to.deep.equal(['site-a', 'site-b']);
    });

    it('runs the phases from the CLI, with clear refusals', async () => {
      const dir = await newPki('rotate-cli');
      const bad = await cli(['rotate', '--dir', dir, 'update-clients']);
      expect(bad.code).to.equal(2);
      expect(bad.stderr).to.match(
        new RegExp(
          '^burrow-pki: rotate update-clients: not allowed in phase standby; ' +
            String.raw`no rotation is in progress; start one with 'rotate init'\n$`,
        ),
      );
      const init = await cli(['rotate', '--dir', dir, 'init']);
      expect(init.code, init.stderr).to.equal(0);
      expect(init.stdout).to.match(/^rotate init: phase init, bundle version 2, trusted roots root-\w+ \+ root-\w+, /);
      expect(init.stdout.trim().split('\n')).to.have.length(1);
      await issueCertificate({ dir, role: 'broker', name: 'broker', ip: ['127.0.0.1'] });
      for (const action of ['update-clients', 'update-servers'])
        expect((await cli(['rotate', '--dir', dir, action])).code).to.equal(0);
      const refused = await cli(['rotate', '--dir', dir, 'finish']);
      expect(refused.code).to.equal(2);
      expect(refused.stderr.trimEnd().split('\n')).to.have.length(1);
      expect(refused.stderr).to.match(
        new RegExp(
          String.raw`^burrow-pki: rotate finish: 1 certificate\(s\) signed by the old CA ` +
            String.raw`issuing-\w+ are still valid, the last until \d{4}-\d\d-\d\dT[\d:.]+Z \(in 2\d h \d+ min\)`,
        ),
      );
      const forced = await cli(['rotate', '--dir', dir, 'finish', '--force', '--json']);
      expect(forced.code, forced.stderr).to.equal(0);
      expect(JSON.parse(forced.stdout)).to.include({ phase: 'standby', bundleVersion: 5 });
      for (const args of [
        ['rotate', '--dir', dir, 'sideways'],
        ['rotate', '--dir', dir],
        ['rotate', 'init'],
        ['rotate', '--dir', dir, 'init', '--force'],
      ]) {
        const result = await cli(args);
        expect(result.code, args.join(' ')).to.equal(2);
        expect(result.stderr, args.join(' ')).to.match(/^burrow-pki: [^\n]+\n$/);
      }
    });
  });

  describe('revocation', () => {
    const identity = (
      issued: { certPem: string },
      role: string,
      name: string,
    ): { role: string; name: string; serialHex: string; notBeforeMs: number } => {
      const leaf = leafOf(issued);
      return { role, name, serialHex: leaf.serialNumber, notBeforeMs: new Date(leaf.validFrom).getTime() };
    };

    it('starts empty, and revokes one certificate by serial (any case)', async () => {
      const dir = await newPki('revoke-serial');
      const empty = await loadRevocations(dir);
      expect(empty.version).to.equal(0);
      const c1 = await issueCertificate({ dir, role: 'agent', name: 'site-a' });
      const c2 = await issueCertificate({ dir, role: 'agent', name: 'site-a' });
      expect(empty.isCertificateRevoked(identity(c1, 'agent', 'site-a'))).to.equal(false);

      await revoke({ dir, serialHex: c1.serialHex.toLowerCase() });
      const list = await loadRevocations(dir);
      expect(list.version).to.equal(1);
      expect(list.isCertificateRevoked(identity(c1, 'agent', 'site-a'))).to.equal(true);
      expect(
        list.isCertificateRevoked({ ...identity(c1, 'agent', 'site-a'), serialHex: c1.serialHex.toLowerCase() }),
      ).to.equal(true);
      expect(list.isCertificateRevoked(identity(c2, 'agent', 'site-a'))).to.equal(false);
      expect(list.isAgentBanned('site-a')).to.equal(false);
      // ':'-separated input works too, and revoking again changes nothing but the version.
      await revoke({ dir, serialHex: c2.serialHex.match(/../g)!.join(':') });
      expect((await loadRevocations(dir)).isCertificateRevoked(identity(c2, 'agent', 'site-a'))).to.equal(true);
      const stored = JSON.parse(fs.readFileSync(path.join(dir, 'revocations.json'), 'utf8'));
      expect(stored.serials.map((s: { serialHex: string }) => s.serialHex)).to.deep.equal([c1.serialHex, c2.serialHex]);
    });

    it('revokes every certificate of an agent id up to now, but not later ones nor other identities', async () => {
      const dir = await newPki('revoke-agent');
      const before1 = await issueCertificate({ dir, role: 'agent', name: 'site-r' });
      const before2 = await signCsr({ dir, csrPem: (await createCsr()).csrPem, role: 'agent', name: 'site-r' });
      const otherAgent = await issueCertificate({ dir, role: 'agent', name: 'site-s' });
      const sameNameService = await issueCertificate({ dir, role: 'service', name: 'site-r' });

      await revoke({ dir, agentId: 'site-r' });
      const list = await loadRevocations(dir);
      expect(list.isCertificateRevoked(identity(before1, 'agent', 'site-r'))).to.equal(true);
      expect(list.isCertificateRevoked(identity(before2, 'agent', 'site-r'))).to.equal(true);
      expect(list.isCertificateRevoked(identity(otherAgent, 'agent', 'site-s'))).to.equal(false);
      expect(list.isCertificateRevoked(identity(sameNameService, 'service', 'site-r'))).to.equal(false);
      expect(list.agentRevocation('site-r')!.banned).to.equal(false);

      // Issued right after (same second, most likely): not revoked. Re-enrollment works.
      const after = await signCsr({ dir, csrPem: (await createCsr()).csrPem, role: 'agent', name: 'site-r' });
      expect((await loadRevocations(dir)).isCertificateRevoked(identity(after, 'agent', 'site-r'))).to.equal(false);
      expect(new Date(leafOf(after).validFrom).getTime()).to.be.at.most(Date.now() - NOT_BEFORE_BACKDATE_MS + 1_000);
      const { token } = await createJoinToken({ dir, agentId: 'site-r' });
      expect(await consumeJoinToken({ dir, token })).to.deep.equal({ agentId: 'site-r' });

      // The rule by time: issuance time (notBefore + 60 s) at or before the revocation.
      const revokedAtMs = list.agentRevocation('site-r')!.revokedAt.getTime();
      const probe = (notBeforeMs: number): boolean =>
        list.isCertificateRevoked({ role: 'agent', name: 'site-r', serialHex: '01', notBeforeMs });
      expect(probe(revokedAtMs - NOT_BEFORE_BACKDATE_MS)).to.equal(true);
      expect(probe(revokedAtMs - NOT_BEFORE_BACKDATE_MS + 1)).to.equal(false);

      // The serials known at revocation time are listed (for CRLs).
      const stored = JSON.parse(fs.readFileSync(path.join(dir, 'revocations.json'), 'utf8'));
      expect(stored.serials.map((s: { serialHex: string }) => s.serialHex).sort()).to.deep.equal(
        [before1.serialHex, before2.serialHex].sort(),
      );
    });

    it(
      'bans: enrollment, new tokens and issuance are refused, ' + 'and every certificate of the id is revoked',
      async () => {
        const dir = await newPki('ban');
        const old = await issueCertificate({ dir, role: 'agent', name: 'site-x' });
        const { token } = await createJoinToken({ dir, agentId: 'site-x' });
        await revoke({ dir, agentId: 'site-x', ban: true });
        const list = await loadRevocations(dir);
        expect(list.isAgentBanned('site-x')).to.equal(true);
        expect(list.isAgentBanned('site-y')).to.equal(false);
        expect(list.isCertificateRevoked(identity(old, 'agent', 'site-x'))).to.equal(true);
        expect(
          list.isCertificateRevoked({
            role: 'agent',
            name: 'site-x',
            serialHex: '01',
            notBeforeMs: Date.now() + 3_600_000,
          }),
        ).to.equal(true);
        await expectEnrollmentError(consumeJoinToken({ dir, token }), 'banned');
        await expectPkiError(createJoinToken({ dir, agentId: 'site-x' }), /banned/);
        await expectPkiError(
          issueCertificate({ dir, role: 'agent', name: 'site-x' }),
          /^name: agent "site-x" is banned/,
        );
        await expectPkiError(
          signCsr({ dir, csrPem: (await createCsr()).csrPem, role: 'agent', name: 'site-x' }),
          /banned/,
        );
        // A later revocation without --ban does not lift the ban.
        await revoke({ dir, agentId: 'site-x' });
        expect((await loadRevocations(dir)).isAgentBanned('site-x')).to.equal(true);
      },
    );

    it('validates revoke options', async () => {
      const dir = await newPki('revoke-options');
      await expectPkiError(revoke({ dir }), /^revoke: give exactly one of/);
      await expectPkiError(revoke({ dir, agentId: 'a', serialHex: '01' }), /^revoke: give exactly one of/);
      await expectPkiError(revoke({ dir, serialHex: '01', ban: true }), /^ban: only applies to an agent id/);
      await expectPkiError(revoke({ dir, serialHex: 'xyz' }), /^serial: must be a certificate serial number in hex/);
      await expectPkiError(revoke({ dir, agentId: 'Not Valid' }), /^agent-id: /);
      await expectPkiError(revoke({ dir: freshDir('none'), agentId: 'a' }), /not an initialised Burrow PKI/);
    });

    it('is cheap when unchanged: the same list object comes back until the file changes', async () => {
      const dir = await newPki('revoke-cache');
      const a = await loadRevocations(dir);
      expect(await loadRevocations(dir)).to.equal(a); // absent file, cached
      await revoke({ dir, agentId: 'site-a' });
      const b = await loadRevocations(dir);
      expect(b).to.not.equal(a);
      expect(b.version).to.equal(1);
      const c = await loadRevocations(dir);
      expect(c).to.equal(b); // stat unchanged: not re-read
      await revoke({ dir, agentId: 'site-b' });
      const d = await loadRevocations(dir);
      expect(d).to.not.equal(c);
      expect(d.version).to.equal(2);
      expect(d.agentRevocation('site-a')).to.not.equal(undefined);
    });

    it('writes a CRL, signed by the issuing CA, that openssl reads and that lists the revoked serials', async () => {
      const dir = await newPki('crl');
      const revoked = await issueCertificate({ dir, role: 'agent', name: 'site-a' });
      const byAgent = await issueCertificate({ dir, role: 'agent', name: 'site-b' });
      const kept = await issueCertificate({ dir, role: 'agent', name: 'site-c' });
      await revoke({ dir, serialHex: revoked.serialHex });
      await revoke({ dir, agentId: 'site-b' });
      const out = path.join(tempRoot, `crl-${++counter}.pem`);
      const pem = await writeCrl({ dir, outFile: out });
      expect(fs.readFileSync(out, 'utf8')).to.equal(pem);
      expect(pem.match(/-----BEGIN X509 CRL-----/g)).to.have.length(1);
      const text = await run('openssl', ['crl', '-in', out, '-noout', '-text']);
      expect(text.code, text.stderr).to.equal(0);
      expect(text.stdout).to.include(`Serial Number: ${revoked.serialHex}`);
      expect(text.stdout).to.include(`Serial Number: ${byAgent.serialHex}`);
      expect(text.stdout).not.to.include(kept.serialHex);
      expect(text.stdout).to.match(/Issuer: O = burrow\.local, CN = Burrow Issuing CA/);
      expect(text.stdout).to.include('X509v3 CRL Number');
      const issuingFile = path.join(dir, 'ca', `${revoked.issuerCaId}.crt`);
      const verified = await run('openssl', ['crl', '-in', out, '-noout', '-CAfile', issuingFile]);
      expect(verified.stderr).to.match(/verify OK/);

      // During a rotation there is one CRL per issuing CA, each listing what that CA issued.
      await rotate({ dir, action: 'init' });
      await rotate({ dir, action: 'update-clients' });
      const fresh = await issueCertificate({ dir, role: 'agent', name: 'site-d' });
      await revoke({ dir, serialHex: fresh.serialHex });
      const two = await writeCrl({ dir });
      const blocks = two.match(/-----BEGIN X509 CRL-----[\s\S]+?-----END X509 CRL-----\n/g)!;
      expect(blocks).to.have.length(2);
      const [oldText, newText] = await Promise.all(
        blocks.map((b) => run('openssl', ['crl', '-noout', '-text'], { input: b })),
      );
      expect(oldText!.stdout).to.include(revoked.serialHex);
      expect(oldText!.stdout).not.to.include(fresh.serialHex);
      expect(newText!.stdout).to.include(fresh.serialHex);
      expect(newText!.stdout).not.to.include(revoked.serialHex);
    });

    it('revokes and writes CRLs from the CLI', async () => {
      const dir = await newPki('revoke-cli');
      const c = await issueCertificate({ dir, role: 'agent', name: 'site-a' });
      const bySerial = await cli(['revoke', '--dir', dir, '--serial', c.serialHex.toLowerCase()]);
      expect(bySerial.code, bySerial.stderr).to.equal(0);
      expect(bySerial.stdout).to.equal(`revoked serial ${c.serialHex}; 1 serial(s) added; revocation list version 1\n`);
      const byAgent = await cli(['revoke', '--dir', dir, '--agent-id', 'site-b', '--ban']);
      expect(byAgent.code, byAgent.stderr).to.equal(0);
      expect(byAgent.stdout).to.match(
        new RegExp(
          String.raw`^revoked agent site-b: every certificate issued up to now, and enrollment \(banned\); ` +
            String.raw`0 serial\(s\) added; revocation list version 2\n$`,
        ),
      );
      expect((await loadRevocations(dir)).isAgentBanned('site-b')).to.equal(true);
      for (const args of [
        ['revoke', '--dir', dir],
        ['revoke', '--dir', dir, '--agent-id', 'a', '--serial', '01'],
        ['revoke', '--dir', dir, '--serial', '01', '--ban'],
        ['revoke', '--dir', dir, '--serial', 'nothex'],
      ]) {
        const r = await cli(args);
        expect(r.code, args.join(' ')).to.equal(2);
        expect(r.stderr, args.join(' ')).to.match(/^burrow-pki: [^\n]+\n$/);
      }
      const stdoutCrl = await cli(['crl', '--dir', dir]);
      expect(stdoutCrl.code, stdoutCrl.stderr).to.equal(0);
      expect(stdoutCrl.stdout).to.match(/^-----BEGIN X509 CRL-----\n/);
      const out = path.join(tempRoot, `cli-crl-${++counter}.pem`);
      const toFile = await cli(['crl', '--dir', dir, '--out', out]);
      expect(toFile.code, toFile.stderr).to.equal(0);
      expect(toFile.stdout).to.equal(`wrote 1 CRL(s) to ${out}\n`);
      expect((await run('openssl', ['crl', '-in', out, '-noout', '-text'])).stdout).to.include(c.serialHex);
    });
  });

  describe('check', () => {
    it('is ok for a fresh PKI, and reports the CA notAfter values', async () => {
      const dir = await newPki('check-ok');
      const result = await checkPki({ dir });
      expect(result.ok).to.equal(true);
      expect(result.problems).to.deep.equal([]);
      expect(result.cas.map((c) => c.kind)).to.deep.equal(['root', 'issuing']);
      expect(result.cas[0]!.daysLeft).to.be.closeTo(3650, 0.01);
      expect(result.cas[1]!.daysLeft).to.be.closeTo(365, 0.01);
      const state = await rotationState(dir);
      expect(result.cas.map((c) => c.notAfter.getTime())).to.deep.equal(state.cas.map((c) => c.notAfter.getTime()));
    });

    it('names a CA with fewer than 60 days left, and an expired one', async () => {
      const dir = await newPki('check-30d', { issuingTtlMs: 30 * DAY_MS });
      const issuingId = (await rotationState(dir)).cas.find((c) => c.kind === 'issuing')!.id;
      const result = await checkPki({ dir });
      expect(result.ok).to.equal(false);
      expect(result.problems).to.have.length(1);
      expect(result.problems[0]).to.match(
        new RegExp(
          `^issuing CA ${issuingId} expires at \\S+Z, 30 days left \\(warning threshold 60 days\\); rotate it ` +
            `with 'burrow-pki rotate --dir .* init'$`,
        ),
      );
      expect((await checkPki({ dir, warnDays: 20 })).ok).to.equal(true);
      const later = await checkPki({ dir, nowMs: Date.now() + 31 * DAY_MS });
      expect(later.problems[0]).to.match(new RegExp(`^issuing CA ${issuingId} expired at `));
      expect(later.cas[1]!.daysLeft).to.be.lessThan(0);
      // Once a rotation is under way, the advice says to complete it.
      await rotate({ dir, action: 'init' });
      const rotating = await checkPki({ dir });
      expect(rotating.problems).to.have.length(2); // the old issuing CA and the new one (same 30-day lifetime)
      expect(rotating.problems.find((p) => p.includes(issuingId))).to.match(/a rotation replacing it is in phase init/);
    });

    it('exits 0 with a summary, 1 with one line per problem, 2 on bad input', async () => {
      const ok = await cli(['check', '--dir', await newPki('check-cli-ok')]);
      expect(ok.code, ok.stderr).to.equal(0);
      expect(ok.stdout).to.match(
        /^ok: 2 CAs, none expires within 60 days; soonest issuing-\w+ on \S+ \(365 days left\)\n$/,
      );
      const shortDir = await newPki('check-cli-short', { issuingTtlMs: 30 * DAY_MS });
      const warn = await cli(['check', '--dir', shortDir]);
      expect(warn.code).to.equal(1);
      expect(warn.stdout.trimEnd().split('\n')).to.have.length(1);
      expect(warn.stdout).to.match(/^issuing CA issuing-\w+ expires at .*30 days left/);
      expect((await cli(['check'], { BURROW_PKI_DIR: shortDir, BURROW_PKI_WARN_DAYS: '10' })).code).to.equal(0);
      const none = await cli(['check', '--dir', freshDir('check-none')]);
      expect(none.code).to.equal(2);
      expect(none.stderr).to.match(/^burrow-pki: dir: .* is not an initialised Burrow PKI/);
      expect((await cli(['check', '--dir', shortDir, '--warn-days', 'soon'])).code).to.equal(2);
    });
  });

  describe('token CLI', () => {
    it('prints only the token, which enrolls once', async () => {
      const dir = await newPki('token-cli');
      const created = await cli([
        'token',
        'create',
        '--dir',
        dir,
        '--agent-id',
        'site-a',
        '--ttl',
        '10m',
        '--broker',
        'broker.example.com:8443',
        '--broker',
        '10.0.0.2:8443',
        '--server-name',
        'burrow.example.com',
      ]);
      expect(created.code, created.stderr).to.equal(0);
      expect(created.stderr).to.equal('');
      expect(created.stdout).to.match(/^burrow-join-v2\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}\.[0-9a-f]{64}\.[\w-]+\n$/);
      const token = created.stdout.trim();
      expect(parseJoinToken(token)).to.deep.include({
        brokers: ['broker.example.com:8443', '10.0.0.2:8443'],
        serverName: 'burrow.example.com',
      });
      const stored = JSON.parse(
        fs.readFileSync(path.join(dir, 'tokens', `${parseJoinToken(token).tokenId}.json`), 'utf8'),
      );
      expect(Date.parse(stored.expiresAt)).to.be.closeTo(Date.now() + 600_000, 10_000);
      expect(await consumeJoinToken({ dir, token })).to.deep.equal({ agentId: 'site-a' });
      const fromEnv = await cli(['token', 'create'], {
        BURROW_PKI_DIR: dir,
        BURROW_PKI_AGENT_ID: 'site-b',
        BURROW_PKI_BROKER: 'a.example.com:8443,b.example.com:8443',
      });
      expect(fromEnv.code, fromEnv.stderr).to.equal(0);
      expect(parseJoinToken(fromEnv.stdout.trim()).brokers).to.deep.equal(['a.example.com:8443', 'b.example.com:8443']);
      expect(await consumeJoinToken({ dir, token: fromEnv.stdout.trim() })).to.deep.equal({ agentId: 'site-b' });
      for (const args of [
        ['token', 'create', '--dir', dir, '--broker', 'b:1'],
        ['token', 'create', '--dir', dir, '--agent-id', 'a'],
        ['token', 'create', '--dir', dir, '--agent-id', 'a', '--broker', 'no-port'],
        ['token', 'create', '--dir', dir, '--agent-id', 'a', '--broker', 'b:1', '--server-name', 'a b'],
        ['token', 'create', '--dir', dir, '--agent-id', 'Bad Id', '--broker', 'b:1'],
        ['token', 'create', '--dir', dir, '--agent-id', 'a', '--ttl', '0s', '--broker', 'b:1'],
        ['token', '--dir', dir],
      ]) {
        const r = await cli(args);
        expect(r.code, args.join(' ')).to.equal(2);
        expect(r.stdout, args.join(' ')).to.equal('');
        expect(r.stderr, args.join(' ')).to.match(/^burrow-pki: [^\n]+\n$/);
      }
    });
  });
});
