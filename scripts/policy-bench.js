#!/usr/bin/env node
/**
 * Policy engine latency: `node scripts/policy-bench.js` (after `make build`). Prints p50/p99 of
 * uncached and cached decisions on the example site and on a generated site of ~200 policies and
 * ~5k entities, the same through raw Cedar calls for comparison, and the reload time. Numbers go
 * in docs/policy.md; they are for orientation, not a test (the machine may be shared).
 */
'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { PolicyEngine } = require('../packages/policy/dist');
const cedar = require('@cedar-policy/cedar-wasm/nodejs');

const EXAMPLES = path.join(__dirname, '..', 'examples', 'policy');
const N = Number(process.env.BENCH_N || 10000);

function pct(samples, p) {
  const s = [...samples].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}
function fmt(samples) {
  return `p50 ${pct(samples, 50).toFixed(1)} µs, p99 ${pct(samples, 99).toFixed(1)} µs (n=${samples.length})`;
}
function time(fn) {
  const t = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t) / 1000;
}

function generateSite(dir) {
  fs.mkdirSync(path.join(dir, 'policies'), { recursive: true });
  const groups = 50;
  const entities = [];
  for (let g = 0; g < groups; g++)
    entities.push({
      uid: { type: 'Group', id: `g${g}` },
      attrs: {},
      parents: g >= 10 ? [{ type: 'Group', id: `g${g % 10}` }] : [],
    });
  for (let p = 0; p < 100; p++)
    entities.push({
      uid: { type: 'Project', id: `p${p}` },
      attrs: { team: { __entity: { type: 'Group', id: `g${p % groups}` } } },
      parents: [],
    });
  for (let u = 0; u < 3850; u++) {
    entities.push({
      uid: { type: 'User', id: `u${u}` },
      attrs: { level: u % 5, employee: u % 7 !== 0 },
      parents: [
        { type: 'Group', id: `g${u % groups}` },
        { type: 'Group', id: `g${(u * 7) % groups}` },
      ],
    });
  }
  for (let d = 0; d < 1000; d++) {
    entities.push({
      uid: { type: 'Document', id: `d${d}` },
      attrs: {
        owner: { __entity: { type: 'User', id: `u${d * 3}` } },
        level: d % 5,
        project: { __entity: { type: 'Project', id: `p${d % 100}` } },
      },
      parents: [{ type: 'Project', id: `p${d % 100}` }],
    });
  }
  fs.writeFileSync(path.join(dir, 'entities.json'), JSON.stringify(entities));
  const actions = ['read', 'edit', 'delete', 'share'];
  for (let f = 0; f < 10; f++) {
    const lines = [];
    for (let i = 0; i < 20; i++) {
      const n = f * 20 + i;
      const action = actions[n % 4];
      if (n % 10 === 9)
        lines.push(
          `forbid (principal in Group::"g${n % groups}", action == Action::"${action}", resource in ` +
            `Project::"p${n % 100}") unless { principal.employee };`,
        );
      else if (n % 3 === 0)
        lines.push(
          `permit (principal in Group::"g${n % groups}", action == Action::"${action}", resource in ` +
            `Project::"p${(n * 3) % 100}") when { principal.level >= resource.level };`,
        );
      else if (n % 3 === 1)
        lines.push(
          `permit (principal, action == Action::"${action}", resource is Document) when { resource.owner == ` +
            `principal && context.hour >= ${n % 9} };`,
        );
      else
        lines.push(
          `permit (principal, action == Action::"${action}", resource is Document) when { principal in ` +
            `resource.project.team && principal.level > ${n % 5} };`,
        );
    }
    fs.writeFileSync(path.join(dir, 'policies', `p${f}.cedar`), `${lines.join('\n')}\n`);
  }
  return entities.length;
}

function siteRequests(count) {
  const out = [];
  const actions = ['read', 'edit', 'delete', 'share'];
  for (let i = 0; i < count; i++) {
    out.push({
      subject: { type: 'User', id: `u${(i * 37) % 3850}` },
      action: { name: actions[i % 4] },
      resource: { type: 'Document', id: `d${(i * 11) % 1000}` },
      context: { hour: i % 24 },
    });
  }
  return out;
}

