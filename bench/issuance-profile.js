#!/usr/bin/env node
'use strict';
// Issuance without the RPC, in one process, to profile (`node --cpu-prof bench/issuance-profile.js`)
// and time the work behind the broker's Enroll: the library's signCsr alone, and the broker's
// own enroll handler (BrokerPki.enroll: consume the join token, signCsr, record the agent's
// state) called with a stand-in for the grpc-js call. Join tokens and CSRs are made first and
// not timed, as in bench/run.js's issuance case.
//
//   node bench/issuance-profile.js [N=300] [concurrency=16] [signCsr|enroll|both]
//   ISSUANCE_CPU_PROF=/tmp/enroll.cpuprofile node bench/issuance-profile.js 600 16 enroll
//   node scripts/cpuprofile-summary.js /tmp/enroll.cpuprofile
// ISSUANCE_CPU_PROF profiles only the timed part (node:inspector), not the setup.
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { Session } = require('node:inspector/promises');
const { performance } = require('node:perf_hooks');
const { createCsr, createJoinToken, initPki, signCsr } = require('@burrow/pki');
const { BrokerPki } = require('@burrow/broker/dist/broker-pki');
const { BrokerMetrics } = require('@burrow/broker/dist/broker-metrics');
const { createLogger } = require('@burrow/tunnel');

const n = Number(process.argv[2] ?? 300);
const concurrency = Number(process.argv[3] ?? 16);
const which = process.argv[4] ?? 'both';

/** Runs `fn` on every item, `concurrency` at a time: per second over the whole batch. */
async function ratePerSecond(items, fn) {
  const profiler = process.env.ISSUANCE_CPU_PROF ? new Session() : undefined;
  if (profiler) {
    profiler.connect();
    await profiler.post('Profiler.enable');
    await profiler.post('Profiler.start');
  }
  let next = 0;
  let failed = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < items.length) {
        try {
          await fn(items[next++]);
        } catch (err) {
          if (failed++ === 0) process.stderr.write(`first failure: ${err.message}\n`);
        }
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  if (profiler) {
    const { profile } = await profiler.post('Profiler.stop');
    fs.writeFileSync(process.env.ISSUANCE_CPU_PROF, JSON.stringify(profile));
    profiler.disconnect();
  }
  return {
    perS: Math.round((items.length - failed) / seconds),
    ok: items.length - failed,
    failed,
    seconds: Math.round(seconds * 100) / 100,
  };
}

/** BrokerPki.enroll as grpc-js calls it, resolved when its callback is. */
function enrollOnce(brokerPki, request) {
  return new Promise((resolve, reject) => {
    const call = { request, getPeer: () => '127.0.0.1:1' };
    brokerPki.enroll(call, (err, response) => (err ? reject(new Error(err.details)) : resolve(response)));
  });
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'burrow-issuance-'));
  try {
    await initPki({ dir, trustDomain: 'bench.burrow.local' });
    const out = {
      n,
      concurrency,
      node: process.version,
      cpus: os.cpus().length,
      loadAverage: os.loadavg().map((x) => Math.round(x * 100) / 100),
    };
    if (which !== 'enroll') {
      const csrs = await Promise.all(Array.from({ length: n }, () => createCsr()));
      let i = 0;
      out.signCsr = await ratePerSecond(csrs, ({ csrPem }) =>
        signCsr({ dir, csrPem, role: 'agent', name: `sign-${i++}` }),
      );
    }
    if (which !== 'signCsr') {
      const requests = [];
      for (let i = 0; i < n; i++) {
        const [{ token }, { csrPem }] = await Promise.all([
          createJoinToken({ dir, agentId: `enroll-${i}`, ttlMs: 3_600_000 }),
          createCsr(),
        ]);
        requests.push({ token, csrPem });
      }
      const brokerPki = new BrokerPki({
        dir,
        logger: createLogger({ level: 'error', component: 'issuance-profile' }),
        metrics: new BrokerMetrics(() => ({ agents: 0, sessions: 0, streams: 0 })),
        issueOwnCertificate: false,
        dns: [],
        ip: [],
        enrollPerMinute: 1e9,
      });
      await brokerPki.load();
      out.enroll = await ratePerSecond(requests, (req) => enrollOnce(brokerPki, req));
    }
    process.stdout.write(`${JSON.stringify(out)}\n`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack ?? err}\n`);
  process.exitCode = 1;
});
