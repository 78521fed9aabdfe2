import * as https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import {
  API_CODECS,
  BurrowError,
  POLICY_METHODS,
  identityOfPeerCertificate,
  statusName,
  type ApiCodec,
  type CredentialStore,
  type Logger,
  type PeerIdentity,
} from '@burrow/tunnel';
import { POLICY_INPUT_LIMITS, checkInputBounds } from '@burrow/policy';
import type { BrokerMetrics } from './broker-metrics';
import type { CallerApi } from './caller-api';
import { followCredentialStore, serverTlsOptions } from './tls-listeners';
import type { CredentialWatch } from './credential-watch';

/**
 * The AuthZEN Authorization API 1.0 HTTP/JSON binding, one policy decision point per agent:
 *
 *   POST /agents/<id>/access/v1/evaluation               -> PolicyDecisionService/Evaluate
 *   POST /agents/<id>/access/v1/evaluations              -> PolicyDecisionService/Evaluations
 *   GET  /agents/<id>/.well-known/authzen-configuration  PDP metadata (answered by the broker)
 *
 * so that a gateway that speaks AuthZEN (Envoy, Kong, ...) can use a site as its PDP. Requests are
 * translated to the gRPC messages and carried through the tunnel exactly like a caller's gRPC
 * call: same mTLS service identity, caller policy and limits (CallerApi.callUnary).
 */

export interface AuthzenHttpDeps {
  api: CallerApi;
  tls: CredentialStore;
  metrics: BrokerMetrics;
  logger: Logger;
  /**
   * Largest request body accepted, in bytes; the smaller of this and POLICY_INPUT_LIMITS.maxBodyBytes
   * (64 KiB) applies.
   */
  maxBodyBytes: number;
  /** Deadline of a request carried through the tunnel, in ms. */
  timeoutMs: number;
  /** Tracks connections, so that a revoked or expired client certificate loses them. */
  watch: CredentialWatch;
}

const ROUTE = /^\/agents\/([^/]+)\/(access\/v1\/evaluations?|\.well-known\/authzen-configuration)$/;

// gRPC status -> HTTP status, for errors of the carried call.
const HTTP_STATUS: Partial<Record<number, number>> = {
  [Status.INVALID_ARGUMENT]: 400,
  [Status.FAILED_PRECONDITION]: 400,
  [Status.OUT_OF_RANGE]: 400,
  [Status.UNAUTHENTICATED]: 401,
  [Status.PERMISSION_DENIED]: 403,
  [Status.NOT_FOUND]: 404,
  [Status.RESOURCE_EXHAUSTED]: 429,
  [Status.UNIMPLEMENTED]: 501,
  [Status.UNAVAILABLE]: 503,
  [Status.DEADLINE_EXCEEDED]: 504,
  [Status.CANCELLED]: 499,
};

/** Maps a gRPC status code to the HTTP status the binding answers with. */
export function httpStatusOf(code: number): number {
  return HTTP_STATUS[code] ?? 500;
}

class HttpError extends Error {
  constructor(
    readonly httpStatus: number,
    readonly code: string,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

function tooLarge(maxBytes: number): HttpError {
  // The rest of the body is not read; the connection is closed after the answer.
  const message = `request body is larger than ${maxBytes} bytes, the AuthZEN request limit`;
  return new HttpError(413, 'RESOURCE_EXHAUSTED', message, { connection: 'close' });
}

/** Reads the body, refusing it from its Content-Length, or as soon as it passes `maxBytes`. */
function readBody(req: IncomingMessage, maxBytes: number): Promise<Buffer> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > maxBytes) return Promise.reject(tooLarge(maxBytes));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > maxBytes) {
        req.removeListener('data', onData);
        chunks.length = 0;
        reject(tooLarge(maxBytes));
        return;
      }
      chunks.push(chunk);
    };
    req.on('data', onData);
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

/** The agent id of a request path, percent-decoded; malformed percent-encoding is a 400. */
function agentIdOf(encoded: string): string {
  try {
    return decodeURIComponent(encoded);
  } catch {
    const shown = JSON.stringify(encoded.slice(0, 100));
    throw new HttpError(400, 'INVALID_ARGUMENT', `the agent id in the path, ${shown}, is not valid percent-encoding`);
  }
}

type Endpoint = 'evaluation' | 'evaluations';

/** The gRPC method and the JSON <-> protobuf codecs behind one evaluation endpoint. */
interface EndpointCodec {
  method: string;
  request: ApiCodec;
  response: ApiCodec;
}

