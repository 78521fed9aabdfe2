#!/usr/bin/env node
/**
 * burrow-call: poke a site through a broker the way grpcurl pokes a server, without writing a
 * caller. The only file of the client that reads process.argv and the environment: flags,
 * BURROW_CALL_* variables and the YAML config file become a {@link CallTarget}, then one command
 * runs. Exit codes: the gRPC status of the call (0 OK, 14 UNAVAILABLE, ...); 2 for a bad command
 * line or configuration, before anything is sent; `check` answers DENY with 20 and UNAUTHENTICATED
 * with 21 (above every gRPC code), so a script can act on the verdict.
 */
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { status as Status } from '@grpc/grpc-js';
import yargs, { type Argv, type CommandModule } from 'yargs';
import { hideBin } from 'yargs/helpers';
import {
  CONFIG_FILE_OPTION,
  ConfigError,
  parseCommandLine,
  parseDurationMs,
  parseListenAddress,
  requireCertificatePair,
  requireReadableFile,
  silenceIpServerNameWarning,
  stringOption,
  withEnvAndConfigFile,
} from '@burrow/tunnel';
import { BurrowCallError, BurrowClient, type CheckRequest, type CheckResponse, type JsonObject } from './burrow-client';
import { ProtoMethod } from './proto-method';

const PROG = 'burrow-call';
const VERSION: string = (require('../package.json') as { version: string }).version;

/** The flags every command takes (the shared interface of issue 16). */
const TARGET_OPTIONS = {
  broker: stringOption("HOST:PORT of a broker's caller API"),
  'cert-dir': stringOption('directory with tls.crt, tls.key (a service certificate) and ca.crt, as burrow-pki issues'),
  agent: stringOption('id of the agent (site) that answers the call'),
  'server-name': stringOption('TLS name to expect in the broker certificate when it differs from the --broker host'),
  timeout: { type: 'string', describe: 'deadline of the call, retries of UNAVAILABLE included', default: '10s' },
  json: { type: 'boolean', describe: 'print one JSON object per result (for scripts)', default: false },
  ...CONFIG_FILE_OPTION,
} as const;

const AUTHENTICATE_OPTIONS = {
  token: stringOption("the token to verify with the site's keys"),
  audience: stringOption('audience the token must name (default: what the agent is configured with)'),
} as const;

const REQUEST_OPTION = {
  // requiresArg: yargs would otherwise take `-` (stdin) for a positional argument.
  request: { ...stringOption('file with the AuthZEN JSON request, or - for stdin'), requiresArg: true },
} as const;

const INVOKE_OPTIONS = {
  data: stringOption('the request as JSON (field names as in the .proto); needs --proto'),
  proto: stringOption('.proto file that defines the method (imports are resolved next to it)'),
  raw: { type: 'boolean', describe: 'send the bytes on stdin as the request, write the response bytes to stdout' },
} as const;

const CHECK_OPTIONS = {
  method: { ...stringOption('HTTP method of the request to judge'), default: 'GET' },
  path: stringOption('path and query of the request, as sent (percent-encoded)'),
  host: stringOption('Host header of the request'),
  token: stringOption("bearer token of the request (without 'Bearer '); the variable keeps it out of ps"),
  'token-file': stringOption('file holding the bearer token (instead of --token)'),
  header: { type: 'string', array: true, describe: 'NAME=VALUE: a request header the mapping may read (repeatable)' },
  extension: { type: 'string', array: true, describe: 'KEY=VALUE: a context extension, as a gateway route sets one' },
} as const;

/** `check`'s exit codes for the verdicts that are not ALLOW: above every gRPC status code (0-16). */
export const CHECK_EXIT_CODES = { DENY: 20, UNAUTHENTICATED: 21 } as const;

type Args = Record<string, unknown>;

/** Where a call goes and how long it may take. */
export interface CallTarget {
  broker: string;
  agent: string;
  certDir: string;
  serverName: string | undefined;
  timeoutMs: number;
  json: boolean;
}

