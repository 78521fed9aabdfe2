#!/usr/bin/env node
// In-process measurement of the tunnel's hot path: a direct call to the echo upstream against the
// same call through broker + agent (test/helpers/stack: real sockets, real mTLS), interleaved in
// rounds so that load from other processes hits both sides alike.
//
//   make build && node scripts/perf-unary.js            # all cases, 3 rounds
//   PERF_ROUNDS=5 PERF_SECONDS=3 node scripts/perf-unary.js
//   PERF_CASES=unary,rps node --cpu-prof --cpu-prof-dir /tmp/prof scripts/perf-unary.js
//   PERF_ONLY=burrow ...   measure only the Burrow side (for profiles)
//   PERF_BASELINE_DIR=/tmp/base ...   also measure a built checkout of another commit ('baseline'
//       side, its own stack and its own copy of grpc-js in this process), for A/B comparisons
//       within one run:  git archive BASE | tar -x -C /tmp/base && cp -a node_modules /tmp/base/
//       && (cd /tmp/base && node_modules/.bin/tsc -b tsconfig.json)
//
// Prints one JSON line per measurement and a summary table with burrow/direct ratios (medians
// over rounds). Not a test: numbers on a shared machine vary; compare within one run.
'use strict';
const path = require('node:path');
const { performance } = require('node:perf_hooks');

const helpers = (root) => {
  const dist = path.join(root, 'test', 'dist', 'helpers');
  return {
    Stack: require(path.join(dist, 'stack.js')).Stack,
    RawClient: require(path.join(dist, 'raw-grpc.js')).RawClient,
  };
};
const { Stack, RawClient } = helpers(path.resolve(__dirname, '..'));
const { ECHO } = require(path.resolve(__dirname, '..', 'test', 'dist', 'helpers', 'echo-upstream.js'));
const BASELINE_DIR = process.env.PERF_BASELINE_DIR;

const ROUNDS = Number(process.env.PERF_ROUNDS ?? 3);
const SECONDS = Number(process.env.PERF_SECONDS ?? 2);
const SEQ_CALLS = Number(process.env.PERF_SEQ_CALLS ?? 1500);
const BIDI_MIB = Number(process.env.PERF_BIDI_MIB ?? 64);
const CASES = (process.env.PERF_CASES ?? 'unary,rps,bidi').split(',');
const ONLY = process.env.PERF_ONLY; // 'burrow' | 'direct' | undefined
const PAYLOAD = Buffer.alloc(100, 7);

function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

/** Sequential unary calls: p50/p99 latency in ms. */
async function latency(call, n) {
  for (let i = 0; i < 100; i++) await call(); // warm-up: connections, JIT
  const ms = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await call();
    ms.push(performance.now() - t0);
  }
  ms.sort((a, b) => a - b);
  return { p50: quantile(ms, 0.5), p99: quantile(ms, 0.99) };
}

/** `concurrency` loops of unary calls for `seconds`: calls per second. */
async function throughput(call, concurrency, seconds) {
  const endAt = performance.now() + seconds * 1000;
  let done = 0;
  const loop = async () => {
    while (performance.now() < endAt) {
      await call();
      done++;
    }
  };
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  await Promise.all(Array.from({ length: concurrency }, loop));
  const cpu = process.cpuUsage(cpu0);
  // CPU time per call is what this process spent, whatever other processes did to the wall clock.
  return { rps: done / ((performance.now() - t0) / 1000), cpuUsPerCall: (cpu.user + cpu.system) / done };
}

