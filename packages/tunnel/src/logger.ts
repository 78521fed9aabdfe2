import * as winston from 'winston';
import { statusName } from './errors';

export type Logger = winston.Logger;
export type LogFormat = 'json' | 'text';

/**
 * The logger both binaries use: JSON lines by default (for log shippers), `text` for a human at a
 * terminal. Logs go to stderr so that a command's stdout stays parseable.
 */
export function createLogger(opts: { level?: string; format?: LogFormat; component: string }): Logger {
  const format = opts.format === 'text'
    ? winston.format.combine(winston.format.timestamp(), winston.format.printf((i) => {
      const { level, message, timestamp, component, ...rest } = i as Record<string, unknown>;
      const extra = Object.keys(rest).length ? ' ' + JSON.stringify(rest) : '';
      return `${String(timestamp)} ${String(level)} [${String(component)}] ${String(message)}${extra}`;
    }))
    : winston.format.combine(winston.format.timestamp(), winston.format.json());
  return winston.createLogger({
    level: opts.level ?? 'info',
    defaultMeta: { component: opts.component },
    format,
    transports: [new winston.transports.Console({ stderrLevels: ['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly'] })],
  });
}

/** A logger that drops everything, for tests and library users who bring none. */
export function silentLogger(): Logger {
  return winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
}

/** Fields of the one log line every forwarded call ends with. */
export interface CallLogFields {
  direction: string;
  code: number;
  details: string;
  durationMs: number;
  [field: string]: unknown;
}

/**
 * Logs a finished call: failures at info, successes at debug. On the per-call path, so a success
 * costs nothing unless debug logging is on.
 */
export function logCallFinished(logger: Logger, fields: CallLogFields): void {
  const ok = fields.code === 0;
  if (ok && !logger.isLevelEnabled('debug')) return;
  const { code, details, ...rest } = fields;
  logger.log(ok ? 'debug' : 'info', 'call finished', { ...rest, status: statusName(code), details: ok ? undefined : details });
}
