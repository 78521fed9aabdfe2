import { createHash } from 'node:crypto';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError } from '@burrow/tunnel';
import { isCedarTypeName } from './cedar-text';

/**
 * The AuthZEN request and response shapes (OpenID AuthZEN Authorization API 1.0, snake_case JSON
 * as on the wire), and the checks that turn untrusted JSON into a request the engine can map to
 * Cedar. See proto/burrow/policy/v1/policy.proto for the contract.
 */

/** A JSON object (AuthZEN `properties` and `context`). */
export type JsonObject = { [key: string]: unknown };

export interface AuthzenSubject {
  type: string;
  id: string;
  properties?: JsonObject;
}
export interface AuthzenAction {
  name: string;
  properties?: JsonObject;
}
export interface AuthzenResource {
  type: string;
  id: string;
  properties?: JsonObject;
}

/** AuthZEN access evaluation request, plus Burrow's `explain`. */
export interface EvaluationRequest {
  subject?: AuthzenSubject;
  action?: AuthzenAction;
  resource?: AuthzenResource;
  context?: JsonObject;
  explain?: boolean;
}

/** AuthZEN `evaluations_semantic` values. */
export type EvaluationsSemantic = 'execute_all' | 'deny_on_first_deny' | 'permit_on_first_permit';
export const EVALUATIONS_SEMANTICS: readonly EvaluationsSemantic[] = [
  'execute_all',
  'deny_on_first_deny',
  'permit_on_first_permit',
];

/** AuthZEN access evaluations (batch) request. */
export interface EvaluationsRequest {
  subject?: AuthzenSubject;
  action?: AuthzenAction;
  resource?: AuthzenResource;
  context?: JsonObject;
  evaluations?: EvaluationRequest[];
  options?: { evaluations_semantic?: string; explain?: boolean };
}

/** A determining policy, as the explanation lists it. */
export interface ExplainedPolicy {
  id: string;
  effect: 'permit' | 'forbid';
  location: string;
}
/** A policy whose evaluation failed (for example a `when` reading a missing attribute). */
export interface ExplainedError {
  policy: string;
  location: string;
  message: string;
}

/** `context.explanation` of a response when `explain` was asked for. */
export interface Explanation {
  /** The Cedar request the AuthZEN one was mapped to. */
  request: { principal: string; action: string; resource: string };
  /** Policies that were satisfied: the determining ones, and for a deny also permits a forbid overrode. */
  satisfied: ExplainedPolicy[];
  errors: ExplainedError[];
}

/** AuthZEN response context as Burrow fills it. */
export interface ResponseContext {
  reason?: string;
  policies?: string[];
  /** The deciding policies' @advice, distinct, in policy order; absent when none carries one. */
  advice?: string[];
  /** The deciding policies' @reason, in policy order; absent when none carries one. */
  reasons?: string[];
  explanation?: Explanation;
  error?: { code: 'INVALID_ARGUMENT'; message: string };
}

export interface EvaluationResponse {
  decision: boolean;
  context: ResponseContext;
}
export interface EvaluationsResponse {
  evaluations: EvaluationResponse[];
}

/**
 * A request the engine cannot evaluate: a missing or malformed field, an invalid type name, a value
 * Cedar cannot hold. gRPC status INVALID_ARGUMENT; the message names the field and the value.
 */
export class PolicyInputError extends BurrowError {
  constructor(
    readonly field: string,
    message: string,
    cause?: unknown,
  ) {
    super(Status.INVALID_ARGUMENT, message, cause);
  }
}

/** A request that passed {@link normalizeRequest}: every field present and checked. */
export interface NormalizedRequest {
  subject: AuthzenSubject;
  action: AuthzenAction;
  resource: AuthzenResource;
  context: JsonObject;
  explain: boolean;
}

function isPlainObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function describe(v: unknown): string {
  if (v === undefined) return 'missing';
  try {
    const s = JSON.stringify(v);
    return s.length > 80 ? `${s.slice(0, 77)}...` : s;
  } catch {
    return String(v);
  }
}

/**
 * Checks that a JSON value can become a Cedar value: Cedar has no null and no floating point, and
 * its Long is 64-bit (JavaScript keeps integers exact only up to 2^53). Throws naming the key path.
 */
export function checkCedarValue(path: string, value: unknown): void {
  if (value === null) throw new PolicyInputError(path, `${path} is null; Cedar has no null (leave the key out)`);
  switch (typeof value) {
    case 'string':
    case 'boolean':
      return;
    case 'number':
      if (!Number.isSafeInteger(value)) {
        throw new PolicyInputError(
          path,
          `${path} is ${String(value)}; Cedar numbers are integers (Long) and JSON ones must be within ±2^53`,
        );
      }
      return;
    case 'object':
      if (Array.isArray(value)) {
        value.forEach((item, i) => {
          checkCedarValue(`${path}[${i}]`, item);
        });
        return;
      }
      for (const [k, v] of Object.entries(value as JsonObject)) checkCedarValue(`${path}.${k}`, v);
      return;
    default:
      throw new PolicyInputError(
        path,
        `${path} is ${value === undefined ? 'undefined' : `a ${typeof value}`}; only JSON values are allowed`,
      );
  }
}

function checkProperties(path: string, value: unknown): JsonObject | undefined {
  if (value === undefined) return undefined;
  if (!isPlainObject(value)) throw new PolicyInputError(path, `${path} must be an object, got ${describe(value)}`);
  checkCedarValue(path, value);
  return value;
}

