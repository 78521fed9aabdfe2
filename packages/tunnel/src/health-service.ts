import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import {
  status as Status,
  type Server,
  type ServerUnaryCall,
  type ServerWritableStream,
  type sendUnaryData,
} from '@grpc/grpc-js';
import { PROTO_DIR } from './frames';

export type ServingStatus = 'SERVING' | 'NOT_SERVING';

interface HealthRequest {
  service: string;
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
  private readonly watchers = new Set<{ service: string; call: ServerWritableStream<HealthRequest, number> }>();

  constructor(private readonly services: readonly string[] = []) {}

  setStatus(status: ServingStatus): void {
    this.status = status;
    for (const w of this.watchers) w.call.write(this.statusOf(w.service));
  }

  /** Ends every Watch stream, so a server can shut down without waiting on them. */
  close(): void {
    for (const w of this.watchers) w.call.end();
    this.watchers.clear();
  }

  private statusOf(service: string): number {
    return service === '' || this.services.includes(service)
      ? STATUS_NUMBER[this.status]
      : STATUS_NUMBER.SERVICE_UNKNOWN;
  }

  addTo(server: Server): void {
    const { req, res } = healthTypes();
    // An object, not a bare string: grpc-js treats an empty-string request as "no request received",
    // and the standard probe sends an empty request (service "").
    const deserialize = (b: Buffer): HealthRequest => ({
      service: String((req.decode(b) as unknown as { service?: string }).service ?? ''),
    });
    const serialize = (s: number): Buffer => Buffer.from(res.encode({ status: s }).finish());
    server.addService(
      {
        check: {
          path: '/grpc.health.v1.Health/Check',
          requestStream: false,
          responseStream: false,
          requestSerialize: (r: HealthRequest) => Buffer.from(req.encode({ service: r.service }).finish()),
          requestDeserialize: deserialize,
          responseSerialize: serialize,
          responseDeserialize: (b: Buffer) => Number((res.decode(b) as unknown as { status: number }).status),
        },
        watch: {
          path: '/grpc.health.v1.Health/Watch',
          requestStream: false,
          responseStream: true,
          requestSerialize: (r: HealthRequest) => Buffer.from(req.encode({ service: r.service }).finish()),
          requestDeserialize: deserialize,
          responseSerialize: serialize,
          responseDeserialize: (b: Buffer) => Number((res.decode(b) as unknown as { status: number }).status),
        },
      },
      {
        check: (call: ServerUnaryCall<HealthRequest, number>, cb: sendUnaryData<number>) => {
          const s = this.statusOf(call.request.service);
          if (s === STATUS_NUMBER.SERVICE_UNKNOWN)
            cb({ code: Status.NOT_FOUND, details: `unknown service "${call.request.service}"` });
          else cb(null, s);
        },
        watch: (call: ServerWritableStream<HealthRequest, number>) => {
          const w = { service: call.request.service, call };
          this.watchers.add(w);
          call.write(this.statusOf(call.request.service));
          call.on('cancelled', () => this.watchers.delete(w));
        },
      },
    );
  }
}
