import { expect } from 'chai';
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as tls from 'node:tls';
import { Client, Metadata, credentials, status as Status, type ServiceError, type StatusObject } from '@grpc/grpc-js';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import type { Broker } from '@burrow/broker';
import { silentLogger } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { getJson, type AgentListing } from './helpers/processes';
import { pollUntil } from './helpers/wait';
import { RawClient, mtlsCredentials, startRawServer } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';
import { RawAgent } from './helpers/raw-agent';

const identity = (b: Buffer): Buffer => b;

/** The status of a unary call that is expected to fail. */
async function failure(client: RawClient, method: string, md: Metadata, deadlineMs = 5_000): Promise<ServiceError> {
  try {
    const res = await client.unary(method, Buffer.from('x'), md, { deadline: Date.now() + deadlineMs });
    throw new Error(`call unexpectedly succeeded: ${res.response.toString()}`);
  } catch (err) {
    if (typeof (err as ServiceError).code !== 'number') throw err;
    return err as ServiceError;
  }
}

/** Value of broker_rejected_handshakes_total{listener, reason}. */
async function rejected(broker: Broker, listener: string, reason: string): Promise<number> {
  const m = await broker.metrics.rejectedHandshakes.get();
  return m.values.find((v) => v.labels.listener === listener && v.labels.reason === reason)?.value ?? 0;
}

/** Opens a raw tunnel stream on the agent listener and resolves with its final status. */
function rawTunnelStream(
  address: string,
  files: CertFiles,
  method: string,
  md = new Metadata(),
): Promise<StatusObject> {
  const client = new Client(address, mtlsCredentials(files));
  return new Promise((resolve) => {
    const call = client.makeBidiStreamRequest(method, identity, identity, md, { deadline: Date.now() + 5_000 });
    call.on('data', () => {});
    call.on('error', () => {});
    call.on('status', (s) => {
      client.close();
      resolve(s);
    });
  });
}

/**
 * Connects with node:tls as a gRPC client would (ALPN h2): 'accepted' when the server starts
 * HTTP/2 (it sends SETTINGS first), 'refused' when it closes the connection instead. Node's TLS
 * server checks the client certificate after the handshake and destroys the socket without an
 * alert, so the client cannot learn why; tests pair this with a control certificate that differs
 * only in the property under test.
 */
function tlsVerdict(port: number, trust: string, files: CertFiles): Promise<string> {
  return new Promise((resolve) => {
    const socket = tls.connect({
      host: '127.0.0.1',
      servername: 'localhost',
      port,
      ca: readFileSync(trust),
      key: readFileSync(files.key),
      cert: readFileSync(files.cert),
      ALPNProtocols: ['h2'],
    });
    let verdict: string | undefined;
    const done = (v: string): void => {
      verdict ??= v;
      socket.destroy();
    };
    socket.once('data', () => done('accepted'));
    socket.once('error', (err: NodeJS.ErrnoException) => done(err.code ?? err.message));
    socket.once('end', () => done('refused'));
    socket.once('close', () => resolve(verdict ?? 'refused'));
  });
}

/** Starts an extra agent on `stack`'s broker with `cert`, answering calls with `upstream`. */
async function extraAgent(stack: Stack, cert: CertFiles, upstream: string): Promise<Agent> {
  const agent = new Agent(
    {
      ...AGENT_DEFAULTS,
      brokers: [stack.agentAddress],
      tlsCertFile: cert.cert,
      tlsKeyFile: cert.key,
      caFile: cert.ca,
      upstreams: [{ service: '*', address: upstream }],
      reconnectBaseMs: 50,
      reconnectMaxMs: 500,
      drainTimeoutMs: 5_000,
    },
    silentLogger(),
  );
  await agent.start();
  await agent.waitConnected();
  return agent;
}

