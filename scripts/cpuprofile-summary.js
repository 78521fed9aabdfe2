#!/usr/bin/env node
// Summarizes a V8 .cpuprofile (node --cpu-prof): self time by function and by file, top N.
//   node scripts/cpuprofile-summary.js /tmp/prof/CPU.*.cpuprofile [topN]
'use strict';
const fs = require('node:fs');

const [file, topArg] = process.argv.slice(2);
if (!file) {
  console.error('usage: cpuprofile-summary.js FILE.cpuprofile [topN]');
  process.exit(2);
}
const top = Number(topArg ?? 40);
const profile = JSON.parse(fs.readFileSync(file, 'utf8'));
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const selfUs = new Map();
// timeDeltas[i] is the time before samples[i] was taken; attribute it to that sample's node.
for (let i = 0; i < profile.samples.length; i++) {
  const id = profile.samples[i];
  selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
}
const total = [...selfUs.values()].reduce((a, b) => a + b, 0);
const shortUrl = (u) =>
  u
    .replace(/^file:\/\//, '')
    .replace(/.*node_modules\//, '~/')
    .replace(/.*\/packages\//, 'packages/');
const byFn = new Map();
const byFile = new Map();
for (const [id, us] of selfUs) {
  const { callFrame: cf } = byId.get(id);
  const where = cf.url ? `${shortUrl(cf.url)}:${cf.lineNumber + 1}` : '';
  const fn = `${cf.functionName || '(anonymous)'} ${where}`;
  byFn.set(fn, (byFn.get(fn) ?? 0) + us);
  const f = cf.url ? shortUrl(cf.url) : `(${cf.functionName})`;
  byFile.set(f, (byFile.get(f) ?? 0) + us);
}
const print = (title, map) => {
  console.log(`\n${title} (total ${(total / 1000).toFixed(0)} ms)`);
  for (const [k, us] of [...map].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`${((100 * us) / total).toFixed(1).padStart(6)}%  ${(us / 1000).toFixed(0).padStart(7)} ms  ${k}`);
  }
};
print('self time by function', byFn);
print('self time by file', byFile);

// PERF_CALLERS=name: also print the call paths (3 frames up) that lead to functions named `name`.
if (process.env.PERF_CALLERS) {
  const parent = new Map();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const paths = new Map();
  for (const [id, us] of selfUs) {
    if (byId.get(id).callFrame.functionName !== process.env.PERF_CALLERS) continue;
    const chain = [];
    for (let p = parent.get(id), i = 0; p !== undefined && i < 4; p = parent.get(p), i++) {
      const cf = byId.get(p).callFrame;
      chain.push(`${cf.functionName || '(anon)'}@${shortUrl(cf.url).split('/').pop()}:${cf.lineNumber + 1}`);
    }
    const k = chain.join(' < ');
    paths.set(k, (paths.get(k) ?? 0) + us);
  }
  print(`callers of ${process.env.PERF_CALLERS}`, paths);
}
