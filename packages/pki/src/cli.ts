#!/usr/bin/env node
/**
 * burrow-pki: command-line front end to @burrow/pki.
 *
 *   burrow-pki init  --dir D [--trust-domain TD] [--key-algorithm ecdsa-p256|ed25519|rsa-2048]
 *                    [--root-ttl 3650d] [--issuing-ttl 365d]
 *   burrow-pki issue --dir D --role broker|agent|service --name N [--dns H]... [--ip A]...
 *                    [--ttl 24h] [--key-algorithm A] --out O
 *   burrow-pki token create --dir D --agent-id ID --broker HOST:PORT... [--server-name N] [--ttl 1h]
 *                                                                  prints only the token
 *   burrow-pki rotate --dir D init|update-clients|update-servers|finish|rollback|status [--force] [--json]
 *   burrow-pki revoke --dir D (--agent-id ID | --serial HEX) [--ban]
 *   burrow-pki crl    --dir D [--out F]                            PEM to F, or to stdout
 *   burrow-pki check  --dir D [--warn-days 60]
 *
 * Every flag can also come from the environment as BURROW_PKI_<FLAG_IN_UPPER_SNAKE_CASE>
 * (BURROW_PKI_DIR, BURROW_PKI_TRUST_DOMAIN, ...); the command line wins. List flags (--dns,
 * --ip) take comma-separated values in the environment, and on the command line too.
 *
 * Exit codes: 0 success (one summary line on stdout); 2 bad input or refused operation
 * (one line `burrow-pki: <message naming the field>` on stderr); 1 unexpected failure, and
 * for `check`, problems found (one line each on stdout).
 *
 * This is the only module of the package that reads process.argv or process.env.
 */
import { promises as fs, readFileSync } from 'node:fs';
import * as path from 'node:path';
import { explainUsageError, misspeltFlag, usageOptionsOf } from '@burrow/tunnel/dist/explain-usage-error';
import yargs, { type Argv, type Options } from 'yargs';
import { DEFAULT_TRUST_DOMAIN, initPki } from './certificate-authority';
import { parseDuration } from './duration';
import { issueCertificate, writeIssued, ISSUED_FILES } from './issue';
import { DEFAULT_KEY_ALGORITHM, KEY_ALGORITHMS, type KeyAlgorithm } from './key-algorithm';
import { loadPki } from './pki-dir';
import { PkiError } from './pki-error';
import { describeTightened, securePkiDir, type PrivateDirOutcome } from './private-dir';
import { ROLES, type Role } from './validation';
import { checkPki, DEFAULT_WARN_DAYS } from './check';
import { validLeavesOf } from './issued-log';
import { createJoinToken } from './join-token';
import { revokeDetailed, writeCrl } from './revocation';
import {
  agentStates,
  humanDuration,
  rotate,
  rotationState,
  ROTATE_ACTIONS,
  type RotateAction,
  type RotationState,
} from './rotation';

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
    return (JSON.parse(readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8')) as { version: string })
      .version;
  } catch {
    return 'unknown';
  }
}

/** Reports a directory tightened to 0700 on stderr: stdout stays the command's one summary line. */
function reportTightened(outcome: PrivateDirOutcome): void {
  const line = describeTightened(outcome);
  if (line) process.stderr.write(`${PROGRAM}: ${line}\n`);
}

