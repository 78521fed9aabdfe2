import { X509Certificate } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { expect } from 'chai';
import {
  Metadata,
  status as Status,
  type ClientDuplexStream,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import { Broker, BROKER_DEFAULTS } from '@burrow/broker';
import { initPki, issueCertificate, writeIssued } from '@burrow/pki';
import { silentLogger } from '@burrow/tunnel';
import { ClusterWorld } from './helpers/cluster';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { expectNoLeaks, snapshotResources } from './helpers/leaks';
import { makeTempDir } from './helpers/pki-fixture';
import { PKI_CLI, runCli } from './helpers/processes';
import { httpsJson } from './helpers/https-json';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { EnvoyAuthzClient, envoyCheckRequest } from './helpers/envoy-client';
import { pollUntil } from './helpers/wait';
import type { CertFiles } from './helpers/pki-fixture';

const statusOf = (call: ClientDuplexStream<Buffer, Buffer>): Promise<StatusObject> =>
  new Promise((resolve) => {
    call.on('error', () => {});
    call.on('status', resolve);
  });
/** `promise`'s value, or undefined when it takes longer than `ms` (the old code never cut). */
const within = async <T>(promise: Promise<T>, ms: number): Promise<T | undefined> => {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
};
/** Sends one message on `call` and waits for its echo: the stream is carried end to end. */
const roundTrip = (call: ClientDuplexStream<Buffer, Buffer>, text: string): Promise<void> =>
  new Promise((resolve) => {
    call.once('data', (m: Buffer) => {
      expect(m.toString()).to.equal(text);
      resolve();
    });
    call.write(Buffer.from(text));
  });

/**
 * Issue 13, item 4: a caller's certificate revoked or expired mid-call ends its calls in flight
 * (TLS checked it only at the handshake), within the revocation poll, like an agent's tunnel.
 */
describe('credentials cut mid-call: service certificates', function () {
  this.timeout(30_000);

  const root = makeTempDir('burrow-credential-cut-');
  const dir = path.join(root, 'pki');
  let broker: Broker;
  let agent: Agent;
  let upstream: EchoUpstream;
  let apiAddress = '';
  let authzenAddress = '';
  let extAuthzAddress = '';
  const baseline = snapshotResources();
  const files = (name: string): CertFiles => ({
    cert: path.join(root, name, 'tls.crt'),
    key: path.join(root, name, 'tls.key'),
    ca: path.join(root, name, 'ca.crt'),
  });
  const callerOf = (name: string): RawClient =>
    new RawClient(apiAddress, mtlsCredentials(files(name)), {
      'grpc.ssl_target_name_override': 'localhost',
    });
  const md = (): Metadata => {
    const m = new Metadata();
    m.set('burrow-agent-id', 'site-cut');
    return m;
  };
  before(async () => {
    await initPki({ dir });
    upstream = await new EchoUpstream().start();
    broker = new Broker(
      {
        ...BROKER_DEFAULTS,
        agentListen: '127.0.0.1:0',
        apiListen: '127.0.0.1:0',
        pkiDir: dir,
        tlsDns: ['localhost'],
        tlsIp: ['127.0.0.1'],
        brokerId: 'cut-broker',
        drainTimeoutMs: 2_000,
        authzenListen: '127.0.0.1:0',
        extAuthzListen: '127.0.0.1:0',
      },
      silentLogger(),
    );
    const ports = await broker.start();
    apiAddress = `127.0.0.1:${ports.apiPort}`;
    authzenAddress = `127.0.0.1:${ports.authzenPort}`;
    extAuthzAddress = `127.0.0.1:${ports.extAuthzPort}`;
    await writeIssued(path.join(root, 'agent'), await issueCertificate({ dir, role: 'agent', name: 'site-cut' }));
    const f = files('agent');
    agent = new Agent(
      {
        ...AGENT_DEFAULTS,
        brokers: [`127.0.0.1:${ports.agentPort}`],
        brokerServerName: 'localhost',
        tlsCertFile: f.cert,
        tlsKeyFile: f.key,
        caFile: f.ca,
        upstreams: [{ service: '*', address: upstream.address }],
        reconnectBaseMs: 50,
        reconnectMaxMs: 300,
        drainTimeoutMs: 1_000,
      },
      silentLogger(),
    );
    await agent.start();
    await agent.waitConnected();
  });

  after(async () => {
    await agent?.stop();
    await broker?.stop();
    await upstream?.stop();
    rmSync(root, { recursive: true, force: true });
    await expectNoLeaks(baseline);
  });

  it(
    'burrow-pki revoke --serial ends a bidi stream in flight with PERMISSION_DENIED within 1.5 s; ' +
      'a new call is refused',
    async () => {
      const svc = await issueCertificate({ dir, role: 'service', name: 'streamer' });
      await writeIssued(path.join(root, 'svc'), svc);
      const caller = callerOf('svc');
      try {
        const call = caller.bidi(ECHO.bidi, md());
        const ended = statusOf(call);
        await roundTrip(call, 'before');
        const revoked = await runCli(PKI_CLI, ['revoke', '--dir', dir, '--serial', svc.serialHex]);
        expect(revoked.exit.code, revoked.stderrLines.join('\n')).to.equal(0);
        const revokedAtMs = Date.now();
        // Still carried until the broker applies the revocation: the stream was alive after the revoke.
        const status = await within(ended, 5_000);
        const tookMs = Date.now() - revokedAtMs;
        if (!status) call.cancel();
        expect(status, 'the stream was still open 5 s after the revocation').to.not.equal(undefined);
        if (!status) return;
        const how = `${Status[status.code]} "${status.details}"`;
        console.log(`      (stream ended ${tookMs} ms after burrow-pki revoke exited: ${how})`);
        expect(status.code).to.equal(Status.PERMISSION_DENIED);
        const named = /^certificate spiffe:\/\/[^ ]+\/service\/streamer \(serial [0-9a-f]+\) was revoked$/;
        expect(status.details).to.match(named);
        expect(tookMs).to.be.below(1_500);
        const refused = await caller.unary(ECHO.unary, Buffer.from('after'), md()).then(
          () => undefined,
          (e: ServiceError) => e,
        );
        expect(refused?.code).to.equal(Status.PERMISSION_DENIED);
        expect(refused?.details).to.match(/revoked/);
      } finally {
        caller.close();
      }
    },
  );

  it(
    'revoking a service certificate closes its AuthZEN connections within 1.5 s; ' + 'its next request gets 403',
    async () => {
      const svc = await issueCertificate({ dir, role: 'service', name: 'gateway' });
      await writeIssued(path.join(root, 'gateway'), svc);
      const f = files('gateway');
      const socket = tls.connect({
        host: '127.0.0.1',
        port: Number(authzenAddress.split(':')[1]),
        servername: 'localhost',
        ca: readFileSync(f.ca),
        cert: readFileSync(f.cert),
        key: readFileSync(f.key),
      });
      socket.on('error', () => {});
      const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
      try {
        await new Promise<void>((resolve, reject) => {
          socket.once('secureConnect', resolve);
          socket.once('error', reject);
        });
        const revoked = await runCli(PKI_CLI, ['revoke', '--dir', dir, '--serial', svc.serialHex]);
        expect(revoked.exit.code, revoked.stderrLines.join('\n')).to.equal(0);
        const revokedAtMs = Date.now();
        const gone = await within(
          closed.then(() => true),
          5_000,
        );
        const tookMs = Date.now() - revokedAtMs;
        console.log(`      (AuthZEN connection closed ${gone ? `${tookMs} ms after the revoke` : 'never (5 s)'})`);
        expect(gone, 'the AuthZEN connection was still open 5 s after the revocation').to.equal(true);
        expect(tookMs).to.be.below(1_500);
        const res = await httpsJson(authzenAddress, 'POST', '/agents/site-cut/access/v1/evaluation', {
          cert: f,
          ca: f.ca,
          body: { subject: { type: 'user', id: 'u' }, action: { name: 'read' }, resource: { type: 'doc', id: 'd' } },
        });
        expect(res.status).to.equal(403);
        expect(JSON.stringify(res.body)).to.match(/revoked/);
      } finally {
        socket.destroy();
      }
    },
  );

  it("revoking Envoy's service certificate refuses its next ext_authz check within 1.5 s", async () => {
    const svc = await issueCertificate({ dir, role: 'service', name: 'envoy-cut' });
    await writeIssued(path.join(root, 'envoy'), svc);
    const envoy = new EnvoyAuthzClient(extAuthzAddress, files('envoy'));
    const check = (): Promise<ServiceError | undefined> =>
      envoy.check(envoyCheckRequest({ agent: 'site-cut', path: '/x' })).then(
        () => undefined,
        (e: ServiceError) => e,
      );
    try {
      // Admitted and carried: this agent has no gateway mapping, so the site itself refuses.
      expect((await check())?.code).to.equal(Status.FAILED_PRECONDITION);
      const revoked = await runCli(PKI_CLI, ['revoke', '--dir', dir, '--serial', svc.serialHex]);
      expect(revoked.exit.code, revoked.stderrLines.join('\n')).to.equal(0);
      const revokedAtMs = Date.now();
      // The broker applies the revocation list when it next reads it: no event reaches the test.
      const refused = await pollUntil('a refused check', async () => {
        const err = await check();
        return err?.code === Status.PERMISSION_DENIED ? err : undefined;
      });
      const tookMs = Date.now() - revokedAtMs;
      console.log(`      (ext_authz check refused ${tookMs} ms after the revoke: "${refused.details}")`);
      expect(refused.details).to.match(/service\/envoy-cut .*revoked/);
      expect(tookMs).to.be.below(1_500);
    } finally {
      envoy.close();
    }
  });

  it('a stream whose service certificate expires mid-call ends with UNAUTHENTICATED at the expiry', async () => {
    const svc = await issueCertificate({ dir, role: 'service', name: 'short-lived', ttlMs: 4_000 });
    await writeIssued(path.join(root, 'short'), svc);
    const caller = callerOf('short');
    try {
      const call = caller.bidi(ECHO.bidi, md());
      const ended = statusOf(call);
      await roundTrip(call, 'before expiry');
      const status = await within(ended, 8_000);
      if (!status) call.cancel();
      expect(status, 'the stream was still open 4 s after the certificate expired').to.not.equal(undefined);
      if (!status) return;
      const lateMs = Date.now() - svc.notAfter.getTime();
      const how = `${Status[status.code]} "${status.details}"`;
      console.log(`      (stream ended ${lateMs} ms after the certificate's notAfter: ${how})`);
      expect(status.code).to.equal(Status.UNAUTHENTICATED);
      expect(status.details).to.match(/service\/short-lived .* expired at/);
      // The broker checks expiries every second; X.509 times have whole seconds.
      expect(lateMs).to.be.below(2_500);
    } finally {
      caller.close();
    }
  });
});

describe('credentials cut mid-call: peer broker certificates', function () {
  this.timeout(60_000);

  let world: ClusterWorld;
  after(async () => {
    await world?.close();
  });

  it(
    "revoking the forwarding broker's certificate ends the calls it carries to the broker holding the agent " +
      'within 1.5 s',
    async () => {
      world = await ClusterWorld.create(['a', 'b']);
      // Both brokers read the PKI directory, so both apply revocations (the owner is the one that cuts).
      for (const name of ['a', 'b']) await world.startBroker(name, ['--pki-dir', world.pki.pkiDir]);
      await world.startAgent('site-peer', ['b']);
      await world.waitListed('b', 'site-peer');
      const m = new Metadata();
      m.set('burrow-agent-id', 'site-peer');
      const call = world.client('a').bidi(ECHO.bidi, m);
      const ended = statusOf(call);
      await roundTrip(call, 'through a to b');
      const serial = new X509Certificate(readFileSync(world.brokerCert.cert)).serialNumber;
      const revoked = await runCli(PKI_CLI, ['revoke', '--dir', world.pki.pkiDir, '--serial', serial]);
      expect(revoked.exit.code, revoked.stderrLines.join('\n')).to.equal(0);
      const revokedAtMs = Date.now();
      const status = await within(ended, 5_000);
      const tookMs = Date.now() - revokedAtMs;
      if (!status) call.cancel();
      const how = status ? `${Status[status.code]} "${status.details}"` : 'still open';
      console.log(`      (forwarded stream ended ${tookMs} ms after the broker certificate was revoked: ${how})`);
      expect(status, 'the forwarded stream was still open 5 s after the revocation').to.not.equal(undefined);
      expect(status!.code).to.not.equal(Status.OK);
      expect(status!.details).to.match(/broker.*was revoked/);
      expect(tookMs).to.be.below(1_500);
      const cut = await world.metrics('b');
      expect(cut.get('burrow_broker_calls_cut_total{listener="peer",reason="revoked"}')).to.equal(1);
    },
  );
});
