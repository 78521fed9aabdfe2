#!/usr/bin/env node
/**
 * burrow-broker: the only file of the broker that reads process.argv and the environment. It turns
 * flags, BURROW_BROKER_* variables and the YAML config file into a typed {@link BrokerConfig},
 * creates the logger and runs the broker until SIGTERM/SIGINT.
 */
import { existsSync, readFileSync } from 'node:fs';
import * as path from 'node:path';
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import {
  // The flags and the parsing burrow-agent shares, in the order this file uses them.
  ADMIN_ALLOWED_HOST_OPTION,
  MAX_MESSAGE_BYTES_OPTION,
  DRAIN_TIMEOUT_OPTION,
  KEEPALIVE_OPTIONS,
  LOG_OPTIONS,
  CONFIG_FILE_OPTION,
  logSettingsFromArgs,
  upstreamsFromArgs,
  maxMessageBytesFromArgs,
  TRACING_OPTIONS,
  tracingFromArgs,
  telemetryBytesFromArgs,
  keepaliveFromArgs,
  runDaemon,
  withEnvAndConfigFile,
  parseCommandLine,
  // Single values.
  ConfigError,
  idProblem,
  parseListenAddress,
  parseAllowedHosts,
  parseDurationMs,
  parseIntInRange,
  requireReadableFile,
  requireCertificatePair,
  asList,
  silenceIpServerNameWarning,
} from '@burrow/tunnel';
import { Broker } from './broker';
import { BROKER_DEFAULTS, DEFAULT_ADMIN_ADDRESS, type BrokerConfig } from './broker-config';
import { ADMIN_EXIT, runAdminCommand, type AdminCommand } from './admin-commands';
import { redactUrl } from './agent-directory';

const PROG = 'burrow-broker';
const VERSION: string = (require('../package.json') as { version: string }).version;

