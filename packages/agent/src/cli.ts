#!/usr/bin/env node
/**
 * burrow-agent: the only file of the agent that reads process.argv and the environment. It turns
 * flags, BURROW_AGENT_* variables and the YAML config file into a typed {@link AgentConfig},
 * creates the logger and runs the agent until SIGTERM/SIGINT.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import {
  ADMIN_ALLOWED_HOST_OPTION,
  CONFIG_FILE_OPTION,
  ConfigError,
  DRAIN_TIMEOUT_OPTION,
  KEEPALIVE_OPTIONS,
  LOG_OPTIONS,
  MAX_MESSAGE_BYTES_OPTION,
  asList,
  keepaliveFromArgs,
  logSettingsFromArgs,
  maxMessageBytesFromArgs,
  parseAllowedHosts,
  parseCommandLine,
  parseDurationMs,
  parseIntInRange,
  parseListenAddress,
  requireCertificatePair,
  requireReadableFile,
  runDaemon,
  silenceIpServerNameWarning,
  stringOption,
  upstreamsFromArgs,
  withEnvAndConfigFile,
} from '@burrow/tunnel';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { Agent } from './agent';
import { enroll, stateFiles } from './enroll';
import { defaultInstallPaths, install, selfCommand, systemdRunning, uninstall, type InstallPaths } from './install';
import { AGENT_DEFAULTS, type AgentConfig, type AgentPolicyConfig } from './agent-config';
import { policyCommand, type PolicyCliIo } from './policy-cli';
import { AUTHN_RUN_OPTIONS, authnConfigFromArgs } from './authn/authn-config';
import { selfCheck } from './self-check';
import { GatewayMappingError, loadGatewayMapping, type GatewayMapping } from './gateway/gateway-mapping';
import { TELEMETRY_RUN_OPTIONS, telemetryConfigFromArgs } from './telemetry-config';

const PROG = 'burrow-agent';
const VERSION: string = (require('../package.json') as { version: string }).version;

const RUN_OPTIONS = {
  broker: {
    type: 'string',
    array: true,
    describe:
      'HOST:PORT of a broker agent listener (repeatable: one tunnel to each; a name gets one tunnel per address ' +
      'it resolves to)',
  },
  'max-brokers': {
    type: 'number',
    describe: 'most distinct brokers to keep tunnels to: the --broker ones, then brokers learned from the replica set',
    default: AGENT_DEFAULTS.maxBrokers,
  },
  'state-dir': stringOption(
    'directory written by `burrow-agent enroll`: certificate, key and trust bundle, renewed automatically',
  ),
  'tls-cert': stringOption('PEM file: the agent certificate, then its chain (default with --state-dir: its tls.crt)'),
  'tls-key': stringOption('PEM file: the agent private key'),
  ca: stringOption('PEM file: CA certificates that sign brokers'),
  'broker-server-name': stringOption(
    'TLS name to expect in broker certificates when it differs from the --broker host',
  ),
  upstream: {
    type: 'string',
    array: true,
    describe:
      'SERVICE=HOST:PORT: site service that answers calls from the platform (repeatable; SERVICE * is the default)',
  },
  'local-listen': stringOption('HOST:PORT where site clients call platform services (plaintext only on loopback)'),
  'local-tls-cert': stringOption('PEM file: certificate of the local listener (turns on TLS)'),
  'local-tls-key': stringOption('PEM file: key of the local listener'),
  'local-ca': stringOption('PEM file: CA of site clients; when set, the local listener requires client certificates'),
  'admin-listen': stringOption('HOST:PORT of the plain-HTTP admin listener (/metrics, /healthz, /readyz, /brokers)'),
  ...ADMIN_ALLOWED_HOST_OPTION,
  'max-concurrent-calls': {
    type: 'number',
    describe: 'most calls a broker may run on one tunnel at once (HTTP/2 concurrent streams)',
    default: AGENT_DEFAULTS.maxConcurrentCalls,
  },
  ...MAX_MESSAGE_BYTES_OPTION,
  'reconnect-base': {
    type: 'string',
    describe: 'first reconnect backoff window (doubles per failure, full jitter)',
    default: '500ms',
  },
  'reconnect-max': { type: 'string', describe: 'largest reconnect backoff window', default: '30s' },
  'broker-wait': {
    type: 'string',
    describe: "how long a site client's call waits for a broker connection",
    default: '5s',
  },
  ...DRAIN_TIMEOUT_OPTION,
  ...KEEPALIVE_OPTIONS,
  ...LOG_OPTIONS,
  ...AUTHN_RUN_OPTIONS,
  policies: stringOption('directory of *.cedar policy files: turns on the built-in policy decision service'),
  entities: stringOption('Cedar JSON entity file (users, groups, resources and their attributes) for the policies'),
  'policy-schema': stringOption(
    'Cedar schema (JSON or human format) that policies, entities and requests are validated against',
  ),
  'policy-cache-ttl': {
    type: 'string',
    describe: 'how long a decision is served from the cache (0s turns it off; dropped on reload)',
    default: '5s',
  },
  'audit-log': {
    type: 'string',
    describe: 'file that gets one JSON line per policy decision (- for stdout)',
    default: '-',
  },
  'gateway-mapping': stringOption(
    'file mapping gateway Check requests (method, path, headers, token claims) to policy evaluations ' +
      '(docs/gateways.md)',
  ),
  ...TELEMETRY_RUN_OPTIONS,
  ...CONFIG_FILE_OPTION,
} as const;

type Args = Record<string, unknown>;

/**
 * Builds the typed config; every problem is a ConfigError naming its flag. Flags are checked in
 * a fixed order, so with several bad flags the same one is always reported.
 */
