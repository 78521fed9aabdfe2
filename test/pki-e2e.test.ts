import { X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import { Agent, AGENT_DEFAULTS, enroll, stateFiles } from '@burrow/agent';
import { Broker, BROKER_DEFAULTS, type BrokerConfig } from '@burrow/broker';
import { createJoinToken, initPki, issueCertificate, revoke, rotate, writeIssued } from '@burrow/pki';
import { createLogger, silentLogger, type Logger } from '@burrow/tunnel';

const testLogger = (component: string): Logger =>
  process.env.BURROW_TEST_LOG
    ? createLogger({ level: process.env.BURROW_TEST_LOG, format: 'text', component })
    : silentLogger();
import { pollUntil } from './helpers/wait';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { expectNoLeaks, snapshotResources, type ResourceSnapshot } from './helpers/leaks';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import type { CertFiles } from './helpers/pki-fixture';

const failure = (p: Promise<unknown>): Promise<ServiceError> =>
  p.then(
    () => {
      throw new Error('call succeeded');
    },
    (e: ServiceError) => e,
  );

/**
 * A broker running on a PKI directory (enrollment, renewal, revocation, rotation), agents enrolled
 * with join tokens into state directories, and a caller with a service certificate.
 */
class PkiWorld {
  root = mkdtempSync(path.join(tmpdir(), 'burrow-pki-e2e-'));
  dir = path.join(this.root, 'pki');
  broker!: Broker;
  agentAddress = '';
  apiAddress = '';
  upstream!: EchoUpstream;
  caller!: RawClient;
  agents: Agent[] = [];
  private baseline: ResourceSnapshot = snapshotResources();

  async start(brokerOverrides: Partial<BrokerConfig> = {}): Promise<this> {
    await initPki({ dir: this.dir });
    this.upstream = await new EchoUpstream().start();
    await this.startBroker(brokerOverrides);
    const svc = await issueCertificate({ dir: this.dir, role: 'service', name: 'caller' });
    await writeIssued(path.join(this.root, 'svc'), svc);
    this.caller = new RawClient(this.apiAddress, mtlsCredentials(this.files('svc')), {
      'grpc.ssl_target_name_override': 'localhost',
    });
    return this;
  }

  async startBroker(overrides: Partial<BrokerConfig> = {}): Promise<void> {
    this.broker = new Broker(
      {
        ...BROKER_DEFAULTS,
        agentListen: '127.0.0.1:0',
        apiListen: '127.0.0.1:0',
        pkiDir: this.dir,
        tlsDns: ['localhost'],
        tlsIp: ['127.0.0.1'],
        brokerId: 'pki-broker',
        agentWaitMs: 3_000,
        drainTimeoutMs: 2_000,
        ...overrides,
      },
      testLogger('broker'),
    );
    const ports = await this.broker.start();
    this.agentAddress = `127.0.0.1:${ports.agentPort}`;
    this.apiAddress = `127.0.0.1:${ports.apiPort}`;
  }

  files(name: string): CertFiles {
    const d = path.join(this.root, name);
    return { cert: path.join(d, 'tls.crt'), key: path.join(d, 'tls.key'), ca: path.join(d, 'ca.crt') };
  }

  async enrollAgent(agentId: string): Promise<string> {
    const { token } = await createJoinToken({ dir: this.dir, agentId });
    const stateDir = path.join(this.root, `state-${agentId}`);
    await enroll({ broker: this.agentAddress, token, stateDir });
    return stateDir;
  }

  async runAgent(stateDir: string): Promise<Agent> {
    const f = stateFiles(stateDir);
    const agent = new Agent(
      {
        ...AGENT_DEFAULTS,
        brokers: [this.agentAddress],
        tlsCertFile: f.cert,
        tlsKeyFile: f.key,
        caFile: f.ca,
        stateDir,
        upstreams: [{ service: '*', address: this.upstream.address }],
        reconnectBaseMs: 50,
        reconnectMaxMs: 300,
        drainTimeoutMs: 2_000,
      },
      testLogger('agent'),
    );
    this.agents.push(agent);
    await agent.start();
    return agent;
  }

  md(agentId: string): Metadata {
    const md = new Metadata();
    md.set('burrow-agent-id', agentId);
    return md;
  }

  async stop(): Promise<void> {
    this.caller?.close();
    for (const a of this.agents) await a.stop();
    await this.broker?.stop();
    await this.upstream?.stop();
    rmSync(this.root, { recursive: true, force: true });
    await expectNoLeaks(this.baseline);
  }
}

describe('PKI lifecycle end to end', () => {
  describe('enrollment', () => {
    let world: PkiWorld;
    before(async () => {
      world = await new PkiWorld().start();
    });
    after(async () => {
      await world?.stop();
    });

    it('one token enrolls an agent that then runs with no other certificate flags', async () => {
      const stateDir = await world.enrollAgent('site-a');
      const f = stateFiles(stateDir);
      expect(statSync(f.key).mode & 0o777).to.equal(0o600);
      const cert = new X509Certificate(readFileSync(f.cert));
      expect(cert.subjectAltName).to.equal('URI:spiffe://burrow.local/agent/site-a');
      await (await world.runAgent(stateDir)).waitConnected();
      const res = await world.caller.unary(ECHO.unary, Buffer.from('enrolled'), world.md('site-a'));
      expect(res.response.toString()).to.equal('enrolled');
    });

    it(
      'a used, unknown, expired or malformed token is ' + 'refused with PERMISSION_DENIED and a clear message',
      async () => {
        const { token } = await createJoinToken({ dir: world.dir, agentId: 'site-b' });
        await enroll({ broker: world.agentAddress, token, stateDir: path.join(world.root, 'b1') });
        const used = await enroll({ broker: world.agentAddress, token, stateDir: path.join(world.root, 'b2') }).then(
          () => undefined,
          (e: Error & { code?: number }) => e,
        );
        expect(used?.code).to.equal(Status.PERMISSION_DENIED);
        expect(used?.message).to.match(/used/);
        const expired = await createJoinToken({ dir: world.dir, agentId: 'site-c', ttlMs: 1 });
        const e2 = await enroll({
          broker: world.agentAddress,
          token: expired.token,
          stateDir: path.join(world.root, 'c1'),
        }).then(
          () => undefined,
          (e: Error & { code?: number }) => e,
        );
        expect(e2?.code).to.equal(Status.PERMISSION_DENIED);
        expect(e2?.message).to.match(/expired/);
        const before = Number(
          (await world.broker.metrics.enrollments.get()).values
            .filter((v) => v.labels.result !== 'ok')
            .reduce((n, v) => n + v.value, 0),
        );
        expect(before).to.be.at.least(2);
      },
    );

    it('N concurrent enrollments with one token: exactly one succeeds', async () => {
      const { token } = await createJoinToken({ dir: world.dir, agentId: 'site-race' });
      const results = await Promise.allSettled(
        Array.from({ length: 8 }, (_, i) =>
          enroll({ broker: world.agentAddress, token, stateDir: path.join(world.root, `race-${i}`) }),
        ),
      );
      expect(results.filter((r) => r.status === 'fulfilled')).to.have.length(1);
      for (const r of results)
        if (r.status === 'rejected') expect((r.reason as { code?: number }).code).to.equal(Status.PERMISSION_DENIED);
    });

    it(
      'a CSR signed with a key it does not hold is refused, ' + 'and the identity comes from the token, not the CSR',
      async () => {
        const { token } = await createJoinToken({ dir: world.dir, agentId: 'site-pop' });
        const x509 = await import('@peculiar/x509');
        const { webcrypto } = await import('node:crypto');
        const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
        const a = await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify']);
        const b = await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify']);
        // Claims key B but is signed with key A: no proof of possession of B.
        const forged = await x509.Pkcs10CertificateRequestGenerator.create({
          name: 'CN=evil',
          keys: { publicKey: b.publicKey, privateKey: a.privateKey },
          signingAlgorithm: alg,
        });
        const client = new (await import('@grpc/grpc-js')).Client(
          world.agentAddress,
          (await import('@grpc/grpc-js')).credentials.createSsl(Buffer.from(world.broker.credentials!.caPem)),
          { 'grpc.ssl_target_name_override': 'localhost' },
        );
        const { ENROLLMENT_SERVICE } = await import('@burrow/tunnel');
        const err = await new Promise<ServiceError | undefined>((resolve) =>
          client.makeUnaryRequest(
            ENROLLMENT_SERVICE.enroll.path,
            ENROLLMENT_SERVICE.enroll.requestSerialize,
            ENROLLMENT_SERVICE.enroll.responseDeserialize,
            { token, csrPem: forged.toString('pem') },
            new Metadata(),
            {},
            (e: ServiceError | null) => resolve(e ?? undefined),
          ),
        );
        client.close();
        expect(err?.code).to.equal(Status.INVALID_ARGUMENT);
        expect(err?.details).to.match(/signature|possession/i);
        // A CSR asking for another identity gets the token's.
        const { token: t2 } = await createJoinToken({ dir: world.dir, agentId: 'site-named' });
        const issued = await enroll({
          broker: world.agentAddress,
          token: t2,
          stateDir: path.join(world.root, 'named'),
        });
        expect(issued.spiffeId).to.equal('spiffe://burrow.local/agent/site-named');
      },
    );

    it('the broker issued its own serving certificate from the PKI directory', () => {
      const cert = new X509Certificate(world.broker.credentials!.certPem);
      expect(cert.subjectAltName).to.include('URI:spiffe://burrow.local/broker/pki-broker,');
      expect(cert.subjectAltName).to.include('IP Address:127.0.0.1');
    });
  });

  describe('renewal and hot reload', () => {
    let world: PkiWorld;
    // Seconds-long leaves: the agent renews about every 2 s, the broker its serving certificate too.
    before(async () => {
      world = await new PkiWorld().start({ leafTtlMs: 3_000 });
    });
    after(async () => {
      await world?.stop();
    });

    it('a bidi stream carrying traffic survives at least 3 renewals on each side', async function () {
      this.timeout(30_000);
      const stateDir = await world.enrollAgent('site-r');
      const agent = await world.runAgent(stateDir);
      await agent.waitConnected();
      const renewals = async (): Promise<number> =>
        (await agent.metrics.renewals.get()).values.find((v) => v.labels.result === 'ok')?.value ?? 0;
      const servingIssued = async (): Promise<number> =>
        (await world.broker.metrics.servingCertificatesIssued.get()).values[0]?.value ?? 0;
      const servingAtStart = await servingIssued();
      const call = world.caller.bidi(ECHO.bidi, world.md('site-r'));
      let echoed = 0;
      call.on('data', () => {
        echoed++;
      });
      let failed: Error | undefined;
      call.on('error', (e: Error) => {
        failed = e;
      });
      const firstSerial = new X509Certificate(agent.certificatePem).serialNumber;
      const pump = setInterval(() => call.write(Buffer.from(`m${echoed}`)), 50);
      try {
        await pollUntil('condition', () => failed !== undefined || echoed > 0, 5_000);
        for (;;) {
          if (failed) throw failed;
          if ((await renewals()) >= 3 && (await servingIssued()) - servingAtStart >= 3) break;
          await new Promise((r) => setTimeout(r, 100));
        }
      } finally {
        clearInterval(pump);
      }
      // One more message after the last renewals still comes back on the same stream.
      const before = echoed;
      call.write(Buffer.from('last'));
      await pollUntil('condition', () => echoed > before || failed !== undefined);
      expect(failed).to.equal(undefined);
      expect(new X509Certificate(agent.certificatePem).serialNumber).to.not.equal(firstSerial);
      call.end();
      await new Promise<void>((resolve) => call.on('status', () => resolve()));
      // New calls (new connections too) work with the renewed certificates.
      const res = await world.caller.unary(ECHO.unary, Buffer.from('after renewals'), world.md('site-r'));
      expect(res.response.toString()).to.equal('after renewals');
    });
  });

  describe('revocation', () => {
    let world: PkiWorld;
    before(async () => {
      world = await new PkiWorld().start();
    });
    after(async () => {
      await world?.stop();
    });

    it('revoking an agent closes its tunnels within 1 s and every path back in is refused', async () => {
      const stateDir = await world.enrollAgent('site-x');
      const agent = await world.runAgent(stateDir);
      await agent.waitConnected();
      expect(world.broker.registry.sessionsOf('site-x')).to.have.length(1);
      const t0 = Date.now();
      await revoke({ dir: world.dir, agentId: 'site-x', ban: true });
      await pollUntil('condition', () => world.broker.registry.sessionsOf('site-x').length === 0, 1_500);
      expect(Date.now() - t0).to.be.lessThan(1_500);
      // Reconnecting (the agent keeps trying) gets no session; renewal is refused.
      const failedConnects = async (): Promise<number> =>
        (await agent.metrics.connects.get()).values.find((v) => v.labels.result === 'failed')?.value ?? 0;
      const before = await failedConnects();
      for (let i = 0; i < 200 && (await failedConnects()) < before + 2; i++)
        await new Promise((r) => setTimeout(r, 10));
      expect(await failedConnects()).to.be.at.least(before + 2);
      expect(world.broker.registry.sessionsOf('site-x')).to.have.length(0);
      await agent.renewNow();
      expect(
        (await agent.metrics.renewals.get()).values.find((v) => v.labels.result === 'failed')?.value ?? 0,
      ).to.be.greaterThan(0);
      // A banned id cannot enroll again, even with a fresh token.
      const { token } = await createJoinToken({ dir: world.dir, agentId: 'site-x' }).catch(() => ({ token: '' }));
      if (token) {
        const e = await enroll({ broker: world.agentAddress, token, stateDir: path.join(world.root, 'x2') }).then(
          () => undefined,
          (x: Error & { code?: number }) => x,
        );
        expect(e?.code).to.equal(Status.PERMISSION_DENIED);
        expect(e?.message).to.match(/banned/);
      }
      // Calls for it fail as for an agent that is not connected.
      const callErr = await failure(
        world.caller.unary(ECHO.unary, Buffer.from('x'), world.md('site-x'), { deadline: Date.now() + 500 }),
      );
      expect([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED]).to.include(callErr.code);
    });
  });

  describe('CA rotation', () => {
    let world: PkiWorld;
    before(async () => {
      world = await new PkiWorld().start({ leafTtlMs: 4_000 });
    });
    after(async () => {
      await world?.stop();
    });

    it(
      'a full rotation with live tunnels fails no call; ' + 'an agent offline through it recovers by re-enrolling',
      async function () {
        this.timeout(60_000);
        const live = await world.runAgent(await world.enrollAgent('site-live'));
        const offlineDir = await world.enrollAgent('site-offline');
        await live.waitConnected();
        let ok = 0;
        const errors: string[] = [];
        let running = true;
        const loop = (async () => {
          while (running) {
            await world.caller
              .unary(ECHO.unary, Buffer.from('r'), world.md('site-live'), { deadline: Date.now() + 5_000 })
              .then(
                () => {
                  ok++;
                },
                (e: ServiceError) => {
                  errors.push(`${e.code} ${e.details}`);
                },
              );
          }
        })();
        const progress = async (): Promise<void> => {
          const before = ok;
          await pollUntil('condition', () => ok > before + 5 || !running, 10_000);
        };
        const broker = world.broker;
        try {
          for (const action of ['init', 'update-clients', 'update-servers'] as const) {
            const state = await rotate({ dir: world.dir, action });
            await pollUntil('condition', () => broker.trustBundleVersion === state.bundleVersion, 3_000);
            await live.renewNow();
            if (action === 'update-clients') {
              // Callers move to the new CA too; the old caller connection finishes its calls.
              const svc = await issueCertificate({ dir: world.dir, role: 'service', name: 'caller' });
              await writeIssued(path.join(world.root, 'svc2'), svc);
              const old = world.caller;
              world.caller = new RawClient(world.apiAddress, mtlsCredentials(world.files('svc2')), {
                'grpc.ssl_target_name_override': 'localhost',
              });
              await progress();
              old.close();
            }
            await progress();
          }
          // Every certificate the old CA issued to agents and brokers lives at most leafTtl (4 s);
          // the first caller certificate (24 h) was replaced above and is no longer used, which is
          // what --force asserts.
          await new Promise((r) => setTimeout(r, 4_500));
          await rotate({ dir: world.dir, action: 'finish', force: true });
          await progress();
          // A new connection now needs the new CA end to end.
          await live.renewNow();
          await progress();
        } finally {
          running = false;
          await loop;
        }
        expect(errors).to.deep.equal([]);
        expect(ok).to.be.greaterThan(20);

        // The agent that slept through it: its certificate is from the old CA, no longer trusted.
        const offline = await world.runAgent(offlineDir);
        const notConnected = await offline.waitConnected(1_500).then(
          () => false,
          () => true,
        );
        expect(notConnected, 'an agent with a certificate from the retired CA connected').to.equal(true);
        const { token } = await createJoinToken({ dir: world.dir, agentId: 'site-offline' });
        await enroll({ broker: world.agentAddress, token, stateDir: offlineDir });
        await offline.waitConnected(5_000);
        const res = await world.caller.unary(ECHO.unary, Buffer.from('back'), world.md('site-offline'));
        expect(res.response.toString()).to.equal('back');
      },
    );
  });
});
