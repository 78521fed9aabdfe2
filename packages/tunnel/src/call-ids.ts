import type * as http2 from 'node:http2';

/**
 * Call ids for logs: `<prefix><random>-<counter>`, unique per process run and short. The random
 * part tells two runs (or two brokers) apart in a merged log; the counter orders the calls.
 */
export class CallIds {
  private counter = 0;
  private readonly prefix: string;

  constructor(kind: string) {
    this.prefix = `${kind}${Math.random().toString(36).slice(2, 7)}`;
  }

  next(): string {
    return `${this.prefix}-${(++this.counter).toString(36)}`;
  }

  /** The call id a peer sent in `burrow-call-id` (cut to 64 characters), or a new one. */
  fromHeader(value: string | string[] | undefined): string {
    return typeof value === 'string' && value !== '' ? value.slice(0, 64) : this.next();
  }
}

/** A node:http2 server's 'stream' listener, with the raw header list that keeps repeated keys apart. */
export type StreamListener = (
  stream: http2.ServerHttp2Stream,
  headers: http2.IncomingHttpHeaders,
  flags: number,
  rawHeaders: string[],
) => void;
