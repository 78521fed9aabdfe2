import * as https from 'node:https';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import type { TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError, statusName } from '@burrow/tunnel';
import {
  GatewayChecker,
  type GatewayListenerDeps,
  bearerChallenge,
  bearerToken,
  deniedBody,
  type GatewayCheckRequest,
  type GatewayVerdict,
} from './gateway-check';
import { presentedBy } from './peer-admission';
import { followCredentialStore, serverTlsOptions } from './tls-listeners';

/**
 * Forward auth on the broker's --forward-auth-listen, for nginx `auth_request` and Traefik
 * `ForwardAuth` (same contract): HTTPS with mTLS (the gateway presents a `service` certificate).
 * Each request is one check of the request the gateway is deciding on, named by headers:
 *
 *   nginx (burrow-auth.conf sets them)   X-Original-Method, X-Original-URI, X-Original-Host,
 *                                        X-Original-Proto, X-Real-IP, X-Request-Id
 *   Traefik (sets them itself)           X-Forwarded-Method, X-Forwarded-Uri, X-Forwarded-Host,
 *                                        X-Forwarded-Proto, X-Forwarded-For
 *
 * with the client's Authorization header passed through. The site is the path's
 * `/agents/<id>/check` (percent-decoded), else the header --forward-auth-agent-header names.
 * Answers: 200 with the agent's x-burrow-* headers (nginx copies them with auth_request_set,
 * Traefik with authResponseHeaders), 401 with WWW-Authenticate, 403; no decision is 400 (the
 * gateway's request is incomplete), 429, 503, 504 or 500, which nginx turns into a 500 for the
 * client and Traefik passes on (docs/gateways.md).
 */

const ROUTE = /^\/agents\/([^/?]+)\/check(?:\?.*)?$/;

/** HTTP status of a check without a decision, by gRPC status. */
const ERROR_STATUS: Partial<Record<number, number>> = {
  [Status.INVALID_ARGUMENT]: 400,
  [Status.RESOURCE_EXHAUSTED]: 429,
  [Status.UNAVAILABLE]: 503,
  [Status.DEADLINE_EXCEEDED]: 504,
};

/** Headers about the subrequest itself, never the original request's: not sent to the agent. */
const OWN_HEADERS = new Set([
  'authorization',
  'host',
  'connection',
  'keep-alive',
  'content-length',
  'transfer-encoding',
  'te',
  'upgrade',
  'x-original-method',
  'x-original-uri',
  'x-original-host',
  'x-original-proto',
  'x-forwarded-method',
  'x-forwarded-uri',
  'x-forwarded-host',
  'x-forwarded-proto',
]);

/** `agentHeader` names the site when the path is not /agents/<id>/check. */
export type ForwardAuthDeps = GatewayListenerDeps;

function first(v: string | string[] | undefined): string | undefined {
  const s = Array.isArray(v) ? v[0] : v;
  return s === undefined || s === '' ? undefined : s;
}

/** The HTTPS listener (mTLS, http/1.1), its TLS material following the broker's credential store. */
export function createForwardAuthServer(deps: ForwardAuthDeps): https.Server {
  const checker = new GatewayChecker({ ...deps, gateway: 'forward_auth' });
  const options = (): https.ServerOptions => serverTlsOptions(deps.tls, true, ['http/1.1']);
  const server = https.createServer(options(), (req, res) => {
    void answer(deps, checker, req, res);
  });
  // Calls are small writes each way: Nagle would hold the answer for the gateway's delayed ACK.
  server.on('secureConnection', (socket: TLSSocket) => socket.setNoDelay(true));
  deps.watch.watchTlsServer(server, 'forward_auth');
  followCredentialStore(server, deps.tls, options);
  return server;
}

async function answer(
  deps: ForwardAuthDeps,
  checker: GatewayChecker,
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  // The subrequest's body (nginx sends none with proxy_pass_request_body off) is not read.
  req.resume();
  const abort = new AbortController();
  const onGone = (): void => {
    if (!res.writableEnded) abort.abort();
  };
  res.on('close', onGone);
  try {
    let agentId: string;
    let request: GatewayCheckRequest;
    try {
      agentId = siteOf(req, deps.agentHeader);
      request = checkRequestOf(req.headers, deps.agentHeader);
    } catch (err) {
      throw checker.refused(err, first(req.headers['x-request-id']));
    }
    const peer = presentedBy(req.socket as TLSSocket).identity;
    // The original request's trace context (nginx and Traefik pass its headers on).
    const traceparent = first(req.headers.traceparent);
    const deadlineMs = Date.now() + deps.timeoutMs;
    const verdict = await checker.check(peer, agentId, request, deadlineMs, { signal: abort.signal, traceparent });
    if (!abort.signal.aborted) sendVerdict(deps, req, res, verdict);
  } catch (err) {
    if (abort.signal.aborted) return; // the gateway left; nobody to answer
    const e = err instanceof BurrowError ? err : new BurrowError(Status.INTERNAL, (err as Error).message);
    send(deps, req, res, ERROR_STATUS[e.code] ?? 500, errorBody(e), { 'x-burrow-error': statusName(e.code) });
  } finally {
    res.removeListener('close', onGone);
  }
}