async function runInit(argv: Record<string, unknown>): Promise<void> {
  const dir = single(argv, 'dir')!;
  // init makes an existing (empty) directory 0700 itself; say so when it was looser.
  const modeBefore = await fs.stat(dir).then(
    (st) => st.mode & 0o777,
    () => undefined,
  );
  await initPki({
    dir,
    trustDomain: single(argv, 'trust-domain'),
    keyAlgorithm: single(argv, 'key-algorithm') as KeyAlgorithm | undefined,
    rootTtlMs: durationFlag(argv, 'root-ttl'),
    issuingTtlMs: durationFlag(argv, 'issuing-ttl'),
  });
  if (modeBefore !== undefined && (modeBefore & 0o077) !== 0) {
    reportTightened({ dir: path.resolve(dir), created: false, tightenedFromMode: modeBefore });
  }
  const pki = await loadPki(dir);
  const bundle = path.join(dir, pki.manifest.trustBundleFile);
  process.stdout.write(
    `initialised ${dir}: trust domain ${pki.trustDomain}, ${pki.keyAlgorithm}, issuing ` +
      `CA ${pki.signingCa.record.id} valid until ${pki.signingCa.notAfter.toISOString()}, trust bundle ${bundle}\n`,
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
  reportTightened(await writeIssued(out, issued));
  process.stdout.write(
    `issued ${issued.spiffeId} serial ${issued.serialHex} expires ${issued.notAfter.toISOString()} ` +
      `-> ${path.join(out, ISSUED_FILES.cert)}\n`,
  );
}

/** Boolean flag (--force, --ban, --json); its environment variable counts when it is 1/true/yes. */
function boolFlag(flagName: string, describe: string): Options {
  const raw = process.env[envName(flagName)];
  const fromEnv = raw !== undefined && /^(1|true|yes)$/i.test(raw.trim());
  return { type: 'boolean', describe: `${describe} [env ${envName(flagName)}]`, default: fromEnv };
}

/** Set by `check` when it found problems: exit 1 without an error line. */
let exitCodeOverride: number | undefined;

async function runTokenCreate(argv: Record<string, unknown>): Promise<void> {
  const info = await createJoinToken({
    dir: single(argv, 'dir')!,
    agentId: single(argv, 'agent-id')!,
    ttlMs: durationFlag(argv, 'ttl'),
    brokers: list(argv, 'broker'),
    serverName: single(argv, 'server-name'),
  });
  // Only the token on stdout, so `TOKEN=$(burrow-pki token create ...)` works.
  process.stdout.write(`${info.token}\n`);
}

async function runRotate(argv: Record<string, unknown>): Promise<void> {
  const dir = single(argv, 'dir')!;
  const action = single(argv, 'action')!;
  if (action === 'status') {
    const state = await rotationState(dir);
    const agents = await agentStates(dir);
    if (argv.json) {
      process.stdout.write(`${JSON.stringify({ ...state, agents }, null, 2)}\n`);
    } else {
      process.stdout.write(await statusText(dir, state, agents));
    }
    return;
  }
  if (argv.force && action !== 'finish') throw new PkiError('force: only applies to finish');
  const state = await rotate({ dir, action: action as RotateAction, force: Boolean(argv.force) });
  for (const warning of state.warnings ?? []) process.stderr.write(`${PROGRAM}: warning: ${warning}\n`);
  if (argv.json) {
    process.stdout.write(`${JSON.stringify(state, null, 2)}\n`);
    return;
  }
  const signer = (pick: (c: RotationState['cas'][number]) => boolean): string => state.cas.find(pick)?.id ?? '?';
  process.stdout.write(
    `rotate ${action}: phase ${state.phase}, bundle version ${state.bundleVersion}, trusted roots ${state.cas
      .filter((c) => c.kind === 'root')
      .map((c) => c.id)
      .join(
        ' + ',
      )}, agents/services signed by ${signer((c) => c.signsClients)}, brokers by ${signer((c) => c.signsServers)}\n`,
  );
}

async function statusText(
  dir: string,
  state: RotationState,
  agents: Awaited<ReturnType<typeof agentStates>>,
): Promise<string> {
  const nowMs = Date.now();
  const lines: string[] = [
    `phase: ${state.phase}`,
    `bundle version: ${state.bundleVersion}`,
    '',
    'CAs (all in the trust bundle):',
  ];
  lines.push(...caTable(state, nowMs));
  const pki = await loadPki(dir);
  const rotation = pki.manifest.rotation;
  if (rotation !== undefined) {
    lines.push('', await oldCaLine(pki.dir, rotation.oldIssuingCaId, nowMs));
  }
  lines.push(
    '',
    `agents (as recorded by brokers; converged = bundle version ${state.bundleVersion} and certificate ` +
      `from ${pki.signingCa.record.id}):`,
  );
  lines.push(...agentLines(agents, state.bundleVersion, pki.signingCa.record.id, nowMs));
  return `${lines.join('\n')}\n`;
}

/** One row per CA of the trust bundle: its lifetime left and what it signs. */
function caTable(state: RotationState, nowMs: number): string[] {
  return table(
    ['ID', 'KIND', 'NOT AFTER', 'SIGNS'],
    state.cas.map((c) => [
      c.id,
      c.kind,
      `${c.notAfter.toISOString()} (${humanDuration(c.notAfter.getTime() - nowMs)} left)`,
      c.kind === 'root'
        ? '-'
        : [c.signsClients ? 'agents, services' : '', c.signsServers ? 'brokers' : '']
            .filter((x) => x !== '')
            .join(', ') || 'nothing',
    ]),
  );
}

/** During a rotation: whether the old issuing CA still has valid certificates ('finish' waits for none). */
async function oldCaLine(pkiDir: string, oldIssuingCaId: string, nowMs: number): Promise<string> {
  const old = await validLeavesOf(pkiDir, oldIssuingCaId, nowMs);
  return old.count === 0
    ? `old CA ${oldIssuingCaId}: no valid certificates left; 'finish' can remove it`
    : `old CA ${oldIssuingCaId}: ${old.count} certificate(s) still valid, the last ` +
        `until ${old.lastNotAfter!.toISOString()}`;
}

/**
 * The agents brokers recorded, and how many have converged: they hold bundle `bundleVersion`
 * and a certificate from the signing CA `signingCaId`.
 */
function agentLines(
  agents: Awaited<ReturnType<typeof agentStates>>,
  bundleVersion: number,
  signingCaId: string,
  nowMs: number,
): string[] {
  if (agents.length === 0) return ['  (none recorded)'];
  const isConverged = (a: (typeof agents)[number]): boolean =>
    a.bundleVersion === bundleVersion && a.issuerCaId === signingCaId;
  return [
    ...table(
      ['AGENT', 'BUNDLE', 'ISSUER', 'CERT NOT AFTER', 'UPDATED', 'CONVERGED'],
      agents.map((a) => [
        a.agentId,
        String(a.bundleVersion),
        a.issuerCaId,
        a.notAfter.toISOString() + (a.notAfter.getTime() <= nowMs ? ' (expired)' : ''),
        a.updatedAt.toISOString(),
        isConverged(a) ? 'yes' : 'no',
      ]),
    ),
    `  ${agents.filter(isConverged).length}/${agents.length} converged`,
  ];
}

function table(header: string[], rows: string[][]): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const fmt = (cells: string[]): string => `  ${cells.map((c, i) => c.padEnd(widths[i]!)).join('  ')}`.trimEnd();
  return [fmt(header), ...rows.map(fmt)];
}

