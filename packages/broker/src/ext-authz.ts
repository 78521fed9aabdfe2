import type * as http2 from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import type * as protobuf from 'protobufjs';
import {
  BurrowError,
  CallIds,
  type LocalCallContext,
  type PeerIdentity,
  answerUnary,
  answerUnimplemented,
  deadlineFromTimeout,
} from '@burrow/tunnel';
import {
  AGENT_CONTEXT_EXTENSION,
  GatewayChecker,
  type GatewayListenerDeps,
  bearerChallenge,
  bearerToken,
  deniedBody,
  type GatewayCheckRequest,
  type GatewayVerdict,
} from './gateway-check';
import { presentedBy } from './peer-admission';
import { loadProtoTypes } from './proto-types';
import { SessionSet, createSecureH2Server } from './tls-listeners';

/**
 * Envoy's external authorization service (envoy.service.auth.v3.Authorization/Check, the published
 * v3 API vendored under proto/envoy) on the broker's --ext-authz-listen: HTTP/2 with mTLS (Envoy
 * presents a `service` certificate), answered on Burrow's raw HTTP/2 unary path (answerUnary) since
 * the check is on every protected request. Each Check names its site by the route's context
 * extension `burrow_agent` (or the header --ext-authz-agent-header names) and becomes one
 * burrow.policy.v1 Check at that agent (gateway-check.ts). The answers (docs/gateways.md):
 *
 *   ALLOW            status OK, ok_response.headers = the agent's x-burrow-* headers (overwriting)
 *   DENY             status PERMISSION_DENIED, denied_response 403, short body, x-burrow-decision-id
 *   UNAUTHENTICATED  status UNAUTHENTICATED, denied_response 401 with WWW-Authenticate: Bearer ...
 *   no decision      a gRPC error status (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED for a
 *                    gateway the caller policy refuses, ...): Envoy applies failure_mode_allow /
 *                    status_on_error to it.
 */

export const EXT_AUTHZ_CHECK_METHOD = '/envoy.service.auth.v3.Authorization/Check';

// envoy.config.core.v3.HeaderValueOption.HeaderAppendAction: the site's headers replace any the
// client sent (a client must not bring its own x-burrow-subject).
const OVERWRITE_IF_EXISTS_OR_ADD = 2;

interface EnvoyTypes {
  checkRequest: protobuf.Type;
  checkResponse: protobuf.Type;
}

let envoyTypes: EnvoyTypes | undefined;
/** The vendored Envoy messages, loaded once (proto/envoy/service/auth/v3/external_auth.proto). */
function types(): EnvoyTypes {
  if (!envoyTypes) {
    const request = 'envoy.service.auth.v3.CheckRequest';
    const response = 'envoy.service.auth.v3.CheckResponse';
    const loaded = loadProtoTypes('envoy/service/auth/v3/external_auth.proto', [request, response]);
    envoyTypes = { checkRequest: loaded.get(request)!, checkResponse: loaded.get(response)! };
  }
  return envoyTypes;
}

/** The parts of envoy.service.auth.v3.AttributeContext the broker reads (as protobufjs decodes them). */
interface Attributes {
  source?: { principal?: string; address?: { socket_address?: { address?: string } } };
  request?: {
    http?: {
      id?: string;
      method?: string;
      headers?: Record<string, string>;
      header_map?: { headers?: { key?: string; value?: string; raw_value?: Uint8Array }[] };
      path?: string;
      host?: string;
      scheme?: string;
    };
  };
  context_extensions?: Record<string, string>;
}

/** Envoy's CheckRequest attributes; bytes that are not one are INVALID_ARGUMENT. */
function decodeAttributes(bytes: Buffer): Attributes {
  try {
    const msg = types().checkRequest.decode(bytes) as unknown as { attributes?: Attributes };
    return msg.attributes ?? {};
  } catch (err) {
    const why = `request is not an envoy.service.auth.v3.CheckRequest: ${(err as Error).message}`;
    throw new BurrowError(Status.INVALID_ARGUMENT, why);
  }
}

type EnvoyHttp = NonNullable<NonNullable<Attributes['request']>['http']>;

/**
 * The request's headers, names in lower case, from the `headers` map or (Envoy's
 * encode_raw_headers) the `header_map` list, repeated names joined with ",". Pseudo-headers are
 * left out (method, path and host carry them).
 */
function headersOf(http: EnvoyHttp): Record<string, string> {
  const out: Record<string, string> = {};
  const add = (name: string, value: string): void => {
    if (name === '' || name.startsWith(':')) return;
    out[name] = name in out ? `${out[name]},${value}` : value;
  };
  const list = http.header_map?.headers;
  if (list && list.length > 0) {
    for (const h of list) {
      const value = h.raw_value && h.raw_value.length > 0 ? Buffer.from(h.raw_value).toString('utf8') : (h.value ?? '');
      add((h.key ?? '').toLowerCase(), value);
    }
  } else {
    for (const [k, v] of Object.entries(http.headers ?? {})) add(k.toLowerCase(), v);
  }
  return out;
}

/**
 * The Burrow CheckRequest of Envoy's attributes: `authorization` travels as `token` (a Bearer
 * token) and never among the headers.
 */
export function checkRequestOfAttributes(a: Attributes): GatewayCheckRequest {
  const http = a.request?.http ?? {};
  const headers = headersOf(http);
  const token = bearerToken(headers.authorization);
  delete headers.authorization;
  return {
    method: (http.method ?? '').toUpperCase(),
    path: http.path ?? '',
    host: http.host ?? '',
    scheme: http.scheme ?? '',
    headers,
    token,
    source_principal: a.source?.principal ?? '',
    request_id: http.id || headers['x-request-id'] || '',
    context_extensions: { ...(a.context_extensions ?? {}) },
    source_address: a.source?.address?.socket_address?.address ?? '',
  };
}

