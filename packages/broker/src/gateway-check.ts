import { status as Status } from '@grpc/grpc-js';
import type * as protobuf from 'protobufjs';
import {
  BurrowError,
  POLICY_METHODS,
  type CredentialStore,
  type Logger,
  type PeerIdentity,
  boundedForLog,
  statusName,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';
import type { CallerApi } from './caller-api';
import type { CredentialWatch } from './credential-watch';
import { loadProtoTypes } from './proto-types';

/**
 * What the broker's gateway listeners (Envoy ext_authz, nginx auth_request / Traefik ForwardAuth)
 * share: one burrow.policy.v1.PolicyDecisionService/Check per protected request, carried to the
 * named site through CallerApi.callUnary (the gateway's service certificate, the caller policy and
 * the limits apply as to any caller), counted and logged once per check.
 */

/** The gateway listeners (metric label `gateway`, credential-watch label `listener`). */
export type GatewayName = 'ext_authz' | 'forward_auth';

/** burrow.policy.v1.CheckRequest in its JSON shape (policy.proto says what each field holds). */
export interface GatewayCheckRequest {
  method: string;
  path: string;
  host: string;
  scheme: string;
  headers: Record<string, string>;
  token: string;
  source_principal: string;
  request_id: string;
  context_extensions: Record<string, string>;
  source_address: string;
}

export type Verdict = 'ALLOW' | 'DENY' | 'UNAUTHENTICATED';

/** The site's answer, as the listeners turn it into their gateway's. */
export interface GatewayVerdict {
  verdict: Verdict;
  decisionId: string;
  /** Headers for the request upstream (x-burrow-subject, x-burrow-decision-id, ...), names in lower case. */
  headers: Record<string, string>;
  /** When UNAUTHENTICATED: the token's refusal (`missing`, `expired`, ...). */
  tokenReason: string;
}

/** The gateway-facing name of a header (or the context extension) that names the site. */
export const AGENT_CONTEXT_EXTENSION = 'burrow_agent';

/**
 * The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 6750), or ''
 * when there is none or the scheme is another.
 */
export function bearerToken(authorization: string | undefined): string {
  if (!authorization) return '';
  const m = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(authorization);
  return m ? m[1]! : '';
}

/**
 * The WWW-Authenticate challenge of a 401 (RFC 6750 section 3): a missing token gets the bare
 * scheme; a refused one `error="invalid_token"` with the refusal's word.
 */
export function bearerChallenge(tokenReason: string): string {
  const word = /^[a-z_]+/.exec(tokenReason)?.[0] ?? '';
  if (word === '' || word === 'missing') return 'Bearer';
  return `Bearer error="invalid_token", error_description="token ${word}"`;
}

/** The short body of a 401 / 403 answer: no reasons (they may describe the policies), only the decision id. */
export function deniedBody(verdict: Verdict, decisionId: string): string {
  const what = verdict === 'UNAUTHENTICATED' ? 'authentication required' : 'access denied';
  return `${what} (decision ${decisionId || 'none'})\n`;
}

/** What each gateway listener is built from. */
export interface GatewayListenerDeps {
  api: CallerApi;
  tls: CredentialStore;
  metrics: BrokerMetrics;
  logger: Logger;
  watch: CredentialWatch;
  /** Longest a check may take, in ms. */
  timeoutMs: number;
  /** Lower-case name of the header that names the site when the gateway's own way does not. */
  agentHeader?: string;
}

export interface GatewayCheckerDeps {
  api: CallerApi;
  metrics: BrokerMetrics;
  logger: Logger;
  gateway: GatewayName;
}

/** One gateway's checks: carried to the site, counted (burrow_broker_gateway_checks_total) and logged. */
export class GatewayChecker {
  constructor(private readonly deps: GatewayCheckerDeps) {
    types();
    // Every verdict's series exists from the first scrape (see BrokerMetrics' constructor).
    for (const verdict of ['allow', 'deny', 'unauthenticated', 'error'])
      deps.metrics.gatewayChecks.inc({ gateway: deps.gateway, verdict }, 0);
    deps.metrics.gatewayCheckDuration.zero({ gateway: deps.gateway });
  }

  /**
   * Asks `agentId` for a decision on `request` on behalf of `peer` (the gateway's certificate).
   * Resolves with the verdict; rejects with a BurrowError when there is none (the site unreachable,
   * the deadline, the caller policy, the agent's own error), which each gateway answers as its
   * failure mode.
   */
  async check(
    peer: PeerIdentity | undefined,
    agentId: string,
    request: GatewayCheckRequest,
    deadlineMs: number,
    opts: { signal?: AbortSignal; traceparent?: string } = {},
  ): Promise<GatewayVerdict> {
    const { signal, traceparent } = opts;
    const { api, gateway } = this.deps;
    const startedMs = performance.now();
    const message = encodeCheckRequest(request);
    const result = await api.callUnary(peer, agentId, POLICY_METHODS.check, message, deadlineMs, {
      signal,
      listener: gateway,
      traceparent,
    });
    if (result.code !== Status.OK) {
      this.record(startedMs, agentId, request.request_id, {
        verdict: 'error',
        code: result.code,
        details: result.details,
      });
      throw new BurrowError(result.code, result.details);
    }
    let verdict: GatewayVerdict;
    try {
      verdict = verdictOf(decodeCheckResponse(result.response!));
    } catch (err) {
      this.record(startedMs, agentId, request.request_id, {
        verdict: 'error',
        code: Status.INTERNAL,
        details: (err as Error).message,
      });
      throw err;
    }
    this.record(startedMs, agentId, request.request_id, { verdict: verdict.verdict, decisionId: verdict.decisionId });
    return verdict;
  }

  /**
   * Counts and logs a check refused before it could be carried (no site named, a malformed
   * request), and returns the error for the listener to answer with.
   */
  refused(err: unknown, requestId = ''): BurrowError {
    const e = err instanceof BurrowError ? err : new BurrowError(Status.INTERNAL, (err as Error).message);
    this.record(performance.now(), '', requestId, { verdict: 'error', code: e.code, details: e.message });
    return e;
  }

  /** The metrics and the one log line of a check (never its token). */
  private record(
    startedMs: number,
    agentId: string,
    requestId: string,
    outcome: { verdict: Verdict | 'error'; decisionId?: string; code?: number; details?: string },
  ): void {
    const { metrics, logger, gateway } = this.deps;
    const durationMs = performance.now() - startedMs;
    const verdict = outcome.verdict.toLowerCase();
    metrics.gatewayChecks.inc({ gateway, verdict });
    metrics.gatewayCheckDuration.observe({ gateway }, durationMs / 1000);
    logger.info('gateway check', {
      gateway,
      agentId: agentId ? boundedForLog(agentId) : undefined,
      verdict,
      decisionId: outcome.decisionId,
      code: outcome.code === undefined ? undefined : statusName(outcome.code),
      details: outcome.details === undefined ? undefined : boundedForLog(outcome.details),
      requestId: requestId ? boundedForLog(requestId) : undefined,
      durationMs: Math.round(durationMs * 100) / 100,
    });
  }
}

interface PolicyTypes {
  checkRequest: protobuf.Type;
  checkResponse: protobuf.Type;
  verdicts: Record<number, string>;
}

let policyTypes: PolicyTypes | undefined;
/** burrow.policy.v1.CheckRequest / CheckResponse (proto/burrow/policy/v1/policy.proto), loaded once. */
function types(): PolicyTypes {
  if (!policyTypes) {
    const request = 'burrow.policy.v1.CheckRequest';
    const response = 'burrow.policy.v1.CheckResponse';
    const loaded = loadProtoTypes('burrow/policy/v1/policy.proto', [request, response]);
    const checkResponse = loaded.get(response)!;
    const verdicts = (checkResponse.fields.verdict!.resolvedType as protobuf.Enum).valuesById;
    policyTypes = { checkRequest: loaded.get(request)!, checkResponse, verdicts };
  }
  return policyTypes;
}

/** The request as burrow.policy.v1.CheckRequest bytes (every field is a string or a string map). */
function encodeCheckRequest(request: GatewayCheckRequest): Buffer {
  return Buffer.from(types().checkRequest.encode(request).finish());
}

/** The parts of burrow.policy.v1.CheckResponse the listeners read (as protobufjs decodes them). */
interface DecodedCheckResponse {
  verdict?: string;
  decision_id?: string;
  headers?: Record<string, string>;
  token_reason?: string;
}

/** The agent's answer; bytes that are not a CheckResponse are an agent fault (INTERNAL). */
function decodeCheckResponse(bytes: Buffer): DecodedCheckResponse {
  const { checkResponse, verdicts } = types();
  let msg: { verdict?: number } & Omit<DecodedCheckResponse, 'verdict'>;
  try {
    msg = checkResponse.decode(bytes) as unknown as typeof msg;
  } catch (err) {
    const why = `the agent's Check answer is not a burrow.policy.v1.CheckResponse: ${(err as Error).message}`;
    throw new BurrowError(Status.INTERNAL, why);
  }
  return { ...msg, verdict: verdicts[msg.verdict ?? 0] };
}

/** The prefix of every header a site may add to a request upstream. */
const SITE_HEADER_PREFIX = 'x-burrow-';
const HEADER_NAME = /^[a-z0-9!#$%&'*+.^_`|~-]+$/;
// Printable ASCII and tabs: a value can never end a header line or smuggle another one.
const HEADER_VALUE = /^[\t\x20-\x7e]*$/;
const MAX_SITE_HEADER_VALUE_CHARS = 8192;

/**
 * Whether a header of the site's answer reaches the gateway: only `x-burrow-*` names, valid as HTTP
 * field names, with printable values. A site decides and annotates; it never rewrites the request
 * (`authorization`, `host`, cookies), whatever its mapping or a rogue agent says.
 */
function isSiteHeader(name: string, value: string): boolean {
  return (
    name.startsWith(SITE_HEADER_PREFIX) &&
    HEADER_NAME.test(name) &&
    value.length <= MAX_SITE_HEADER_VALUE_CHARS &&
    HEADER_VALUE.test(value)
  );
}

/** The listeners' view of the agent's CheckResponse; one without a verdict is an agent fault. */
function verdictOf(response: DecodedCheckResponse): GatewayVerdict {
  const verdict = response.verdict;
  if (verdict !== 'ALLOW' && verdict !== 'DENY' && verdict !== 'UNAUTHENTICATED')
    throw new BurrowError(Status.INTERNAL, `the agent answered Check without a verdict (${String(verdict)})`);
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(response.headers ?? {})) {
    const name = k.toLowerCase();
    if (isSiteHeader(name, v)) headers[name] = v;
  }
  // The decision id goes into headers and bodies: an agent's id that could not be one is left out.
  const id = response.decision_id ?? '';
  const decisionId = id.length <= MAX_SITE_HEADER_VALUE_CHARS && HEADER_VALUE.test(id) ? id : '';
  if (decisionId && !headers['x-burrow-decision-id']) headers['x-burrow-decision-id'] = decisionId;
  return { verdict, decisionId, headers, tokenReason: response.token_reason ?? '' };
}
