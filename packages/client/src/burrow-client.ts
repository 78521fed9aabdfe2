import { readFileSync } from 'node:fs';
import {
  Client,
  Metadata,
  credentials,
  status as Status,
  type ChannelCredentials,
  type ServiceError,
} from '@grpc/grpc-js';
import {
  AGENT_ID_KEY,
  API_CODECS,
  AUTH_METHODS,
  POLICY_METHODS,
  brokerIdentityCheck,
  identityOfCertificate,
  splitPemCertificates,
  type ApiCodec,
} from '@burrow/tunnel';

// Declared here rather than imported, so that the package's type declarations need nothing but
// this package: the published tarball bundles @burrow/tunnel's code but not its types.
/** A JSON value, as the AuthZEN and authentication APIs carry it. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
/** A JSON object. */
export type JsonObject = { [key: string]: JsonValue };

/** AuthZEN subject, action, resource (Burrow's policy API uses the same JSON). */
export interface Subject {
  type: string;
  id: string;
  properties?: JsonObject;
}
export interface Action {
  name: string;
  properties?: JsonObject;
}
export interface Resource {
  type: string;
  id: string;
  properties?: JsonObject;
}

export interface EvaluationRequest {
  subject?: Subject;
  action?: Action;
  resource?: Resource;
  context?: JsonObject;
  /** Ask the agent to say why (response context `explanation`). */
  explain?: boolean;
}

export interface EvaluationResponse {
  decision: boolean;
  /** `reason`, `policies` (deciding policy ids), `explanation` when asked, `error` for a failed batch item. */
  context?: JsonObject;
}

export type EvaluationsSemantic = 'execute_all' | 'deny_on_first_deny' | 'permit_on_first_permit';

export interface EvaluationsRequest extends Omit<EvaluationRequest, 'explain'> {
  evaluations: EvaluationRequest[];
  options?: { evaluations_semantic?: EvaluationsSemantic; explain?: boolean };
}

export interface EvaluationsResponse {
  evaluations: EvaluationResponse[];
}

/** A gateway's question (burrow.policy.v1.CheckRequest): the HTTP request it is about to forward. */
export interface CheckRequest {
  /** Upper case ("GET"). */
  method: string;
  /** Path and query as sent, not decoded. */
  path: string;
  host?: string;
  scheme?: string;
  /** Lower-case names; repeated headers joined with ",". Not `authorization`: that is `token`. */
  headers?: Record<string, string>;
  /** The bearer token, without "Bearer ". */
  token?: string;
  source_principal?: string;
  request_id?: string;
  context_extensions?: Record<string, string>;
  source_address?: string;
}

export type CheckVerdict = 'ALLOW' | 'DENY' | 'UNAUTHENTICATED';

/** The site's answer to a {@link CheckRequest} (burrow.policy.v1.CheckResponse). */
export interface CheckResponse {
  verdict: CheckVerdict;
  /** Unique per decision; logged by the agent and the broker. */
  decision_id: string;
  /** The subject evaluated; absent when UNAUTHENTICATED. */
  subject?: Subject;
  reasons: string[];
  /** The @advice of the deciding policies ("quarantine"). */
  advice: string[];
  policies: string[];
  /** Headers to add upstream (allow only). */
  headers: Record<string, string>;
  /** Why the token was refused (UNAUTHENTICATED): `missing`, `expired`, `signature`, ... first. */
  token_reason: string;
}

export interface AuthenticationResult {
  authenticated: boolean;
  subject: string;
  groups: string[];
  claims: JsonObject;
  expiresAt?: Date;
  /** Why a token was refused: a stable word (`expired`, `audience`, ...), a colon, details. */
  reason: string;
}

export interface BurrowClientOptions {
  /** HOST:PORT of a broker's caller API. */
  broker: string;
  /**
   * The caller's `service` certificate and key, and the CA that signs brokers: PEM text or file
   * paths. The broker must present `spiffe://<this certificate's trust domain>/broker/<name>`.
   */
  tls:
    | { cert: string | Buffer; key: string | Buffer; ca: string | Buffer }
    | { certFile: string; keyFile: string; caFile: string };
  /** TLS name expected in the broker certificate, when it differs from the host in `broker`. */
  serverName?: string;
  /** Deadline of each call (all attempts together), in ms. Default 5000. */
  timeoutMs?: number;
  /** Attempts for a call failing with UNAVAILABLE (the agent or broker was briefly gone). Default 3. */
  maxAttempts?: number;
  /** First retry delay in ms; doubles per attempt, full jitter. Default 100. */
  retryBaseMs?: number;
}

/** Per-call overrides. */
export interface CallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** What {@link BurrowClient.ping} learned. */
export interface PingResult {
  /** grpc.health.v1 status name: `SERVING`, `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`. */
  status: string;
  /** Round trip of the answered attempt, in ms. */
  rttMs: number;
}

const HEALTH_CHECK_METHOD = '/grpc.health.v1.Health/Check';
const HEALTH_STATUS_NAMES = ['UNKNOWN', 'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN'];

