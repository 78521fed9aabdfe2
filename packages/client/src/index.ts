/**
 * @burrow/client: what a platform service needs to ask sites questions through a Burrow broker.
 */
export {
  BurrowClient,
  BurrowCallError,
  type BurrowClientOptions,
  type CallOptions,
  type PingResult,
  type JsonObject,
  type JsonValue,
  type AuthenticationResult,
  type Subject,
  type Action,
  type Resource,
  type EvaluationRequest,
  type EvaluationResponse,
  type EvaluationsSemantic,
  type EvaluationsRequest,
  type EvaluationsResponse,
  type CheckRequest,
  type CheckResponse,
  type CheckVerdict,
} from './burrow-client';