const SERVE_OPTIONS = {
  'agent-listen': { type: 'string', describe: 'HOST:PORT where agents connect (mTLS)', default: '0.0.0.0:7443' },
  'api-listen': {
    type: 'string',
    describe: 'HOST:PORT where callers send calls for agents (mTLS)',
    default: '0.0.0.0:8443',
  },
  'admin-listen': {
    type: 'string',
    describe:
      'HOST:PORT of the plain-HTTP admin listener (/metrics, /healthz, /readyz, /agents, /agents/<id>, ' +
      '/status); off when empty',
  },
  'admin-token-file': {
    type: 'string',
    describe:
      'file holding a secret (16+ characters) that POST /agents/<id>/disconnect must carry as Authorization: ' +
      'Bearer; without it mutating admin requests work only on a loopback admin listener',
  },
  ...ADMIN_ALLOWED_HOST_OPTION,
  'tls-cert': {
    type: 'string',
    describe: 'PEM file: the broker certificate, then its chain (optional with --pki-dir: the broker issues its own)',
  },
  'tls-key': { type: 'string', describe: 'PEM file: the broker private key' },
  ca: {
    type: 'string',
    describe: 'PEM file: CA certificates that sign agents and callers (default with --pki-dir: its trust bundle)',
  },
  'pki-dir': {
    type: 'string',
    describe: 'PKI directory (burrow-pki init): enables enrollment, renewal, revocation and CA rotation',
  },
  'tls-dns': {
    type: 'string',
    array: true,
    describe: 'DNS name for the self-issued serving certificate (repeatable; added to hostname, localhost)',
  },
  'tls-ip': {
    type: 'string',
    array: true,
    describe: 'IP address for the self-issued serving certificate (repeatable; added to 127.0.0.1, ::1)',
  },
  'default-names': {
    type: 'boolean',
    describe:
      'the self-issued certificate also names hostname, localhost, 127.0.0.1, ::1 besides --tls-dns/--tls-ip ' +
      '(--no-default-names: only those)',
    default: true,
  },
  'leaf-ttl': {
    type: 'string',
    describe: "lifetime of certificates the broker issues (agents' and its own)",
    default: '24h',
  },
  'enroll-per-minute': {
    type: 'number',
    describe: 'enrollment attempts allowed per source address per minute',
    default: 30,
  },
  upstream: {
    type: 'string',
    array: true,
    describe:
      'SERVICE=HOST:PORT: platform service site clients reach through agents (repeatable; SERVICE * is the default)',
  },
  'trust-domain': {
    type: 'string',
    describe: "trust domain of agents and callers (default: the broker certificate's)",
  },
  'broker-id': {
    type: 'string',
    describe:
      "id in logs, session handshakes and the cluster directory: the name in the broker certificate's " +
      'spiffe://<td>/broker/<name> (default: that name; a self-issued certificate is named <hostname>-<agent port>)',
  },
  ...MAX_MESSAGE_BYTES_OPTION,
  'agent-wait': {
    type: 'string',
    describe: 'how long a call waits for its agent (capped by the call deadline)',
    default: '5s',
  },
  ...DRAIN_TIMEOUT_OPTION,
  'max-pending-handshakes': {
    type: 'number',
    describe:
      'most TLS handshakes the agent listener runs at once; connections past it are closed at once and the ' +
      'agents retry after their backoff (0 = no cap)',
    default: 256,
  },
  'max-pending-handshakes-per-address': {
    type: 'number',
    describe:
      'most connections of one source address, per TLS listener, without a proven client certificate (in their ' +
      'handshake, or enrolling); more are closed at accept (0 = no cap)',
    default: 32,
  },
  'handshake-timeout': {
    type: 'string',
    describe: 'a connection to any TLS listener whose handshake has not finished in this time is closed',
    default: '5s',
  },
  'unauthenticated-timeout': {
    type: 'string',
    describe:
      'with --pki-dir: an agent-listener connection without a client certificate (enrollment) is closed this ' +
      'long after its handshake',
    default: '10s',
  },
  'max-sessions-per-agent': {
    type: 'number',
    describe: 'most tunnel sessions one agent certificate may hold at this broker at once (0 = no cap)',
    default: 4,
  },
  ...KEEPALIVE_OPTIONS,
  'authzen-listen': {
    type: 'string',
    describe: 'HOST:PORT of the AuthZEN HTTP/JSON binding (HTTPS, mTLS with service certificates); off when empty',
  },
  'authzen-timeout': {
    type: 'string',
    describe: 'deadline of an AuthZEN HTTP request carried to its agent',
    default: '10s',
  },
  'ext-authz-listen': {
    type: 'string',
    describe:
      'HOST:PORT of the Envoy ext_authz gRPC service (envoy.service.auth.v3.Authorization/Check; HTTP/2, mTLS ' +
      'with service certificates); off when empty',
  },
  'ext-authz-timeout': {
    type: 'string',
    describe: "longest an ext_authz check may take (Envoy's own timeout applies when shorter)",
    default: '2s',
  },
  'ext-authz-agent-header': {
    type: 'string',
    describe: 'request header that names the site when the route sets no context extension burrow_agent',
  },
  'forward-auth-listen': {
    type: 'string',
    describe:
      'HOST:PORT of forward auth for nginx auth_request and Traefik ForwardAuth (HTTPS, mTLS with service ' +
      'certificates; GET /agents/<id>/check); off when empty',
  },
  'forward-auth-timeout': {
    type: 'string',
    describe: 'longest a forward-auth check may take',
    default: '2s',
  },
  'forward-auth-agent-header': {
    type: 'string',
    describe: 'request header that names the site when the path is not /agents/<id>/check',
  },
  'caller-policies': {
    type: 'string',
    describe:
      'directory of *.cedar files saying which services may call which methods on which agents (default: all ' +
      'allowed, logged loudly)',
  },
  'caller-entities': {
    type: 'string',
    describe: 'Cedar JSON entity file for the caller policies (agent groups, service teams)',
  },
  'caller-policy-schema': {
    type: 'string',
    describe: 'Cedar schema the caller policies and entities are validated against',
  },
  'caller-audit-log': {
    type: 'string',
    describe: 'file that gets one JSON line per caller authorization decision; off when empty',
  },
  'caller-max-concurrent': {
    type: 'number',
    describe: 'most calls in flight per caller service (0 = no limit)',
    default: 4096,
  },
  'caller-rate': {
    type: 'number',
    describe: 'calls per second per caller service, token bucket with one second of burst (0 = no limit)',
    default: 0,
  },
  'agent-max-concurrent': { type: 'number', describe: 'most calls in flight per agent (0 = no limit)', default: 2048 },
  'agent-rate': { type: 'number', describe: 'calls per second per agent (0 = no limit)', default: 0 },
  'redis-url': {
    type: 'string',
    describe: 'redis:// URL of the agent directory shared by a cluster of brokers; without it the broker runs alone',
  },
  'redis-key-prefix': {
    type: 'string',
    describe: "prefix of the cluster's Redis keys and channels (clusters sharing one Redis need different ones)",
    default: 'burrow:',
  },
  advertise: {
    type: 'string',
    describe:
      "HOST:PORT other brokers reach this broker's peer listener at (required with --redis-url; the host must " +
      'be in the serving certificate)',
  },
  'peer-listen': {
    type: 'string',
    describe:
      'HOST:PORT of the broker-to-broker listener (mTLS, broker certificates only; default: the --advertise address)',
  },
  'agent-advertise': {
    type: 'string',
    describe:
      'HOST:PORT agents should dial for this broker, told to agents in the replica set (default: the ' +
      "--advertise host with the agent listener's port)",
  },
  'registry-ttl': {
    type: 'string',
    describe: 'how long a directory entry outlives its broker (refreshed every third of it)',
    default: '30s',
  },
  ...TRACING_OPTIONS,
  'telemetry-max-bytes-per-agent': {
    type: 'string',
    describe: "bytes per second of an agent session's Telemetry frames taken for export (more are dropped)",
    default: '256KiB',
  },
  'telemetry-queue-bytes': {
    type: 'string',
    describe: 'encoded spans held for the OTLP endpoint at most (more are dropped)',
    default: '16MiB',
  },
  ...LOG_OPTIONS,
  ...CONFIG_FILE_OPTION,
} as const;

