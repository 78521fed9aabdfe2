/**
 * A failed enrollment does not burn its join token, and enrollment is idempotent (issue 16 section 3):
 * local problems are found before the token is presented, and the same token with the same key
 * gets the same certificate again while the token is valid; another key is refused.
 */
import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Client, Metadata, credentials, status as Status, type ServiceError } from '@grpc/grpc-js';
import { expect } from 'chai';
import { enroll, PENDING_KEY_FILE, stateFiles } from '@burrow/agent';
import { Broker, BROKER_DEFAULTS } from '@burrow/broker';
import { createCsr, createJoinToken, initPki, parseJoinToken } from '@burrow/pki';
import { ENROLLMENT_SERVICE, silentLogger, type IssuedAgentCertificate } from '@burrow/tunnel';
import { AGENT_CLI } from './helpers/processes';

const NOBODY = 65534;

describe('enrollment retries (issue 16: a failed enroll does not burn the token)', function () {
  this.timeout(60_000);
  const root = mkdtempSync(path.join(tmpdir(), 'burrow-enroll-retry-'));
  const pkiDir = path.join(root, 'pki');
  let broker: Broker;
  let agentAddress = '';

  before(async () => {
    chmodSync(root, 0o755); // the unprivileged enroll below must reach its state dir's parent
    await initPki({ dir: pkiDir });
    broker = new Broker(
      {
        ...BROKER_DEFAULTS,
        agentListen: '127.0.0.1:0',
        apiListen: '127.0.0.1:0',
        pkiDir,
        brokerId: 'enroll-retry',
        drainTimeoutMs: 1_000,
      },
      silentLogger(),
    );
    agentAddress = `127.0.0.1:${(await broker.start()).agentPort}`;
  });

  after(async () => {
    await broker?.stop();
    rmSync(root, { recursive: true, force: true });
  });

  /** Calls Enrollment/Enroll directly, so the test chooses the key. */
  function enrollRaw(token: string, csrPem: string): Promise<IssuedAgentCertificate> {
    const client = new Client(agentAddress, credentials.createSsl(Buffer.from(broker.credentials!.caPem)), {
      'grpc.ssl_target_name_override': 'localhost',
    });
    return new Promise<IssuedAgentCertificate>((resolve, reject) =>
      client.makeUnaryRequest(
        ENROLLMENT_SERVICE.enroll.path,
        ENROLLMENT_SERVICE.enroll.requestSerialize,
        ENROLLMENT_SERVICE.enroll.responseDeserialize,
        { token, csrPem },
        new Metadata(),
        { deadline: Date.now() + 10_000 },
        (err: ServiceError | null, res?: IssuedAgentCertificate) => (err ? reject(err) : resolve(res!)),
      ),
    ).finally(() => client.close());
  }

  const serialOf = (pem: string): string => new X509Certificate(pem).serialNumber;

  it('a state dir that cannot be created fails before the token is presented; the token still works', async () => {
    const { token } = await createJoinToken({ dir: pkiDir, agentId: 'site-local' });
    const notADir = path.join(root, 'a-file');
    writeFileSync(notADir, 'x');
    const err = await enroll({ broker: agentAddress, token, stateDir: path.join(notADir, 'state') }).then(
      () => undefined,
      (e: Error & { code?: number }) => e,
    );
    expect(err?.code).to.equal(Status.FAILED_PRECONDITION);
    expect(err?.message).to.match(/^state-dir: cannot prepare .*a-file\/state \(.*\); the join token was not used/);
    expect(err?.message).not.to.contain('\n');
    const stateDir = path.join(root, 'state-local');
    const issued = await enroll({ broker: agentAddress, token, stateDir });
    expect(issued.agentId).to.equal('site-local');
    expect(existsSync(stateFiles(stateDir).cert)).to.equal(true);
    expect(existsSync(path.join(stateDir, PENDING_KEY_FILE))).to.equal(false);
  });

  it('enroll into a state dir it may not write (EACCES) prints one line; the token still works', async () => {
    const { token } = await createJoinToken({ dir: pkiDir, agentId: 'site-eacces', brokers: [agentAddress] });
    const parent = path.join(root, 'root-owned');
    mkdirSync(parent, { mode: 0o755 });
    const run = (stateDir: string, uid?: number): Promise<{ code: number; stdout: string; stderr: string }> =>
      new Promise((resolve) => {
        const child = execFile(
          process.execPath,
          [AGENT_CLI, 'enroll', '--token', token, '--state-dir', stateDir],
          { uid, env: { PATH: process.env.PATH ?? '' }, timeout: 20_000 },
          (_err, stdout, stderr) => resolve({ code: child.exitCode ?? -1, stdout, stderr }),
        );
      });
    const denied = await run(path.join(parent, 'state'), NOBODY);
    expect(denied.code).to.equal(1);
    expect(denied.stderr.trimEnd().split('\n')).to.have.length(1);
    expect(denied.stderr).to.match(
      /^burrow-agent: enroll: state-dir: cannot prepare .*EACCES.*join token was not used/,
    );
    const ok = await run(path.join(root, 'state-eacces'));
    expect(ok.stderr).to.equal('');
    expect(ok.code).to.equal(0);
    expect(ok.stdout).to.match(/^enrolled as spiffe:\/\/burrow\.local\/agent\/site-eacces;/);
    // The start line names what the token said: no flag to add by hand.
    expect(ok.stdout).to.contain(`start with: burrow-agent run --broker ${agentAddress} --state-dir `);
  });

  it('the same token with the same key twice gets the same certificate; another key is refused', async () => {
    const { token } = await createJoinToken({ dir: pkiDir, agentId: 'site-same' });
    const { csrPem, keyPem } = await createCsr();
    const first = await enrollRaw(token, csrPem);
    // A new CSR for the same key, as an agent retrying after a failure would send.
    const again = await enrollRaw(token, (await createCsr({ keyPem })).csrPem);
    expect(serialOf(again.certificateChainPem)).to.equal(serialOf(first.certificateChainPem));
    expect(again.certificateChainPem).to.equal(first.certificateChainPem);
    expect(again.spiffeId).to.equal('spiffe://burrow.local/agent/site-same');
    const repeated = (await broker.metrics.enrollments.get()).values.find((v) => v.labels.result === 'repeated');
    expect(repeated?.value).to.equal(1);
    const other = await enrollRaw(token, (await createCsr()).csrPem).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(other?.code).to.equal(Status.PERMISSION_DENIED);
    expect(other?.details).to.match(/already used with another key/);
  });

  it('an enroll retried after the broker answered presents the kept key and gets the same certificate', async () => {
    const { token } = await createJoinToken({ dir: pkiDir, agentId: 'site-kept' });
    const stateDir = path.join(root, 'state-kept');
    mkdirSync(stateDir, { mode: 0o700 });
    // tls.crt as a directory: the broker's answer cannot be written, as on a disk that fills up.
    mkdirSync(stateFiles(stateDir).cert);
    const failed = await enroll({ broker: agentAddress, token, stateDir }).then(
      () => undefined,
      (e: Error) => e,
    );
    expect(failed?.message).to.match(
      /^state-dir: the broker issued the certificate but it cannot be written to .*EISDIR/,
    );
    expect(failed?.message).to.match(/run the same command again with the same token before it expires/);
    expect(existsSync(path.join(stateDir, PENDING_KEY_FILE))).to.equal(true);
    rmSync(stateFiles(stateDir).cert, { recursive: true });
    const issued = await enroll({ broker: agentAddress, token, stateDir });
    expect(issued.agentId).to.equal('site-kept');
    const cert = readFileSync(stateFiles(stateDir).cert, 'utf8');
    expect(
      new X509Certificate(cert).checkPrivateKey(
        (await import('node:crypto')).createPrivateKey(readFileSync(stateFiles(stateDir).key)),
      ),
    ).to.equal(true);
    const again = await enrollRaw(token, (await createCsr()).csrPem).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(again?.code).to.equal(Status.PERMISSION_DENIED);
  });

  it('a self-contained token names the broker and server name; old four-part tokens still parse', async () => {
    const { token } = await createJoinToken({
      dir: pkiDir,
      agentId: 'site-v2',
      brokers: [agentAddress, 'broker-b.example.com:8443'],
      serverName: 'localhost',
    });
    expect(token).to.match(/^burrow-join-v2\./);
    const parsed = parseJoinToken(token);
    expect(parsed.brokers).to.deep.equal([agentAddress, 'broker-b.example.com:8443']);
    expect(parsed.serverName).to.equal('localhost');
    const old = await createJoinToken({ dir: pkiDir, agentId: 'site-v1' });
    expect(old.token).to.match(/^burrow-join-v1\.[0-9a-f]{16}\.[\w-]{43}\.[0-9a-f]{64}$/);
    expect(parseJoinToken(old.token).brokers).to.deep.equal([]);
    const issued = await enroll({ token, stateDir: path.join(root, 'state-v2') });
    expect(issued.broker).to.equal(agentAddress);
    expect(issued.serverName).to.equal('localhost');
    const noBroker = await enroll({ token: old.token, stateDir: path.join(root, 'state-v1') }).then(
      () => undefined,
      (e: Error) => e,
    );
    expect(noBroker?.message).to.match(/^broker: is required: this join token does not name a broker/);
    expect(() => parseJoinToken(`${token.split('.').slice(0, 4).join('.').replace('v2', 'v1')}.x`)).to.throw(
      /four parts/,
    );
  });
});
