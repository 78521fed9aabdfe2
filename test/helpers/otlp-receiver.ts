import { EventEmitter } from 'node:events';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import * as protobuf from 'protobufjs';

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'proto');

/** One span as the receiver got it: ids in hex, times in ns (bigint), attributes as plain values. */
export interface ReceivedSpan {
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  /** OTLP SpanKind: 1 INTERNAL, 2 SERVER, 3 CLIENT. */
  kind: number;
  startNs: bigint;
  endNs: bigint;
  attributes: Record<string, unknown>;
  /** The resource attributes of the batch the span came in. */
  resource: Record<string, unknown>;
  status: { code: number; message: string };
}

export const SPAN_KIND = { INTERNAL: 1, SERVER: 2, CLIENT: 3 } as const;

let requestType: protobuf.Type | undefined;
/** ExportTraceServiceRequest from the vendored OpenTelemetry protos, loaded here (not Burrow's decoder). */
function exportRequestType(): protobuf.Type {
  if (!requestType) {
    const root = new protobuf.Root();
    root.resolvePath = (_origin, target) => path.join(PROTO_ROOT, target);
    root.loadSync('opentelemetry/proto/collector/trace/v1/trace_service.proto');
    requestType = root.lookupType('opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest');
  }
  return requestType;
}

type AnyValue = Record<string, unknown>;
function plain(value: AnyValue | undefined): unknown {
  if (!value) return undefined;
  if ('stringValue' in value) return value.stringValue;
  if ('intValue' in value) return Number(value.intValue);
  if ('boolValue' in value) return value.boolValue;
  if ('doubleValue' in value) return value.doubleValue;
  if ('arrayValue' in value) return ((value.arrayValue as { values?: AnyValue[] }).values ?? []).map((v) => plain(v));
  return value;
}
function attributesOf(list: { key: string; value?: AnyValue }[] | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const kv of list ?? []) out[kv.key] = plain(kv.value);
  return out;
}
const hex = (b: unknown): string => (b ? Buffer.from(b as Uint8Array).toString('hex') : '');

/** Decodes one OTLP/HTTP protobuf body into spans. */
export function decodeSpans(body: Buffer): ReceivedSpan[] {
  const t = exportRequestType();
  // biome-ignore lint/suspicious/noExplicitAny: protobufjs plain objects of the OTLP messages
  const req = t.toObject(t.decode(body), { longs: String, bytes: Buffer, enums: Number }) as any;
  const spans: ReceivedSpan[] = [];
  for (const rs of req.resourceSpans ?? []) {
    const resource = attributesOf(rs.resource?.attributes);
    for (const ss of rs.scopeSpans ?? [])
      for (const s of ss.spans ?? [])
        spans.push({
          traceId: hex(s.traceId),
          spanId: hex(s.spanId),
          parentSpanId: hex(s.parentSpanId),
          name: s.name,
          kind: s.kind,
          startNs: BigInt(s.startTimeUnixNano),
          endNs: BigInt(s.endTimeUnixNano),
          attributes: attributesOf(s.attributes),
          resource,
          status: { code: s.status?.code ?? 0, message: s.status?.message ?? '' },
        });
  }
  return spans;
}

/**
 * The pid (of `pids`) holding the TCP socket whose local port is `port` and that is connected to
 * `peerPort` on this host, read from /proc (Linux): which process made a connection, checked while
 * it is open.
 */
export function socketOwner(port: number, peerPort: number, pids: readonly number[]): number | undefined {
  let inode: string | undefined;
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of readFileSync(table, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10) continue;
      const local = Number.parseInt(f[1]!.split(':')[1]!, 16);
      const remote = Number.parseInt(f[2]!.split(':')[1]!, 16);
      if (local === port && remote === peerPort) inode = f[9];
    }
  }
  if (!inode) return undefined;
  for (const pid of pids) {
    let fds: string[] = [];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`) === `socket:[${inode}]`) return pid;
      } catch {
        // closed meanwhile
      }
    }
  }
  return undefined;
}

/**
 * A real OTLP/HTTP trace receiver (POST /v1/traces, application/x-protobuf), decoding every
 * request with the vendored OpenTelemetry protos. Emits 'spans' with each request's spans. Notes,
 * at accept, which of the `watchPids` made each connection.
 */
export class OtlpReceiver extends EventEmitter {
  readonly spans: ReceivedSpan[] = [];
  readonly requests: { contentType: string; bytes: number }[] = [];
  /** For each accepted connection: the watched pid that made it (undefined: none of them). */
  readonly connectionsFrom: (number | undefined)[] = [];
  watchPids: number[] = [];
  private server: http.Server | undefined;
  port = 0;

  async start(): Promise<this> {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const body = Buffer.concat(chunks);
        if (req.method !== 'POST' || req.url !== '/v1/traces') {
          res.writeHead(404).end();
          return;
        }
        this.requests.push({ contentType: String(req.headers['content-type']), bytes: body.length });
        let spans: ReceivedSpan[];
        try {
          spans = decodeSpans(body);
        } catch {
          res.writeHead(400).end();
          return;
        }
        this.spans.push(...spans);
        res.writeHead(200, { 'content-type': 'application/x-protobuf' }).end();
        this.emit('spans', spans);
      });
    });
    this.server.on('connection', (socket) => {
      this.connectionsFrom.push(socketOwner(socket.remotePort!, this.port, this.watchPids));
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
    return this;
  }

  get endpoint(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Resolves with the received spans once `done(spans)` holds for them (checked as requests arrive). */
  waitFor(what: string, done: (spans: ReceivedSpan[]) => boolean, timeoutMs = 15_000): Promise<ReceivedSpan[]> {
    if (done(this.spans)) return Promise.resolve(this.spans);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off('spans', check);
        const names = this.spans.map((s) => `${s.name}(${s.kind})`).join(', ');
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; received: ${names}`));
      }, timeoutMs);
      const check = (): void => {
        if (!done(this.spans)) return;
        clearTimeout(timer);
        this.off('spans', check);
        resolve(this.spans);
      };
      this.on('spans', check);
    });
  }

  /** The spans of one trace. */
  trace(traceId: string): ReceivedSpan[] {
    return this.spans.filter((s) => s.traceId === traceId);
  }

  async stop(): Promise<void> {
    const server = this.server;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}
