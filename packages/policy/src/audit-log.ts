import { createWriteStream } from 'node:fs';
import type { Writable } from 'node:stream';
import type { Logger } from 'winston';

/** One audit record: one decision, cached or not. Written as one JSON line. */
export interface AuditRecord {
  /** ISO 8601 time of the decision. */
  time: string;
  /**
   * SHA-256 (hex) of the canonical JSON of the request, so equal requests can be matched without logging their data.
   */
  input_sha256: string;
  decision: 'allow' | 'deny' | 'error';
  policies: string[];
  cached: boolean;
  latency_us: number;
  /** Who asked, as the caller of evaluate() vouches for it (a verified service identity, an agent id). */
  caller?: string;
  /** The broker where the call entered, when another broker admitted it first and forwarded it here. */
  forwarded_by?: string;
  /** Ids of the entering broker's caller policies that permitted the call (with forwarded_by). */
  entry_policies?: string[];
  /** The gateway decision (PolicyDecisionService/Check) this evaluation answered: its decision_id. */
  decision_id?: string;
  /** For decision=error: why the request could not be evaluated. */
  error?: string;
}

/** Options of {@link AuditLog}. */
export interface AuditLogOptions {
  /**
   * A writable stream (left open on close, only drained) or a file path (opened for append, mode 0600, closed on
   * close).
   */
  sink: Writable | string;
  logger: Logger;
  /** Records are dropped (and counted) while more than this many bytes wait for the disk. Default 8 MiB. */
  maxBufferedBytes?: number;
  /** Called for every record dropped. */
  onDrop?: () => void;
}

/**
 * The decision audit log: JSON lines written through a buffered stream. {@link record} never
 * waits for the disk; when the disk falls behind by more than `maxBufferedBytes`, records are
 * dropped and counted rather than holding decisions up or growing memory without bound.
 */
export class AuditLog {
  private readonly stream: Writable;
  private readonly owned: boolean;
  private readonly maxBufferedBytes: number;
  private failed: Error | undefined;
  private closed = false;

  private constructor(private readonly opts: AuditLogOptions) {
    this.owned = typeof opts.sink === 'string';
    this.stream = typeof opts.sink === 'string' ? createWriteStream(opts.sink, { flags: 'a', mode: 0o600 }) : opts.sink;
    this.maxBufferedBytes = opts.maxBufferedBytes ?? 8 * 1024 * 1024;
    this.stream.on('error', (err: Error) => {
      if (!this.failed)
        opts.logger.error('audit log write failed; decisions go on without it', {
          error: err.message,
          file: typeof opts.sink === 'string' ? opts.sink : undefined,
        });
      this.failed = err;
    });
  }

  /**
   * Opens the audit log. For a file path it waits until the file is open, so a bad path is a
   * startup error (rejects with the path and the errno) rather than a silent loss later.
   */
  static async open(opts: AuditLogOptions): Promise<AuditLog> {
    const log = new AuditLog(opts);
    if (log.owned) {
      await new Promise<void>((resolve, reject) => {
        const onError = (err: NodeJS.ErrnoException): void =>
          reject(new Error(`audit log ${String(opts.sink)}: cannot open: ${err.code ?? err.message}`));
        log.stream.once('error', onError);
        log.stream.once('open', () => {
          log.stream.off('error', onError);
          resolve();
        });
      });
    }
    return log;
  }

  /** Appends one record; never blocks, never throws. */
  record(rec: AuditRecord): void {
    if (this.closed || this.failed) {
      this.opts.onDrop?.();
      return;
    }
    if (this.stream.writableLength > this.maxBufferedBytes) {
      this.opts.onDrop?.();
      return;
    }
    this.stream.write(`${JSON.stringify(rec)}\n`);
  }

  /** Flushes what is buffered; closes the file when the log opened it. Resolves once written. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.failed || this.stream.destroyed) return;
    if (this.owned) {
      await new Promise<void>((resolve) => this.stream.end(() => resolve()));
    } else if (this.stream.writableLength > 0) {
      // Writes complete in order, so the callback of an empty write runs once everything before it is written.
      await new Promise<void>((resolve) => this.stream.write('', () => resolve()));
    }
  }
}
