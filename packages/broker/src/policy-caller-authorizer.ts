import { PolicyEngine, type PolicyEngineOptions } from '@burrow/policy';
import { serviceOfMethod, type Logger, type PeerIdentity } from '@burrow/tunnel';
import type { Registry } from 'prom-client';
import type { CallerAuthorizer, CallerDecision, ForwardedCall } from './caller-authorizer';

export interface PolicyCallerAuthorizerOptions {
  policiesDir: string;
  entitiesFile?: string;
  schemaFile?: string;
  /** Where decisions are audited: a file, or undefined for none (denials are logged anyway). */
  auditLog?: string;
  logger: Logger;
  registry: Registry;
}

/**
 * Caller authorization written as Cedar policy, on the same engine the agent uses. Each call is
 * one AuthZEN evaluation with this fixed mapping (README, "Caller authorization"):
 *
 *   principal  Service::"<name>"      (the service certificate's SPIFFE path /service/<name>;
 *                                      attributes spiffe_id and trust_domain)
 *   action     Action::"<full method>" e.g. Action::"/burrow.policy.v1.PolicyDecisionService/Evaluate"
 *   resource   Agent::"<agent id>"
 *   context    { service: "burrow.policy.v1.PolicyDecisionService", method: "Evaluate" }
 *
 * Entity data can put agents in groups (`Agent::"site-a"` in `Site::"eu"`) and services in teams.
 * Default deny; policies reload when their files change (the last good set stays active).
 */
export class PolicyCallerAuthorizer implements CallerAuthorizer {
  private constructor(private readonly engine: PolicyEngine) {}

  static async open(opts: PolicyCallerAuthorizerOptions): Promise<PolicyCallerAuthorizer> {
    const engineOpts: PolicyEngineOptions = {
      policiesDir: opts.policiesDir,
      entitiesFile: opts.entitiesFile,
      schemaFile: opts.schemaFile,
      auditLog: opts.auditLog,
      watch: true,
      logger: opts.logger,
      registry: opts.registry,
      metricsPrefix: 'burrow_broker_caller_policy',
    };
    return new PolicyCallerAuthorizer(await PolicyEngine.open(engineOpts));
  }

  get policyCount(): number {
    return this.engine.policyCount;
  }

  authorize(caller: PeerIdentity, agentId: string, method: string, forwarded?: ForwardedCall): CallerDecision {
    const service = serviceOfMethod(method);
    try {
      const res = this.engine.evaluate(
        {
          subject: {
            type: 'Service',
            id: caller.name,
            properties: { spiffe_id: caller.spiffeId, trust_domain: caller.trustDomain },
          },
          action: { name: method },
          resource: { type: 'Agent', id: agentId },
          context: { service, method: method.slice(service.length + 2) },
        },
        { caller: caller.spiffeId, ...forwarded },
      );
      return {
        allowed: res.decision,
        reason: String(res.context.reason ?? (res.decision ? 'allowed' : 'denied')),
        policies: (res.context.policies as string[] | undefined) ?? [],
      };
    } catch (err) {
      // A request the policies cannot judge is denied, never allowed.
      return {
        allowed: false,
        reason: `caller policy could not be evaluated: ${(err as Error).message}`,
        policies: [],
      };
    }
  }

  close(): Promise<void> {
    return this.engine.close();
  }
}