async function runRevoke(argv: Record<string, unknown>): Promise<void> {
  const agentId = single(argv, 'agent-id');
  const serialHex = single(argv, 'serial');
  const result = await revokeDetailed({ dir: single(argv, 'dir')!, agentId, serialHex, ban: Boolean(argv.ban) });
  const what =
    agentId !== undefined
      ? `agent ${agentId}: every certificate issued up to now${argv.ban ? ', and enrollment (banned)' : ''}`
      : `serial ${serialHex!.replace(/:/g, '').toUpperCase()}` +
        `${result.serialKnown === false ? ' (not in the issued-certificate log; listed in every CRL)' : ''}`;
  process.stdout.write(
    `revoked ${what}; ${result.serials.length} serial(s) added; revocation list version ${result.version}\n`,
  );
}

async function runCrl(argv: Record<string, unknown>): Promise<void> {
  const out = single(argv, 'out');
  const pem = await writeCrl({ dir: single(argv, 'dir')!, outFile: out });
  if (out === undefined) process.stdout.write(pem);
  else process.stdout.write(`wrote ${(pem.match(/BEGIN X509 CRL/g) ?? []).length} CRL(s) to ${out}\n`);
}

async function runCheck(argv: Record<string, unknown>): Promise<void> {
  const warnText = single(argv, 'warn-days');
  const warnDays = warnText === undefined ? DEFAULT_WARN_DAYS : Number(warnText);
  if (warnText !== undefined && (!/^\d+$/.test(warnText) || !Number.isSafeInteger(warnDays))) {
    throw new PkiError(`warn-days: must be a whole number of days (got '${warnText}')`);
  }
  const result = await checkPki({ dir: single(argv, 'dir')!, warnDays });
  if (!result.ok) {
    for (const problem of result.problems) process.stdout.write(`${problem}\n`);
    exitCodeOverride = 1;
    return;
  }
  const soonest = [...result.cas].sort((a, b) => a.daysLeft - b.daysLeft)[0];
  process.stdout.write(
    `ok: ${result.cas.length} CAs, none expires within ${warnDays} days; soonest ${soonest?.id ?? '-'} ` +
      `on ${soonest?.notAfter.toISOString() ?? '-'} (${Math.round(soonest?.daysLeft ?? 0)} days left)\n`,
  );
}