const CODECS: Record<Endpoint, EndpointCodec> = {
  evaluation: {
    method: POLICY_METHODS.evaluate,
    request: API_CODECS.evaluationRequest,
    response: API_CODECS.evaluationResponse,
  },
  evaluations: {
    method: POLICY_METHODS.evaluations,
    request: API_CODECS.evaluationsRequest,
    response: API_CODECS.evaluationsResponse,
  },
};

const WELL_KNOWN = '.well-known/authzen-configuration';

/** What the request handler needs: the listener's dependencies and the body limit in force. */
interface AuthzenContext {
  deps: AuthzenHttpDeps;
  /** The smaller of deps.maxBodyBytes and POLICY_INPUT_LIMITS.maxBodyBytes. */
  maxBodyBytes: number;
}

/**
 * Creates the HTTPS listener (mTLS: callers present `service` certificates). Its TLS material
 * follows the broker's credential store, so renewals and CA rotation apply to new connections.
 */
export function createAuthzenServer(deps: AuthzenHttpDeps): https.Server {
  const ctx: AuthzenContext = { deps, maxBodyBytes: Math.min(deps.maxBodyBytes, POLICY_INPUT_LIMITS.maxBodyBytes) };
  const options = (): https.ServerOptions => serverTlsOptions(deps.tls, true, ['http/1.1']);
  const server = https.createServer(options(), (req, res) => {
    void handle(ctx, req, res);
  });
  deps.watch.watchTlsServer(server, 'authzen');
  followCredentialStore(server, deps.tls, options);
  return server;
}

/** The answer to one request: counts it under its endpoint and writes the JSON body with the common headers. */
class Reply {
  /** Metric label; stays 'unknown' until the path names an endpoint. */
  endpoint = 'unknown';
  private readonly requestId: string | undefined;

  constructor(
    private readonly deps: AuthzenHttpDeps,
    private readonly req: IncomingMessage,
    private readonly res: ServerResponse,
  ) {
    const id = req.headers['x-request-id'];
    this.requestId = typeof id === 'string' ? id.slice(0, 200) : undefined;
  }

  send(httpStatus: number, body: unknown, headers: Record<string, string> = {}): void {
    this.deps.metrics.httpRequests.inc({ endpoint: this.endpoint, status: String(httpStatus) });
    const text = JSON.stringify(body);
    // A connection whose certificate was just revoked or expired closes after this answer.
    const closing = this.deps.watch.isClosing(this.req.socket as TLSSocket) ? { connection: 'close' } : {};
    this.res.writeHead(httpStatus, {
      'content-type': 'application/json',
      'cache-control': 'no-store',
      ...(this.requestId ? { 'x-request-id': this.requestId } : {}),
      ...closing,
      ...headers,
    });
    this.res.end(text);
  }
}

async function handle(ctx: AuthzenContext, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const reply = new Reply(ctx.deps, req, res);
  try {
    await route(ctx, req, res, reply);
  } catch (err) {
    sendError(ctx.deps.logger, reply, err);
  }
}

/** Error mapping: an HttpError is answered as it says; anything else is logged and a 500. */
function sendError(logger: Logger, reply: Reply, err: unknown): void {
  if (err instanceof HttpError) {
    reply.send(err.httpStatus, { error: { code: err.code, message: err.message } }, err.headers);
    return;
  }
  logger.error('AuthZEN request failed', { error: (err as Error).message });
  reply.send(500, { error: { code: 'INTERNAL', message: 'internal error' } });
}

async function route(ctx: AuthzenContext, req: IncomingMessage, res: ServerResponse, reply: Reply): Promise<void> {
  const [encodedAgentId, rest] = matchRoute(req);
  const agentId = agentIdOf(encodedAgentId);
  const peer = admitPeer(req);
  if (rest === WELL_KNOWN) {
    reply.endpoint = 'configuration';
    answerConfiguration(req, reply, agentId);
    return;
  }
  const endpoint: Endpoint = rest.endsWith('s') ? 'evaluations' : 'evaluation';
  reply.endpoint = endpoint;
  if (req.method !== 'POST') throw new HttpError(405, 'INVALID_ARGUMENT', 'use POST', { allow: 'POST' });
  const json = await readJsonRequest(req, ctx.maxBodyBytes);
  const codec = CODECS[endpoint];
  await evaluateThroughTunnel(ctx.deps, res, reply, { peer, agentId, codec, message: encodeRequest(codec, json) });
}