/** Envoy's HeaderValueOption list of `headers`, each replacing what the request had. */
function headerOptions(headers: Record<string, string>): object[] {
  return Object.entries(headers)
    .filter(([, value]) => value !== '')
    .map(([key, value]) => ({ header: { key, value }, append_action: OVERWRITE_IF_EXISTS_OR_ADD }));
}

/** Envoy's CheckResponse for a verdict (see the table at the top). */
export function envoyResponseOf(v: GatewayVerdict): Record<string, unknown> {
  if (v.verdict === 'ALLOW') return { status: { code: Status.OK }, ok_response: { headers: headerOptions(v.headers) } };
  const unauthenticated = v.verdict === 'UNAUTHENTICATED';
  const headers: Record<string, string> = {
    'content-type': 'text/plain; charset=utf-8',
    'x-burrow-decision-id': v.decisionId,
  };
  if (unauthenticated) headers['www-authenticate'] = bearerChallenge(v.tokenReason);
  const body = deniedBody(v.verdict, v.decisionId);
  return {
    status: { code: unauthenticated ? Status.UNAUTHENTICATED : Status.PERMISSION_DENIED, message: body.trim() },
    denied_response: { status: { code: unauthenticated ? 401 : 403 }, headers: headerOptions(headers), body },
  };
}

/**
 * `timeoutMs`: Envoy's own deadline (grpc-timeout) applies when shorter; `agentHeader` names the
 * site when the route sets no `burrow_agent`.
 */
export interface ExtAuthzDeps extends GatewayListenerDeps {
  maxMessageBytes: number;
}

/** The listener: its HTTP/2 server (mTLS, following the credential store) and its sessions (for the drain). */
export class ExtAuthzListener {
  readonly server: http2.Http2SecureServer;
  readonly sessions = new SessionSet();
  private readonly checker: GatewayChecker;
  private readonly callIds = new CallIds('x');

  constructor(private readonly deps: ExtAuthzDeps) {
    types();
    this.checker = new GatewayChecker({ ...deps, gateway: 'ext_authz' });
    this.server = createSecureH2Server(deps.tls);
    this.sessions.track(this.server);
    deps.watch.watchHttp2Server(this.server, 'ext_authz');
    this.server.on('stream', (stream, headers) => this.handle(stream, headers));
  }

  private handle(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders): void {
    stream.on('error', () => {});
    const method = String(headers[':path'] ?? '');
    if (method !== EXT_AUTHZ_CHECK_METHOD) {
      const shown = JSON.stringify(method.slice(0, 200));
      answerUnimplemented(stream, `the ext_authz listener serves only ${EXT_AUTHZ_CHECK_METHOD}, not ${shown}`);
      return;
    }
    const nowMs = Date.now();
    const envoyDeadlineMs = deadlineFromTimeout(headers['grpc-timeout'], nowMs) ?? Number.POSITIVE_INFINITY;
    const deadlineMs = Math.min(envoyDeadlineMs, nowMs + this.deps.timeoutMs);
    const socket = stream.session?.socket as TLSSocket | undefined;
    const peer = socket ? presentedBy(socket).identity : undefined;
    // Envoy's own span when its tracing is on, else the client's, from the request it is checking.
    const callTraceparent = typeof headers.traceparent === 'string' ? headers.traceparent : undefined;
    void answerUnary(stream, (request, ctx) => this.check(peer, request, ctx, callTraceparent), {
      method,
      maxMessageBytes: this.deps.maxMessageBytes,
      deadlineMs,
      callId: this.callIds.next(),
    });
  }

  private async check(
    peer: PeerIdentity | undefined,
    bytes: Buffer,
    ctx: LocalCallContext,
    callTraceparent: string | undefined,
  ): Promise<Buffer> {
    let request: GatewayCheckRequest;
    let agentId: string;
    try {
      const attributes = decodeAttributes(bytes);
      request = checkRequestOfAttributes(attributes);
      agentId = this.siteOf(attributes, request);
    } catch (err) {
      throw this.checker.refused(err);
    }
    const traceparent = callTraceparent ?? request.headers.traceparent;
    const verdict = await this.checker.check(peer, agentId, request, ctx.deadlineMs, {
      signal: ctx.signal,
      traceparent,
    });
    const { checkResponse } = types();
    // A plain object of the message's shape (enums as numbers): the generated coder takes it as it is.
    return Buffer.from(checkResponse.encode(envoyResponseOf(verdict)).finish());
  }

  /** The site: the route's context extension, else the operator's header; neither is INVALID_ARGUMENT. */
  private siteOf(a: Attributes, request: GatewayCheckRequest): string {
    const fromRoute = a.context_extensions?.[AGENT_CONTEXT_EXTENSION];
    if (fromRoute) return fromRoute;
    const { agentHeader } = this.deps;
    const fromHeader = agentHeader ? request.headers[agentHeader] : undefined;
    if (fromHeader) return fromHeader;
    const header = agentHeader
      ? `the header ${agentHeader} (--ext-authz-agent-header)`
      : 'a header named by --ext-authz-agent-header (not set)';
    const why =
      `no site named: set context_extensions.${AGENT_CONTEXT_EXTENSION} on the route ` +
      `(typed_per_filter_config, envoy.filters.http.ext_authz check_settings) or ${header}`;
    throw new BurrowError(Status.INVALID_ARGUMENT, why);
  }
}
