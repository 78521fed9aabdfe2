import { EventEmitter } from 'node:events';
import { Writable } from 'node:stream';
import * as winston from 'winston';
import type { Logger } from '@burrow/tunnel';

/**
 * A logger that keeps every record (JSON) for assertions; `events` emits `record` after each one
 * is kept, for a test to wait on instead of polling.
 */
export function recordingLogger(): { logger: Logger; records: Record<string, unknown>[]; events: EventEmitter } {
  const records: Record<string, unknown>[] = [];
  const events = new EventEmitter();
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      records.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
      events.emit('record');
      cb();
    },
  });
  return {
    logger: winston.createLogger({
      level: 'debug',
      format: winston.format.json(),
      transports: [new winston.transports.Stream({ stream })],
    }),
    records,
    events,
  };
}
