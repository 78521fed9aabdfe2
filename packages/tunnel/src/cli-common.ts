import type { Argv } from 'yargs';
import { explainUsageError, misspeltFlag, usageOptionsOf } from './explain-usage-error';
import { ConfigError, asList, loadYamlConfig, parseBytes, parseDurationMs } from './cli-options';
import { DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSIONS } from './frames';
import { DEFAULT_KEEPALIVE, type KeepaliveSettings } from './grpc-options';
import { createLogger, type LogFormat, type Logger } from './logger';
import { runUntilSignalled } from './signals';
import { parseUpstreamRoute, type UpstreamRoute } from './upstream-table';

/**
 * The flags burrow-agent and burrow-broker both take, and their parsing: one definition each, so
 * that the two binaries cannot drift apart in wording, defaults or error messages. Each CLI spreads
 * these into its own option table where its `--help` lists them.
 */

/** A plain string flag: no default, not repeatable. */
export function stringOption(describe: string): { readonly type: 'string'; readonly describe: string } {
  return { type: 'string', describe };
}

/** `--log-level` and `--log-format`. */
export const LOG_OPTIONS = {
  'log-level': { type: 'string', describe: 'error, warn, info or debug', default: 'info' },
  'log-format': { type: 'string', describe: 'json or text', default: 'json' },
} as const;

/** `--keepalive-time` and `--keepalive-timeout` (HTTP/2 pings). */
export const KEEPALIVE_OPTIONS = {
  'keepalive-time': { type: 'string', describe: 'HTTP/2 ping interval on quiet connections', default: '20s' },
  'keepalive-timeout': {
    type: 'string',
    describe: 'ping answer timeout before a connection is dropped',
    default: '10s',
  },
} as const;

/** `--max-message-bytes`. */
export const MAX_MESSAGE_BYTES_OPTION = {
  'max-message-bytes': { type: 'string', describe: 'largest forwarded message, e.g. 16MiB', default: '16MiB' },
} as const;

/** `--drain-timeout`. */
export const DRAIN_TIMEOUT_OPTION = {
  'drain-timeout': { type: 'string', describe: 'how long shutdown waits for calls in flight', default: '30s' },
} as const;

/** `--admin-allowed-host` (repeatable). */
export const ADMIN_ALLOWED_HOST_OPTION = {
  'admin-allowed-host': {
    type: 'string',
    array: true,
    describe:
      'host name the admin listener answers to besides localhost, IP addresses and its own address ' +
      '(repeatable; other Host or Origin headers get 403: DNS rebinding)',
  },
} as const;

/** `--config`: the YAML file read by {@link withEnvAndConfigFile}. */
export const CONFIG_FILE_OPTION = {
  config: { type: 'string', describe: 'YAML file whose keys are these flag names' },
} as const;

/**
 * The defaults of the settings behind the shared flags, as both binaries' config types spell them
 * (not `upstreams`: each binary keeps its own empty list, so no caller can change the other's).
 */
export const SHARED_CONFIG_DEFAULTS = {
  maxMessageBytes: DEFAULT_MAX_MESSAGE_BYTES,
  keepalive: DEFAULT_KEEPALIVE,
  logLevel: 'info',
  logFormat: 'json' as LogFormat,
};

type Args = Record<string, unknown>;

/**
 * Has a command read its flags also from `<envPrefix>_*` variables and from the YAML file named
 * by `--config`, whose keys must be the command's own flag names.
 */
export function withEnvAndConfigFile<T>(y: Argv<T>, envPrefix: string, options: Record<string, unknown>): Argv<T> {
  return y.env(envPrefix).config('config', 'YAML config file (keys are flag names)', (file: string) =>
    loadYamlConfig(
      file,
      Object.keys(options).filter((k) => k !== 'config'),
    ),
  );
}

/** Checks `--log-level` and `--log-format`. */
export function logSettingsFromArgs(args: Args): { logLevel: string; logFormat: LogFormat } {
  const logLevel = String(args['log-level']);
  if (!['error', 'warn', 'info', 'debug'].includes(logLevel))
    throw new ConfigError('log-level', `"${logLevel}" is not one of error, warn, info, debug`);
  const logFormat = String(args['log-format']);
  if (logFormat !== 'json' && logFormat !== 'text')
    throw new ConfigError('log-format', `"${logFormat}" is not json or text`);
  return { logLevel, logFormat };
}

/** Parses the repeatable `--upstream SERVICE=HOST:PORT`. */
export function upstreamsFromArgs(args: Args): UpstreamRoute[] {
  return asList(args.upstream).map((u) => {
    try {
      return parseUpstreamRoute(u);
    } catch (err) {
      throw new ConfigError('upstream', (err as Error).message);
    }
  });
}

/** Parses `--max-message-bytes`: from 1KiB to 1GiB. */
export function maxMessageBytesFromArgs(args: Args): number {
  const maxMessageBytes = parseBytes('max-message-bytes', args['max-message-bytes']);
  if (maxMessageBytes < 1024 || maxMessageBytes > 1024 ** 3)
    throw new ConfigError('max-message-bytes', 'must be from 1KiB to 1GiB');
  return maxMessageBytes;
}

/** Parses `--keepalive-time` and `--keepalive-timeout`. */
export function keepaliveFromArgs(args: Args): KeepaliveSettings {
  return {
    timeMs: parseDurationMs('keepalive-time', args['keepalive-time']),
    timeoutMs: parseDurationMs('keepalive-timeout', args['keepalive-timeout']),
  };
}

/** How a CLI reports a bad command line or configuration: print it and exit (does not return). */
export type CliFailure = (message: string) => never;

/** A daemon (agent or broker) as {@link runDaemon} drives it. */
export interface Daemon {
  start(): Promise<unknown>;
  stop(): Promise<void>;
}

/**
 * Runs a daemon's command: builds its config (a ConfigError goes to `fail`), creates the logger
 * the config asks for, creates the daemon (a constructor error goes to `fail` too) and runs it
 * until SIGTERM/SIGINT.
 */
export async function runDaemon<C extends { logLevel: string; logFormat: LogFormat }>(
  component: string,
  buildConfig: () => C,
  create: (config: C, logger: Logger) => Daemon,
  fail: CliFailure,
): Promise<void> {
  let config: C;
  try {
    config = buildConfig();
  } catch (err) {
    fail((err as Error).message);
  }
  const logger = createLogger({ level: config.logLevel, format: config.logFormat, component });
  let daemon: Daemon;
  try {
    daemon = create(config, logger);
  } catch (err) {
    fail((err as Error).message);
  }
  await runUntilSignalled(
    logger,
    () => daemon.start(),
    () => daemon.stop(),
    (err) => fail(err.message),
  );
}

/**
 * Ends a CLI's yargs chain the same way for both binaries: unknown flags and commands are errors,
 * `--version` prints `version` with the protocol versions spoken, and every parse error goes to
 * `fail`.
 */
export function parseCommandLine<T>(y: Argv<T>, version: string, fail: CliFailure, args: readonly string[]): void {
  void y
    .strict()
    .version(`${version} (protocol ${PROTOCOL_VERSIONS.join(', ')})`)
    .help()
    .check(() => {
      const misspelt = misspeltFlag(args, usageOptionsOf(y));
      if (misspelt) throw new Error(misspelt);
      return true;
    }, true)
    .fail((msg, err) => fail(err ? err.message : explainUsageError(msg, args, usageOptionsOf(y))))
    .parse();
}
