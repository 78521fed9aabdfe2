#!/usr/bin/env node
'use strict';
// The floor under the broker's memory per agent: what Node itself keeps per idle mutually
// authenticated connection, with no Burrow and no grpc-js. This process is the server; a forked
// child opens the connections with an agent certificate. Prints one JSON line:
//   {"connections": N, "tls": KiB, "http2": KiB, "http2Streams": KiB, "streams": S}
// tls: a bare node:tls server (requestCert) holding N idle connections; http2: a node:http2
// secure server holding N idle sessions; http2Streams: the same with S idle streams per session
// (a Burrow agent holds its session stream plus its idle offers). RSS per connection after full
// GCs, measured against the same process before the connections.
//
//   node bench/connection-floor.js CERTS_JSON N S   (each figure from a fresh process)
// CERTS_JSON: a file with {"server": {certPem, keyPem, caPem}, "client": {certPem, keyPem, caPem}}.
const { execFileSync, fork } = require('node:child_process');
const fs = require('node:fs');
const http2 = require('node:http2');
const tls = require('node:tls');

const [certsFile, nArg, streamsArg] = process.argv.slice(2);
const certs = JSON.parse(fs.readFileSync(certsFile, 'utf8'));

/** The forked child: opens the connections with the agent certificate and holds them. */
function runClient() {
  // Client: opens `n` connections of `kind`, reports, then holds them until it is killed.
  process.on('message', async ({ port, n, kind, streams }) => {
    const held = [];
    const opts = {
      key: certs.client.keyPem,
      cert: certs.client.certPem,
      ca: certs.client.caPem,
      servername: 'localhost',
    };
    const connectOne = () =>
      new Promise((resolve, reject) => {
        if (kind === 'tls') {
          const s = tls.connect({ port, host: '127.0.0.1', ...opts }, resolve);
          s.on('error', reject);
          held.push(s);
          return;
        }
        const session = http2.connect(`https://127.0.0.1:${port}`, opts, () => {
          let answered = 0;
          if (streams === 0) resolve();
          for (let k = 0; k < streams; k++) {
            const req = session.request({ ':method': 'POST', ':path': '/idle' });
            req.on('error', () => {});
            req.on('response', () => {
              if (++answered === streams) resolve();
            });
            req.write('x');
            held.push(req);
          }
        });
        session.on('error', reject);
        held.push(session);
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

/** KiB of server RSS per idle connection of `kind` (tls | http2) with `streams` idle streams each. */
async function measure(kind, n, streams) {
  const opts = {
    key: certs.server.keyPem,
    cert: certs.server.certPem,
    ca: certs.server.caPem,
    requestCert: true,
    rejectUnauthorized: true,
  };
  const held = [];
  const server = kind === 'tls' ? tls.createServer(opts, (s) => held.push(s)) : http2.createSecureServer(opts);
  if (kind !== 'tls') {
    server.on('stream', (stream) => {
      held.push(stream);
      stream.on('error', () => {});
      stream.respond({ ':status': 200 });
    });
  }
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
    client.send({ port: server.address().port, n, kind, streams });
  });
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