/** HealthCheckResponse is one varint field (1: status); read it without loading health.proto. */
function healthStatusOf(res: Buffer): string {
  let status = 0;
  for (let i = 0; i < res.length; ) {
    const tag = res[i++]!;
    let value = 0;
    for (let shift = 0; i < res.length; shift += 7) {
      const b = res[i++]!;
      value |= (b & 0x7f) << shift;
      if (b < 0x80) break;
    }
    if (tag === 0x08) status = value;
    else if ((tag & 7) !== 0) break; // not a varint: not a HealthCheckResponse we know, stop reading
  }
  return HEALTH_STATUS_NAMES[status] ?? `status ${status}`;
}

/** A failed call: the gRPC status the broker or agent answered with. */
export class BurrowCallError extends Error {
  override readonly name = 'BurrowCallError';
  constructor(
    /** The gRPC status code (a number: 14 is UNAVAILABLE); `grpc.status` of @grpc/grpc-js names them. */
    readonly code: number,
    readonly details: string,
    readonly attempts: number,
  ) {
    super(`${Status[code] ?? code}: ${details}`);
  }
}

function pem(v: string | Buffer): Buffer {
  return Buffer.isBuffer(v) ? v : Buffer.from(v);
}

/**
 * The client platform services use to ask a site, through a broker: "is this token valid?"
 * ({@link authenticate}) and "may this subject do this?" ({@link evaluate}, {@link evaluations}).
 * Every call has a deadline; calls that fail with UNAVAILABLE (agent reconnecting, broker
 * draining) are retried with jittered backoff within that deadline. Other errors are not retried:
 * they would fail the same way again.
 */
export class BurrowClient {
  private readonly client: Client;
  private readonly timeoutMs: number;
  private readonly maxAttempts: number;
  private readonly retryBaseMs: number;

  constructor(opts: BurrowClientOptions) {
    const tls =
      'certFile' in opts.tls
        ? {
            cert: readFileSync(opts.tls.certFile),
            key: readFileSync(opts.tls.keyFile),
            ca: readFileSync(opts.tls.caFile),
          }
        : { cert: pem(opts.tls.cert), key: pem(opts.tls.key), ca: pem(opts.tls.ca) };
    // Any certificate of the trust domain passes the chain check; only a broker's may hear our calls.
    const own = splitPemCertificates(tls.cert.toString())[0];
    const trustDomain = own ? identityOfCertificate(own.raw)?.trustDomain : undefined;
    const verify = { checkServerIdentity: brokerIdentityCheck(trustDomain) };
    const creds: ChannelCredentials = credentials.createSsl(tls.ca, tls.key, tls.cert, verify);
    this.client = new Client(
      opts.broker,
      creds,
      opts.serverName
        ? { 'grpc.ssl_target_name_override': opts.serverName, 'grpc.default_authority': opts.serverName }
        : {},
    );
    this.timeoutMs = opts.timeoutMs ?? 5_000;
    this.maxAttempts = Math.max(1, opts.maxAttempts ?? 3);
    this.retryBaseMs = opts.retryBaseMs ?? 100;
  }

  /** Verifies `token` with the site's keys. A refused token resolves with authenticated=false. */
  async authenticate(
    agentId: string,
    token: string,
    audience = '',
    opts: CallOptions = {},
  ): Promise<AuthenticationResult> {
    const res = await this.call(
      agentId,
      AUTH_METHODS.authenticate,
      API_CODECS.authenticateRequest,
      API_CODECS.authenticateResponse,
      { token, audience },
      opts,
    );
    return {
      authenticated: res.authenticated === true,
      subject: String(res.subject ?? ''),
      groups: (res.groups as string[] | undefined) ?? [],
      claims: (res.claims as JsonObject | undefined) ?? {},
      expiresAt: typeof res.expires_at === 'string' ? new Date(res.expires_at) : undefined,
      reason: String(res.reason ?? ''),
    };
  }

  /** One AuthZEN access evaluation, decided by the site's policies. */
  async evaluate(agentId: string, request: EvaluationRequest, opts: CallOptions = {}): Promise<EvaluationResponse> {
    const res = await this.call(
      agentId,
      POLICY_METHODS.evaluate,
      API_CODECS.evaluationRequest,
      API_CODECS.evaluationResponse,
      request,
      opts,
    );
    return { decision: res.decision === true, context: res.context as JsonObject | undefined };
  }

  /**
   * One gateway decision (PolicyDecisionService/Check): the site verifies the token, maps the request
   * with its gateway mapping and decides. DENY and UNAUTHENTICATED are answers, not errors.
   */
  async check(agentId: string, request: CheckRequest, opts: CallOptions = {}): Promise<CheckResponse> {
    const res = await this.call(
      agentId,
      POLICY_METHODS.check,
      API_CODECS.checkRequest,
      API_CODECS.checkResponse,
      request as unknown as JsonObject,
      opts,
    );
    const list = (v: JsonValue | undefined): string[] => (Array.isArray(v) ? v.map(String) : []);
    return {
      verdict: String(res.verdict ?? 'VERDICT_UNSPECIFIED') as CheckVerdict,
      decision_id: String(res.decision_id ?? ''),
      subject: res.subject as Subject | undefined,
      reasons: list(res.reasons),
      advice: list(res.advice),
      policies: list(res.policies),
      headers: (res.headers as Record<string, string> | undefined) ?? {},
      token_reason: String(res.token_reason ?? ''),
    };
  }

