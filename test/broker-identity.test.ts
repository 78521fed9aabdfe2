// Issue 13 item 3: a certificate of the trust domain that is not a broker's must not pass for the
// broker. Fake brokers (a real HTTP/2 TLS server on loopback) present a service certificate
// (issued for the name "localhost", and as older releases issued it: CN=localhost, serverAuth),
// an agent certificate, and a broker certificate from a foreign CA; the real agent must not open a
// session (and says why in one log line), @burrow/client must fail before sending any request,
// and the broker's peer forwarder must not hand a call to it. A fake with a real broker
// certificate is the control: it does see the requests.
import { expect } from 'chai';
import * as http2 from 'node:http2';
import * as tls from 'node:tls';
import { readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import { BrokerMetrics, PeerForwarder } from '@burrow/broker';
import { BurrowClient } from '@burrow/client';
import { CONTROL_PATH, CredentialStore, DEFAULT_KEEPALIVE, GRPC_CONTENT_TYPE, TUNNEL_ALPN } from '@burrow/tunnel';
import { forgeLeaf } from './helpers/forged-cert';
import { expectNoLeaks, snapshotResources, type ResourceSnapshot } from './helpers/leaks';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { capturingLogger } from './helpers/policy-fixture';
import { pollUntil } from './helpers/wait';

/**
 * A TLS server that records every request it gets and never answers one. It offers both of a v4
 * broker's ALPNs: on `burrow-tunnel` it is the HTTP/2 client, as a broker is, and opens the control
 * stream (what the agent sends on it, its Hello, is a request); on `h2` it is an HTTP/2 server
 * (the client's calls, the peer forwarder's, an agent's site calls).
 */
class FakeBroker {
  readonly requests: (http2.IncomingHttpHeaders | { hello: Buffer })[] = [];
  handshakes = 0;
  private readonly server: tls.Server;
  private readonly h2 = http2.createServer();
  private readonly sessions = new Set<http2.Http2Session>();
  private readonly sockets = new Set<tls.TLSSocket>();

  constructor(cert: CertFiles, trustPem: string) {
    this.server = tls.createServer({
      key: readFileSync(cert.key),
      cert: readFileSync(cert.cert),
      ca: trustPem,
      requestCert: true,
      rejectUnauthorized: false,
      ALPNProtocols: [TUNNEL_ALPN, 'h2'],
    });
    this.server.on('secureConnection', (socket: tls.TLSSocket) => {
      this.handshakes++;
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      socket.on('error', () => {});
      if (socket.alpnProtocol === TUNNEL_ALPN) this.tunnel(socket);
      else this.h2.emit('connection', socket);
    });
    this.h2.on('session', (s) => this.track(s));
    this.h2.on('stream', (stream, headers) => {
      stream.on('error', () => {});
      this.requests.push(headers);
    });
    this.server.on('tlsClientError', () => {});
  }

  /** The broker's side of a tunnel: opens the control stream; whatever the agent sends is recorded. */
  private tunnel(socket: tls.TLSSocket): void {
    const session = http2.connect('https://agent', { createConnection: () => socket });
    this.track(session);
    const control = session.request({
      ':method': 'POST',
      ':path': CONTROL_PATH,
      'content-type': GRPC_CONTENT_TYPE,
      te: 'trailers',
    });
    control.on('error', () => {});
    control.on('data', (hello: Buffer) => this.requests.push({ hello }));
  }

  private track(s: http2.Http2Session): void {
    this.sessions.add(s);
    s.on('error', () => {});
    s.on('close', () => this.sessions.delete(s));
  }

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    for (const s of this.sessions) s.destroy();
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

describe('only a broker certificate passes for a broker (issue 13 item 3)', function () {
  this.timeout(60_000);
  let pki: PkiFixture;
  let foreign: PkiFixture;
  let agentCert: CertFiles;
  let serviceCert: CertFiles;
  let brokerCert: CertFiles;
  let trustPem: string;
  let baseline: ResourceSnapshot;
  const fakes: Record<string, () => Promise<CertFiles>> = {};

  before(async () => {
    baseline = snapshotResources();
    pki = await PkiFixture.create();
    foreign = await PkiFixture.create();
    [agentCert, serviceCert, brokerCert] = await Promise.all([
      pki.issue('agent', 'site-a'),
      pki.issue('service', 'billing'),
      pki.issue('broker', 'broker-1', { dns: ['localhost'], ip: ['127.0.0.1'] }),
    ]);
    trustPem = readFileSync(agentCert.ca, 'utf8');
    const forged = (name: string): string => path.join(pki.root, `forged-${name}`);
    fakes['a service certificate issued for the name localhost'] = () => pki.issue('service', 'localhost');
    fakes['a service certificate as older releases issued it (CN=localhost, serverAuth)'] = () =>
      forgeLeaf(pki.pkiDir, forged('service'), {
        uris: ['spiffe://burrow.local/service/localhost'],
        cn: 'localhost',
        ekus: ['clientAuth', 'serverAuth'],
      });
    fakes['an agent certificate issued for the name localhost'] = () => pki.issue('agent', 'localhost');
    fakes['an agent certificate with serverAuth and DNS:localhost'] = () =>
      forgeLeaf(pki.pkiDir, forged('agent'), {
        uris: ['spiffe://burrow.local/agent/localhost'],
        dns: ['localhost'],
        ekus: ['clientAuth', 'serverAuth'],
      });
    fakes['a broker certificate of a foreign CA'] = () =>
      foreign.issue('broker', 'broker-1', { dns: ['localhost'], ip: ['127.0.0.1'] });
  });

  after(async () => {
    pki.cleanup();
    foreign.cleanup();
    await expectNoLeaks(baseline);
  });

  async function withFake<T>(cert: CertFiles, body: (address: string, fake: FakeBroker) => Promise<T>): Promise<T> {
    const fake = new FakeBroker(cert, trustPem);
    const address = await fake.start();
    try {
      return await body(address, fake);
    } finally {
      await fake.stop();
    }
  }

  /** Runs a real agent against `address` until it logs a refused session or the fake sees a request. */
  async function agentAgainst(address: string, fake: FakeBroker): Promise<Record<string, unknown>[]> {
    const { logger, records } = capturingLogger();
    const agent = new Agent(
      {
        ...AGENT_DEFAULTS,
        brokers: [address],
        brokerServerName: 'localhost',
        tlsCertFile: agentCert.cert,
        tlsKeyFile: agentCert.key,
        caFile: agentCert.ca,
        reconnectBaseMs: 200,
        reconnectMaxMs: 1_000,
        drainTimeoutMs: 500,
      },
      logger,
    );
    await agent.start();
    try {
      await pollUntil(
        'a refusal or a request',
        () => fake.requests.length > 0 || records.some((r) => r.message === 'cannot establish tunnel session'),
        10_000,
      );
    } finally {
      await agent.stop();
    }
    return records;
  }

  for (const what of [
    'a service certificate issued for the name localhost',
    'a service certificate as older releases issued it (CN=localhost, serverAuth)',
    'an agent certificate issued for the name localhost',
    'an agent certificate with serverAuth and DNS:localhost',
    'a broker certificate of a foreign CA',
  ]) {
    describe(`a fake broker with ${what}`, () => {
      it('is refused by the real agent: no session, no request, one log line saying why', async () => {
        const cert = await fakes[what]!();
        await withFake(cert, async (address, fake) => {
          const records = await agentAgainst(address, fake);
          expect(fake.requests, 'requests the fake broker saw').to.deep.equal([]);
          expect(records.some((r) => r.message === 'tunnel session established')).to.equal(false);
          const refused = records.find((r) => r.message === 'cannot establish tunnel session')!;
          console.log(`      agent: ${String(refused.error)}`);
          if (/foreign/.test(what)) expect(String(refused.error)).to.match(/certificate/);
          else if (/localhost$/.test(what) && /issued for/.test(what))
            expect(String(refused.error)).to.match(
              /is not a Burrow broker|unsuitable certificate purpose|does not contain|not cert's CN/,
            );
          else
            expect(String(refused.error)).to.match(
              new RegExp(
                'server localhost is not a Burrow broker of trust domain "burrow.local": ' +
                  String.raw`it presented spiffe:\/\/burrow.local\/(service|agent)\/localhost`,
              ),
            );
        });
      });

      it('is refused by @burrow/client before any request (no token sent)', async () => {
        const cert = await fakes[what]!();
        await withFake(cert, async (address, fake) => {
          const client = new BurrowClient({
            broker: address,
            serverName: 'localhost',
            tls: { certFile: serviceCert.cert, keyFile: serviceCert.key, caFile: serviceCert.ca },
            timeoutMs: 3_000,
            maxAttempts: 1,
          });
          try {
            const err = await client.authenticate('site-a', 'secret-token-123').then(
              () => undefined,
              (e: Error) => e,
            );
            expect(err, 'the call must fail').to.be.instanceOf(Error);
            console.log(`      client: ${err!.message}`);
            if (!/foreign|issued for/.test(what)) expect(err!.message).to.match(/is not a Burrow broker/);
          } finally {
            client.close();
          }
          expect(fake.requests, 'requests the fake broker saw').to.deep.equal([]);
        });
      });

      it("is refused by the broker's peer forwarder", async () => {
        const cert = await fakes[what]!();
        await withFake(cert, async (address, fake) => {
          const store = new CredentialStore({
            caPem: readFileSync(brokerCert.ca),
            certPem: readFileSync(brokerCert.cert),
            keyPem: readFileSync(brokerCert.key),
          });
          const metrics = new BrokerMetrics(
            () => ({ agents: 0, sessions: 0, activeCalls: 0, waiters: 0 }),
            () => [],
          );
          const forwarder = new PeerForwarder({
            tls: store,
            brokerId: 'broker-1',
            trustDomain: 'burrow.local',
            keepalive: DEFAULT_KEEPALIVE,
            metrics,
            readyTimeoutMs: 3_000,
          });
          try {
            // The peer address is an IP, as --advertise usually is; the broker certificate lists it.
            const attempt = await forwarder.open(
              address.replace('127.0.0.1', 'localhost'),
              'site-a',
              {
                method: '/echo.Echo/Unary',
                rawHeaders: ['x-custom', 'v'],
                contentType: GRPC_CONTENT_TYPE,
                deadlineMs: Date.now() + 5_000,
              },
              new AbortController().signal,
              { caller: 'spiffe://burrow.local/service/caller', method: '/echo.Echo/Unary', policies: [] },
            );
            if (attempt.ready) throw new Error('the peer forwarder handed a call to a fake broker');
            console.log(`      peer forwarder: ${attempt.reason}`);
            // The reason names the certificate problem, not a bare stream reset.
            expect(attempt.reason).to.match(
              /foreign/.test(what)
                ? /certificate/
                : /is not a Burrow broker|unsuitable certificate purpose|does not contain|not cert's CN/,
            );
          } finally {
            forwarder.close();
          }
          expect(fake.requests, 'requests the fake broker saw').to.deep.equal([]);
        });
      });
    });
  }

  describe('a fake broker with a real broker certificate (control)', () => {
    it("gets the agent's session request and the client's call", async () => {
      await withFake(brokerCert, async (address, fake) => {
        await agentAgainst(address, fake);
        expect(fake.requests.length).to.be.greaterThan(0);
        const before = fake.requests.length;
        const client = new BurrowClient({
          broker: address,
          serverName: 'localhost',
          tls: { certFile: serviceCert.cert, keyFile: serviceCert.key, caFile: serviceCert.ca },
          timeoutMs: 1_000,
          maxAttempts: 1,
        });
        try {
          await client.authenticate('site-a', 'secret-token-123').catch(() => undefined);
        } finally {
          client.close();
        }
        expect(fake.requests.length).to.be.greaterThan(before);
      });
    });
  });
});