async function benchEngine(label, opts, requests) {
  const engine = await PolicyEngine.open({ ...opts, cacheTtlMs: 0 });
  for (let i = 0; i < 500; i++) engine.evaluate(requests[i % requests.length]); // warm-up (Wasm tier-up)
  const uncached = [];
  let allows = 0;
  for (let i = 0; i < N; i++)
    uncached.push(
      time(() => {
        if (engine.evaluate(requests[i % requests.length]).decision) allows++;
      }),
    );
  console.log(`${label}: uncached ${fmt(uncached)}; ${allows} allows`);
  await engine.close();

  const cachedEngine = await PolicyEngine.open({
    ...opts,
    cacheTtlMs: 60_000,
    auditLog: fs.createWriteStream(os.devNull),
  });
  for (const r of requests.slice(0, 1000)) cachedEngine.evaluate(r);
  const cached = [];
  for (let i = 0; i < N; i++)
    cached.push(time(() => cachedEngine.evaluate(requests[i % Math.min(1000, requests.length)])));
  console.log(`${label}: cached (audit log to /dev/null) ${fmt(cached)}`);
  await cachedEngine.close();
}

function benchRawCedar(label, opts, requests) {
  const policies = fs
    .readdirSync(opts.policiesDir)
    .filter((f) => f.endsWith('.cedar'))
    .map((f) => fs.readFileSync(path.join(opts.policiesDir, f), 'utf8'))
    .join('\n');
  const entities = JSON.parse(fs.readFileSync(opts.entitiesFile, 'utf8'));
  const call = (r) => ({
    principal: { type: r.subject.type, id: r.subject.id },
    action: { type: 'Action', id: r.action.name },
    resource: { type: r.resource.type, id: r.resource.id },
    context: r.context || {},
    entities,
  });
  const n = Math.min(N, entities.length > 1000 ? 50 : N);
  const parseEveryTime = [];
  for (let i = 0; i < n; i++)
    parseEveryTime.push(
      time(() =>
        cedar.isAuthorized({ ...call(requests[i % requests.length]), policies: { staticPolicies: policies } }),
      ),
    );
  console.log(
    `${label}: raw isAuthorized (parse policies + all ${entities.length} entities every call) ${fmt(parseEveryTime)}`,
  );
  cedar.preparsePolicySet('bench', { staticPolicies: policies });
  const stateful = [];
  for (let i = 0; i < n; i++)
    stateful.push(
      time(() => cedar.statefulIsAuthorized({ ...call(requests[i % requests.length]), preparsedPolicySetId: 'bench' })),
    );
  console.log(
    `${label}: raw statefulIsAuthorized (preparsed policies, all ${entities.length} entities every ` +
      `call) ${fmt(stateful)}`,
  );
}

async function main() {
  const sampleRequests = fs
    .readdirSync(path.join(EXAMPLES, 'requests'))
    .filter((f) => /^(permit|deny)-/.test(f))
    .map((f) => JSON.parse(fs.readFileSync(path.join(EXAMPLES, 'requests', f), 'utf8')));
  const sample = { policiesDir: path.join(EXAMPLES, 'policies'), entitiesFile: path.join(EXAMPLES, 'entities.json') };
  console.log(
    `cedar ${cedar.getCedarVersion()}, node ${process.version}, ${os.cpus().length} cpus, ` +
      `load ${os.loadavg()[0].toFixed(1)}`,
  );
  await benchEngine('example site (7 policies, 17 entities)', sample, sampleRequests);
  benchRawCedar('example site', sample, sampleRequests);

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'burrow-policy-bench-'));
  try {
    const count = generateSite(dir);
    const big = { policiesDir: path.join(dir, 'policies'), entitiesFile: path.join(dir, 'entities.json') };
    const requests = siteRequests(5000);
    await benchEngine(`generated site (200 policies, ${count} entities)`, big, requests);
    benchRawCedar('generated site', big, requests);
    const engine = await PolicyEngine.open(big);
    const reloads = [];
    for (let i = 0; i < 10; i++) {
      fs.appendFileSync(
        path.join(big.policiesDir, 'p0.cedar'),
        `permit (principal == User::"extra${i}", action, resource);\n`,
      );
      const r = await engine.reload();
      if (!r.ok) throw new Error(r.error);
      reloads.push(r.durationMs);
    }
    reloads.sort((a, b) => a - b);
    console.log(
      `generated site: reload (read, parse, validate, swap) median ${reloads[5].toFixed(1)} ms, ` +
        `max ${reloads[9].toFixed(1)} ms`,
    );
    await engine.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

module.exports = { generateSite, siteRequests };
if (require.main === module)
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