function checkTypedEntity(field: 'subject' | 'resource', value: unknown): AuthzenSubject {
  if (value === undefined || value === null) throw new PolicyInputError(field, `${field} is required`);
  if (!isPlainObject(value))
    throw new PolicyInputError(field, `${field} must be an object with type and id, got ${describe(value)}`);
  const { type, id } = value;
  if (typeof type !== 'string')
    throw new PolicyInputError(`${field}.type`, `${field}.type must be a string, got ${describe(type)}`);
  if (!isCedarTypeName(type)) {
    throw new PolicyInputError(
      `${field}.type`,
      `${field}.type ${JSON.stringify(type)} is not a valid Cedar type name (identifiers joined by ::, such as ` +
        `User or Acme::Document)`,
    );
  }
  if (typeof id !== 'string' || id === '')
    throw new PolicyInputError(`${field}.id`, `${field}.id must be a non-empty string, got ${describe(id)}`);
  const properties = checkProperties(`${field}.properties`, value.properties);
  return properties === undefined ? { type, id } : { type, id, properties };
}

function checkAction(value: unknown): AuthzenAction {
  if (value === undefined || value === null) throw new PolicyInputError('action', 'action is required');
  if (!isPlainObject(value))
    throw new PolicyInputError('action', `action must be an object with a name, got ${describe(value)}`);
  const { name } = value;
  if (typeof name !== 'string' || name === '')
    throw new PolicyInputError('action.name', `action.name must be a non-empty string, got ${describe(name)}`);
  const properties = checkProperties('action.properties', value.properties);
  return properties === undefined ? { name } : { name, properties };
}

/**
 * Validates one AuthZEN evaluation request (untrusted JSON) and returns it with every field
 * present. Throws {@link PolicyInputError} naming the first bad field.
 */
export function normalizeRequest(input: unknown): NormalizedRequest {
  if (!isPlainObject(input))
    throw new PolicyInputError('request', `the request must be a JSON object, got ${describe(input)}`);
  const subject = checkTypedEntity('subject', input.subject);
  const action = checkAction(input.action);
  const resource = checkTypedEntity('resource', input.resource);
  const context = checkProperties('context', input.context) ?? {};
  if (input.explain !== undefined && typeof input.explain !== 'boolean') {
    throw new PolicyInputError('explain', `explain must be a boolean, got ${describe(input.explain)}`);
  }
  return { subject, action, resource, context, explain: input.explain === true };
}

/** An AuthZEN evaluations request checked at the top level; its items are checked one by one later. */
export interface NormalizedBatch {
  items: EvaluationRequest[];
  semantic: EvaluationsSemantic;
}

/**
 * Expands an AuthZEN evaluations request: each item's present subject, action, resource or
 * context replaces the top-level default as a whole object (AuthZEN 1.0 "Access Evaluations");
 * `options.explain` turns explanations on for every item. No `evaluations` (or an empty list)
 * means the top-level fields are one evaluation. Throws {@link PolicyInputError} only for a
 * malformed batch (not an array, unknown semantic); item problems surface per item later.
 */
export function expandEvaluations(input: unknown): NormalizedBatch {
  if (!isPlainObject(input))
    throw new PolicyInputError('request', `the evaluations request must be a JSON object, got ${describe(input)}`);
  const options = input.options;
  if (options !== undefined && !isPlainObject(options))
    throw new PolicyInputError('options', `options must be an object, got ${describe(options)}`);
  const semanticRaw = options?.evaluations_semantic ?? 'execute_all';
  if (typeof semanticRaw !== 'string' || !(EVALUATIONS_SEMANTICS as readonly string[]).includes(semanticRaw)) {
    throw new PolicyInputError(
      'options.evaluations_semantic',
      `options.evaluations_semantic ${describe(semanticRaw)} is not one of ${EVALUATIONS_SEMANTICS.join(', ')}`,
    );
  }
  if (options?.explain !== undefined && typeof options.explain !== 'boolean') {
    throw new PolicyInputError(
      'options.explain',
      `options.explain must be a boolean, got ${describe(options.explain)}`,
    );
  }
  const list = input.evaluations ?? [];
  if (!Array.isArray(list))
    throw new PolicyInputError('evaluations', `evaluations must be an array, got ${describe(list)}`);
  const pick = (item: JsonObject, key: 'subject' | 'action' | 'resource' | 'context'): unknown =>
    item[key] !== undefined && item[key] !== null ? item[key] : input[key];
  const raw: unknown[] = list.length === 0 ? [{}] : list;
  const items = raw.map((entry): EvaluationRequest => {
    // A malformed item is kept as is so that it fails on its own, in its place.
    if (!isPlainObject(entry)) return entry as EvaluationRequest;
    const item: JsonObject = {
      subject: pick(entry, 'subject'),
      action: pick(entry, 'action'),
      resource: pick(entry, 'resource'),
    };
    const context = pick(entry, 'context');
    if (context !== undefined) item.context = context;
    if (entry.explain !== undefined) item.explain = entry.explain;
    else if (options?.explain === true) item.explain = true;
    return item as EvaluationRequest;
  });
  return { items, semantic: semanticRaw as EvaluationsSemantic };
}

/**
 * JSON with object keys sorted at every level, so that equal requests give equal strings whatever
 * order their keys came in: the decision cache key and the audit log's input hash.
 */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map((v) => (v === undefined ? 'null' : canonicalJson(v))).join(',')}]`;
  if (isPlainObject(value)) {
    const keys = Object.keys(value)
      .filter((k) => value[k] !== undefined)
      .sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`).join(',')}}`;
  }
  return JSON.stringify(value) ?? 'null';
}

/** Hex SHA-256 of a string. */
export function sha256Hex(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}
