#!/usr/bin/env node
'use strict';
// The floor under the broker's memory per agent: what Node itself keeps per idle mutually
// authenticated connection, with no Burrow and no grpc-js. This process is the TLS server (the
// broker's side); a forked child dials the connections with an agent certificate. The HTTP/2
// roles are those of protocol v4 (tunnel.proto, "Roles"): on the connection the child dialed,
// this process is the HTTP/2 client and the child the HTTP/2 server. Prints one JSON line:
//   {"connections": N, "tls": KiB, "http2": KiB, "http2Streams": KiB, "streams": S}
// tls: a bare node:tls server (requestCert) holding N idle connections; http2: the same with an
// idle HTTP/2 client session on each; http2Streams: the same with S open streams per session that
// this side opened and the child answered (an idle v4 agent holds exactly one: its control
// stream). RSS per connection after full GCs, measured against the same process before the
// connections.
//
//   node bench/connection-floor.js CERTS_JSON N S   (each figure from a fresh process)
// CERTS_JSON: a file with {"server": {certPem, keyPem, caPem}, "client": {certPem, keyPem, caPem}}.
const { execFileSync, fork } = require('node:child_process');
const fs = require('node:fs');
const http2 = require('node:http2');
const tls = require('node:tls');

const [certsFile, nArg, streamsArg] = process.argv.slice(2);
const certs = JSON.parse(fs.readFileSync(certsFile, 'utf8'));

// Burrow's tunnel ALPN: the role flip works with any protocol but `http/1.1` or none.
const ALPN = ['burrow-tunnel'];

/**
 * The forked child (the agents' side): dials the connections with the agent certificate and holds
 * them; for http2 it is the HTTP/2 server on each, answering every stream and keeping it open.
 * Tells the parent once the TLS handshakes are done; the parent counts its own streams.
 */
function runClient() {
  process.on('message', async ({ port, n, kind }) => {
    const held = [];
    const opts = {
      key: certs.client.keyPem,
      cert: certs.client.certPem,
      ca: certs.client.caPem,
      servername: 'localhost',
      ALPNProtocols: ALPN,
    };
    const h2 = http2.createServer();
    h2.on('stream', (stream) => {
      held.push(stream);
      stream.on('error', () => {});
      stream.respond({ ':status': 200 });
      stream.write('y');
    });
    const connectOne = () =>
      new Promise((resolve, reject) => {
        const s = tls.connect({ port, host: '127.0.0.1', ...opts }, () => {
          if (kind !== 'tls') h2.emit('connection', s);
          resolve();
        });
        s.on('error', reject);
        held.push(s);
      });
    // 16 handshakes at a time: quicker than one by one, and never a storm.
    let left = n;
    await Promise.all(
      Array.from({ length: Math.min(16, n) }, async () => {
        while (left-- > 0) await connectOne();
      }),
    );
    process.send({ connected: held.length });
  });
  process.on('disconnect', () => process.exit(0));
}

const rssKiB = () => {
  global.gc();
  global.gc();
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1]);
};

/**
 * KiB of server RSS per idle connection of `kind` (tls | http2) with `streams` open streams each,
 * opened by this side as a v4 broker opens its control stream on an agent's connection.
 */
async function measure(kind, n, streams) {
  const opts = {
    key: certs.server.keyPem,
    cert: certs.server.certPem,
    ca: certs.server.caPem,
    requestCert: true,
    rejectUnauthorized: true,
    ALPNProtocols: ALPN,
  };
  const held = [];
  let answered = 0;
  let allAnswered;
  const answeredAll = new Promise((resolve) => {
    allAnswered = resolve;
  });
  const expected = kind === 'tls' ? 0 : n * streams;
  if (expected === 0) allAnswered();
  const server = tls.createServer(opts, (socket) => {
    held.push(socket);
    if (kind === 'tls') return;
    const session = http2.connect('https://localhost', { createConnection: () => socket });
    session.on('error', () => {});
    held.push(session);
    for (let k = 0; k < streams; k++) {
      const req = session.request({ ':method': 'POST', ':path': '/control' });
      req.on('error', () => {});
      req.on('response', () => {
        if (++answered === expected) allAnswered();
      });
      req.write('x');
      held.push(req);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const before = rssKiB();
  const client = fork(__filename, process.argv.slice(2), {
    env: { ...process.env, BURROW_FLOOR_CLIENT: '1' },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const exited = new Promise((resolve) => client.once('exit', resolve));
  await new Promise((resolve, reject) => {
    client.once('message', resolve);
    client.once('exit', (code) => reject(new Error(`floor client exited (${code}) before connecting`)));
    client.send({ port: server.address().port, n, kind });
  });
  await answeredAll;
  const perConnection = Math.round(((rssKiB() - before) / n) * 10) / 10;
  client.kill();
  await exited;
  for (const h of held) h.destroy?.();
  await new Promise((resolve) => server.close(resolve));
  return perConnection;
}

/** Runs one measurement in a fresh process (pages freed by an earlier one would hide RSS growth). */
function measureApart(kind, n, streams) {
  const out = execFileSync(process.execPath, ['--expose-gc', __filename, ...process.argv.slice(2)], {
    env: { ...process.env, BURROW_FLOOR_KIND: JSON.stringify({ kind, n, streams }) },
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return Number(out.trim());
}

/** The parent: measures each kind in a fresh process, or (BURROW_FLOOR_KIND) is that process. */
function runServer() {
  (async () => {
    const n = Number(nArg);
    const streams = Number(streamsArg);
    if (process.env.BURROW_FLOOR_KIND) {
      const one = JSON.parse(process.env.BURROW_FLOOR_KIND);
      process.stdout.write(`${await measure(one.kind, one.n, one.streams)}\n`);
      return;
    }
    const out = {
      connections: n,
      streams,
      tls: measureApart('tls', n, 0),
      http2: measureApart('http2', n, 0),
      http2Streams: measureApart('http2', n, streams),
    };
    process.stdout.write(`${JSON.stringify(out)}\n`);
  })().catch((err) => {
    process.stderr.write(`connection-floor: ${err.stack}\n`);
    process.exit(1);
  });
}

// Last, so that every const above is initialised before either side runs.
if (process.env.BURROW_FLOOR_CLIENT) runClient();
else runServer();
