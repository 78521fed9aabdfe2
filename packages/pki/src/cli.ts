#!/usr/bin/env node
/**
 * burrow-pki: command-line front end to @burrow/pki.
 *
 *   burrow-pki init  --dir D [--trust-domain TD] [--key-algorithm ecdsa-p256|ed25519|rsa-2048]
 *                    [--root-ttl 3650d] [--issuing-ttl 365d]
 *   burrow-pki issue --dir D --role broker|agent|service --name N [--dns H]... [--ip A]...
 *                    [--ttl 24h] [--key-algorithm A] --out O
 *
 * Every flag can also come from the environment as BURROW_PKI_<FLAG_IN_UPPER_SNAKE_CASE>
 * (BURROW_PKI_DIR, BURROW_PKI_TRUST_DOMAIN, ...); the command line wins. List flags (--dns,
 * --ip) take comma-separated values in the environment, and on the command line too.
 *
 * Exit codes: 0 success (one summary line on stdout); 2 bad input or refused operation
 * (one line `burrow-pki: <message naming the field>` on stderr); 1 unexpected failure.
 *
 * This is the only module of the package that reads process.argv or process.env.
 */
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import yargs, { type Argv, type Options } from 'yargs';
import { DEFAULT_TRUST_DOMAIN, initPki } from './certificate-authority';
import { parseDuration } from './duration';
import { issueCertificate, writeIssued, ISSUED_FILES } from './issue';
import { DEFAULT_KEY_ALGORITHM, KEY_ALGORITHMS, type KeyAlgorithm } from './key-algorithm';
import { loadPki } from './pki-dir';
import { PkiError } from './pki-error';
import { ROLES, type Role } from './validation';

const PROGRAM = 'burrow-pki';
const ENV_PREFIX = 'BURROW_PKI_';

/** Usage errors detected by yargs itself (missing or unknown flags). */
class UsageError extends Error {}

/** BURROW_PKI_<FLAG> for a flag such as 'trust-domain'. */
function envName(flag: string): string {
  return ENV_PREFIX + flag.replace(/-/g, '_').toUpperCase();
}

/**
 * Declares a flag whose default comes from its environment variable. Done per flag rather
 * than with yargs' `.env()` because `.env()` combined with `.strict()` rejects any unrelated
 * BURROW_PKI_* variable (e.g. BURROW_PKI_TTL set for `issue` would break `init`).
 */
function flag(flagName: string, options: Options & { array?: boolean }): Options {
  const raw = process.env[envName(flagName)];
  const fromEnv = raw === undefined || raw === '' ? undefined : options.array ? splitList(raw) : raw;
  return {
    ...options,
    type: 'string',
    describe: `${options.describe ?? ''} [env ${envName(flagName)}]`.trim(),
    ...(fromEnv === undefined ? {} : { default: fromEnv, defaultDescription: `$${envName(flagName)}` }),
  };
}

function splitList(values: string | readonly string[]): string[] {
  return (Array.isArray(values) ? values : [values])
    .flatMap((v: string) => String(v).split(','))
    .map((v) => v.trim())
    .filter((v) => v !== '');
}

/** Reads a single-valued flag; yargs turns a repeated flag into an array, which we refuse. */
function single(argv: Record<string, unknown>, flagName: string): string | undefined {
  const value = argv[flagName];
  if (Array.isArray(value)) throw new PkiError(`${flagName}: given more than once`);
  return value === undefined ? undefined : String(value);
}

function list(argv: Record<string, unknown>, flagName: string): string[] {
  const value = argv[flagName];
  return value === undefined ? [] : splitList(value as string | string[]);
}

/** Parses a duration flag; errors name the flag, and zero is refused since a lifetime must be positive. */
function durationFlag(argv: Record<string, unknown>, flagName: string): number | undefined {
  const text = single(argv, flagName);
  if (text === undefined) return undefined;
  let ms: number;
  try {
    ms = parseDuration(text);
  } catch (err) {
    throw new PkiError(`${flagName}: ${(err as Error).message}`);
  }
  if (ms <= 0) throw new PkiError(`${flagName}: must be longer than zero (got '${text}')`);
  return ms;
}

