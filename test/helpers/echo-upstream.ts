import { EventEmitter } from 'node:events';
import { Metadata, type ServerDuplexStream } from '@grpc/grpc-js';
import { startRawServer } from './raw-grpc';

export const ECHO = {
  unary: '/burrow.test.Echo/Unary',
  clientStream: '/burrow.test.Echo/ClientStream',
  serverStream: '/burrow.test.Echo/ServerStream',
  bidi: '/burrow.test.Echo/Bidi',
  status: '/burrow.test.Echo/Status',
  hang: '/burrow.test.Echo/Hang',
  metadata: '/burrow.test.Echo/Metadata',
} as const;

/** What the upstream saw of one call. */
export interface SeenCall {
  method: string;
  metadata: Metadata;
  deadline: number;
  cancelled: boolean;
}

/** Snapshot of metadata as plain JSON (binary values base64) for equality checks. */
export function metadataJson(md: Metadata): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  for (const key of Object.keys(md.getMap()))
    out[key] = md.get(key).map((v) => (typeof v === 'string' ? v : `b64:${v.toString('base64')}`));
  return out;
}

/**
 * A real gRPC upstream for tests, speaking raw bytes so tests check byte-exactness:
 * - Unary/Bidi echo every message; ClientStream answers the concatenation once the client half-closes;
 * - ServerStream: request is JSON {count, size}; answers `count` messages of `size` bytes, then OK;
 * - Status: request is JSON {code, message, details?(base64)}; fails with it (details in grpc-status-details-bin);
 * - Hang: never answers; records cancellation (emits 'cancelled');
 * - Metadata: answers the request metadata as JSON, with response headers and trailers including -bin.
 * Emits 'call' (SeenCall) when a call arrives and 'cancelled' when one is cancelled.
 */
export class EchoUpstream extends EventEmitter {
  readonly calls: SeenCall[] = [];
  active = 0;
  /** Bytes the ServerStream method managed to hand to grpc-js, over all calls (backpressure tests). */
  streamedBytes = 0;
  address = '';
  private stopFn: (() => Promise<void>) | undefined;

  async start(): Promise<this> {
    const track =
      (h: (call: ServerDuplexStream<Buffer, Buffer>, seen: SeenCall) => void) =>
      (call: ServerDuplexStream<Buffer, Buffer>) => {
        const d = call.getDeadline();
        const seen: SeenCall = {
          method: call.getPath(),
          metadata: call.metadata,
          deadline: d instanceof Date ? d.getTime() : d,
          cancelled: false,
        };
        this.calls.push(seen);
        this.active++;
        let ended = false;
        const end = (): void => {
          if (!ended) {
            ended = true;
            this.active--;
          }
        };
        call.on('cancelled', () => {
          seen.cancelled = true;
          end();
          this.emit('cancelled', seen);
        });
        call.on('finish', end);
        call.on('error', () => {});
        this.emit('call', seen);
        h(call, seen);
      };
    const s = await startRawServer({
      [ECHO.unary]: track((call) =>
        call.on('data', (m: Buffer) => {
          call.write(m);
          call.end();
        }),
      ),
      [ECHO.bidi]: track((call) => {
        call.on('data', (m: Buffer) => {
          if (!call.write(m)) {
            call.pause();
            call.once('drain', () => call.resume());
          }
        });
        call.on('end', () => call.end());
      }),
      [ECHO.clientStream]: track((call) => {
        const parts: Buffer[] = [];
        call.on('data', (m: Buffer) => parts.push(m));
        call.on('end', () => {
          call.write(Buffer.concat(parts));
          call.end();
        });
      }),
      [ECHO.serverStream]: track((call) =>
        call.once('data', (m: Buffer) => {
          const { count, size } = JSON.parse(m.toString()) as { count: number; size: number };
          let i = 0;
          const pump = (): void => {
            while (i < count && !call.cancelled) {
              const buf = Buffer.alloc(size, i % 251);
              i++;
              this.streamedBytes += size;
              if (!call.write(buf)) {
                call.once('drain', pump);
                return;
              }
            }
            call.end();
          };
          pump();
        }),
      ),
      [ECHO.status]: track((call) =>
        call.once('data', (m: Buffer) => {
          const { code, message, details } = JSON.parse(m.toString()) as {
            code: number;
            message: string;
            details?: string;
          };
          const md = new Metadata();
          if (details) md.set('grpc-status-details-bin', Buffer.from(details, 'base64'));
          md.set('x-trailer', 'kept');
          call.emit('error', { code, details: message, metadata: md });
        }),
      ),
      [ECHO.hang]: track(() => {}),
      [ECHO.metadata]: track((call) =>
        call.once('data', () => {
          const headers = new Metadata();
          headers.set('x-header', 'h-value');
          headers.set('x-header-bin', Buffer.from([0, 1, 2, 255]));
          call.sendMetadata(headers);
          call.write(Buffer.from(JSON.stringify(metadataJson(call.metadata))));
          const trailers = new Metadata();
          trailers.set('x-trailer', 't-value');
          trailers.set('x-trailer-bin', Buffer.from([255, 254, 0]));
          call.end(trailers);
        }),
      ),
    });
    this.address = s.address;
    this.stopFn = s.stop;
    return this;
  }

  async stop(): Promise<void> {
    await this.stopFn?.();
  }
}
