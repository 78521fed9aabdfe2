import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { status as Status } from '@grpc/grpc-js';
import {
  BURROW_ATTRIBUTES,
  BurrowError,
  type JsonObject,
  type JsonValue,
  type Logger,
  type TraceParent,
  endRpcSpan,
  endSpan,
  startChildSpan,
} from '@burrow/tunnel';
import type { PolicyDecider, TokenAuthenticator } from '../builtin-services';
import { engineError } from '../engine-error';
import { checkInputOf, parseTarget, type CheckInput } from './check-input';
import type { GatewayMapping } from './gateway-mapping';
import { MappingDenial, evaluationOf, headerValue, mappedHeaders, type SourceEnv } from './mapped-request';

/**
 * PolicyDecisionService/Check at the agent: one gateway decision in one round trip. The bearer
 * token is verified with the site's verifier (the Authenticate built-in's, with its key cache),
 * the request is mapped to an AuthZEN evaluation with the gateway mapping, the policy engine
 * decides (its decision cache applies), and the answer carries the verdict, the subject, the
 * reasons and advice of the deciding policies and the headers to add upstream.
 */

export type CheckVerdict = 'ALLOW' | 'DENY' | 'UNAUTHENTICATED';

/** A judged request, before it is written as a CheckResponse. */
interface Judgement {
  verdict: CheckVerdict;
  subject?: { type: string; id: string };
  reasons: string[];
  advice: string[];
  policies: string[];
  tokenReason?: string;
  /** Headers the mapping adds (allow only). */
  headers?: Record<string, string>;
}

export interface GatewayCheckOptions {
  mapping?: GatewayMapping;
  authenticator?: TokenAuthenticator;
  policy?: PolicyDecider;
  logger: Logger;
}

/** Characters of a gateway's request id written to the log (Envoy's are 36-character UUIDs). */
const MAX_LOGGED_REQUEST_ID = 128;

const strings = (v: JsonValue | undefined): string[] =>
  Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];

export class GatewayCheck {
  constructor(private readonly opts: GatewayCheckOptions) {}

  /**
   * Answers one decoded CheckRequest with a CheckResponse (JSON shape of API_CODECS). `trace`: the
   * call's span when traced; the key fetch and the Cedar evaluation get child spans under it.
   */
  async check(request: JsonObject, caller: string | undefined, trace?: TraceParent): Promise<JsonObject> {
    const startedAt = performance.now();
    const input = checkInputOf(request);
    const { mapping, policy } = this.ready();
    const decisionId = randomUUID();
    trace?.span.setAttribute(BURROW_ATTRIBUTES.decisionId, decisionId);
    const j = await this.judge(mapping, policy, input, { caller, decisionId, trace });
    const response = responseOf(j, decisionId);
    this.opts.logger.info('gateway decision', {
      decision_id: decisionId,
      // The gateway's id, as it sent it: bounded, so a peer cannot make one log line arbitrarily long.
      request_id: input.requestId ? input.requestId.slice(0, MAX_LOGGED_REQUEST_ID) : undefined,
      verdict: j.verdict,
      subject: j.subject?.id,
      advice: j.advice.length > 0 ? j.advice : undefined,
      policies: j.policies,
      caller,
      duration_ms: Math.round((performance.now() - startedAt) * 1000) / 1000,
    });
    return response;
  }

  /** The mapping and engine, or FAILED_PRECONDITION naming the flag to set. */
  private ready(): { mapping: GatewayMapping; policy: PolicyDecider } {
    const { mapping, policy, authenticator } = this.opts;
    const fail = (m: string): BurrowError => new BurrowError(Status.FAILED_PRECONDITION, m);
    if (!mapping)
      throw fail('this agent has no gateway mapping: start it with --gateway-mapping FILE (docs/gateways.md)');
    if (!policy) throw fail('this agent has no policies: start it with --policies DIR (and --entities FILE)');
    if (mapping.token !== 'none' && !authenticator)
      throw fail(
        `the gateway mapping ${mapping.file} reads tokens (token ${mapping.token}) and this agent verifies none: ` +
          'start it with --jwks, --jwks-url or --introspection-url',
      );
    return { mapping, policy };
  }