/** `--key-algorithm`, described with the algorithms it accepts. */
function keyAlgorithmFlag(describe: string): Options {
  return flag('key-algorithm', { describe: `${describe}: ${KEY_ALGORITHMS.join(', ')}` });
}

function parser(args: readonly string[]): Argv {
  // Built once per parse, so every command's --dir reads BURROW_PKI_DIR at the same moment.
  const dirFlag = flag('dir', { describe: 'PKI directory', demandOption: true });
  const y = yargs([...args])
    .scriptName(PROGRAM)
    .usage(`$0 <command> [options]\n\nCreate a Burrow PKI and issue SPIFFE X509-SVID style certificates.`);
  return withCommonBehaviour(withPkiCommands(y, dirFlag), args);
}

/** A burrow-pki command; its options builder gets the shared --dir flag. */
interface PkiCommand {
  readonly command: string;
  readonly describe: string;
  readonly options: (y: Argv, dirFlag: Options) => Argv;
  /** Absent for a command that only groups subcommands. */
  readonly run?: (argv: Record<string, unknown>) => Promise<void>;
}

// In the order --help lists them.
const PKI_COMMANDS: readonly PkiCommand[] = [
  // Commands that create things: the PKI itself, certificates and join tokens.
  {
    command: 'init',
    describe: 'create a root CA, an issuing CA and the trust bundle in a new directory',
    options: initOptions,
    run: runInit,
  },
  {
    command: 'issue',
    describe: 'issue a certificate and key into an output directory (tls.crt, tls.key, ca.crt)',
    options: issueOptions,
    run: runIssue,
  },
  { command: 'token', describe: 'manage join tokens', options: tokenCommands },
  // Commands that operate an existing PKI: rotation, revocation, CRLs and expiry checks.
  {
    command: 'rotate <action>',
    describe: 'CA rotation: init, update-clients, update-servers, finish, rollback, or status',
    options: rotateOptions,
    run: runRotate,
  },
  {
    command: 'revoke',
    describe: 'revoke a certificate by serial, or every certificate of an agent id so far',
    options: revokeOptions,
    run: runRevoke,
  },
  {
    command: 'crl',
    describe: 'write CRLs (PEM, one per issuing CA) of the revoked certificates',
    options: crlOptions,
    run: runCrl,
  },
  {
    command: 'check',
    describe: 'check CA expiry: exit 1 with one line per CA expiring within --warn-days',
    options: checkOptions,
    run: runCheck,
  },
];

function withPkiCommands(y: Argv, dirFlag: Options): Argv {
  return PKI_COMMANDS.reduce((yy, c) => yy.command(c.command, c.describe, (sub) => c.options(sub, dirFlag), c.run), y);
}

function initOptions(y: Argv, dirFlag: Options): Argv {
  return y
    .option('dir', dirFlag)
    .option('trust-domain', flag('trust-domain', { describe: `SPIFFE trust domain (default ${DEFAULT_TRUST_DOMAIN})` }))
    .option('key-algorithm', keyAlgorithmFlag(`CA key algorithm (default ${DEFAULT_KEY_ALGORITHM})`))
    .option('root-ttl', flag('root-ttl', { describe: 'root CA lifetime, e.g. 3650d (default 10 years)' }))
    .option('issuing-ttl', flag('issuing-ttl', { describe: 'issuing CA lifetime, e.g. 365d (default 1 year)' }));
}

function issueOptions(y: Argv, dirFlag: Options): Argv {
  return y
    .option('dir', dirFlag)
    .option('role', flag('role', { describe: `role: ${ROLES.join(', ')}`, demandOption: true }))
    .option(
      'name',
      flag('name', {
        describe:
          'agent, service or broker name, the last segment of spiffe://<td>/<role>/<name> ' +
          "(a broker's default: its first --dns or --ip)",
      }),
    )
    .option('dns', flag('dns', { describe: 'DNS name SAN, repeatable (broker only)', array: true }))
    .option('ip', flag('ip', { describe: 'IP address SAN, repeatable (broker only)', array: true }))
    .option('ttl', flag('ttl', { describe: 'lifetime, e.g. 90s, 15m, 24h, 7d, 1h30m (default 24h)' }))
    .option('key-algorithm', keyAlgorithmFlag("key algorithm (default: the PKI's)"))
    .option(
      'out',
      flag('out', {
        describe: 'output directory, created 0700 (an existing one is tightened to 0700)',
        demandOption: true,
      }),
    );
}

