import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import type * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError } from './errors';
import { PROTO_DIR } from './frames';
import { GRPC_CONTENT_TYPE, MessageReader, endWithStatus, frameMessage } from './grpc-wire';
import { answerUnary } from './unary-call';

const HEALTH_CHECK = '/grpc.health.v1.Health/Check';
const HEALTH_WATCH = '/grpc.health.v1.Health/Watch';
/** A health request names one service: far below this. */
const MAX_HEALTH_REQUEST_BYTES = 4096;

export type ServingStatus = 'SERVING' | 'NOT_SERVING';

interface Watcher {
  service: string;
  write(status: number): void;
  end(): void;
}

const STATUS_NUMBER: Record<ServingStatus | 'SERVICE_UNKNOWN', number> = {
  SERVING: 1,
  NOT_SERVING: 2,
  SERVICE_UNKNOWN: 3,
};

let types: { req: protobuf.Type; res: protobuf.Type } | undefined;
function healthTypes(): { req: protobuf.Type; res: protobuf.Type } {
  if (!types) {
    const root = protobuf.loadSync(path.join(PROTO_DIR, 'grpc', 'health', 'v1', 'health.proto'));
    types = {
      req: root.lookupType('grpc.health.v1.HealthCheckRequest'),
      res: root.lookupType('grpc.health.v1.HealthCheckResponse'),
    };
  }
  return types;
}

/**
 * The standard gRPC health service (`grpc.health.v1.Health`). The empty service name and the names
 * in `services` report the overall status; `setStatus` changes it (NOT_SERVING while draining) and
 * notifies Watch streams.
 */
export class HealthService {
  private status: ServingStatus = 'SERVING';
  private readonly watchers = new Set<Watcher>();

  constructor(private readonly services: readonly string[] = []) {}

  setStatus(status: ServingStatus): void {
    this.status = status;
    for (const w of this.watchers) w.write(this.statusOf(w.service));
  }

  /** Ends every Watch stream, so a server can shut down without waiting on them. */
  close(): void {
    for (const w of this.watchers) w.end();
    this.watchers.clear();
  }

  private statusOf(service: string): number {
    return service === '' || this.services.includes(service)
      ? STATUS_NUMBER[this.status]
      : STATUS_NUMBER.SERVICE_UNKNOWN;
  }

  /** True when `method` is one of this service's (the caller then hands the stream to {@link answer}). */
  static handles(method: string): boolean {
    return method === HEALTH_CHECK || method === HEALTH_WATCH;
  }

  /**
   * Answers a Check or Watch call on a raw HTTP/2 stream. Check is unary; Watch sends the current
   * status, then every change, until the caller ends it or {@link close} is called.
   */
  answer(stream: http2.ServerHttp2Stream, method: string, deadlineMs: number): void {
    const { req, res } = healthTypes();
    const serviceOf = (b: Buffer): string => String((req.decode(b) as unknown as { service?: string }).service ?? '');
    const encode = (s: number): Buffer => Buffer.from(res.encode({ status: s }).finish());
    if (method === HEALTH_CHECK) {
      void answerUnary(
        stream,
        async (request) => {
          const service = serviceOf(request);
          const s = this.statusOf(service);
          if (s === STATUS_NUMBER.SERVICE_UNKNOWN)
            throw new BurrowError(Status.NOT_FOUND, `unknown service "${service}"`);
          return encode(s);
        },
        { method, maxMessageBytes: MAX_HEALTH_REQUEST_BYTES, deadlineMs, callId: '' },
      );
      return;
    }
    const reader = new MessageReader(MAX_HEALTH_REQUEST_BYTES);
    stream.on('error', () => {});
    stream.on('data', (chunk: Buffer) => {
      let got: Buffer[];
      try {
        got = reader.push(chunk);
      } catch (err) {
        const e = err as BurrowError;
        endWithStatus(stream, e.code, e.message);
        return;
      }
      const first = got[0];
      if (first === undefined || stream.headersSent) return;
      const service = serviceOf(first);
      stream.respond({ ':status': 200, 'content-type': GRPC_CONTENT_TYPE }, { waitForTrailers: true });
      const w = {
        service,
        write: (s: number) => stream.write(frameMessage(encode(s))),
        end: () => {
          endWithStatus(stream, Status.OK, '');
        },
      };
      this.watchers.add(w);
      w.write(this.statusOf(service));
      stream.on('close', () => this.watchers.delete(w));
    });
  }
}
