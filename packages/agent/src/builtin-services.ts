import { status as Status } from '@grpc/grpc-js';
import { POLICY_INPUT_LIMITS } from '@burrow/policy';
import {
  API_CODECS,
  AUTH_METHODS,
  BurrowError,
  POLICY_METHODS,
  serviceOfMethod,
  type JsonObject,
  type LocalCallContext,
  type LocalUnaryHandler,
  type Logger,
  silentLogger,
  BURROW_ATTRIBUTES,
  TRACING_OFF,
  endRpcSpan,
  endSpan,
  startChildSpan,
  type Span,
  type TraceParent,
  type Tracing,
} from '@burrow/tunnel';
import type { AuthenticationResult } from './authn/token-verifier';
import { engineError } from './engine-error';
import { CHECK_LIMITS } from './gateway/check-input';
import { GatewayCheck } from './gateway/gateway-check';
import type { GatewayMapping } from './gateway/gateway-mapping';

/**
 * The services the agent answers itself, without an upstream: token verification
 * (burrow.auth.v1) and policy decisions (burrow.policy.v1). An `--upstream` route naming one of
 * these services replaces the built-in one; the default route `*` does not.
 */

/** What the built-in authentication service needs from a token verifier. */
export interface TokenAuthenticator {
  /** `trace`: the call's span, under which a key fetch the token needs gets its own span. */
  authenticate(token: string, audience: string, trace?: TraceParent): Promise<AuthenticationResult>;
}

/** What the built-in policy service needs from a policy engine (AuthZEN JSON in and out). */
export interface PolicyDecider {
  evaluate(request: JsonObject, opts: { caller?: string; decisionId?: string }): Promise<JsonObject> | JsonObject;
  evaluations(request: JsonObject, opts: { caller?: string }): Promise<JsonObject> | JsonObject;
}

export interface BuiltinServicesOptions {
  /** The agent's tracing: spans of Cedar evaluations and key fetches (default off). */
  tracing?: Tracing;
  authenticator?: TokenAuthenticator;
  policy?: PolicyDecider;
  /** The gateway mapping Check uses (--gateway-mapping); Check is FAILED_PRECONDITION without it. */
  gatewayMapping?: GatewayMapping;
  /** Where Check logs its one line per decision. */
  logger?: Logger;
}

const AUTH_SERVICE = serviceOfMethod(AUTH_METHODS.authenticate);
const POLICY_SERVICE = serviceOfMethod(POLICY_METHODS.evaluate);

/** Full names of the services the agent can answer itself. */
export const BUILTIN_SERVICE_NAMES: readonly string[] = [AUTH_SERVICE, POLICY_SERVICE];

/** Dispatches forwarded calls for the built-in services to their engines. */
export class BuiltinServices {
  private readonly handlers = new Map<string, LocalUnaryHandler>();
  private readonly gateway: GatewayCheck;

  constructor(private readonly opts: BuiltinServicesOptions) {
    this.gateway = new GatewayCheck({
      mapping: opts.gatewayMapping,
      authenticator: opts.authenticator,
      policy: opts.policy,
      logger: opts.logger ?? silentLogger(),
    });
    this.handlers.set(POLICY_METHODS.check, (req, ctx) => this.check(req, ctx));
    this.handlers.set(AUTH_METHODS.authenticate, (req, ctx) => this.authenticate(req, ctx));
    this.handlers.set(POLICY_METHODS.evaluate, (req, ctx) => this.decide('evaluate', req, ctx));
    this.handlers.set(POLICY_METHODS.evaluations, (req, ctx) => this.decide('evaluations', req, ctx));
  }

  /** True when `service` is one the agent answers itself (configured or not). */
  isBuiltinService(service: string): boolean {
    return service === AUTH_SERVICE || service === POLICY_SERVICE;
  }

  /**
   * The handler for `method`, an UNIMPLEMENTED one for an unknown method of a built-in service,
   * or undefined when the method is not built in.
   */
  handlerFor(method: string): LocalUnaryHandler | undefined {
    const h = this.handlers.get(method);
    if (h) return h;
    if (!this.isBuiltinService(serviceOfMethod(method))) return undefined;
    return () =>
      Promise.reject(
        new BurrowError(
          Status.UNIMPLEMENTED,
          `the agent's ${serviceOfMethod(method)} has no method ${method.slice(method.lastIndexOf('/') + 1)}`,
        ),
      );
  }

  private get tracing(): Tracing {
    return this.opts.tracing ?? TRACING_OFF;
  }

