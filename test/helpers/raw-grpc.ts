import {
  Client,
  Metadata,
  Server,
  ServerCredentials,
  credentials,
  type CallOptions,
  type ChannelCredentials,
  type ClientDuplexStream,
  type ServerDuplexStream,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';
import type { CertFiles } from './pki-fixture';

/** Message bytes in, bytes out: tests see exactly what crossed the tunnel. */
export const raw = (b: Buffer): Buffer => b;

/** mTLS channel credentials from issued files. */
export function mtlsCredentials(files: CertFiles): ChannelCredentials {
  return credentials.createSsl(readFileSync(files.ca), readFileSync(files.key), readFileSync(files.cert));
}

/** A generic client for any method path, raw bytes. */
export class RawClient {
  readonly client: Client;
  constructor(
    address: string,
    creds: ChannelCredentials = credentials.createInsecure(),
    options: Record<string, string | number> = {},
  ) {
    this.client = new Client(address, creds, {
      'grpc.max_receive_message_length': -1,
      'grpc.max_send_message_length': -1,
      ...options,
    });
  }

  unary(
    method: string,
    req: Buffer,
    md = new Metadata(),
    opts: CallOptions = {},
  ): Promise<{ response: Buffer; headers: Metadata; status: StatusObject }> {
    return new Promise((resolve, reject) => {
      let headers = new Metadata();
      let response: Buffer | undefined;
      const call = this.client.makeUnaryRequest(
        method,
        raw,
        raw,
        req,
        md,
        opts,
        (err: ServiceError | null, res?: Buffer) => {
          if (err) reject(err);
          else response = res;
        },
      );
      call.on('metadata', (h) => {
        headers = h;
      });
      call.on('status', (s) => {
        if (response !== undefined) resolve({ response, headers, status: s });
      });
    });
  }

  bidi(method: string, md = new Metadata(), opts: CallOptions = {}): ClientDuplexStream<Buffer, Buffer> {
    return this.client.makeBidiStreamRequest(method, raw, raw, md, opts);
  }

  close(): void {
    this.client.close();
  }
}

/** Collects everything a streaming call returns. */
export function collect(
  call: ClientDuplexStream<Buffer, Buffer>,
): Promise<{ messages: Buffer[]; headers?: Metadata; status: StatusObject }> {
  return new Promise((resolve) => {
    const messages: Buffer[] = [];
    let headers: Metadata | undefined;
    let status: StatusObject | undefined;
    let ended = false;
    const done = (): void => {
      if (status && ended) resolve({ messages, headers, status });
    };
    call.on('metadata', (h) => {
      headers = h;
    });
    call.on('data', (m: Buffer) => messages.push(m));
    call.on('error', () => {});
    call.on('end', () => {
      ended = true;
      done();
    });
    call.on('status', (s) => {
      status = s;
      if (s.code !== 0) ended = true;
      done();
    });
  });
}

export type RawHandler = (call: ServerDuplexStream<Buffer, Buffer>) => void;

/** A real gRPC server on 127.0.0.1:0 with raw-byte bidi handlers per method path. */
export async function startRawServer(
  handlers: Record<string, RawHandler>,
  creds = ServerCredentials.createInsecure(),
  options: Record<string, number> = {},
): Promise<{ server: Server; port: number; address: string; stop(): Promise<void> }> {
  const server = new Server({ 'grpc.max_receive_message_length': -1, 'grpc.max_send_message_length': -1, ...options });
  const def: Record<string, object> = {};
  const impl: Record<string, RawHandler> = {};
  for (const [path, h] of Object.entries(handlers)) {
    const key = path.replace(/[^A-Za-z0-9]/g, '_');
    def[key] = {
      path,
      requestStream: true,
      responseStream: true,
      requestSerialize: raw,
      requestDeserialize: raw,
      responseSerialize: raw,
      responseDeserialize: raw,
    };
    impl[key] = h;
  }
  server.addService(def as never, impl as never);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', creds, (e, p) => (e ? reject(e) : resolve(p))),
  );
  return {
    server,
    port,
    address: `127.0.0.1:${port}`,
    stop: () =>
      new Promise<void>((resolve) => {
        server.forceShutdown();
        resolve();
      }),
  };
}
