import * as winston from 'winston';
import { statusName } from './errors';

export type Logger = winston.Logger;
export type LogFormat = 'json' | 'text';

/**
 * The logger both binaries use: JSON lines by default (for log shippers), `text` for a human at a
 * terminal. Logs go to stderr so that a command's stdout stays parseable.
 */
export function createLogger(opts: { level?: string; format?: LogFormat; component: string }): Logger {
  const format =
    opts.format === 'text'
      ? winston.format.combine(
          winston.format.timestamp(),
          winston.format.printf((i) => {
            const { level, message, timestamp, component, ...rest } = i as Record<string, unknown>;
            const extra = Object.keys(rest).length ? ` ${JSON.stringify(rest)}` : '';
            return `${String(timestamp)} ${String(level)} [${String(component)}] ${String(message)}${extra}`;
          }),
        )
      : winston.format.combine(winston.format.timestamp(), winston.format.json());
  return winston.createLogger({
    level: opts.level ?? 'info',
    defaultMeta: { component: opts.component },
    format,
    transports: [
      new winston.transports.Console({ stderrLevels: ['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly'] }),
    ],
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
  // The method, call id and status message may come from a peer's frame (up to a message in size).
  for (const key of ['method', 'callId'] as const) {
    if (typeof rest[key] === 'string') rest[key] = boundedForLog(rest[key] as string);
  }
  const status = statusName(code);
  const shown = ok ? undefined : boundedForLog(details);
  logger.log(ok ? 'debug' : 'info', 'call finished', { ...rest, status, details: shown });
}

/** Most characters of a peer-controlled string a log line carries ({@link boundedForLog}). */
export const LOGGED_STRING_MAX_CHARS = 1024;

/**
 * `value` cut to {@link LOGGED_STRING_MAX_CHARS} characters, saying how long it was when cut. For
 * strings a peer chose (a method path, a status message) that go into a log line: a log must not
 * grow by megabytes per call.
 */
export function boundedForLog(value: string): string {
  if (value.length <= LOGGED_STRING_MAX_CHARS) return value;
  return `${value.slice(0, LOGGED_STRING_MAX_CHARS)}… (${value.length} characters)`;
}