function packageVersion(): string {
  try {
    return (JSON.parse(readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

async function runInit(argv: Record<string, unknown>): Promise<void> {
  const dir = single(argv, 'dir')!;
  await initPki({
    dir,
    trustDomain: single(argv, 'trust-domain'),
    keyAlgorithm: single(argv, 'key-algorithm') as KeyAlgorithm | undefined,
    rootTtlMs: durationFlag(argv, 'root-ttl'),
    issuingTtlMs: durationFlag(argv, 'issuing-ttl'),
  });
  const pki = await loadPki(dir);
  const bundle = path.join(dir, pki.manifest.trustBundleFile);
  process.stdout.write(
    `initialised ${dir}: trust domain ${pki.trustDomain}, ${pki.keyAlgorithm}, issuing CA ${pki.signingCa.record.id} valid until ${pki.signingCa.notAfter.toISOString()}, trust bundle ${bundle}\n`,
  );
}

async function runIssue(argv: Record<string, unknown>): Promise<void> {
  const out = single(argv, 'out')!;
  const issued = await issueCertificate({
    dir: single(argv, 'dir')!,
    role: single(argv, 'role') as Role,
    name: single(argv, 'name') ?? '',
    dns: list(argv, 'dns'),
    ip: list(argv, 'ip'),
    ttlMs: durationFlag(argv, 'ttl'),
    keyAlgorithm: single(argv, 'key-algorithm') as KeyAlgorithm | undefined,
  });
  await writeIssued(out, issued);
  process.stdout.write(
    `issued ${issued.spiffeId} serial ${issued.serialHex} expires ${issued.notAfter.toISOString()} -> ${path.join(out, ISSUED_FILES.cert)}\n`,
  );
}

function parser(args: readonly string[]): Argv {
  const dirFlag = flag('dir', { describe: 'PKI directory', demandOption: true });
  const keyAlgorithmFlag = (describe: string): Options => flag('key-algorithm', { describe: `${describe}: ${KEY_ALGORITHMS.join(', ')}` });
  return yargs([...args])
    .scriptName(PROGRAM)
    .usage(`$0 <command> [options]\n\nCreate a Burrow PKI and issue SPIFFE X509-SVID style certificates.`)
    .command(
      'init',
      'create a root CA, an issuing CA and the trust bundle in a new directory',
      (y) =>
        y
          .option('dir', dirFlag)
          .option('trust-domain', flag('trust-domain', { describe: `SPIFFE trust domain (default ${DEFAULT_TRUST_DOMAIN})` }))
          .option('key-algorithm', keyAlgorithmFlag(`CA key algorithm (default ${DEFAULT_KEY_ALGORITHM})`))
          .option('root-ttl', flag('root-ttl', { describe: 'root CA lifetime, e.g. 3650d (default 10 years)' }))
          .option('issuing-ttl', flag('issuing-ttl', { describe: 'issuing CA lifetime, e.g. 365d (default 1 year)' })),
      runInit,
    )
    .command(
      'issue',
      'issue a certificate and key into an output directory (tls.crt, tls.key, ca.crt)',
      (y) =>
        y
          .option('dir', dirFlag)
          .option('role', flag('role', { describe: `role: ${ROLES.join(', ')}`, demandOption: true }))
          .option('name', flag('name', { describe: 'agent or service name (optional for broker)' }))
          .option('dns', flag('dns', { describe: 'DNS name SAN, repeatable (broker only)', array: true }))
          .option('ip', flag('ip', { describe: 'IP address SAN, repeatable (broker only)', array: true }))
          .option('ttl', flag('ttl', { describe: 'lifetime, e.g. 90s, 15m, 24h, 7d, 1h30m (default 24h)' }))
          .option('key-algorithm', keyAlgorithmFlag('key algorithm (default: the PKI\'s)'))
          .option('out', flag('out', { describe: 'output directory, created 0700', demandOption: true })),
      runIssue,
    )
    .demandCommand(1, 'a command is required: init or issue')
    .strict()
    .version(packageVersion())
    .help()
    .alias('h', 'help')
    .wrap(Math.min(100, yargs().terminalWidth()))
    .fail((message, err) => {
      throw err ?? new UsageError(message);
    });
}

/**
 * Runs the CLI with the given arguments (without `node` and the script path) and returns the
 * exit code. `--help` and `--version` print and exit the process directly (yargs' behaviour).
 */
export async function main(args: readonly string[]): Promise<number> {
  try {
    await parser(args).parseAsync();
    return 0;
  } catch (err) {
    const usage = err instanceof PkiError || err instanceof UsageError;
    const message = (err instanceof Error ? err.message : String(err)).replace(/\s*\n\s*/g, ' ').trim();
    process.stderr.write(`${PROGRAM}: ${message}\n`);
    return usage ? 2 : 1;
  }
}

if (require.main === module) {
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