export function agentConfigFromArgs(args: Args): AgentConfig {
  const brokers = asList(args.broker).map((b) => parseListenAddress('broker', b));
  if (brokers.length === 0) throw new ConfigError('broker', 'is required (HOST:PORT of a broker agent listener)');
  const { logLevel, logFormat } = logSettingsFromArgs(args);
  const upstreams = upstreamsFromArgs(args);
  const local = localSideFromArgs(args);
  const limits = streamLimitsFromArgs(args);
  const identity = identityFromArgs(args);
  const authn = authnConfigFromArgs(args);
  const policy = policyConfigFromArgs(args);
  return {
    ...AGENT_DEFAULTS,
    brokers,
    ...identity,
    brokerServerName: args['broker-server-name'] ? String(args['broker-server-name']) : undefined,
    upstreams,
    localListen: local.localListen,
    localTls: localTlsFromArgs(args, local),
    adminListen: args['admin-listen'] ? parseListenAddress('admin-listen', args['admin-listen']) : undefined,
    adminAllowedHosts: parseAllowedHosts('admin-allowed-host', args['admin-allowed-host']),
    ...limits,
    ...timingsFromArgs(args),
    logLevel,
    logFormat,
    authn,
    policy,
    gatewayMapping: gatewayMappingFromArgs(args, policy, authn),
    telemetry: telemetryConfigFromArgs(args),
  };
}

/** The site-side listener for local clients (--local-listen) and its TLS files. */
interface LocalSideArgs {
  readonly localListen: string | undefined;
  readonly localTlsCert: string | undefined;
  readonly localTlsKey: string | undefined;
}