  /** Many evaluations in one round trip, answered in order (AuthZEN access evaluations). */
  async evaluations(agentId: string, batch: EvaluationsRequest, opts: CallOptions = {}): Promise<EvaluationsResponse> {
    const res = await this.call(
      agentId,
      POLICY_METHODS.evaluations,
      API_CODECS.evaluationsRequest,
      API_CODECS.evaluationsResponse,
      batch,
      opts,
    );
    const items = (res.evaluations as JsonObject[] | undefined) ?? [];
    return {
      evaluations: items.map((e) => ({ decision: e.decision === true, context: e.context as JsonObject | undefined })),
    };
  }

  /**
   * Asks the agent itself whether it serves (grpc.health.v1 Health/Check naming the agent: the
   * broker routes it through the tunnel and the agent answers, no upstream involved). Resolves with
   * the health status name (`SERVING`, `NOT_SERVING`, ...) and the round trip of the answered
   * attempt; rejects with {@link BurrowCallError} (`UNAVAILABLE` for an agent that is not connected).
   */
  async ping(agentId: string, opts: CallOptions = {}): Promise<PingResult> {
    let startedNs = 0n;
    const res = await this.retrying(agentId, HEALTH_CHECK_METHOD, Buffer.alloc(0), opts, () => {
      startedNs = process.hrtime.bigint();
    });
    const rttMs = Number(process.hrtime.bigint() - startedNs) / 1e6;
    return { status: healthStatusOf(res), rttMs };
  }

  /**
   * Calls any unary method of the site (`/pkg.Service/Method`) with an already serialized request
   * and resolves with the serialized response: for callers that bring their own codec.
   */
  invoke(agentId: string, method: string, request: Buffer, opts: CallOptions = {}): Promise<Buffer> {
    if (!/^\/[^/\s]+\/[^/\s]+$/.test(method))
      return Promise.reject(
        new BurrowCallError(Status.INVALID_ARGUMENT, `"${method}" is not a method path like /pkg.Service/Method`, 0),
      );
    return this.retrying(agentId, method, request, opts);
  }

  /** Closes the connection to the broker. */
  close(): void {
    this.client.close();
  }

  private async call(
    agentId: string,
    method: string,
    reqCodec: ApiCodec,
    resCodec: ApiCodec,
    body: unknown,
    opts: CallOptions,
  ): Promise<JsonObject> {
    let message: Buffer;
    try {
      message = reqCodec.encode(body as JsonValue);
    } catch (err) {
      // The codec names the bad field with a gRPC code; callers handle one error type.
      const e = err as { code?: number; message: string };
      throw new BurrowCallError(e.code ?? Status.INVALID_ARGUMENT, e.message, 0);
    }
    return resCodec.decode(await this.retrying(agentId, method, message, opts));
  }

  private async retrying(
    agentId: string,
    method: string,
    message: Buffer,
    opts: CallOptions,
    beforeAttempt?: () => void,
  ): Promise<Buffer> {
    const deadlineMs = Date.now() + (opts.timeoutMs ?? this.timeoutMs);
    let unavailable: ServiceError | undefined;
    for (let attempt = 1; ; attempt++) {
      try {
        beforeAttempt?.();
        return await this.unary(agentId, method, message, deadlineMs, opts.signal);
      } catch (err) {
        let e = err as ServiceError;
        // A retry that ran out the clock says less than the UNAVAILABLE it retried (`agent "x" is not
        // connected`): the broker waits for an absent agent until the deadline on the second attempt.
        if (e.code === Status.DEADLINE_EXCEEDED && unavailable) e = unavailable;
        if (e.code === Status.UNAVAILABLE) unavailable = e;
        const retryable =
          e === err && e.code === Status.UNAVAILABLE && attempt < this.maxAttempts && !opts.signal?.aborted;
        const delayMs = Math.random() * this.retryBaseMs * 2 ** (attempt - 1);
        if (!retryable || Date.now() + delayMs >= deadlineMs)
          throw new BurrowCallError(e.code ?? Status.UNKNOWN, e.details ?? e.message, attempt);
        await new Promise((resolve) => setTimeout(resolve, delayMs));
      }
    }
  }

  private unary(
    agentId: string,
    method: string,
    message: Buffer,
    deadlineMs: number,
    signal?: AbortSignal,
  ): Promise<Buffer> {
    const md = new Metadata();
    md.set(AGENT_ID_KEY, agentId);
    return new Promise((resolve, reject) => {
      const call = this.client.makeUnaryRequest(
        method,
        (b: Buffer) => b,
        (b: Buffer) => b,
        message,
        md,
        { deadline: deadlineMs },
        (err, res) => {
          signal?.removeEventListener('abort', onAbort);
          if (err) reject(err);
          else resolve(res!);
        },
      );
      const onAbort = (): void => call.cancel();
      signal?.addEventListener('abort', onAbort);
    });
  }
}