type Args = Record<string, unknown>;

/** Options of the admin client commands (`agents`, `status`). */
const ADMIN_OPTIONS = {
  // The name serve gives the same address, so one BURROW_BROKER_ADMIN_LISTEN serves both.
  'admin-listen': {
    type: 'string',
    describe: "HOST:PORT of the broker's admin listener (what serve was given as --admin-listen)",
    // Applied in admin(): a yargs default would hide whether the old --admin was given as well.
    defaultDescription: DEFAULT_ADMIN_ADDRESS,
  },
  // The old name, still accepted with a warning; hidden from --help.
  admin: { type: 'string', hidden: true },
  'admin-token-file': {
    type: 'string',
    describe: "file holding the broker's admin token (needed to disconnect when the admin listener is not on loopback)",
  },
  json: { type: 'boolean', describe: "print the broker's JSON instead of tables", default: false },
  timeout: { type: 'string', describe: 'how long to wait for the broker', default: '5s' },
  ...CONFIG_FILE_OPTION,
} as const;
const AGENTS_OPTIONS = {
  ...ADMIN_OPTIONS,
  reason: { type: 'string', describe: 'agents disconnect: why (logged by the broker, sent to the agent)' },
} as const;

/** Reads an admin token file: the secret is its content without surrounding whitespace. */
function readAdminToken(field: string, file: string): string {
  let token: string;
  try {
    token = readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new ConfigError(field, `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  if (token.length < 16 || /\s/.test(token))
    throw new ConfigError(field, `${file} must hold one token of at least 16 characters without spaces`);
  return token;
}

/** A listener timeout: at least 100 ms (a handshake cannot finish in less), at most an hour. */
function parseTimeoutMs(field: string, value: unknown): number {
  const ms = parseDurationMs(field, value);
  if (ms < 100 || ms > 3_600_000) throw new ConfigError(field, 'must be from 100ms to 1h');
  return ms;
}

/** The `serve` flags' defaults, as yargs fills them in (for callers of {@link brokerConfigFromArgs}). */
export function serveDefaults(): Args {
  const defaults: Args = {};
  for (const [key, option] of Object.entries(SERVE_OPTIONS)) {
    if ('default' in option) defaults[key] = option.default;
  }
  return defaults;
}

/**
 * Builds the typed config; every problem is a ConfigError naming its flag. The parts are read in
 * a fixed order, so that of several bad flags the same one is reported first.
 */
export function brokerConfigFromArgs(args: Args): BrokerConfig {
  const logging = logSettingsFromArgs(args);
  const upstreams = upstreamsFromArgs(args);
  const maxMessageBytes = maxMessageBytesFromArgs(args);
  const agentMaxConcurrent = parseIntInRange('agent-max-concurrent', args['agent-max-concurrent'], 0, 1_000_000);
  const tls = tlsFilesFromArgs(args);
  return {
    ...BROKER_DEFAULTS,
    ...listenersFromArgs(args),
    ...pkiFromArgs(args, tls),
    upstreams,
    trustDomain: args['trust-domain'] ? String(args['trust-domain']) : undefined,
    brokerId: brokerIdFromArgs(args['broker-id']),
    maxMessageBytes,
    ...connectionLimitsFromArgs(args),
    keepalive: keepaliveFromArgs(args),
    callerPolicy: callerPolicyFromArgs(args),
    cluster: clusterFromArgs(args),
    authzenListen: args['authzen-listen'] ? parseListenAddress('authzen-listen', args['authzen-listen']) : undefined,
    authzenTimeoutMs: parseDurationMs('authzen-timeout', args['authzen-timeout']),
    ...gatewaysFromArgs(args),
    limits: callLimitsFromArgs(args, agentMaxConcurrent),
    tracing: tracingFromArgs(args),
    telemetry: {
      maxBytesPerAgentPerSecond: telemetryBytesFromArgs(args, 'telemetry-max-bytes-per-agent', 1024),
      queueBytes: telemetryBytesFromArgs(args, 'telemetry-queue-bytes', 64 * 1024),
    },
    ...logging,
  };
}

type GatewayConfig = Pick<
  BrokerConfig,
  | 'extAuthzListen'
  | 'extAuthzTimeoutMs'
  | 'extAuthzAgentHeader'
  | 'forwardAuthListen'
  | 'forwardAuthTimeoutMs'
  | 'forwardAuthAgentHeader'
>;

/** The gateway listeners (Envoy ext_authz, forward auth), their deadlines and site headers. */
function gatewaysFromArgs(args: Args): GatewayConfig {
  const listen = (flag: string): string | undefined => (args[flag] ? parseListenAddress(flag, args[flag]) : undefined);
  return {
    extAuthzListen: listen('ext-authz-listen'),
    extAuthzTimeoutMs: parseDurationMs('ext-authz-timeout', args['ext-authz-timeout']),
    extAuthzAgentHeader: headerNameFromArgs('ext-authz-agent-header', args['ext-authz-agent-header']),
    forwardAuthListen: listen('forward-auth-listen'),
    forwardAuthTimeoutMs: parseDurationMs('forward-auth-timeout', args['forward-auth-timeout']),
    forwardAuthAgentHeader: headerNameFromArgs('forward-auth-agent-header', args['forward-auth-agent-header']),
  };
}

/** An HTTP header name (RFC 9110 token), lower-cased; unset when empty. */
function headerNameFromArgs(flag: string, value: unknown): string | undefined {
  if (value === undefined || value === '') return undefined;
  const name = String(value);
  if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name))
    throw new ConfigError(flag, `${JSON.stringify(name.slice(0, 100))} is not an HTTP header name`);
  return name.toLowerCase();
}

type TlsFiles = Pick<BrokerConfig, 'pkiDir' | 'tlsCertFile' | 'tlsKeyFile' | 'leafTtlMs'>;

/** The PKI directory and the serving certificate's files (optional with a PKI directory). */
function tlsFilesFromArgs(args: Args): TlsFiles {
  const pkiDir = args['pki-dir'] ? String(args['pki-dir']) : undefined;
  if (pkiDir && !existsSync(path.join(pkiDir, 'pki.json')))
    throw new ConfigError('pki-dir', `${pkiDir} is not a PKI directory (run burrow-pki init --dir ${pkiDir})`);
  // With a PKI directory the certificate is optional (self-issued), but a given one must be whole.
  const needFiles = !pkiDir || args['tls-cert'] !== undefined || args['tls-key'] !== undefined;
  const tlsCertFile = needFiles ? requireReadableFile('tls-cert', args['tls-cert']) : undefined;
  const tlsKeyFile = needFiles ? requireReadableFile('tls-key', args['tls-key']) : undefined;
  if (tlsCertFile && tlsKeyFile) requireCertificatePair('tls-cert', tlsCertFile, 'tls-key', tlsKeyFile, 'broker');
  const leafTtlMs = parseDurationMs('leaf-ttl', args['leaf-ttl']);
  if (leafTtlMs < 1000) throw new ConfigError('leaf-ttl', 'must be at least 1s');
  return { pkiDir, tlsCertFile, tlsKeyFile, leafTtlMs };
}

function listenersFromArgs(
  args: Args,
): Pick<BrokerConfig, 'agentListen' | 'apiListen' | 'adminListen' | 'adminAllowedHosts' | 'adminToken'> {
  return {
    agentListen: parseListenAddress('agent-listen', args['agent-listen']),
    apiListen: parseListenAddress('api-listen', args['api-listen']),
    adminListen: args['admin-listen'] ? parseListenAddress('admin-listen', args['admin-listen']) : undefined,
    adminAllowedHosts: parseAllowedHosts('admin-allowed-host', args['admin-allowed-host']),
    adminToken: args['admin-token-file']
      ? readAdminToken('admin-token-file', String(args['admin-token-file']))
      : undefined,
  };
}

/** TLS and PKI options: the CA (optional with a PKI directory) and what the broker issues. */
function pkiFromArgs(
  args: Args,
  tls: TlsFiles,
): TlsFiles & Pick<BrokerConfig, 'caFile' | 'tlsDns' | 'tlsIp' | 'defaultNames' | 'enrollPerMinute'> {
  const tlsDns = asList(args['tls-dns']);
  const tlsIp = asList(args['tls-ip']);
  const defaultNames = args['default-names'] !== false;
  if (!defaultNames && tls.pkiDir && !tls.tlsCertFile && tlsDns.length + tlsIp.length === 0)
    throw new ConfigError('default-names', 'with --no-default-names the certificate needs --tls-dns or --tls-ip');
  return {
    tlsCertFile: tls.tlsCertFile,
    tlsKeyFile: tls.tlsKeyFile,
    caFile: tls.pkiDir && args.ca === undefined ? undefined : requireReadableFile('ca', args.ca),
    pkiDir: tls.pkiDir,
    tlsDns,
    tlsIp,
    defaultNames,
    leafTtlMs: tls.leafTtlMs,
    enrollPerMinute: parseIntInRange('enroll-per-minute', args['enroll-per-minute'], 1, 100_000),
  };
}

type ConnectionLimits = Pick<
  BrokerConfig,
  | 'agentWaitMs'
  | 'drainTimeoutMs'
  | 'maxPendingHandshakes'
  | 'maxPendingHandshakesPerAddress'
  | 'handshakeTimeoutMs'
  | 'unauthenticatedTimeoutMs'
  | 'maxSessionsPerAgent'
>;

/** Waits, drain and the limits on handshakes and sessions. */
function connectionLimitsFromArgs(args: Args): ConnectionLimits {
  return {
    agentWaitMs: parseDurationMs('agent-wait', args['agent-wait']),
    drainTimeoutMs: parseDurationMs('drain-timeout', args['drain-timeout']),
    maxPendingHandshakes: parseIntInRange('max-pending-handshakes', args['max-pending-handshakes'], 0, 1_000_000),
    maxPendingHandshakesPerAddress: parseIntInRange(
      'max-pending-handshakes-per-address',
      args['max-pending-handshakes-per-address'],
      0,
      1_000_000,
    ),
    handshakeTimeoutMs: parseTimeoutMs('handshake-timeout', args['handshake-timeout']),
    unauthenticatedTimeoutMs: parseTimeoutMs('unauthenticated-timeout', args['unauthenticated-timeout']),
    maxSessionsPerAgent: parseIntInRange('max-sessions-per-agent', args['max-sessions-per-agent'], 0, 10_000),
  };
}

/** Per-caller and per-agent concurrency and rate limits. */
function callLimitsFromArgs(args: Args, agentMaxConcurrent: number): BrokerConfig['limits'] {
  return {
    caller: {
      maxConcurrent: parseIntInRange('caller-max-concurrent', args['caller-max-concurrent'], 0, 1_000_000),
      ratePerSecond: parseIntInRange('caller-rate', args['caller-rate'], 0, 1_000_000),
    },
    agent: {
      maxConcurrent: agentMaxConcurrent,
      ratePerSecond: parseIntInRange('agent-rate', args['agent-rate'], 0, 1_000_000),
    },
  };
}

function brokerIdFromArgs(value: unknown): string | undefined {
  if (value === undefined || value === '') return undefined;
  const problem = idProblem(String(value));
  if (problem) throw new ConfigError('broker-id', problem);
  return String(value);
}

function clusterFromArgs(args: Args): BrokerConfig['cluster'] {
  const redisUrl = args['redis-url'] === undefined || args['redis-url'] === '' ? undefined : String(args['redis-url']);
  if (!redisUrl) {
    for (const k of ['advertise', 'peer-listen', 'agent-advertise'])
      if (args[k] !== undefined && args[k] !== '')
        throw new ConfigError(k, 'needs --redis-url (brokers form a cluster through Redis)');
    return undefined;
  }
  let url: URL;
  try {
    url = new URL(redisUrl);
  } catch {
    throw new ConfigError('redis-url', `"${redactUrl(redisUrl)}" is not a URL (redis://HOST:PORT[/DB])`);
  }
  if (url.protocol !== 'redis:' && url.protocol !== 'rediss:')
    throw new ConfigError('redis-url', `"${url.protocol}" is not redis: or rediss:`);
  if (args.advertise === undefined || args.advertise === '')
    throw new ConfigError('advertise', 'is required with --redis-url (HOST:PORT other brokers reach this one at)');
  const advertise = parseListenAddress('advertise', args.advertise);
  const registryTtlMs = parseDurationMs('registry-ttl', args['registry-ttl']);
  if (registryTtlMs < 1000) throw new ConfigError('registry-ttl', 'must be at least 1s');
  return {
    redisUrl,
    redisKeyPrefix: String(args['redis-key-prefix'] ?? 'burrow:'),
    advertise,
    peerListen: args['peer-listen'] ? parseListenAddress('peer-listen', args['peer-listen']) : advertise,
    agentAdvertise: args['agent-advertise']
      ? parseListenAddress('agent-advertise', args['agent-advertise'])
      : undefined,
    registryTtlMs,
    lookupCacheMs: Math.min(1_000, registryTtlMs),
  };
}

function callerPolicyFromArgs(args: Args): BrokerConfig['callerPolicy'] {
  const str = (k: string): string | undefined =>
    args[k] === undefined || args[k] === '' ? undefined : String(args[k]);
  const policiesDir = str('caller-policies');
  if (!policiesDir) {
    for (const k of ['caller-entities', 'caller-policy-schema', 'caller-audit-log'])
      if (str(k)) throw new ConfigError(k, 'needs --caller-policies (the directory of *.cedar files)');
    return undefined;
  }
  if (!existsSync(policiesDir)) throw new ConfigError('caller-policies', `${policiesDir} does not exist`);
  return {
    policiesDir,
    entitiesFile: str('caller-entities') ? requireReadableFile('caller-entities', args['caller-entities']) : undefined,
    schemaFile: str('caller-policy-schema')
      ? requireReadableFile('caller-policy-schema', args['caller-policy-schema'])
      : undefined,
    auditLog: str('caller-audit-log'),
  };
}

function fail(message: string): never {
  process.stderr.write(`${PROG}: ${message}\n`);
  process.exit(2);
}

function serve(args: Args): Promise<void> {
  return runDaemon(
    'broker',
    () => brokerConfigFromArgs(args),
    (config, logger) => new Broker(config, logger),
    fail,
  );
}

/**
 * The admin address the admin commands call: `--admin-listen`, or the old `--admin` (renamed so
 * that serve and the admin commands name the address alike) with a warning on stderr, or the default.
 */
function adminAddress(args: Args): unknown {
  if (args.admin === undefined) return args['admin-listen'] ?? DEFAULT_ADMIN_ADDRESS;
  if (args['admin-listen'] !== undefined)
    throw new ConfigError('admin', 'is the old name of --admin-listen: give only --admin-listen');
  process.stderr.write(`${PROG}: --admin (BURROW_BROKER_ADMIN) is deprecated: use --admin-listen\n`);
  return args.admin;
}

/** `burrow-broker agents list|show|disconnect` and `burrow-broker status`. */
async function admin(command: AdminCommand, args: Args): Promise<void> {
  let address: string, token: string | undefined, timeoutMs: number;
  try {
    address = parseListenAddress('admin-listen', adminAddress(args));
    token = args['admin-token-file'] ? readAdminToken('admin-token-file', String(args['admin-token-file'])) : undefined;
    timeoutMs = parseDurationMs('timeout', args.timeout);
    if (command.kind !== 'list' && command.kind !== 'status' && !command.agentId)
      throw new ConfigError('agent-id', `agents ${command.kind} needs an agent id`);
    if (command.kind === 'list' && args['agent-id'] !== undefined)
      throw new ConfigError('agent-id', 'agents list takes no agent id');
  } catch (err) {
    fail((err as Error).message);
  }
  const result = await runAdminCommand(command, { address, token, timeoutMs, json: Boolean(args.json) });
  process.stdout.write(result.stdout);
  if (result.stderr) process.stderr.write(`${PROG}: ${result.stderr}`);
  process.exitCode = result.exitCode;
}

function adminCommand(args: Args): AdminCommand {
  const agentId = args['agent-id'] === undefined ? '' : String(args['agent-id']);
  switch (args.action) {
    case 'show':
      return { kind: 'show', agentId };
    case 'disconnect':
      return { kind: 'disconnect', agentId, reason: args.reason === undefined ? undefined : String(args.reason) };
    default:
      return { kind: 'list' };
  }
}

/**
 * `serve` and the admin commands share the BURROW_BROKER_ prefix but not their options: a shell
 * that exports BURROW_BROKER_ADMIN for the client must still run `serve`, and the reverse. Each
 * command sees only the variables of its own options (yargs' strict mode would refuse the others).
 */
function keepOwnEnvironment(command: string | undefined): void {
  const options: Record<string, readonly string[]> = {
    serve: Object.keys(SERVE_OPTIONS),
    agents: Object.keys(AGENTS_OPTIONS),
    status: Object.keys(ADMIN_OPTIONS),
  };
  const own = options[command ?? ''];
  if (!own) return;
  for (const name of Object.keys(process.env)) {
    if (!name.startsWith('BURROW_BROKER_')) continue;
    if (!own.includes(name.slice('BURROW_BROKER_'.length).toLowerCase().replace(/_/g, '-'))) delete process.env[name];
  }
}

function serveCommand(y: Argv): Argv {
  return withEnvAndConfigFile(y.options(SERVE_OPTIONS), 'BURROW_BROKER', SERVE_OPTIONS).strict();
}

function agentsCommand(y: Argv): Argv {
  const withArgs = y
    .positional('action', {
      choices: ['list', 'show', 'disconnect'] as const,
      describe: 'list | show <agent-id> | disconnect <agent-id>',
    })
    .positional('agent-id', {
      type: 'string',
      describe: "the agent id (its certificate's spiffe://<td>/agent/<id>)",
    })
    .options(AGENTS_OPTIONS);
  return withEnvAndConfigFile(withArgs, 'BURROW_BROKER', AGENTS_OPTIONS)
    .epilog(
      `exit codes: ${ADMIN_EXIT.ok} done, ${ADMIN_EXIT.notFound} agent not ` +
        `connected, ${ADMIN_EXIT.unreachable} broker unreachable or bad options, ${ADMIN_EXIT.refused} ` +
        `refused (admin token), ${ADMIN_EXIT.failed} other failure`,
    )
    .strict();
}

function statusCommand(y: Argv): Argv {
  return withEnvAndConfigFile(y.options(ADMIN_OPTIONS), 'BURROW_BROKER', ADMIN_OPTIONS).strict();
}

function main(): void {
  keepOwnEnvironment(hideBin(process.argv)[0]);
  const commands = yargs(hideBin(process.argv))
    .scriptName(PROG)
    .usage('$0 <command> [options]')
    .command('serve', "accept agent tunnels and carry callers' calls down them", serveCommand, (args) => {
      void serve(args as Args);
    })
    .command(
      'agents <action> [agent-id]',
      'list connected agents, show one, or disconnect one (admin listener)',
      agentsCommand,
      (args) => {
        void admin(adminCommand(args as Args), args as Args);
      },
    )
    .command(
      'status',
      "show the broker's version, uptime, agents, calls, drain and PKI state (admin listener)",
      statusCommand,
      (args) => {
        void admin({ kind: 'status' }, args as Args);
      },
    )
    .demandCommand(1, 'name a command: serve, agents or status');
  parseCommandLine(commands, VERSION, fail, hideBin(process.argv));
}

if (require.main === module) {
  silenceIpServerNameWarning();
  main();
}