/** The agent id (still percent-encoded) and the rest of the path of a known endpoint, or a 400 / 404. */
function matchRoute(req: IncomingMessage): [string, string] {
  let url: URL;
  try {
    url = new URL(req.url ?? '/', 'https://broker');
  } catch {
    throw new HttpError(400, 'INVALID_ARGUMENT', 'the request target is not a valid path');
  }
  const m = ROUTE.exec(url.pathname);
  if (!m)
    throw new HttpError(
      404,
      'NOT_FOUND',
      `no AuthZEN endpoint at ${url.pathname.slice(0, 200)}; use /agents/<id>/access/v1/evaluation(s)`,
    );
  return [m[1]!, m[2]!];
}

/**
 * The caller's identity, from the client certificate the TLS handshake verified. The admission
 * checks on it (role, trust domain, revocation) run in CallerApi.callUnary, like a gRPC caller's.
 */
function admitPeer(req: IncomingMessage): PeerIdentity | undefined {
  return identityOfPeerCertificate((req.socket as TLSSocket).getPeerCertificate());
}

/** The PDP metadata of one agent, answered by the broker itself. */
function answerConfiguration(req: IncomingMessage, reply: Reply, agentId: string): void {
  if (req.method !== 'GET' && req.method !== 'HEAD')
    throw new HttpError(405, 'INVALID_ARGUMENT', 'use GET', { allow: 'GET, HEAD' });
  // Relative to the metadata's own URL, never built from the request's Host header: a forged
  // Host (DNS rebinding, a proxy that passes it through) would otherwise point a PDP client at
  // another server. The listener has no configured public name to use instead.
  const base = `/agents/${encodeURIComponent(agentId)}`;
  reply.send(200, {
    policy_decision_point: base,
    access_evaluation_endpoint: `${base}/access/v1/evaluation`,
    access_evaluations_endpoint: `${base}/access/v1/evaluations`,
  });
}

/** The JSON body of an evaluation request, within the byte limit and POLICY_INPUT_LIMITS, or a 4xx. */
async function readJsonRequest(req: IncomingMessage, maxBodyBytes: number): Promise<unknown> {
  const type = String(req.headers['content-type'] ?? '');
  if (!/^application\/json\b/i.test(type))
    throw new HttpError(415, 'INVALID_ARGUMENT', 'content-type must be application/json');
  const body = await readBody(req, maxBodyBytes);
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new HttpError(400, 'INVALID_ARGUMENT', `body is not JSON: ${(err as Error).message}`);
  }
  try {
    // Before the conversion to protobuf, which recurses into every value.
    checkInputBounds(json);
  } catch (err) {
    throw new HttpError(400, 'INVALID_ARGUMENT', (err as Error).message);
  }
  return json;
}

/** The request as the gRPC message; a value the message cannot hold is a 400. */
function encodeRequest(codec: EndpointCodec, json: unknown): Buffer {
  try {
    return codec.request.encode(json);
  } catch (err) {
    if (err instanceof BurrowError) throw new HttpError(400, statusName(err.code), err.message);
    throw err;
  }
}

/** One evaluation carried to the agent. */
interface TunnelCall {
  peer: PeerIdentity | undefined;
  agentId: string;
  codec: EndpointCodec;
  message: Buffer;
}

/**
 * Carries the evaluation through the tunnel like a caller's gRPC call and answers with the decoded
 * response; a call that fails becomes an HttpError with the mapped status. A client that leaves
 * cancels the call and gets no answer.
 */
async function evaluateThroughTunnel(
  deps: AuthzenHttpDeps,
  res: ServerResponse,
  reply: Reply,
  call: TunnelCall,
): Promise<void> {
  const abort = new AbortController();
  const onGone = (): void => {
    if (!res.writableEnded) abort.abort();
  };
  res.on('close', onGone);
  const deadlineMs = Date.now() + deps.timeoutMs;
  const result = await deps.api.callUnary(call.peer, call.agentId, call.codec.method, call.message, deadlineMs, {
    signal: abort.signal,
    // An HTTP client's W3C trace context, continued like a gRPC caller's.
    traceparent: typeof res.req.headers.traceparent === 'string' ? res.req.headers.traceparent : undefined,
  });
  res.removeListener('close', onGone);
  if (abort.signal.aborted) return; // the client left; nobody to answer
  if (result.code !== Status.OK)
    throw new HttpError(httpStatusOf(result.code), statusName(result.code), result.details);
  reply.send(200, call.codec.response.decode(result.response!));
}
