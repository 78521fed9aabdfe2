/**
 * @burrow/policy: the Cedar policy engine shared by the agent (site decisions) and the broker (caller authorization).
 * Exports marked `@internal` are there only for the tests.
 */

// The engine: load a policy set, evaluate AuthZEN requests, reload.
export {
  PolicyEngine,
  POLICY_ENGINE_DEFAULTS,
  type PolicyEngineOptions,
  type EvaluateOptions,
  type ReloadResult,
} from './policy-engine';

// Loading and checking policy files (the agent's `policy check` and startup).
export {
  loadPolicySet,
  formatPolicyIssue,
  PolicyLoadError,
  type PolicySources,
  type PolicyIssue,
  type PolicyInputs,
  type CompiledPolicy,
  type CompiledPolicySet,
} from './policy-set-loader';

// AuthZEN request and response shapes, and the bounds a request must stay within.
export {
  PolicyInputError,
  EVALUATIONS_SEMANTICS,
  type AuthzenSubject,
  type AuthzenAction,
  type AuthzenResource,
  type EvaluationRequest,
  type EvaluationsSemantic,
  type EvaluationsRequest,
  type EvaluationResponse,
  type EvaluationsResponse,
  type ResponseContext,
  type Explanation,
  type ExplainedPolicy,
  type ExplainedError,
} from './policy-input';
export { checkInputBounds, POLICY_INPUT_LIMITS, type PolicyInputLimits } from './input-bounds';

/** @internal Tests check the engine's metrics, hashing and statement splitting with these. */
export { PolicyMetrics } from './policy-metrics';
/** @internal */
export { canonicalJson, sha256Hex } from './policy-input';
/** @internal */
export { splitPolicyStatements } from './cedar-text';
