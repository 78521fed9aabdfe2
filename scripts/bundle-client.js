#!/usr/bin/env node
'use strict';
// Builds what the @burrow/client tarball ships (`make build` and `npm pack` run it):
//  - bundle/index.js and bundle/burrow-call.js: the compiled client (packages/client/dist) with
//    @burrow/tunnel and every third-party module inlined by esbuild. The package then has no
//    dependencies at all, so `npm install burrow-client-*.tgz` never asks a registry for anything:
//    the public registry has unrelated packages named @burrow/*, which must never be fetched.
//  - proto/: the protos the bundled codec loads at run time (auth, policy, tunnel).
// The type declarations are tsc's dist/*.d.ts: the client's public types are declared in the
// client itself, so they need no other package.
const fs = require('node:fs');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');
const PKG = path.join(ROOT, 'packages', 'client');
const OUT = path.join(PKG, 'bundle');

function fail(message) {
  process.stderr.write(`bundle-client: ${message}\n`);
  process.exit(1);
}

// frames.js finds the protos three levels above its own dist directory (the repository's proto/).
// In the bundle, code runs from <package>/bundle, so point it one level up: <package>/proto.
const PROTO_DIR_IN_REPO = "path.resolve(__dirname, '..', '..', '..', 'proto')";
const protoDirPlugin = {
  name: 'burrow-proto-dir',
  setup(build) {
    build.onLoad({ filter: /[\\/]tunnel[\\/]dist[\\/]frames\.js$/ }, (args) => {
      const text = fs.readFileSync(args.path, 'utf8');
      if (!text.includes(PROTO_DIR_IN_REPO))
        fail(`${args.path} no longer defines PROTO_DIR as ${PROTO_DIR_IN_REPO}; update this script`);
      return { contents: text.replace(PROTO_DIR_IN_REPO, "path.resolve(__dirname, '..', 'proto')"), loader: 'js' };
    });
  },
};

function copyProtos() {
  const from = path.join(ROOT, 'proto');
  const to = path.join(PKG, 'proto');
  fs.rmSync(to, { recursive: true, force: true });
  fs.cpSync(from, to, { recursive: true, filter: (src) => fs.statSync(src).isDirectory() || src.endsWith('.proto') });
}

async function main() {
  if (!fs.existsSync(path.join(PKG, 'dist', 'cli.js'))) fail('packages/client/dist is missing: run `make build` first');
  const esbuild = require('esbuild');
  fs.rmSync(OUT, { recursive: true, force: true });
  const common = {
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    logLevel: 'silent',
    plugins: [protoDirPlugin],
  };
  const results = await Promise.all([
    esbuild.build({
      ...common,
      entryPoints: [path.join(PKG, 'dist', 'index.js')],
      outfile: path.join(OUT, 'index.js'),
    }),
    esbuild.build({
      ...common,
      stdin: { contents: "require('./dist/cli.js').cliMain();", resolveDir: PKG, loader: 'js' },
      banner: { js: '#!/usr/bin/env node' },
      outfile: path.join(OUT, 'burrow-call.js'),
    }),
  ]);
  for (const r of results)
    for (const w of r.warnings)
      process.stderr.write(`bundle-client: esbuild: ${w.text} (${w.location ? w.location.file : ''})\n`);
  fs.chmodSync(path.join(OUT, 'burrow-call.js'), 0o755);
  copyProtos();
}

main().catch((err) => fail(err.message));