  private async authenticate(request: Buffer, ctx: LocalCallContext): Promise<Buffer> {
    const verifier = this.opts.authenticator;
    if (!verifier)
      throw new BurrowError(
        Status.FAILED_PRECONDITION,
        'this agent verifies no tokens: start it with --jwks, --jwks-url or --introspection-url, or route ' +
          'burrow.auth.v1.AuthenticationService to an upstream',
      );
    const req = API_CODECS.authenticateRequest.decode(request);
    let result: Awaited<ReturnType<typeof verifier.authenticate>>;
    try {
      const trace = ctx.span ? { tracing: this.tracing, span: ctx.span } : undefined;
      result = await verifier.authenticate(String(req.token ?? ''), String(req.audience ?? ''), trace);
    } catch (err) {
      throw engineError(err, 'token verification failed');
    }
    return API_CODECS.authenticateResponse.encode({
      authenticated: result.authenticated,
      subject: result.subject,
      groups: result.groups,
      claims: result.authenticated ? result.claims : undefined,
      expires_at: result.expiresAt ? result.expiresAt.toISOString() : undefined,
      reason: result.reason,
    });
  }

  private async decide(kind: 'evaluate' | 'evaluations', request: Buffer, ctx: LocalCallContext): Promise<Buffer> {
    const engine = this.opts.policy;
    if (!engine)
      throw new BurrowError(
        Status.FAILED_PRECONDITION,
        'this agent has no policies: start it with --policies DIR (and --entities FILE), or route ' +
          'burrow.policy.v1.PolicyDecisionService to an upstream',
      );
    const codecs =
      kind === 'evaluate'
        ? { req: API_CODECS.evaluationRequest, res: API_CODECS.evaluationResponse }
        : { req: API_CODECS.evaluationsRequest, res: API_CODECS.evaluationsResponse };
    // Bounded before decoding: decoding and converting a message costs in proportion to its size,
    // and the engine's own depth and value bounds apply only to what was decoded.
    const { maxMessageBytes } = POLICY_INPUT_LIMITS;
    if (request.length > maxMessageBytes) {
      const message =
        `policy request is ${request.length} bytes; ` + `policy requests may be at most ${maxMessageBytes} bytes`;
      throw new BurrowError(Status.INVALID_ARGUMENT, message);
    }
    let input: JsonObject;
    try {
      input = codecs.req.decode(request);
    } catch (err) {
      if (err instanceof BurrowError) throw err;
      // A Struct nested thousands deep fits in the byte bound and overflows the recursive decoder.
      const why =
        err instanceof RangeError
          ? `it nests too deep to decode; policy requests may nest at most ${POLICY_INPUT_LIMITS.maxDepth} levels`
          : (err as Error).message;
      throw new BurrowError(Status.INVALID_ARGUMENT, `policy request cannot be decoded: ${why}`, err);
    }
    const span = ctx.span && startChildSpan(this.tracing, 'cedar evaluation', ctx.span);
    let output: JsonObject;
    try {
      output = await (kind === 'evaluate'
        ? engine.evaluate(input, { caller: ctx.caller })
        : engine.evaluations(input, { caller: ctx.caller }));
    } catch (err) {
      const e = engineError(err, 'policy evaluation failed');
      if (span) endRpcSpan(span, e.code, e.message);
      throw e;
    }
    if (span) this.endEvaluationSpan(span, kind, input, output);
    return codecs.res.encode(output);
  }

  private async check(request: Buffer, ctx: LocalCallContext): Promise<Buffer> {
    // Bounded before decoding, as the other policy methods are; the fields' own bounds follow.
    if (request.length > CHECK_LIMITS.maxMessageBytes) {
      throw new BurrowError(
        Status.INVALID_ARGUMENT,
        `check request is ${request.length} bytes; check requests may be at most ${CHECK_LIMITS.maxMessageBytes} bytes`,
      );
    }
    const input = API_CODECS.checkRequest.decode(request);
    const trace = ctx.span ? { tracing: this.tracing, span: ctx.span } : undefined;
    return API_CODECS.checkResponse.encode(await this.gateway.check(input, ctx.caller, trace));
  }

  /**
   * The Cedar evaluation span's attributes: the decision(s) and the policies that decided. Never
   * the request's subject, resource or action, the entities, or a token; the request's context
   * values only with --trace-include-context.
   */
  private endEvaluationSpan(span: Span, kind: 'evaluate' | 'evaluations', input: JsonObject, output: JsonObject): void {
    const answers = (kind === 'evaluate' ? [output] : ((output.evaluations as JsonObject[] | undefined) ?? [])) as {
      decision?: unknown;
      context?: { policies?: unknown };
    }[];
    const decisions = answers.map((a) => (a.decision === true ? 'allow' : 'deny'));
    const policies = answers.flatMap((a) => (Array.isArray(a.context?.policies) ? a.context.policies.map(String) : []));
    span.setAttribute(BURROW_ATTRIBUTES.decision, kind === 'evaluate' ? decisions[0]! : decisions);
    span.setAttribute(BURROW_ATTRIBUTES.policies, [...new Set(policies)]);
    if (this.tracing.includeContext && input.context !== undefined)
      span.setAttribute(BURROW_ATTRIBUTES.context, JSON.stringify(input.context).slice(0, 4096));
    endSpan(span);
  }
}