function tokenCommands(y: Argv, dirFlag: Options): Argv {
  return y
    .command(
      'create',
      'create a single-use join token bound to an agent id; prints only the token',
      (yy) =>
        yy
          .option('dir', dirFlag)
          .option('agent-id', flag('agent-id', { describe: 'agent id the token enrolls', demandOption: true }))
          .option(
            'broker',
            flag('broker', {
              describe:
                'HOST:PORT of a broker agent listener the agent enrolls at and connects to (repeatable; the ' +
                'token carries them, so the agent needs no other flag)',
              array: true,
              demandOption: true,
            }),
          )
          .option(
            'server-name',
            flag('server-name', {
              describe: 'TLS name the agent expects in the broker certificate when it differs from the --broker host',
            }),
          )
          .option('ttl', flag('ttl', { describe: 'token lifetime, e.g. 10m, 1h (default 1h)' })),
      runTokenCreate,
    )
    .demandCommand(1, 'a token command is required: create');
}

function crlOptions(y: Argv, dirFlag: Options): Argv {
  return y.option('dir', dirFlag).option('out', flag('out', { describe: 'output file (default: stdout)' }));
}

function checkOptions(y: Argv, dirFlag: Options): Argv {
  return y
    .option('dir', dirFlag)
    .option(
      'warn-days',
      flag('warn-days', { describe: `warn when fewer days are left (default ${DEFAULT_WARN_DAYS})` }),
    );
}

function rotateOptions(y: Argv, dirFlag: Options): Argv {
  return y
    .positional('action', {
      type: 'string',
      choices: [...ROTATE_ACTIONS, 'status'],
      describe: 'phase change, or status',
    })
    .option('dir', dirFlag)
    .option('force', boolFlag('force', 'finish: drop the old CA although certificates it signed are still valid'))
    .option('json', boolFlag('json', 'print the state as JSON'));
}

function revokeOptions(y: Argv, dirFlag: Options): Argv {
  return y
    .option('dir', dirFlag)
    .option('agent-id', flag('agent-id', { describe: 'revoke every certificate issued to this agent id up to now' }))
    .option('serial', flag('serial', { describe: 'revoke the certificate with this serial (hex)' }))
    .option('ban', boolFlag('ban', 'with --agent-id: also refuse enrollment of this id'));
}

/** Directory hardening, strictness, help/version and error handling shared by every command. */
function withCommonBehaviour(y: Argv, args: readonly string[]): Argv {
  return y
    .middleware(async (argv) => {
      // Every command but init works on an existing PKI directory: one left group/world
      // accessible (copied, unpacked, chmod'ed) is tightened before the command reads its keys.
      if (argv._[0] === 'init' || typeof argv.dir !== 'string') return;
      for (const outcome of await securePkiDir(argv.dir)) reportTightened(outcome);
    })
    .demandCommand(1, 'a command is required: init, issue, token, rotate, revoke, crl or check')
    .check(() => {
      const misspelt = misspeltFlag(args, usageOptionsOf(y));
      if (misspelt) throw new UsageError(misspelt);
      return true;
    }, true)
    .strict()
    .version(packageVersion())
    .help()
    .alias('h', 'help')
    .wrap(Math.min(100, yargs().terminalWidth()))
    .fail((message, err) => {
      // The flags' variables are BURROW_PKI_<FLAG> (see flag()), not yargs' .env(): name them.
      const options = { ...usageOptionsOf(y), envPrefix: ENV_PREFIX.slice(0, -1) };
      throw err ?? new UsageError(explainUsageError(message, args, options));
    });
}

/**
 * Runs the CLI with the given arguments (without `node` and the script path) and returns the
 * exit code. `--help` and `--version` print and exit the process directly (yargs' behaviour).
 */
export async function main(args: readonly string[]): Promise<number> {
  try {
    exitCodeOverride = undefined;
    await parser(args).parseAsync();
    return exitCodeOverride ?? 0;
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