/** One bidi call echoing `mib` MiB in 64 KiB messages, writer honouring backpressure: MB/s. */
function bidiRate(client, md, mib) {
  return new Promise((resolve, reject) => {
    const msg = Buffer.alloc(64 * 1024, 3);
    const total = (mib * 1024 * 1024) / msg.length;
    const call = client.bidi(ECHO.bidi, md());
    let sent = 0;
    let received = 0;
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    const pump = () => {
      while (sent < total) {
        sent++;
        if (!call.write(msg)) {
          call.once('drain', pump);
          return;
        }
      }
      call.end();
    };
    call.on('data', () => {
      received++;
    });
    call.on('error', reject);
    call.on('status', (s) => {
      if (s.code !== 0) return reject(new Error(s.details));
      if (received !== total) return reject(new Error(`echoed ${received} of ${total}`));
      const cpu = process.cpuUsage(cpu0);
      resolve({
        mbPerS: (mib * 1.048576) / ((performance.now() - t0) / 1000),
        cpuMsPerMiB: (cpu.user + cpu.system) / 1000 / mib,
      });
    });
    pump();
  });
}

async function main() {
  const stack = await Stack.start();
  const direct = new RawClient(stack.siteUpstream.address);
  const sides = {
    direct: { client: direct, md: () => undefined },
    burrow: { client: stack.caller, md: () => stack.md() },
  };
  let baseline;
  if (BASELINE_DIR) {
    baseline = await helpers(path.resolve(BASELINE_DIR)).Stack.start();
    sides.baseline = { client: baseline.caller, md: () => baseline.md() };
  }
  const unary = (side) => () => side.client.unary(ECHO.unary, PAYLOAD, side.md() ?? undefined);
  const results = {};
  const record = (key, side, value) => {
    results[key] ??= {};
    results[key][side] ??= [];
    results[key][side].push(value);
    console.log(JSON.stringify({ case: key, side, value: Math.round(value * 1000) / 1000 }));
  };
  const order = ONLY ? [ONLY] : BASELINE_DIR ? ['direct', 'baseline', 'burrow'] : ['direct', 'burrow'];
  try {
    for (let round = 0; round < ROUNDS; round++) {
      // Alternate the order of the sides so that drift in machine load cancels out.
      const sidesThisRound = round % 2 === 0 ? order : [...order].reverse();
      for (const name of sidesThisRound) {
        const side = sides[name];
        if (CASES.includes('unary')) {
          const l = await latency(unary(side), SEQ_CALLS);
          record('unary p50 ms', name, l.p50);
          record('unary p99 ms', name, l.p99);
        }
        if (CASES.includes('rps')) {
          for (const c of [1, 16, 64]) {
            const t = await throughput(unary(side), c, SECONDS);
            record(`rps c=${c}`, name, t.rps);
            if (c === 64) record('cpu us/call c=64', name, t.cpuUsPerCall);
          }
        }
        if (CASES.includes('bidi')) {
          const b = await bidiRate(side.client, side.md, BIDI_MIB);
          record('bidi 64KiB MB/s', name, b.mbPerS);
          record('bidi cpu ms/MiB', name, b.cpuMsPerMiB);
        }
      }
    }
  } catch (err) {
    direct.close();
    await baseline?.stop();
    await stack.stop();
    throw err;
  }
  const cols = order.includes('baseline') ? ['direct', 'baseline', 'burrow'] : ['direct', 'burrow'];
  const head =
    cols.map((c) => c.padStart(10)).join('') +
    cols
      .filter((c) => c !== 'direct')
      .map((c) => `${c.slice(0, 4)}/dir`.padStart(10))
      .join('');
  console.log(`\n${'case'.padEnd(18)}${head}   (medians of ${ROUNDS} rounds)`);
  for (const [key, v] of Object.entries(results)) {
    const m = Object.fromEntries(cols.map((c) => [c, v[c] ? median(v[c]) : NaN]));
    const ratios = cols
      .filter((c) => c !== 'direct')
      .map((c) => (m[c] / m.direct).toFixed(2).padStart(10))
      .join('');
    console.log(`${key.padEnd(18)}${cols.map((c) => m[c].toFixed(2).padStart(10)).join('')}${ratios}`);
  }
  direct.close();
  // The leak check of stop() waits on unref'd timers: the process may exit in it, which is fine.
  await baseline?.stop().catch(() => {});
  await stack.stop();
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