/**
 * The body of an answer without a decision. Traefik passes it to the client: only a malformed
 * check (the gateway's configuration, nothing of the site's) is explained there; the broker's log
 * line of the check has the details of every other error (which site, the caller policy's reason).
 */
function errorBody(e: BurrowError): string {
  const code = statusName(e.code);
  return e.code === Status.INVALID_ARGUMENT ? `burrow: ${code}: ${e.message}\n` : `burrow: ${code}: no decision\n`;
}

/** The site: `/agents/<id>/check` (percent-decoded), else the operator's header; else INVALID_ARGUMENT. */
function siteOf(req: IncomingMessage, agentHeader: string | undefined): string {
  const m = ROUTE.exec(req.url ?? '');
  if (m) {
    try {
      return decodeURIComponent(m[1]!);
    } catch {
      const shown = JSON.stringify(m[1]!.slice(0, 100));
      throw new BurrowError(
        Status.INVALID_ARGUMENT,
        `the agent id in the path, ${shown}, is not valid percent-encoding`,
      );
    }
  }
  const fromHeader = agentHeader ? first(req.headers[agentHeader]) : undefined;
  if (fromHeader) return fromHeader;
  const header = agentHeader ? ` or set the header ${agentHeader} (--forward-auth-agent-header)` : '';
  const why = `no site named: use the path /agents/<id>/check${header}; got ${(req.url ?? '').slice(0, 200)}`;
  throw new BurrowError(Status.INVALID_ARGUMENT, why);
}

/**
 * The Burrow CheckRequest of the original request as the gateway describes it (nginx's
 * X-Original-* first, then Traefik's X-Forwarded-*); without a method and a URI there is nothing
 * to decide on (INVALID_ARGUMENT).
 */
export function checkRequestOf(h: IncomingHttpHeaders, agentHeader?: string): GatewayCheckRequest {
  const method = first(h['x-original-method']) ?? first(h['x-forwarded-method']);
  const uri = first(h['x-original-uri']) ?? first(h['x-forwarded-uri']);
  if (!method || !uri) {
    const why =
      'the original request is not named: set X-Original-Method and X-Original-URI (nginx, see ' +
      "deploy/nginx/burrow-auth.conf) or use Traefik's ForwardAuth (X-Forwarded-Method, X-Forwarded-Uri)";
    throw new BurrowError(Status.INVALID_ARGUMENT, why);
  }
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(h)) {
    if (value === undefined || OWN_HEADERS.has(name) || name === agentHeader) continue;
    headers[name] = Array.isArray(value) ? value.join(',') : value;
  }
  const forwardedFor = first(h['x-forwarded-for'])?.split(',')[0]?.trim();
  return {
    method: method.toUpperCase(),
    path: uri,
    host: first(h['x-original-host']) ?? first(h['x-forwarded-host']) ?? '',
    scheme: first(h['x-original-proto']) ?? first(h['x-forwarded-proto']) ?? '',
    headers,
    token: bearerToken(first(h.authorization)),
    // The gateway authenticated its client with mTLS only if it says so; the forward-auth
    // contract has no standard header for it.
    source_principal: '',
    request_id: first(h['x-request-id']) ?? '',
    context_extensions: {},
    source_address: first(h['x-real-ip']) ?? forwardedFor ?? '',
  };
}

function sendVerdict(deps: ForwardAuthDeps, req: IncomingMessage, res: ServerResponse, v: GatewayVerdict): void {
  if (v.verdict === 'ALLOW') {
    send(deps, req, res, 200, '', v.headers);
    return;
  }
  const headers: Record<string, string> = { 'x-burrow-decision-id': v.decisionId };
  if (v.verdict === 'UNAUTHENTICATED') headers['www-authenticate'] = bearerChallenge(v.tokenReason);
  send(deps, req, res, v.verdict === 'UNAUTHENTICATED' ? 401 : 403, deniedBody(v.verdict, v.decisionId), headers);
}

function send(
  deps: ForwardAuthDeps,
  req: IncomingMessage,
  res: ServerResponse,
  httpStatus: number,
  body: string,
  headers: Record<string, string>,
): void {
  // A connection whose certificate was just revoked or expired closes after this answer.
  const closing = deps.watch.isClosing(req.socket as TLSSocket) ? { connection: 'close' } : {};
  const present = Object.fromEntries(Object.entries(headers).filter(([, value]) => value !== ''));
  res.writeHead(httpStatus, {
    'content-type': 'text/plain; charset=utf-8',
    'cache-control': 'no-store',
    ...closing,
    ...present,
  });
  res.end(body);
}