/** Builds the call target; every problem is a ConfigError naming its flag. */
export function callTargetFromArgs(args: Args): CallTarget {
  const required = (k: string, what: string): string => {
    const v = args[k];
    if (v === undefined || v === '')
      throw new ConfigError(k, `is required (${what}; or BURROW_CALL_${k.toUpperCase().replace(/-/g, '_')})`);
    return String(v);
  };
  const broker = parseListenAddress('broker', required('broker', "HOST:PORT of a broker's caller API"));
  const certDir = required('cert-dir', 'directory with tls.crt, tls.key and ca.crt');
  const agent = required('agent', 'id of the agent to call');
  const cert = requireReadableFile('cert-dir', path.join(certDir, 'tls.crt'));
  const key = requireReadableFile('cert-dir', path.join(certDir, 'tls.key'));
  requireReadableFile('cert-dir', path.join(certDir, 'ca.crt'));
  requireCertificatePair('cert-dir', cert, 'cert-dir', key, 'service');
  const timeoutMs = parseDurationMs('timeout', args.timeout);
  if (timeoutMs <= 0) throw new ConfigError('timeout', 'must be more than 0s');
  return {
    broker,
    agent,
    certDir,
    serverName: args['server-name'] ? String(args['server-name']) : undefined,
    timeoutMs,
    json: args.json === true,
  };
}

function fail(message: string): never {
  process.stderr.write(`${PROG}: ${message.split('\n')[0]}\n`);
  process.exit(2);
}

function statusName(code: number): string {
  return (Status as unknown as Record<number, string>)[code] ?? `STATUS_${code}`;
}

