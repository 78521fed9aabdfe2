#!/usr/bin/env node
'use strict';
/**
 * A stand-in for a site's identity provider, for demos and manual tests of the agent's token
 * verification. Keys are made when you run it; none is ever committed.
 *
 *   node examples/auth/mint-token.js keys --out DIR
 *       makes an ES256 and an RS256 key pair and writes
 *         DIR/jwks.json               the public keys (give this to burrow-agent --jwks)
 *         DIR/signing-key.jwk         the ES256 private key (mode 0600)
 *         DIR/signing-key-rs256.jwk   the RS256 private key (mode 0600)
 *
 *   node examples/auth/mint-token.js sign --key DIR/signing-key.jwk --iss ISS --aud AUD --sub SUB
 *       [--groups a,b] [--exp 10m] [--nbf 0s] [--claim name=value ...]
 *       prints a signed JWT. --exp and --nbf are offsets from now: 10m, 1h, 30s, or negative
 *       (--exp -5m mints an expired token).
 *
 * Plain Node (20+); uses jose from the repository's node_modules (run `make build` or `npm ci` first).
 */
const fs = require('node:fs');
const path = require('node:path');

const USAGE =
  `usage:
  mint-token.js keys --out DIR
  mint-token.js sign --key FILE --iss ISS --aud AUD --sub SUB ` +
  '[--groups a,b] [--exp 10m] [--nbf 0s] [--claim name=value ...]';

function fail(message) {
  process.stderr.write(`mint-token: ${message}\n`);
  process.exit(2);
}

/** --name value pairs; repeated names collect into arrays. */
function parseFlags(argv) {
  const flags = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) fail(`unexpected argument "${arg}"\n${USAGE}`);
    const name = arg.slice(2);
    const value = argv[i + 1];
    if (value === undefined) fail(`--${name} needs a value`);
    i++;
    flags[name] = flags[name] === undefined ? value : [].concat(flags[name], value);
  }
  return flags;
}

const UNIT_SECONDS = { s: 1, m: 60, h: 3600, d: 86400 };

/** `10m`, `-5m`, `90s`, `2h` -> seconds. */
function offsetSeconds(name, text) {
  const m = /^(-?\d+)(s|m|h|d)$/.exec(String(text));
  if (!m) fail(`--${name} "${text}" is not an offset like 10m, 30s, 2h or -5m`);
  return Number(m[1]) * UNIT_SECONDS[m[2]];
}

function single(flags, name, required) {
  const v = flags[name];
  if (Array.isArray(v)) fail(`--${name} given more than once`);
  if (required && (v === undefined || v === '')) fail(`--${name} is required\n${USAGE}`);
  return v;
}

async function makeKeys(jose, flags) {
  const out = single(flags, 'out', true);
  fs.mkdirSync(out, { recursive: true });
  const publicKeys = [];
  for (const [alg, file] of [
    ['ES256', 'signing-key.jwk'],
    ['RS256', 'signing-key-rs256.jwk'],
  ]) {
    const { publicKey, privateKey } = await jose.generateKeyPair(alg, { extractable: true });
    const publicJwk = await jose.exportJWK(publicKey);
    // The RFC 7638 thumbprint is a stable kid that needs no registry of names.
    const kid = await jose.calculateJwkThumbprint(publicJwk);
    publicKeys.push({ ...publicJwk, kid, alg, use: 'sig' });
    const target = path.join(out, file);
    // Created with 0600 from the start: a private key is never readable by others, not even briefly.
    fs.rmSync(target, { force: true });
    fs.writeFileSync(target, `${JSON.stringify({ ...(await jose.exportJWK(privateKey)), kid, alg }, null, 2)}\n`, {
      mode: 0o600,
      flag: 'wx',
    });
  }
  fs.writeFileSync(path.join(out, 'jwks.json'), `${JSON.stringify({ keys: publicKeys }, null, 2)}\n`);
  process.stdout.write(
    `wrote ${path.join(out, 'jwks.json')} (public), ${path.join(out, 'signing-key.jwk')} (ES256, private) ` +
      `and ${path.join(out, 'signing-key-rs256.jwk')} (RS256, private)\n`,
  );
}

async function sign(jose, flags) {
  const keyFile = single(flags, 'key', true);
  let jwk;
  try {
    jwk = JSON.parse(fs.readFileSync(keyFile, 'utf8'));
  } catch (err) {
    fail(`--key ${keyFile}: ${err.code || err.message}`);
  }
  if (!jwk.alg || !jwk.d)
    fail(`--key ${keyFile} is not a private JWK with an "alg" (make one with: mint-token.js keys --out DIR)`);
  const key = await jose.importJWK(jwk, jwk.alg);
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: single(flags, 'sub', true) };
  if (flags.groups !== undefined)
    claims.groups = String(single(flags, 'groups'))
      .split(',')
      .map((g) => g.trim())
      .filter(Boolean);
  for (const pair of [].concat(flags.claim ?? [])) {
    const eq = pair.indexOf('=');
    if (eq <= 0) fail(`--claim "${pair}" is not name=value`);
    claims[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  const token = new jose.SignJWT(claims)
    .setProtectedHeader({ alg: jwk.alg, kid: jwk.kid, typ: 'JWT' })
    .setIssuer(single(flags, 'iss', true))
    .setAudience(single(flags, 'aud', true))
    .setIssuedAt(now)
    .setExpirationTime(now + offsetSeconds('exp', single(flags, 'exp') ?? '10m'));
  if (flags.nbf !== undefined) token.setNotBefore(now + offsetSeconds('nbf', single(flags, 'nbf')));
  process.stdout.write(`${await token.sign(key)}\n`);
}

async function main() {
  const [command, ...rest] = process.argv.slice(2);
  if (command === undefined || command === '--help' || command === '-h') {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const flags = parseFlags(rest);
  // jose 6 is an ES module; import() loads it from CommonJS on every Node 20 release.
  const jose = await import('jose');
  if (command === 'keys') await makeKeys(jose, flags);
  else if (command === 'sign') await sign(jose, flags);
  else fail(`unknown command "${command}"\n${USAGE}`);
}

main().catch((err) => fail(err.message));
