import * as http from 'node:http';
import * as https from 'node:https';
import type { OtlpChunk } from './otlp';
import type { SpanSink } from './tracing-sdk';

/** Where and how spans are exported over OTLP/HTTP (the binaries' `--otlp-*` flags). */
export interface OtlpHttpOptions {
  /** `http(s)://host:port[/prefix]`; requests go to `{endpoint}/v1/traces`. */
  endpoint: string;
  /** PEM: CA to verify an https endpoint with, and a client certificate and key for mTLS. */
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Extra request headers (an `authorization` for a hosted collector). */
  headers?: Record<string, string>;
  /** One request's limit, connection to answer. */
  timeoutMs: number;
  /** Encoded spans held while the endpoint is slow or down; past this, new batches are dropped. */
  maxQueueBytes: number;
  /** Attempts after the first one for a request that failed in a way worth retrying. */
  retries?: number;
  /** Wait before the first retry; doubled for each next one. */
  retryDelayMs?: number;
  /** Most bytes one request carries (several queued batches are concatenated up to it). */
  maxRequestBytes?: number;
  /** Counts what was dropped: `queue_full`, `export_failed` (retries used up), `rejected` (a 4xx). */
  onDropped(bytes: number, spans: number, reason: 'queue_full' | 'export_failed' | 'rejected', error?: string): void;
  onExported?(bytes: number, spans: number): void;
}

export const DEFAULT_OTLP_TIMEOUT_MS = 10_000;
export const DEFAULT_OTLP_RETRIES = 2;
const DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024;
/** How long a shutdown waits for queued spans to reach the collector. */
const SHUTDOWN_GRACE_MS = 2_000;

/** HTTP statuses the OTLP spec says to retry. */
const RETRYABLE = new Set([429, 502, 503, 504]);

/** Why one request failed, and whether another attempt may succeed. */
class ExportFailure extends Error {
  constructor(
    message: string,
    readonly retryable: boolean,
  ) {
    super(message);
  }
}

/**
 * Exports OTLP protobuf batches (the broker's spans, its agents' re-stamped batches, or a
 * non-uploading agent's spans) to an OTLP/HTTP endpoint: one request at a time, bounded queue,
 * bounded retries with a timeout each, every drop counted. Never blocks a caller: {@link accept}
 * only queues.
 */
export class OtlpHttpExporter implements SpanSink {
  private readonly queue: OtlpChunk[] = [];
  /** Bytes queued plus the bytes of the request in flight (the budget covers both). */
  private heldBytes = 0;
  private sending: Promise<void> | undefined;
  private readonly url: URL;
  private readonly agent: http.Agent;
  private closed = false;
  /** Past the shutdown's grace: what is still queued is dropped, not sent. */
  private stopped = false;

  constructor(private readonly opts: OtlpHttpOptions) {
    this.url = new URL(`${opts.endpoint.replace(/\/+$/, '')}/v1/traces`);
    this.agent =
      this.url.protocol === 'https:'
        ? new https.Agent({ keepAlive: true, maxSockets: 1, ca: opts.ca, cert: opts.cert, key: opts.key })
        : new http.Agent({ keepAlive: true, maxSockets: 1 });
  }

  /** Bytes waiting or in flight (`burrow_*_telemetry_queue_bytes`). */
  get queuedBytes(): number {
    return this.heldBytes;
  }

  accept(chunk: OtlpChunk): void {
    if (this.closed || this.heldBytes + chunk.bytes.length > this.opts.maxQueueBytes) {
      this.opts.onDropped(chunk.bytes.length, chunk.spans, 'queue_full');
      return;
    }
    this.queue.push(chunk);
    this.heldBytes += chunk.bytes.length;
    this.sending ??= this.drain().finally(() => {
      this.sending = undefined;
    });
  }

  /** Spans the tracer dropped before they got here: counted like the exporter's own drops. */
  dropped(spans: number, reason: 'too_large' | 'queue_full', bytes: number): void {
    this.opts.onDropped(bytes, spans, 'queue_full', reason);
  }

  /** Sends what is queued now; resolves when the queue is empty or every batch was dropped. */
  async flush(): Promise<void> {
    while (this.sending) await this.sending;
  }

  /**
   * Stops taking batches and sends what is queued for at most `graceMs`, then drops the rest (a
   * collector that is down must not hold a process's shutdown for its timeouts and retries).
   */
  async shutdown(graceMs = SHUTDOWN_GRACE_MS): Promise<void> {
    this.closed = true;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.flush(), new Promise((resolve) => (timer = setTimeout(resolve, graceMs)))]);
    clearTimeout(timer);
    this.stopped = true;
    this.agent.destroy();
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.stopped ? this.queue.splice(0) : this.takeBatch();
      const body = Buffer.concat(batch.map((c) => c.bytes));
      const spans = batch.reduce((n, c) => n + c.spans, 0);
      const failure = this.stopped ? new ExportFailure('shut down', true) : await this.sendWithRetries(body);
      this.heldBytes -= body.length;
      if (!failure) this.opts.onExported?.(body.length, spans);
      else this.opts.onDropped(body.length, spans, failure.retryable ? 'export_failed' : 'rejected', failure.message);
    }
  }

  /** Queued batches up to the request size (at least one); concatenated requests merge (protobuf). */
  private takeBatch(): OtlpChunk[] {
    const max = this.opts.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES;
    const batch = [this.queue.shift()!];
    let bytes = batch[0]!.bytes.length;
    while (this.queue.length > 0 && bytes + this.queue[0]!.bytes.length <= max) {
      const next = this.queue.shift()!;
      bytes += next.bytes.length;
      batch.push(next);
    }
    return batch;
  }

  private async sendWithRetries(body: Buffer): Promise<ExportFailure | undefined> {
    const retries = this.opts.retries ?? DEFAULT_OTLP_RETRIES;
    let delayMs = this.opts.retryDelayMs ?? 500;
    for (let attempt = 0; ; attempt++) {
      const failure = await this.post(body);
      if (!failure?.retryable || attempt >= retries || this.closed) return failure;
      await new Promise((resolve) => setTimeout(resolve, delayMs).unref());
      delayMs *= 2;
    }
  }

  /** One POST; resolves undefined on a 2xx, else the failure. Never rejects. */
  private post(body: Buffer): Promise<ExportFailure | undefined> {
    const client = this.url.protocol === 'https:' ? https : http;
    return new Promise((resolve) => {
      const req = client.request(this.url, {
        method: 'POST',
        agent: this.agent,
        timeout: this.opts.timeoutMs,
        headers: {
          ...this.opts.headers,
          'content-type': 'application/x-protobuf',
          'content-length': body.length,
        },
      });
      req.once('timeout', () => req.destroy(new ExportFailure(`no answer within ${this.opts.timeoutMs} ms`, true)));
      req.once('error', (err) => resolve(err instanceof ExportFailure ? err : new ExportFailure(err.message, true)));
      req.once('response', (res) => {
        res.resume();
        const code = res.statusCode ?? 0;
        res.once('end', () => {
          if (code >= 200 && code < 300) resolve(undefined);
          else resolve(new ExportFailure(`HTTP ${code}`, RETRYABLE.has(code)));
        });
        res.once('error', (err) => resolve(new ExportFailure(err.message, true)));
      });
      req.end(body);
    });
  }
}
