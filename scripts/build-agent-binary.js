#!/usr/bin/env node
// `make agent-binary`: the agent as one file for air-gapped sites, dist/burrow-agent-linux-x64.
//  1. esbuild bundles the compiled agent (packages/agent/dist) and everything it requires into one
//     CommonJS file. jose (ESM) is converted; the Cedar engine's wasm, which
//     @cedar-policy/cedar-wasm/nodejs reads from disk next to its JS, is embedded as bytes instead
//     (plugin below), so any code that requires that module works inside the binary.
//  2. Node's single executable application support (node --experimental-sea-config) turns the
//     bundle plus every file under proto/ (as assets, see packages/tunnel/src/embedded-protos.ts)
//     into a blob; postject injects it into a copy of this Node executable.
//  3. The result is checked in a clean environment (no node on PATH, empty working directory):
//     --version and the hidden `self-check` (protos, Cedar, jose) must pass, else the build fails.
//  4. dist/burrow-agent-linux-x64.sha256 is written in sha256sum format.
// The binary embeds this machine's Node (process.execPath); it needs glibc and nothing else.
'use strict';
const { execFileSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');
const NAME = 'burrow-agent-linux-x64';
const OUT_DIR = path.join(ROOT, 'dist');
const OUT = path.join(OUT_DIR, NAME);
const WORK = path.join(OUT_DIR, 'agent-binary');
const AGENT_CLI = path.join(ROOT, 'packages', 'agent', 'dist', 'cli.js');
const PROTO_ROOT = path.join(ROOT, 'proto');
// The fuse Node's single executable support looks for; fixed for every Node release that has it.
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';

function fail(message) {
  process.stderr.write(`build-agent-binary: ${message}\n`);
  process.exit(1);
}

/**
 * esbuild plugin: @cedar-policy/cedar-wasm/nodejs does
 *   const wasmPath = `${__dirname}/cedar_wasm_bg.wasm`; const wasmBytes = require('fs').readFileSync(wasmPath);
 * which finds nothing in a single executable. Replace the read with a require of the .wasm file,
 * which esbuild's binary loader embeds (a Uint8Array at run time). If a new cedar-wasm release loads
 * its wasm differently, fail the build rather than ship a binary whose policy engine cannot start.
 */
const embedCedarWasm = {
  name: 'embed-cedar-wasm',
  setup(build) {
    build.onLoad({ filter: /[\\/]@cedar-policy[\\/]cedar-wasm[\\/]nodejs[\\/]cedar_wasm\.js$/ }, (args) => {
      const source = fs.readFileSync(args.path, 'utf8');
      const read = /require\(\s*['"]fs['"]\s*\)\.readFileSync\(\s*wasmPath\s*\)/;
      const wasmFile = path.join(path.dirname(args.path), 'cedar_wasm_bg.wasm');
      if (!read.test(source) || !fs.existsSync(wasmFile)) {
        return {
          errors: [
            {
              text:
                `${args.path} no longer reads cedar_wasm_bg.wasm with require('fs').readFileSync(wasmPath); ` +
                `update the embed-cedar-wasm plugin`,
            },
          ],
        };
      }
      return {
        contents: source.replace(read, `require(${JSON.stringify(wasmFile)})`),
        loader: 'js',
        resolveDir: path.dirname(args.path),
      };
    });
  },
};

/**
 * esbuild warns `"jose" should be marked as external for use with "require.resolve"` about
 * packages/agent/src/authn/jose-loader.ts, and it is wrong to follow the advice here: the binary has
 * no node_modules, so jose must be bundled. In the bundle, jose-loader's `require('jose')` is the
 * bundled (ESM converted to CommonJS) module and always succeeds; the `import()` of
 * `require.resolve('jose')` after it is the fallback for Node releases without require(esm)
 * outside the binary, never reached inside it (`self-check` verifies jose in the built binary).
 * Only this one warning, from that file, is dropped; any other still prints.
 */
function isExpectedJoseWarning(w) {
  return (
    w.id === 'require-resolve-not-external' &&
    w.text.startsWith('"jose"') &&
    Boolean(w.location && /[\\/]authn[\\/]jose-loader\.js$/.test(w.location.file))
  );
}

async function bundle(file) {
  const esbuild = require('esbuild');
  const result = await esbuild.build({
    stdin: {
      contents: `require(${JSON.stringify(AGENT_CLI)}).cliMain();`,
      resolveDir: ROOT,
      sourcefile: 'burrow-agent-main.js',
      loader: 'js',
    },
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    outfile: file,
    loader: { '.wasm': 'binary' },
    plugins: [embedCedarWasm],
    keepNames: true,
    logLevel: 'silent',
  });
  for (const w of result.warnings) {
    if (isExpectedJoseWarning(w)) continue;
    process.stderr.write(`build-agent-binary: esbuild: ${w.text} (${w.location ? w.location.file : ''})\n`);
  }
}

function protoAssets() {
  // The compiled tunnel package defines how the binary finds its protos; use its list and names.
  const { listProtoFiles, PROTO_MANIFEST_ASSET } = require(
    path.join(ROOT, 'packages', 'tunnel', 'dist', 'embedded-protos.js'),
  );
  const files = listProtoFiles(PROTO_ROOT, undefined);
  const manifest = path.join(WORK, 'proto-index.json');
  fs.writeFileSync(manifest, `${JSON.stringify(files)}\n`);
  const assets = { [PROTO_MANIFEST_ASSET]: manifest };
  for (const f of files) assets[`proto/${f}`] = path.join(PROTO_ROOT, ...f.split('/'));
  return { assets, count: files.length };
}

/** Runs the binary as an air-gapped site would: no node on PATH, no NODE_*, an empty directory. */
function smoke(binary) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'burrow-agent-smoke-'));
  try {
    const env = {
      PATH: '/usr/sbin:/usr/bin:/sbin:/bin'
        .split(':')
        .filter((d) => !fs.existsSync(path.join(d, 'node')))
        .join(':'),
      HOME: dir,
      LANG: 'C.UTF-8',
    };
    const run = (args) =>
      execFileSync(binary, args, {
        cwd: dir,
        env,
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
        timeout: 60_000,
      });
    const version = run(['--version']).trim();
    const { version: expected } = require(path.join(ROOT, 'packages', 'agent', 'package.json'));
    if (!version.startsWith(`${expected} (protocol `))
      fail(`--version printed "${version}", expected "${expected} (protocol …)"`);
    const check = run(['self-check']).trim();
    if (!/^self-check ok: single executable yes;/.test(check)) fail(`self-check printed "${check}"`);
    return { version, check };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Runs postject without its chatter: progress lines, and LIEF's "Can't find string offset for
 * section name '.note…'" warnings about this Node's many ELF notes (the binary is checked by
 * smoke() right after). What it printed is shown if it fails.
 */
async function quietly(fn) {
  const said = [];
  const saved = { log: console.log, warn: console.warn, error: console.error };
  const keep = (...args) => {
    said.push(args.join(' '));
  };
  Object.assign(console, { log: keep, warn: keep, error: keep });
  try {
    return await fn();
  } catch (err) {
    process.stderr.write(said.map((l) => `build-agent-binary: postject: ${l}\n`).join(''));
    throw err;
  } finally {
    Object.assign(console, saved);
  }
}

async function main() {
  if (process.platform !== 'linux' || process.arch !== 'x64')
    fail(
      `builds ${NAME} only on linux-x64 (this is ${process.platform}-${process.arch}): the binary is this Node ` +
        `executable plus the agent`,
    );
  if (!fs.existsSync(AGENT_CLI)) fail(`${path.relative(ROOT, AGENT_CLI)} is missing; run make build first`);
  const started = Date.now();
  fs.rmSync(WORK, { recursive: true, force: true });
  fs.mkdirSync(WORK, { recursive: true });

  const bundleFile = path.join(WORK, 'burrow-agent.js');
  await bundle(bundleFile);

  const blob = path.join(WORK, 'sea-prep.blob');
  const { assets, count } = protoAssets();
  const seaConfig = path.join(WORK, 'sea-config.json');
  fs.writeFileSync(
    seaConfig,
    JSON.stringify(
      {
        main: bundleFile,
        output: blob,
        // The "single executable applications are experimental" line would precede every log line.
        disableExperimentalSEAWarning: true,
        // V8 code cache for the bundle: faster start; valid because the binary embeds this very Node.
        useCodeCache: true,
        assets,
      },
      null,
      2,
    ),
  );
  // Prints "Wrote single executable preparation blob" on success; errors surface through the throw.
  execFileSync(process.execPath, ['--experimental-sea-config', seaConfig], {
    cwd: WORK,
    stdio: ['ignore', 'pipe', 'pipe'],
  });

  const tmp = `${OUT}.tmp-${process.pid}`;
  try {
    fs.copyFileSync(process.execPath, tmp);
    fs.chmodSync(tmp, 0o755);
    await quietly(() =>
      require('postject').inject(tmp, 'NODE_SEA_BLOB', fs.readFileSync(blob), { sentinelFuse: SEA_FUSE }),
    );
    const result = smoke(tmp);
    fs.renameSync(tmp, OUT);
    const digest = crypto.createHash('sha256').update(fs.readFileSync(OUT)).digest('hex');
    fs.writeFileSync(`${OUT}.sha256`, `${digest}  ${NAME}\n`);
    const mib = (fs.statSync(OUT).size / 2 ** 20).toFixed(1);
    process.stdout.write(
      `built dist/${NAME} (${mib} MiB, ${count} protos, ${((Date.now() - started) / 1000).toFixed(1)} ` +
        `s): ${result.version}\n${result.check}\nsha256 ${digest}\n`,
    );
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

main().catch((err) => fail(err?.stack ? err.stack : String(err)));