  private async judge(
    mapping: GatewayMapping,
    policy: PolicyDecider,
    input: CheckInput,
    who: { caller: string | undefined; decisionId: string; trace?: TraceParent },
  ): Promise<Judgement> {
    const verified = await this.verify(mapping, input, who.trace);
    if ('verdict' in verified) return verified;
    const target = parseTarget(input.target);
    if (!target.ok) return denial(target.reason);
    const env: SourceEnv = { input, claims: verified.claims, path: target.path, query: target.query };
    let evaluation: JsonObject;
    try {
      evaluation = evaluationOf(mapping, env, target.segments);
    } catch (err) {
      if (err instanceof MappingDenial) return denial(err.message);
      throw err;
    }
    const subject = evaluation.subject as { type: string; id: string };
    let answer: JsonObject;
    const span = who.trace && startChildSpan(who.trace.tracing, 'cedar evaluation', who.trace.span);
    try {
      answer = await policy.evaluate(evaluation, { caller: who.caller, decisionId: who.decisionId });
    } catch (err) {
      const e = engineError(err, 'policy evaluation failed');
      if (span) endRpcSpan(span, e.code, e.message);
      // The mapped request does not fit the site's schema or Cedar: the site's setup, not the
      // gateway's request, so a deny naming it rather than an error the gateway cannot act on.
      if (e.code !== Status.INVALID_ARGUMENT) throw e;
      this.opts.logger.warn('gateway mapping made a request the policies cannot evaluate; denied', {
        decision_id: who.decisionId,
        mapping: mapping.file,
        error: e.message,
      });
      return { ...denial(`the mapped request cannot be evaluated: ${e.message}`), subject: plain(subject) };
    }
    if (span) {
      // The decision and the deciding policies only: never the subject, resource, context or claims.
      span.setAttribute(BURROW_ATTRIBUTES.decision, answer.decision === true ? 'allow' : 'deny');
      span.setAttribute(BURROW_ATTRIBUTES.policies, strings((answer.context as JsonObject | undefined)?.policies));
      endSpan(span);
    }
    return this.judgementOf(answer, plain(subject), mapping, env);
  }

  /** The token's claims, or the UNAUTHENTICATED judgement. */
  private async verify(
    mapping: GatewayMapping,
    input: CheckInput,
    trace: TraceParent | undefined,
  ): Promise<Judgement | { claims: Record<string, unknown> }> {
    if (mapping.token === 'none' || (mapping.token === 'optional' && input.token === '')) return { claims: {} };
    if (input.token === '') return unauthenticated('missing: the request has no bearer token');
    let result: Awaited<ReturnType<TokenAuthenticator['authenticate']>>;
    try {
      result = await this.opts.authenticator!.authenticate(input.token, '', trace);
    } catch (err) {
      const e = engineError(err, 'token verification failed');
      // An oversized token is the client's doing: the gateway answers 401, not an error it fails on.
      if (e.code === Status.INVALID_ARGUMENT) return unauthenticated(`malformed: ${e.message}`);
      throw e;
    }
    if (!result.authenticated) return unauthenticated(result.reason);
    return { claims: result.claims };
  }

  private judgementOf(
    answer: JsonObject,
    subject: { type: string; id: string },
    mapping: GatewayMapping,
    env: SourceEnv,
  ): Judgement {
    const context = (answer.context ?? {}) as JsonObject;
    const allow = answer.decision === true;
    const annotated = strings(context.reasons);
    const reason = typeof context.reason === 'string' ? [context.reason] : [];
    return {
      verdict: allow ? 'ALLOW' : 'DENY',
      subject,
      reasons: annotated.length > 0 ? annotated : reason,
      advice: strings(context.advice),
      policies: strings(context.policies),
      headers: allow ? mappedHeaders(mapping, env) : undefined,
    };
  }
}

function plain(s: { type: string; id: string }): { type: string; id: string } {
  return { type: s.type, id: s.id };
}

function denial(reason: string): Judgement {
  return { verdict: 'DENY', reasons: [reason], advice: [], policies: [] };
}

function unauthenticated(tokenReason: string): Judgement {
  return {
    verdict: 'UNAUTHENTICATED',
    reasons: [`token refused: ${tokenReason}`],
    advice: [],
    policies: [],
    tokenReason,
  };
}

/** The CheckResponse; headers upstream only on allow. */
function responseOf(j: Judgement, decisionId: string): JsonObject {
  const out: JsonObject = {
    verdict: j.verdict,
    decision_id: decisionId,
    reasons: j.reasons,
    advice: j.advice,
    policies: j.policies,
  };
  if (j.subject) out.subject = j.subject;
  if (j.tokenReason) out.token_reason = j.tokenReason;
  if (j.verdict === 'ALLOW') {
    const headers: Record<string, string> = { ...j.headers };
    headers['x-burrow-decision-id'] = decisionId;
    if (j.subject) headers['x-burrow-subject'] = headerValue(j.subject.id);
    if (j.advice.length > 0) headers['x-burrow-advice'] = headerValue(j.advice.join(','));
    out.headers = headers;
  }
  return out;
}