/** Reads `--request FILE|-` as a JSON object. */
async function readJsonRequest(args: Args): Promise<JsonObject> {
  const from = args.request === undefined || args.request === '' ? undefined : String(args.request);
  if (!from) throw new ConfigError('request', 'is required (a file with the AuthZEN JSON request, or - for stdin)');
  let text: string;
  try {
    text = from === '-' ? (await readStdin()).toString('utf8') : readFileSync(from, 'utf8');
  } catch (err) {
    throw new ConfigError('request', `cannot read ${from}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError('request', `${from === '-' ? 'stdin' : from} is not JSON (${(err as Error).message})`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    throw new ConfigError('request', `${from === '-' ? 'stdin' : from} is not a JSON object`);
  return json as JsonObject;
}

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

function out(target: CallTarget, json: unknown, human: string): void {
  process.stdout.write(target.json ? `${JSON.stringify(json)}\n` : human.endsWith('\n') ? human : `${human}\n`);
}

function reasonOf(context: JsonObject | undefined): string {
  const r = context?.reason ?? context?.error;
  return typeof r === 'string' && r !== '' ? r : '';
}

function describeDecision(decision: boolean, context: JsonObject | undefined): string {
  const lines = [decision ? 'permit' : 'deny'];
  const reason = reasonOf(context);
  if (reason) lines.push(`  reason: ${reason}`);
  const policies = context?.policies;
  if (Array.isArray(policies) && policies.length > 0) lines.push(`  policies: ${policies.join(', ')}`);
  if (context?.explanation !== undefined) lines.push(`  explanation: ${JSON.stringify(context.explanation)}`);
  return lines.join('\n');
}

/** One command against the target: resolves when the result is printed. */
type Command = (client: BurrowClient, target: CallTarget, args: Args) => Promise<void>;

const ping: Command = async (client, target) => {
  const r = await client.ping(target.agent, { timeoutMs: target.timeoutMs });
  const rttMs = Math.round(r.rttMs * 10) / 10;
  out(
    target,
    { agent: target.agent, broker: target.broker, status: r.status, rtt_ms: rttMs },
    `${target.agent} via ${target.broker}: ${r.status} in ${rttMs} ms`,
  );
};

const authenticate: Command = async (client, target, args) => {
  if (args.token === undefined || args.token === '')
    throw new ConfigError('token', 'is required (the token to verify; or BURROW_CALL_TOKEN)');
  const audience = args.audience ? String(args.audience) : '';
  const r = await client.authenticate(target.agent, String(args.token), audience, { timeoutMs: target.timeoutMs });
  const json: JsonObject = {
    authenticated: r.authenticated,
    subject: r.subject,
    groups: r.groups,
    claims: r.claims,
    reason: r.reason,
  };
  if (r.expiresAt) json.expires_at = r.expiresAt.toISOString();
  const human = r.authenticated
    ? [
        `authenticated: ${r.subject}`,
        `  groups: ${r.groups.length > 0 ? r.groups.join(', ') : '(none)'}`,
        ...(r.expiresAt ? [`  expires: ${r.expiresAt.toISOString()}`] : []),
        `  claims: ${JSON.stringify(r.claims)}`,
      ].join('\n')
    : `not authenticated: ${r.reason}`;
  out(target, json, human);
};

const evaluate: Command = async (client, target, args) => {
  const request = await readJsonRequest(args);
  const r = await client.evaluate(target.agent, request, { timeoutMs: target.timeoutMs });
  out(target, r, describeDecision(r.decision, r.context));
};

const evaluations: Command = async (client, target, args) => {
  const request = await readJsonRequest(args);
  if (!Array.isArray(request.evaluations))
    throw new ConfigError('request', 'an evaluations request needs an "evaluations" array');
  const r = await client.evaluations(target.agent, request as never, { timeoutMs: target.timeoutMs });
  const human = r.evaluations.map((e, i) => `${i + 1}: ${describeDecision(e.decision, e.context)}`).join('\n');
  out(target, r, human || '(no evaluations)');
};

/** `NAME=VALUE` flags as a map; header names lower case. */
function pairsOf(flag: string, v: unknown, lower: boolean): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of v === undefined ? [] : Array.isArray(v) ? v : [v]) {
    const text = String(item);
    const eq = text.indexOf('=');
    if (eq <= 0) throw new ConfigError(flag, `"${text}" is not NAME=VALUE`);
    const name = lower ? text.slice(0, eq).toLowerCase() : text.slice(0, eq);
    out[name] = name in out ? `${out[name]},${text.slice(eq + 1)}` : text.slice(eq + 1);
  }
  return out;
}

function tokenOf(args: Args): string {
  if (args.token && args['token-file']) throw new ConfigError('token-file', 'give --token or --token-file, not both');
  if (!args['token-file']) return args.token ? String(args.token) : '';
  const file = requireReadableFile('token-file', args['token-file']);
  return readFileSync(file, 'utf8').trim();
}

function describeCheck(r: CheckResponse): string {
  const lines = [`${r.verdict.toLowerCase()}  decision ${r.decision_id}`];
  if (r.subject) lines.push(`  subject: ${r.subject.type}::${JSON.stringify(r.subject.id)}`);
  if (r.token_reason) lines.push(`  token: ${r.token_reason}`);
  if (r.advice.length > 0) lines.push(`  advice: ${r.advice.join(', ')}`);
  for (const reason of r.reasons) lines.push(`  reason: ${reason}`);
  if (r.policies.length > 0) lines.push(`  policies: ${r.policies.join(', ')}`);
  for (const [k, v] of Object.entries(r.headers).sort()) lines.push(`  header: ${k}: ${v}`);
  return lines.join('\n');
}

const check: Command = async (client, target, args) => {
  if (!args.path) throw new ConfigError('path', 'is required (the path and query of the request to judge)');
  const request: CheckRequest = {
    method: String(args.method ?? 'GET').toUpperCase(),
    path: String(args.path),
    host: args.host ? String(args.host) : '',
    token: tokenOf(args),
    headers: pairsOf('header', args.header, true),
    context_extensions: pairsOf('extension', args.extension, false),
  };
  const r = await client.check(target.agent, request, { timeoutMs: target.timeoutMs });
  out(target, r, describeCheck(r));
  if (r.verdict === 'DENY' || r.verdict === 'UNAUTHENTICATED') process.exitCode = CHECK_EXIT_CODES[r.verdict];
};

const invoke: Command = async (client, target, args) => {
  const method = String(args.method ?? '');
  if (!/^\/[^/\s]+\/[^/\s]+$/.test(method))
    throw new ConfigError('method', `"${method}" is not a method path like /pkg.Service/Method`);
  const raw = args.raw === true;
  const hasData = args.data !== undefined;
  if (raw && (hasData || args.proto)) throw new ConfigError('raw', '--raw sends stdin as is; drop --data and --proto');
  if (!raw) {
    if (!args.proto) throw new ConfigError('proto', 'is required to encode --data (or use --raw for bytes on stdin)');
    if (!hasData) throw new ConfigError('data', 'is required with --proto (the request as JSON, e.g. {})');
  }
  const opts = { timeoutMs: target.timeoutMs };
  if (raw) {
    const res = await client.invoke(target.agent, method, await readStdin(), opts);
    if (target.json) out(target, { method, bytes: res.length, base64: res.toString('base64') }, '');
    else process.stdout.write(res);
    return;
  }
  const codec = ProtoMethod.load(requireReadableFile('proto', args.proto), method);
  const request = codec.encodeRequest(String(args.data));
  const response = codec.decodeResponse(await client.invoke(target.agent, method, request, opts));
  out(target, response, JSON.stringify(response, null, 2));
};

/** Runs `command` and exits with the call's gRPC status (2 for a bad flag found late). */
async function run(command: Command, args: Args): Promise<void> {
  let target: CallTarget;
  let client: BurrowClient;
  try {
    target = callTargetFromArgs(args);
    client = new BurrowClient({
      broker: target.broker,
      tls: {
        certFile: path.join(target.certDir, 'tls.crt'),
        keyFile: path.join(target.certDir, 'tls.key'),
        caFile: path.join(target.certDir, 'ca.crt'),
      },
      serverName: target.serverName,
      timeoutMs: target.timeoutMs,
    });
  } catch (err) {
    fail((err as Error).message);
  }
  try {
    process.exitCode = 0;
    await command(client, target, args);
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message);
    const code = err instanceof BurrowCallError ? err.code : Status.UNKNOWN;
    const details = err instanceof BurrowCallError ? err.details : (err as Error).message;
    // One line: multi-line details (a stack, a proto parse error) would break `2>err; cat err` scripts.
    process.stderr.write(`${PROG}: ${statusName(code)}: ${details.replace(/\s*\n\s*/g, '; ')}\n`);
    process.exitCode = code;
  } finally {
    client.close();
  }
}

function command(
  name: string,
  describe: string,
  options: Record<string, unknown>,
  handler: Command,
): CommandModule<object, Args> {
  const all = { ...TARGET_OPTIONS, ...options };
  return {
    command: name,
    describe,
    builder: (y: Argv<object>) => {
      const withMethod = name.startsWith('invoke')
        ? y.positional('method', { type: 'string', describe: 'full method path: /pkg.Service/Method' })
        : y;
      return withEnvAndConfigFile(withMethod.options(all as never), 'BURROW_CALL', all).strict() as Argv<Args>;
    },
    handler: (args: Args) => {
      void run(handler, args);
    },
  };
}

function main(): void {
  const args = hideBin(process.argv);
  const commands = yargs(args)
    .scriptName(PROG)
    .usage('$0 <command> --broker HOST:PORT --cert-dir DIR --agent ID [options]')
    .command(command('ping', 'ask the agent itself whether it serves (health through the tunnel)', {}, ping))
    .command(command('authenticate', "verify a token with the site's keys", AUTHENTICATE_OPTIONS, authenticate))
    .command(command('evaluate', 'one AuthZEN access evaluation (JSON in, decision out)', REQUEST_OPTION, evaluate))
    .command(command('evaluations', 'a batch of AuthZEN evaluations', REQUEST_OPTION, evaluations))
    .command(
      command(
        'check',
        'a gateway decision: judge one HTTP request (exit 20 deny, 21 unauthenticated)',
        CHECK_OPTIONS,
        check,
      ),
    )
    .command(command('invoke <method>', 'call any unary method of the site', INVOKE_OPTIONS, invoke))
    .demandCommand(1, 'name a command: ping, authenticate, evaluate, evaluations, check or invoke');
  parseCommandLine(commands, VERSION, fail, args);
}

/** Runs the CLI on process.argv; the bundled bin calls it (in a bundle this file is not `require.main`). */
export function cliMain(): void {
  silenceIpServerNameWarning();
  main();
}

if (require.main === module) cliMain();
