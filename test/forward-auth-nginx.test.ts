import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';
import { freePort } from './helpers/free-port';
import { GatewaySite } from './helpers/gateway-site';
import { TestNginx, ensureNginx, templateBurrowAuthConf } from './helpers/nginx';
import type { CertFiles } from './helpers/pki-fixture';
import { AGENT_ID, Stack } from './helpers/stack';

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** Sends `req` (no body) and resolves with the whole answer. */
function answerOf(req: http.ClientRequest): Promise<Answer> {
  return new Promise((resolve, reject) => {
    req.on('response', (res: http.IncomingMessage) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        body += c;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** A plain HTTP request to nginx (the client side of the gateway). */
function viaNginx(port: number, urlPath: string, headers: Record<string, string> = {}): Promise<Answer> {
  return answerOf(http.request({ host: '127.0.0.1', port, path: urlPath, headers, agent: false }));
}

/** A request straight to the broker's forward-auth listener, as Traefik's ForwardAuth makes it. */
function forwardAuth(address: string, cert: CertFiles, urlPath: string, headers: Record<string, string>) {
  const [host, port] = address.split(':');
  return answerOf(
    https.request({
      host,
      port: Number(port),
      path: urlPath,
      headers,
      cert: readFileSync(cert.cert),
      key: readFileSync(cert.key),
      ca: readFileSync(cert.ca),
      servername: 'localhost',
      agent: false,
    }),
  );
}

/** The application behind nginx: answers 200 and records the headers each request arrived with. */
class RecordingUpstream {
  readonly seen: http.IncomingHttpHeaders[] = [];
  readonly server = http.createServer((req, res) => {
    this.seen.push(req.headers);
    res.writeHead(200, { 'content-type': 'text/plain' }).end('upstream ok\n');
  });

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  stop(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/**
 * A real nginx (Debian's nginx-core, installed when missing) running the shipped
 * deploy/nginx/burrow-auth.conf in front of an HTTP upstream, asking the broker's forward-auth
 * listener over mTLS, which asks a real agent (examples/package-proxy): issue 17's "real nginx
 * protects an upstream with decisions from a site".
 */
describe('nginx auth_request through the broker (real nginx)', function () {
  this.timeout(120_000);
  let site: GatewaySite;
  let stack: Stack;
  let upstream: RecordingUpstream;
  let nginx: TestNginx;
  let gatewayCert: CertFiles;
  let token: string;
  const pull = (name: string, age: number, auth: string | undefined, extra: Record<string, string> = {}) =>
    viaNginx(nginx.port, `/packages/npm/${name}?tag=latest`, {
      'x-package-age-days': String(age),
      ...(auth === undefined ? {} : { authorization: `Bearer ${auth}` }),
      ...extra,
    });

  before(async () => {
    ensureNginx();
    site = await GatewaySite.create();
    stack = await Stack.start({
      // An offline site is answered fast: the broker waits 300 ms for the agent, then says so.
      broker: { forwardAuthListen: '127.0.0.1:0', forwardAuthAgentHeader: 'x-burrow-site', agentWaitMs: 300 },
      agent: site.agentConfig(),
    });
    upstream = new RecordingUpstream();
    const app = await upstream.start();
    gatewayCert = await stack.pki.issue('service', 'nginx-edge');
    const conf = templateBurrowAuthConf({
      listenPort: await freePort(),
      broker: stack.forwardAuthAddress,
      brokerName: 'localhost',
      app,
      serviceCert: gatewayCert.cert,
      serviceKey: gatewayCert.key,
      ca: gatewayCert.ca,
      agentId: AGENT_ID,
    });
    const port = Number(/listen 127\.0\.0\.1:(\d+);/.exec(conf)![1]);
    nginx = await TestNginx.start(conf, port);
    token = await site.token('alice');
  });
  after(async () => {
    await nginx?.stop();
    await upstream?.stop();
    await stack?.stop();
    site?.cleanup();
  });

  it('lets a good token through; the subject and decision id arrive upstream (a forged one replaced)', async () => {
    const res = await pull('lodash', 30, token, { 'x-burrow-subject': 'User::"mallory"' });
    expect(res.status, nginx.errorLog()).to.equal(200);
    expect(res.body).to.equal('upstream ok\n');
    const seen = upstream.seen.at(-1)!;
    expect(seen['x-burrow-subject']).to.include('alice').and.not.include('mallory');
    expect(seen['x-burrow-decision-id']).to.match(/\S{8,}/);
    expect(seen['x-burrow-advice']).to.equal(undefined);
  });

  it('passes the quarantine advice of a young package to the upstream', async () => {
    const res = await pull('left-pad', 2, token);
    expect(res.status).to.equal(200);
    expect(upstream.seen.at(-1)!['x-burrow-advice']).to.equal('quarantine');
  });

  it('answers 401 with the invalid_token challenge for an expired token, without reaching the upstream', async () => {
    const before = upstream.seen.length;
    const res = await pull('lodash', 30, await site.token('alice', { expired: true }));
    expect(res.status).to.equal(401);
    expect(res.headers['www-authenticate']).to.equal('Bearer error="invalid_token", error_description="token expired"');
    expect(upstream.seen.length).to.equal(before);
  });

  it('answers 401 with a bare Bearer challenge when the token is missing', async () => {
    const res = await pull('lodash', 30, undefined);
    expect(res.status).to.equal(401);
    expect(res.headers['www-authenticate']).to.equal('Bearer');
  });

  it('answers 403 for a forbidden path (a known-malicious package), without reaching the upstream', async () => {
    const before = upstream.seen.length;
    const res = await pull('event-stream-4.0.0-flatmap', 30, token);
    expect(res.status).to.equal(403);
    expect(upstream.seen.length).to.equal(before);
  });

  it("serves Traefik's ForwardAuth contract (X-Forwarded-*) on the same endpoint", async () => {
    const res = await forwardAuth(stack.forwardAuthAddress, gatewayCert, `/agents/${AGENT_ID}/check`, {
      'x-forwarded-method': 'GET',
      'x-forwarded-uri': '/packages/pypi/requests',
      'x-forwarded-host': 'packages.example.test',
      'x-forwarded-proto': 'https',
      'x-forwarded-for': '203.0.113.7, 10.0.0.1',
      'x-package-age-days': '400',
      authorization: `Bearer ${token}`,
    });
    expect(res.status, res.body).to.equal(200);
    expect(res.headers['x-burrow-subject']).to.include('alice');
    expect(res.headers['x-burrow-decision-id']).to.match(/\S{8,}/);
  });

  it('takes the site from the operator header on another path, and names both ways when neither is there', async () => {
    const original = {
      'x-original-method': 'GET',
      'x-original-uri': '/packages/npm/lodash',
      'x-package-age-days': '30',
    };
    const auth = { authorization: `Bearer ${token}` };
    const named = await forwardAuth(stack.forwardAuthAddress, gatewayCert, '/check', {
      ...original,
      ...auth,
      'x-burrow-site': AGENT_ID,
    });
    expect(named.status, named.body).to.equal(200);
    const unnamed = await forwardAuth(stack.forwardAuthAddress, gatewayCert, '/check', { ...original, ...auth });
    expect(unnamed.status).to.equal(400);
    expect(unnamed.body).to.include('/agents/<id>/check').and.include('x-burrow-site');
  });

  it('refuses a check that does not name the original request with 400 naming the headers', async () => {
    const res = await forwardAuth(stack.forwardAuthAddress, gatewayCert, `/agents/${AGENT_ID}/check`, {
      authorization: `Bearer ${token}`,
    });
    expect(res.status).to.equal(400);
    expect(res.headers['x-burrow-error']).to.equal('INVALID_ARGUMENT');
    expect(res.body).to.include('X-Original-Method').and.include('X-Forwarded-Method');
  });

  it('answers an offline site fast: 503 from the broker, which nginx turns into a 500', async () => {
    await stack.agent.stop();
    const direct = await forwardAuth(stack.forwardAuthAddress, gatewayCert, `/agents/${AGENT_ID}/check`, {
      'x-original-method': 'GET',
      'x-original-uri': '/packages/npm/lodash',
    });
    expect(direct.status).to.equal(503);
    expect(direct.headers['x-burrow-error']).to.equal('UNAVAILABLE');
    // Which site and why stay in the broker's log: Traefik would show this body to the client.
    expect(direct.body).to.equal('burrow: UNAVAILABLE: no decision\n');
    const startedMs = Date.now();
    const res = await pull('lodash', 30, token);
    expect(res.status).to.equal(500);
    expect(Date.now() - startedMs).to.be.below(2_000);
    expect(nginx.errorLog()).to.include('auth request unexpected status: 503');
  });
});
