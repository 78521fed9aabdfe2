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
} from '@burrow/tunnel';
import { POLICY_INPUT_LIMITS, checkInputBounds } from '@burrow/policy';
import type { BrokerMetrics } from './broker-metrics';
import type { CallerApi } from './caller-api';
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

/**
 * Creates the HTTPS listener (mTLS: callers present `service` certificates). Its TLS material
 * follows the broker's credential store, so renewals and CA rotation apply to new connections.
 */
export function createAuthzenServer(deps: AuthzenHttpDeps): https.Server {
  const secureOptions = (): https.ServerOptions => ({
    key: deps.tls.keyPem,
    cert: deps.tls.certPem,
    ca: deps.tls.caPem,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.2',
  });
  const server = https.createServer(secureOptions(), (req, res) => {
    void handle(req, res);
  });
  deps.watch.watchTlsServer(server, 'authzen');
  // Follow renewals and rotation: every update of the store rebuilds the context for new handshakes.
  let current = `${deps.tls.certPem}${deps.tls.caPem}`;
  const refresh = (): void => {
    const next = `${deps.tls.certPem}${deps.tls.caPem}`;
    if (next === current) return;
    current = next;
    server.setSecureContext(secureOptions());
  };
  const onCa = (): void => refresh();
  const onIdentity = (): void => refresh();
  deps.tls.addCaCertificateListener(onCa);
  deps.tls.addIdentityCertificateListener(onIdentity);
  server.on('close', () => {
    deps.tls.removeCaCertificateListener(onCa);
    deps.tls.removeIdentityCertificateListener(onIdentity);
  });

  const codecs: Record<'evaluation' | 'evaluations', { method: string; request: ApiCodec; response: ApiCodec }> = {
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

  const maxBodyBytes = Math.min(deps.maxBodyBytes, POLICY_INPUT_LIMITS.maxBodyBytes);

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const requestId =
      typeof req.headers['x-request-id'] === 'string' ? req.headers['x-request-id'].slice(0, 200) : undefined;
    let endpoint = 'unknown';
    const send = (httpStatus: number, body: unknown, headers: Record<string, string> = {}): void => {
      deps.metrics.httpRequests.inc({ endpoint, status: String(httpStatus) });
      const text = JSON.stringify(body);
      // A connection whose certificate was just revoked or expired closes after this answer.
      const closing = deps.watch.isClosing(req.socket as TLSSocket) ? { connection: 'close' } : {};
      res.writeHead(httpStatus, {
        'content-type': 'application/json',
        'cache-control': 'no-store',
        ...(requestId ? { 'x-request-id': requestId } : {}),
        ...closing,
        ...headers,
      });
      res.end(text);
    };
    try {
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
      const agentId = agentIdOf(m[1]!);
      const peer = identityOfPeerCertificate((req.socket as TLSSocket).getPeerCertificate());
      if (m[2] === '.well-known/authzen-configuration') {
        endpoint = 'configuration';
        if (req.method !== 'GET' && req.method !== 'HEAD')
          throw new HttpError(405, 'INVALID_ARGUMENT', 'use GET', { allow: 'GET, HEAD' });
        // Relative to the metadata's own URL, never built from the request's Host header: a forged
        // Host (DNS rebinding, a proxy that passes it through) would otherwise point a PDP client at
        // another server. The listener has no configured public name to use instead.
        const base = `/agents/${encodeURIComponent(agentId)}`;
        send(200, {
          policy_decision_point: base,
          access_evaluation_endpoint: `${base}/access/v1/evaluation`,
          access_evaluations_endpoint: `${base}/access/v1/evaluations`,
        });
        return;
      }
      endpoint = m[2]!.endsWith('s') ? 'evaluations' : 'evaluation';
      if (req.method !== 'POST') throw new HttpError(405, 'INVALID_ARGUMENT', 'use POST', { allow: 'POST' });
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
      const codec = codecs[endpoint as 'evaluation' | 'evaluations'];
      let message: Buffer;
      try {
        message = codec.request.encode(json);
      } catch (err) {
        if (err instanceof BurrowError) throw new HttpError(400, statusName(err.code), err.message);
        throw err;
      }
      const abort = new AbortController();
      const onGone = (): void => {
        if (!res.writableEnded) abort.abort();
      };
      res.on('close', onGone);
      const result = await deps.api.callUnary(
        peer,
        agentId,
        codec.method,
        message,
        Date.now() + deps.timeoutMs,
        abort.signal,
      );
      res.removeListener('close', onGone);
      if (abort.signal.aborted) return; // the client left; nobody to answer
      if (result.code !== Status.OK)
        throw new HttpError(httpStatusOf(result.code), statusName(result.code), result.details);
      send(200, codec.response.decode(result.response!));
    } catch (err) {
      if (err instanceof HttpError) {
        send(err.httpStatus, { error: { code: err.code, message: err.message } }, err.headers);
        return;
      }
      deps.logger.error('AuthZEN request failed', { error: (err as Error).message });
      send(500, { error: { code: 'INTERNAL', message: 'internal error' } });
    }
  }

  return server;
}
