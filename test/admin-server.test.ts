import { expect } from 'chai';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Registry } from 'prom-client';
import { createAdminServer, isLoopbackAddress, type AdminMutationPolicy, type AdminRoute } from '@burrow/tunnel';

interface Reply {
  status: number;
  body: string;
}

function send(
  port: number,
  host: string,
  method: string,
  path: string,
  opts: { headers?: Record<string, string>; body?: string } = {},
): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host, port, method, path, headers: opts.headers, agent: false, timeout: 5_000 },
      (res) => {
        let body = '';
        res
          .setEncoding('utf8')
          .on('data', (c: string) => {
            body += c;
          })
          .on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end(opts.body);
  });
}

/**
 * The admin listener's routes and its rules for mutating requests, on a real HTTP server on port
 * 0 with a route that records what it was called with.
 */
describe('admin server: routes and mutating requests', () => {
  let server: http.Server | undefined;
  let calls: { params: string[]; body: unknown }[];

  async function start(host: string, mutations: AdminMutationPolicy | undefined): Promise<number> {
    calls = [];
    const routes: AdminRoute[] = [
      {
        method: 'GET',
        pattern: /^\/things\/([^/]+)$/,
        mutating: false,
        handle: ([id]) => (id === 'a b' ? { status: 200, body: { id } } : { status: 404, body: { error: `no ${id}` } }),
      },
      {
        method: 'POST',
        pattern: /^\/things\/([^/]+)\/poke$/,
        mutating: true,
        handle: (params, req) => {
          calls.push({ params, body: req.body });
          return { status: 200, body: { poked: params[0] } };
        },
      },
      { method: 'GET', pattern: /^\/boom$/, mutating: false, handle: () => Promise.reject(new Error('exploded')) },
    ];
    server = createAdminServer({
      metrics: new Registry(),
      json: { '/list': () => [1, 2] },
      routes,
      mutations,
      isReady: () => true,
    });
    await new Promise<void>((resolve, reject) => {
      server!.once('error', reject);
      server!.listen(0, host, () => resolve());
    });
    return (server.address() as AddressInfo).port;
  }

  afterEach(async () => {
    if (server) {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server!.close(() => resolve()));
      server = undefined;
    }
  });

  it('knows loopback addresses', () => {
    for (const a of ['127.0.0.1', '127.3.2.1', '::1', '[::1]', '::ffff:127.0.0.1', 'localhost'])
      expect(isLoopbackAddress(a), a).to.equal(true);
    for (const a of [
      '0.0.0.0',
      '::',
      '10.0.0.1',
      '128.0.0.1',
      '::ffff:10.0.0.1',
      'evil.example',
      '127.0.0.1.evil.example',
      '',
    ])
      expect(isLoopbackAddress(a), a).to.equal(false);
  });

  it('serves parameter routes with decoded parameters, 404 and 500 as JSON, and the old routes', async () => {
    const port = await start('127.0.0.1', {});
    expect(await send(port, '127.0.0.1', 'GET', '/things/a%20b')).to.deep.include({ status: 200 });
    expect(JSON.parse((await send(port, '127.0.0.1', 'GET', '/things/a%20b')).body)).to.deep.equal({ id: 'a b' });
    const missing = await send(port, '127.0.0.1', 'GET', '/things/zz');
    expect(missing.status).to.equal(404);
    expect(JSON.parse(missing.body)).to.deep.equal({ error: 'no zz' });
    expect((await send(port, '127.0.0.1', 'GET', '/things/%E0%A4%A')).status).to.equal(400);
    const boom = await send(port, '127.0.0.1', 'GET', '/boom');
    expect(boom.status).to.equal(500);
    expect(JSON.parse(boom.body)).to.deep.equal({ error: 'exploded' });
    expect(JSON.parse((await send(port, '127.0.0.1', 'GET', '/list')).body)).to.deep.equal([1, 2]);
    expect((await send(port, '127.0.0.1', 'POST', '/list')).status).to.equal(405);
    expect((await send(port, '127.0.0.1', 'GET', '/nothing')).status).to.equal(404);
  });

  it(
    'on loopback without a token: runs a local POST with its JSON body, refuses other methods, forged origins, ' +
      'bad and huge bodies',
    async () => {
      const port = await start('127.0.0.1', {});
      const ok = await send(port, '127.0.0.1', 'POST', '/things/x/poke', {
        headers: { 'content-type': 'application/json' },
        body: '{"reason":"r"}',
      });
      expect(ok.status, ok.body).to.equal(200);
      expect(calls).to.deep.equal([{ params: ['x'], body: { reason: 'r' } }]);
      expect((await send(port, '127.0.0.1', 'GET', '/things/x/poke')).status).to.equal(405);
      expect(
        (await send(port, '127.0.0.1', 'POST', '/things/x/poke', { headers: { origin: 'https://evil.example' } }))
          .status,
      ).to.equal(403);
      expect(
        (await send(port, '127.0.0.1', 'POST', '/things/x/poke', { headers: { host: 'evil.example:80' } })).status,
      ).to.equal(403);
      expect((await send(port, '127.0.0.1', 'POST', '/things/x/poke', { body: '{not json' })).status).to.equal(400);
      expect(
        (
          await send(port, '127.0.0.1', 'POST', '/things/x/poke', {
            body: JSON.stringify({ reason: 'x'.repeat(20_000) }),
          })
        ).status,
      ).to.equal(413);
      expect(calls).to.have.length(1);
    },
  );

  it('refuses mutating requests when the owner gave no policy', async () => {
    const port = await start('127.0.0.1', undefined);
    expect((await send(port, '127.0.0.1', 'POST', '/things/x/poke')).status).to.equal(403);
    expect(calls).to.deep.equal([]);
  });

  it('off loopback: refuses without a token configured; with one, needs exactly that bearer token', async () => {
    let port = await start('0.0.0.0', {});
    const refused = await send(port, '127.0.0.1', 'POST', '/things/x/poke');
    expect(refused.status).to.equal(403);
    expect(JSON.parse(refused.body).error).to.include('bound to 0.0.0.0, not loopback');
    await new Promise<void>((resolve) => server!.close(() => resolve()));

    port = await start('0.0.0.0', { token: 's3cret-token-0123456789' });
    expect((await send(port, '127.0.0.1', 'POST', '/things/x/poke')).status).to.equal(401);
    expect(
      (
        await send(port, '127.0.0.1', 'POST', '/things/x/poke', {
          headers: { authorization: 'Bearer s3cret-token-012345678' },
        })
      ).status,
    ).to.equal(401);
    expect(
      (
        await send(port, '127.0.0.1', 'POST', '/things/x/poke', {
          headers: { authorization: 'Basic s3cret-token-0123456789' },
        })
      ).status,
    ).to.equal(401);
    const ok = await send(port, '127.0.0.1', 'POST', '/things/x/poke', {
      headers: { authorization: 'Bearer s3cret-token-0123456789' },
    });
    expect(ok.status, ok.body).to.equal(200);
    expect(calls.map((c) => c.params)).to.deep.equal([['x']]);
  });

  it('with a token, requires it on loopback too', async () => {
    const port = await start('127.0.0.1', { token: 's3cret-token-0123456789' });
    expect((await send(port, '127.0.0.1', 'POST', '/things/x/poke')).status).to.equal(401);
    expect(calls).to.deep.equal([]);
  });
});
