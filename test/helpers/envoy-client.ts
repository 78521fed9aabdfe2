import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { type ServiceError, credentials, loadPackageDefinition, type Client, Metadata } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import * as protobuf from 'protobufjs';
import type { CertFiles } from './pki-fixture';

/**
 * An Envoy-shaped ext_authz client: @grpc/grpc-js with the vendored Envoy protos
 * (proto/envoy/service/auth/v3), over mTLS with a `service` certificate, sending CheckRequests
 * filled the way Envoy's ext_authz HTTP filter fills them (see {@link envoyCheckRequest}).
 */

const PROTO_DIR = path.resolve(__dirname, '..', '..', '..', 'proto');

/** envoy.config.core.v3.HeaderValueOption as decoded. */
export interface EnvoyHeaderOption {
  header: { key: string; value: string };
  append_action?: string;
}

/** envoy.service.auth.v3.CheckResponse as @grpc/proto-loader decodes it (enums as names). */
export interface EnvoyCheckResponse {
  status?: { code: number; message: string };
  http_response?: 'ok_response' | 'denied_response';
  ok_response?: { headers: EnvoyHeaderOption[]; headers_to_remove: string[] };
  denied_response?: { status?: { code: string }; headers: EnvoyHeaderOption[]; body: string };
}

type CheckFn = (
  req: object,
  md: Metadata,
  opts: { deadline: Date },
  cb: (err: ServiceError | null, res: EnvoyCheckResponse) => void,
) => void;

export class EnvoyAuthzClient {
  private readonly client: Client & { Check: CheckFn };

  constructor(address: string, cert: CertFiles, serverName = 'localhost') {
    const def = loadSync('envoy/service/auth/v3/external_auth.proto', {
      includeDirs: [PROTO_DIR],
      keepCase: true,
      enums: String,
      oneofs: true,
      defaults: true,
    });
    // biome-ignore lint/suspicious/noExplicitAny: the package tree is untyped
    const Authorization = (loadPackageDefinition(def) as any).envoy.service.auth.v3.Authorization;
    const creds = credentials.createSsl(readFileSync(cert.ca), readFileSync(cert.key), readFileSync(cert.cert));
    this.client = new Authorization(address, creds, { 'grpc.ssl_target_name_override': serverName });
  }

  /** One Check with Envoy's deadline; rejects with the gRPC error when there is no CheckResponse. */
  check(request: object, timeoutMs = 2_000): Promise<EnvoyCheckResponse> {
    return new Promise((resolve, reject) => {
      this.client.Check(request, new Metadata(), { deadline: new Date(Date.now() + timeoutMs) }, (err, res) =>
        err ? reject(err) : resolve(res),
      );
    });
  }

  close(): void {
    this.client.close();
  }
}

/** What a test says about the downstream request; the rest is filled as Envoy would. */
export interface DownstreamRequest {
  method?: string;
  /** Path and query as the client sent them, not decoded. */
  path?: string;
  host?: string;
  /** More request headers (any case: Envoy lower-cases them). */
  headers?: Record<string, string>;
  /** Sent as `authorization: Bearer <token>`. */
  token?: string;
  /** The route's context_extensions.burrow_agent; omitted when undefined. */
  agent?: string;
  requestId?: string;
  /** Envoy's encode_raw_headers: header_map (raw_value bytes, repeats kept) instead of the headers map. */
  rawHeaders?: boolean;
}

/**
 * A CheckRequest the way Envoy's HTTP ext_authz filter builds one (attribute_context.proto): the
 * headers map with lower-case names, HTTP/2 pseudo-headers included, repeated headers merged with
 * ","; `path` is the request target with its query, undecoded; `host` is :authority; `id` is the
 * x-request-id Envoy generated; the source peer's address and (with downstream mTLS) principal;
 * the route's context extensions.
 */
export function envoyCheckRequest(r: DownstreamRequest): object {
  const method = r.method ?? 'GET';
  const reqPath = r.path ?? '/';
  const host = r.host ?? 'packages.example.test';
  const id = r.requestId ?? `req-${Math.random().toString(16).slice(2)}`;
  const headers: Record<string, string> = {
    ':authority': host,
    ':method': method,
    ':path': reqPath,
    ':scheme': 'https',
    'user-agent': 'curl/8.5.0',
    accept: '*/*',
    'x-forwarded-proto': 'https',
    'x-request-id': id,
  };
  for (const [k, v] of Object.entries(r.headers ?? {})) headers[k.toLowerCase()] = v;
  if (r.token !== undefined) headers.authorization = `Bearer ${r.token}`;
  const http: Record<string, unknown> = { id, method, path: reqPath, host, scheme: 'https' };
  if (r.rawHeaders)
    http.header_map = {
      headers: Object.entries(headers).map(([key, value]) => ({ key, raw_value: Buffer.from(value) })),
    };
  else http.headers = headers;
  const nowS = Math.floor(Date.now() / 1000);
  return {
    attributes: {
      source: {
        address: { socket_address: { address: '203.0.113.7', port_value: 53_124 } },
        principal: 'spiffe://clients.example.test/ci-runner',
      },
      destination: { address: { socket_address: { address: '10.0.0.5', port_value: 8080 } } },
      request: { time: { seconds: nowS, nanos: 0 }, http },
      context_extensions: r.agent === undefined ? {} : { burrow_agent: r.agent },
    },
  };
}

/** `request` (an object from {@link envoyCheckRequest}) as envoy.service.auth.v3.CheckRequest bytes. */
export function encodeEnvoyCheckRequest(request: object): Buffer {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(PROTO_DIR, target);
  root.loadSync('envoy/service/auth/v3/external_auth.proto', { keepCase: true });
  const type = root.lookupType('envoy.service.auth.v3.CheckRequest');
  return Buffer.from(type.encode(type.fromObject(request)).finish());
}

/** The headers of an ok/denied response as a plain object (the last value of a name wins). */
export function headersOf(options: EnvoyHeaderOption[] | undefined): Record<string, string> {
  return Object.fromEntries((options ?? []).map((o) => [o.header.key, o.header.value]));
}