describe('identity', function () {
  this.timeout(20_000);

  describe('who may call the API and open tunnels', () => {
    let stack: Stack;
    let otherPki: PkiFixture;
    const clients: RawClient[] = [];
    const client = (creds: ReturnType<typeof credentials.createSsl>): RawClient => {
      const c = new RawClient(stack.apiAddress, creds);
      clients.push(c);
      return c;
    };

    before(async () => {
      stack = await Stack.start();
      otherPki = await PkiFixture.create();
    });
    afterEach(() => {
      for (const c of clients.splice(0)) c.close();
    });
    after(async () => {
      await stack?.stop();
      otherPki?.cleanup();
    });

    it('a service certificate may call (control for the refusals below)', async () => {
      const res = await stack.caller.unary(ECHO.unary, Buffer.from('ok'), stack.md());
      expect(res.response.toString()).to.equal('ok');
    });

    it('a caller with an AGENT certificate gets PERMISSION_DENIED', async () => {
      const before = await rejected(stack.broker, 'api', 'wrong_role');
      const seen = stack.siteUpstream.calls.length;
      const err = await failure(client(mtlsCredentials(stack.agentCert)), ECHO.unary, stack.md());
      expect(err.code, err.details).to.equal(Status.PERMISSION_DENIED);
      expect(err.details).to.match(/role "agent"/);
      expect(await rejected(stack.broker, 'api', 'wrong_role')).to.equal(before + 1);
      expect(stack.siteUpstream.calls.length, 'upstream saw no call').to.equal(seen);
    });

    it('a caller with a BROKER certificate gets PERMISSION_DENIED', async () => {
      const seen = stack.siteUpstream.calls.length;
      const err = await failure(client(mtlsCredentials(stack.brokerCert)), ECHO.unary, stack.md());
      expect(err.code, err.details).to.equal(Status.PERMISSION_DENIED);
      expect(err.details).to.match(/role "broker"/);
      expect(stack.siteUpstream.calls.length, 'upstream saw no call').to.equal(seen);
    });

    it('a caller certificate from another PKI is refused in the TLS handshake (UNAVAILABLE) and counted', async () => {
      const foreign = await otherPki.issue('service', 'platform-svc');
      const before = await rejected(stack.broker, 'api', 'tls');
      // Trusts our broker (our CA), presents a certificate our broker does not trust.
      const creds = credentials.createSsl(
        readFileSync(stack.serviceCert.ca),
        readFileSync(foreign.key),
        readFileSync(foreign.cert),
      );
      const err = await failure(client(creds), ECHO.unary, stack.md());
      expect(err.code, err.details).to.equal(Status.UNAVAILABLE);
      // ...in the TLS handshake, and only because of the issuer: the same name from our PKI is accepted.
      const port = Number(stack.apiAddress.split(':')[1]);
      expect(await tlsVerdict(port, stack.serviceCert.ca, foreign)).to.equal('refused');
      expect(
        await tlsVerdict(port, stack.serviceCert.ca, stack.serviceCert),
        'control: our own platform-svc certificate',
      ).to.equal('accepted');
      await pollUntil(
        'rejected_handshakes_total{listener="api",reason="tls"} to increase',
        async () => (await rejected(stack.broker, 'api', 'tls')) > before,
      );
    });

    it('an expired service certificate is refused', async () => {
      const expired = await stack.pki.issue('service', 'expired-svc', { ttlMs: 1 });
      const notAfter = Date.parse(new X509Certificate(readFileSync(expired.cert)).validTo);
      // notAfter has whole seconds and is at most 1 ms ahead of issuing time; never call it "now".
      if (Date.now() <= notAfter) await new Promise((resolve) => setTimeout(resolve, notAfter - Date.now() + 1));
      expect(notAfter).to.be.below(Date.now());
      const before = await rejected(stack.broker, 'api', 'tls');
      const err = await failure(client(mtlsCredentials(expired)), ECHO.unary, stack.md());
      expect(err.code, err.details).to.equal(Status.UNAVAILABLE);
      // Refused in the handshake, and only because of its lifetime: the same name with the default lifetime is
      // accepted.
      const port = Number(stack.apiAddress.split(':')[1]);
      expect(await tlsVerdict(port, expired.ca, expired)).to.equal('refused');
      expect(
        await tlsVerdict(port, expired.ca, await stack.pki.issue('service', 'expired-svc')),
        'control: same name, default lifetime',
      ).to.equal('accepted');
      await pollUntil(
        'rejected_handshakes_total{listener="api",reason="tls"} to increase',
        async () => (await rejected(stack.broker, 'api', 'tls')) > before,
      );
    });

    it('a tunnel opened with a SERVICE certificate is refused with PERMISSION_DENIED', async () => {
      const before = await rejected(stack.broker, 'agent', 'wrong_role');
      const agent = await RawAgent.connect(stack.agentAddress, stack.serviceCert);
      try {
        const control = await agent.control();
        control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw' } });
        const refused = await control.refused();
        expect(refused.code, refused.message).to.equal(Status.PERMISSION_DENIED);
        await agent.closed;
      } finally {
        agent.close();
      }
      expect(await rejected(stack.broker, 'agent', 'wrong_role')).to.equal(before + 1);
      const agents = await getJson<AgentListing[]>(`${stack.adminUrl}/agents`);
      expect(agents.map((a) => a.id)).to.deep.equal(['site-a']);
    });

    it('a site call (agent -> platform) with a SERVICE certificate is refused with PERMISSION_DENIED', async () => {
      // The agent listener's ordinary gRPC side takes the agent's platform calls: a service
      // certificate may not pose as an agent there either.
      const before = await rejected(stack.broker, 'agent', 'wrong_role');
      const s = await rawTunnelStream(stack.agentAddress, stack.serviceCert, ECHO.unary);
      expect(s.code, s.details).to.equal(Status.PERMISSION_DENIED);
      // Worded for the likely cause, a caller on the wrong port; still counted as a wrong role.
      expect(s.details).to.match(
        /^this is the broker's agent listener \(agents connect here\); call the caller API on port \d+$/,
      );
      expect(await rejected(stack.broker, 'agent', 'wrong_role')).to.equal(before + 1);
      // The real agent's session is untouched.
      const res = await stack.caller.unary(ECHO.unary, Buffer.from('still'), stack.md());
      expect(res.response.toString()).to.equal('still');
    });
  });

  describe('the agent id comes from the certificate', () => {
    let stack: Stack;
    const extra: Agent[] = [];
    const stops: (() => Promise<void>)[] = [];

    // A short agent wait keeps the "not connected" case quick.
    beforeEach(async () => {
      stack = await Stack.start({ broker: { agentWaitMs: 300 } });
    });
    afterEach(async () => {
      for (const a of extra.splice(0)) await a.stop();
      for (const s of stops.splice(0)) await s();
      await stack?.stop();
    });

    const listing = (): Promise<AgentListing[]> => getJson<AgentListing[]>(`${stack.adminUrl}/agents`);

    it('agents for site-a and site-b each get their own calls', async () => {
      // site-b's upstream marks its answers so we know who answered.
      const siteB = await startRawServer({
        [ECHO.unary]: (call) =>
          call.on('data', (m: Buffer) => {
            call.write(Buffer.concat([Buffer.from('site-b:'), m]));
            call.end();
          }),
      });
      stops.push(siteB.stop);
      extra.push(await extraAgent(stack, await stack.pki.issue('agent', 'site-b'), siteB.address));
      expect((await listing()).map((a) => a.id).sort()).to.deep.equal(['site-a', 'site-b']);

      const seenA = stack.siteUpstream.calls.length;
      const b = await stack.caller.unary(ECHO.unary, Buffer.from('hi'), stack.md({}, 'site-b'));
      expect(b.response.toString()).to.equal('site-b:hi');
      expect(stack.siteUpstream.calls.length, 'site-a upstream saw nothing of the site-b call').to.equal(seenA);
      const a = await stack.caller.unary(ECHO.unary, Buffer.from('hi'), stack.md({}, 'site-a'));
      expect(a.response.toString()).to.equal('hi');
      expect(stack.siteUpstream.calls.length).to.equal(seenA + 1);
    });

    it('a call naming an agent that is not connected is not routed to another agent', async () => {
      const err = await failure(stack.caller, ECHO.unary, stack.md({}, 'site-c'));
      expect(err.code, err.details).to.equal(Status.UNAVAILABLE);
      expect(err.details).to.match(/site-c/);
    });

    it(
      'a second connection with the same certificate adds up ' +
        '(connections: 2); stopping it leaves the first serving',
      async () => {
        const second = await extraAgent(stack, stack.agentCert, stack.siteUpstream.address);
        extra.push(second);
        const [entry] = await listing();
        expect(entry).to.include({ id: 'site-a', connections: 2 });
        expect(entry!.sessions).to.have.length(2);

        // Stop the newer connection: had it replaced (hijacked) the first, nothing would be left.
        await second.stop();
        await pollUntil('/agents to show one connection', async () => (await listing())[0]?.connections === 1);
        for (let i = 0; i < 5; i++) {
          const res = await stack.caller.unary(ECHO.unary, Buffer.from(`after-${i}`), stack.md());
          expect(res.response.toString()).to.equal(`after-${i}`);
        }
      },
    );

    it('stopping the first of two connections leaves the second serving', async () => {
      const second = await extraAgent(stack, stack.agentCert, stack.siteUpstream.address);
      extra.push(second);
      expect((await listing())[0]).to.include({ id: 'site-a', connections: 2 });
      await stack.agent.stop();
      await pollUntil('/agents to show one connection', async () => (await listing())[0]?.connections === 1);
      const results = await Promise.all(
        [0, 1, 2, 3, 4].map((i) => stack.caller.unary(ECHO.unary, Buffer.from(`c${i}`), stack.md())),
      );
      expect(results.map((r) => r.response.toString())).to.deep.equal(['c0', 'c1', 'c2', 'c3', 'c4']);
    });
  });
});