function localSideFromArgs(args: Args): LocalSideArgs {
  const localTlsCert = args['local-tls-cert']
    ? requireReadableFile('local-tls-cert', args['local-tls-cert'])
    : undefined;
  const localTlsKey = args['local-tls-key'] ? requireReadableFile('local-tls-key', args['local-tls-key']) : undefined;
  if (Boolean(localTlsCert) !== Boolean(localTlsKey))
    throw new ConfigError(
      localTlsCert ? 'local-tls-key' : 'local-tls-cert',
      'local-tls-cert and local-tls-key go together',
    );
  const localListen = args['local-listen'] ? parseListenAddress('local-listen', args['local-listen']) : undefined;
  // Local clients' calls carry credentials: without TLS they may only cross the loopback interface.
  if (localListen && !localTlsCert && !/^(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d+$/.test(localListen)) {
    throw new ConfigError(
      'local-listen',
      `${localListen} is not loopback; plaintext is only allowed on loopback, set local-tls-cert and local-tls-key`,
    );
  }
  return { localListen, localTlsCert, localTlsKey };
}

/** TLS of the local listener, with --local-ca (checked after the agent's own --ca) when given. */
function localTlsFromArgs(args: Args, local: LocalSideArgs): AgentConfig['localTls'] {
  return local.localTlsCert && local.localTlsKey
    ? {
        certFile: local.localTlsCert,
        keyFile: local.localTlsKey,
        caFile: args['local-ca'] ? requireReadableFile('local-ca', args['local-ca']) : undefined,
      }
    : undefined;
}

function streamLimitsFromArgs(args: Args): Pick<AgentConfig, 'maxConcurrentCalls' | 'maxBrokers' | 'maxMessageBytes'> {
  const maxMessageBytes = maxMessageBytesFromArgs(args);
  const maxConcurrentCalls = parseIntInRange('max-concurrent-calls', args['max-concurrent-calls'], 1, 100_000);
  const maxBrokers = parseIntInRange('max-brokers', args['max-brokers'], 1, 64);
  return { maxConcurrentCalls, maxBrokers, maxMessageBytes };
}

/**
 * The agent's certificate, key and trust bundle: from explicit flags, or else from the files
 * `burrow-agent enroll` wrote into --state-dir.
 */
function identityFromArgs(args: Args): Pick<AgentConfig, 'tlsCertFile' | 'tlsKeyFile' | 'caFile' | 'stateDir'> {
  const stateDir = args['state-dir'] ? String(args['state-dir']) : undefined;
  const files = stateDir ? stateFiles(stateDir) : undefined;
  if (stateDir && !args['tls-cert'] && !existsSync(files!.cert)) {
    throw new ConfigError(
      'state-dir',
      `${stateDir} holds no certificate; run burrow-agent enroll --broker HOST:PORT --token TOKEN ` +
        `--state-dir ${stateDir} first`,
    );
  }
  const tlsCertFile = requireReadableFile('tls-cert', args['tls-cert'] ?? files?.cert);
  const tlsKeyFile = requireReadableFile('tls-key', args['tls-key'] ?? files?.key);
  requireCertificatePair('tls-cert', tlsCertFile, 'tls-key', tlsKeyFile, 'agent');
  return { tlsCertFile, tlsKeyFile, caFile: requireReadableFile('ca', args.ca ?? files?.ca), stateDir };
}

function timingsFromArgs(
  args: Args,
): Pick<AgentConfig, 'reconnectBaseMs' | 'reconnectMaxMs' | 'brokerWaitMs' | 'drainTimeoutMs' | 'keepalive'> {
  return {
    reconnectBaseMs: parseDurationMs('reconnect-base', args['reconnect-base']),
    reconnectMaxMs: parseDurationMs('reconnect-max', args['reconnect-max']),
    brokerWaitMs: parseDurationMs('broker-wait', args['broker-wait']),
    drainTimeoutMs: parseDurationMs('drain-timeout', args['drain-timeout']),
    keepalive: keepaliveFromArgs(args),
  };
}

/** The built-in policy service's sources, or undefined without --policies. */
function policyConfigFromArgs(args: Args): AgentPolicyConfig | undefined {
  const str = (k: string): string | undefined =>
    args[k] === undefined || args[k] === '' ? undefined : String(args[k]);
  const policiesDir = str('policies');
  if (!policiesDir) {
    for (const k of ['entities', 'policy-schema'])
      if (str(k)) throw new ConfigError(k, 'needs --policies (the directory of *.cedar files)');
    return undefined;
  }
  if (!existsSync(policiesDir)) throw new ConfigError('policies', `${policiesDir} does not exist`);
  const entitiesFile = str('entities') ? requireReadableFile('entities', args.entities) : undefined;
  const schemaFile = str('policy-schema') ? requireReadableFile('policy-schema', args['policy-schema']) : undefined;
  const cacheTtlMs = parseDurationMs('policy-cache-ttl', args['policy-cache-ttl']);
  return { policiesDir, entitiesFile, schemaFile, cacheTtlMs, auditLog: str('audit-log') ?? '-' };
}

/**
 * The gateway mapping, parsed and checked against the rest of the config: it needs --policies,
 * and a key source unless it says `token none`. Problems are `FILE:LINE: problem`.
 */
function gatewayMappingFromArgs(
  args: Args,
  policy: AgentPolicyConfig | undefined,
  authn: AgentConfig['authn'],
): GatewayMapping | undefined {
  if (args['gateway-mapping'] === undefined || args['gateway-mapping'] === '') return undefined;
  const file = String(args['gateway-mapping']);
  let mapping: GatewayMapping;
  try {
    mapping = loadGatewayMapping(file);
  } catch (err) {
    if (err instanceof GatewayMappingError) throw new ConfigError('gateway-mapping', err.message);
    throw err;
  }
  if (!policy) throw new ConfigError('gateway-mapping', 'needs --policies (the policies Check decides with)');
  if (mapping.token !== 'none' && !authn)
    throw new ConfigError(
      'gateway-mapping',
      `${file} says token ${mapping.token}: set --jwks, --jwks-url or --introspection-url to verify tokens`,
    );
  if (mapping.token !== 'none' && !authn?.audiences?.length && !authn?.allowedAudiences?.length)
    throw new ConfigError(
      'gateway-mapping',
      `${file} says token ${mapping.token}: set --token-audience (Check verifies tokens for the agent's audiences)`,
    );
  return mapping;
}

function fail(message: string): never {
  process.stderr.write(`${PROG}: ${message}\n`);
  process.exit(2);
}

function run(args: Args): Promise<void> {
  return runDaemon(
    'agent',
    () => agentConfigFromArgs(args),
    (config, logger) => new Agent(config, logger, VERSION),
    fail,
  );
}

const ENROLL_OPTIONS = {
  broker: {
    type: 'string',
    describe: 'HOST:PORT of the broker agent listener (default: the brokers the join token names)',
  },
  token: {
    type: 'string',
    describe: 'the join token from `burrow-pki token create` [env BURROW_AGENT_TOKEN]',
    demandOption: true,
  },
  'state-dir': { type: 'string', describe: 'where to write the key, certificate and trust bundle', demandOption: true },
  'broker-server-name': {
    type: 'string',
    describe: "TLS name to expect in the broker certificate (default: the join token's, else the --broker host)",
  },
} as const;

/** The `burrow-agent run` command line that uses what an enrollment wrote. */
export function runCommandLine(result: { brokers: string[]; serverName?: string }, stateDir: string): string {
  const brokers = result.brokers.map((b) => ` --broker ${b}`).join('');
  const name = result.serverName === undefined ? '' : ` --broker-server-name ${result.serverName}`;
  return `burrow-agent run${brokers}${name} --state-dir ${stateDir}`;
}

async function runEnroll(args: Args): Promise<void> {
  let broker: string | undefined;
  try {
    broker = args.broker === undefined ? undefined : parseListenAddress('broker', args.broker);
  } catch (err) {
    fail((err as Error).message);
  }
  try {
    const stateDir = String(args['state-dir']);
    const issued = await enroll({
      broker,
      token: String(args.token),
      stateDir,
      serverName: args['broker-server-name'] ? String(args['broker-server-name']) : undefined,
      notice: (line) => process.stderr.write(`${PROG}: enroll: ${line}\n`),
    });
    process.stdout.write(
      `enrolled as ${issued.spiffeId}; state in ${stateDir}; start with: ${runCommandLine(issued, stateDir)}\n`,
    );
    process.exit(0);
  } catch (err) {
    process.stderr.write(`${PROG}: enroll: ${(err as Error).message.replace(/\s*\n\s*/g, ' ')}\n`);
    process.exit(1);
  }
}

const INSTALL_PATH_OPTIONS = {
  root: {
    type: 'string',
    describe: 'prefix for every path below (install under a directory, e.g. to try it without root)',
    default: '/',
  },
  'state-dir': { type: 'string', describe: 'state directory [default: ROOT/var/lib/burrow-agent]' },
  'config-file': { type: 'string', describe: 'agent.yaml to write [default: ROOT/etc/burrow-agent/agent.yaml]' },
  'unit-file': {
    type: 'string',
    describe: 'systemd unit to write [default: ROOT/etc/systemd/system/burrow-agent.service]',
  },
  binary: {
    type: 'string',
    describe: 'where the single executable copies itself [default: ROOT/usr/local/bin/burrow-agent]',
  },
  user: {
    type: 'string',
    describe: 'system user the agent runs as, created if missing (--no-user: none, keep file owners)',
    default: 'burrow',
  },
  systemd: {
    type: 'boolean',
    describe: 'install and start the systemd unit (default: when /run/systemd/system exists; --no-systemd: never)',
  },
  'dry-run': {
    type: 'boolean',
    describe: 'print the plan and change nothing (install: and check the brokers answer with the pinned CA)',
    default: false,
  },
} as const;

const INSTALL_OPTIONS = {
  token: ENROLL_OPTIONS.token,
  'broker-server-name': ENROLL_OPTIONS['broker-server-name'],
  ...INSTALL_PATH_OPTIONS,
  broker: {
    type: 'string',
    array: true,
    describe: 'HOST:PORT of a broker agent listener (repeatable; default: the brokers the join token names)',
  },
  upstream: {
    type: 'string',
    array: true,
    describe: 'SERVICE=HOST:PORT site service for agent.yaml (repeatable)',
    default: ['*=127.0.0.1:50051'],
  },
  'admin-listen': {
    type: 'string',
    describe: 'admin listener for agent.yaml (status, metrics)',
    default: '127.0.0.1:9091',
  },
} as const;

const UNINSTALL_OPTIONS = {
  ...INSTALL_PATH_OPTIONS,
  purge: {
    type: 'boolean',
    describe: 'also remove the state directory (the agent identity) and the user',
    default: false,
  },
} as const;

function installPathsFromArgs(args: Args): InstallPaths {
  const root = String(args.root ?? '/');
  const defaults = defaultInstallPaths(root);
  const pick = (flag: string, fallback: string): string => (args[flag] ? path.resolve(String(args[flag])) : fallback);
  return {
    stateDir: pick('state-dir', defaults.stateDir),
    configFile: pick('config-file', defaults.configFile),
    unitFile: pick('unit-file', defaults.unitFile),
    binary: pick('binary', defaults.binary),
  };
}

/** Installing into the real system needs root; under --root, or only planning, it does not. */
function requireRoot(args: Args, command: string): void {
  if (args['dry-run'] || String(args.root ?? '/') !== '/' || process.getuid?.() === 0) return;
  fail(
    `${command}: must run as root (sudo burrow-agent ${command} ...), or give --root DIR to install under a directory`,
  );
}

const userOf = (args: Args): string | undefined => (args.user === false ? undefined : String(args.user ?? 'burrow'));
const out = (line: string): void => {
  process.stdout.write(`${line}\n`);
};

async function runInstall(args: Args): Promise<void> {
  requireRoot(args, 'install');
  let brokers: string[] | undefined;
  try {
    brokers = asList(args.broker).map((b) => parseListenAddress('broker', b));
    for (const u of asList(args.upstream))
      if (!/^[^=]+=.+:\d+$/.test(u)) throw new ConfigError('upstream', `"${u}" is not SERVICE=HOST:PORT`);
    parseListenAddress('admin-listen', args['admin-listen']);
  } catch (err) {
    fail((err as Error).message);
  }
  try {
    const code = await install({
      token: String(args.token),
      brokers,
      serverName: args['broker-server-name'] ? String(args['broker-server-name']) : undefined,
      paths: installPathsFromArgs(args),
      upstreams: asList(args.upstream),
      adminListen: String(args['admin-listen']),
      user: userOf(args),
      systemd: typeof args.systemd === 'boolean' ? args.systemd : systemdRunning(),
      dryRun: Boolean(args['dry-run']),
      self: selfCommand(),
      out,
      err: (line) => process.stderr.write(`${PROG}: ${line}\n`),
    });
    process.exit(code);
  } catch (err) {
    process.stderr.write(`${PROG}: install: ${(err as Error).message.replace(/\s*\n\s*/g, ' ')}\n`);
    process.exit(2);
  }
}

async function runUninstall(args: Args): Promise<void> {
  requireRoot(args, 'uninstall');
  try {
    const code = await uninstall({
      paths: installPathsFromArgs(args),
      purge: Boolean(args.purge),
      user: userOf(args),
      systemd: typeof args.systemd === 'boolean' ? args.systemd : systemdRunning(),
      dryRun: Boolean(args['dry-run']),
      out,
    });
    process.exit(code);
  } catch (err) {
    process.stderr.write(`${PROG}: uninstall: ${(err as Error).message.replace(/\s*\n\s*/g, ' ')}\n`);
    process.exit(1);
  }
}

/** Runs a `policy` subcommand on the process streams and exits with its code. */
function runPolicyCommand(handler: (args: Args, io: PolicyCliIo) => Promise<number>): (args: Args) => void {
  const io: PolicyCliIo = {
    readStdin: async () => {
      const chunks: Buffer[] = [];
      for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
      return Buffer.concat(chunks).toString('utf8');
    },
    out: (text) => process.stdout.write(text),
    err: (text) => process.stderr.write(`${PROG}: policy: ${text}`),
  };
  return (args) => {
    handler(args, io).then(
      (code) => {
        process.exitCode = code;
      },
      (err: Error) => fail(err.message),
    );
  };
}

async function runSelfCheck(): Promise<void> {
  try {
    const r = await selfCheck();
    process.stdout.write(
      `self-check ok: single executable ${r.singleExecutable ? 'yes' : 'no'}; ${r.protos.length} protos ` +
        `(${r.protos.join(', ')}); cedar ${r.cedarVersion} allow/deny; jose ${r.joseAlgorithm} sign/verify\n`,
    );
    process.exit(0);
  } catch (err) {
    process.stderr.write(`${PROG}: ${(err as Error).message}\n`);
    process.exit(1);
  }
}

function main(): void {
  const commands = yargs(hideBin(process.argv))
    .scriptName(PROG)
    .usage('$0 <command> [options]')
    .command(
      'run',
      'dial out to brokers and answer the calls they carry',
      (y) => withEnvAndConfigFile(y.options(RUN_OPTIONS), 'BURROW_AGENT', RUN_OPTIONS).strict(),
      (args) => {
        void run(args as Args);
      },
    )
    .command(
      'enroll',
      'enroll this agent with a join token: make a key, get a certificate, write the state directory',
      (y) => y.options(ENROLL_OPTIONS).env('BURROW_AGENT').strict(),
      (args) => {
        void runEnroll(args as Args);
      },
    )
    .command(
      'install',
      'as root: enroll with a join token, write agent.yaml, create the burrow user, install and start the unit',
      (y) => y.options(INSTALL_OPTIONS).env('BURROW_AGENT').strict(),
      (args) => {
        void runInstall(args as Args);
      },
    )
    .command(
      'uninstall',
      'stop and remove what install made (the state directory stays unless --purge)',
      (y) => y.options(UNINSTALL_OPTIONS).strict(),
      (args) => {
        void runUninstall(args as Args);
      },
    )
    .command(policyCommand(runPolicyCommand))
    // Hidden: run by `make agent-binary` and the tests to prove the single executable is complete.
    .command(
      'self-check',
      false,
      (y) => y.strict(),
      () => {
        void runSelfCheck();
      },
    )
    .demandCommand(1, 'name a command: run, enroll, install, uninstall or policy');
  parseCommandLine(commands, VERSION, fail, hideBin(process.argv));
}

/** Runs the CLI on process.argv; the single executable's entry point calls it (it is not `require.main`). */
export function cliMain(): void {
  silenceIpServerNameWarning();
  main();
}

if (require.main === module) cliMain();
