import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError } from './errors';
import { PROTO_DIR } from './frames';

/**
 * Protobuf <-> JSON for Burrow's auth and policy APIs, in the JSON shape AuthZEN and Burrow's
 * HTTP binding use: field names as written in the .proto (snake_case), google.protobuf.Struct as a
 * plain JSON object, google.protobuf.Timestamp as an RFC 3339 string. The agent decodes requests
 * with it, the broker's AuthZEN HTTP binding encodes them, and the platform client does both.
 *
 * Conversion is strict where a wrong shape would silently change a decision: an object where a
 * string belongs, or a non-object where a message belongs, is INVALID_ARGUMENT naming the field.
 * Unknown keys are ignored, as AuthZEN asks of a PDP.
 */

/** Full method paths of the built-in services. */
export const AUTH_METHODS = {
  authenticate: '/burrow.auth.v1.AuthenticationService/Authenticate',
} as const;
export const POLICY_METHODS = {
  evaluate: '/burrow.policy.v1.PolicyDecisionService/Evaluate',
  evaluations: '/burrow.policy.v1.PolicyDecisionService/Evaluations',
  check: '/burrow.policy.v1.PolicyDecisionService/Check',
} as const;

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

let apiRoot: protobuf.Root | undefined;
function root(): protobuf.Root {
  if (!apiRoot) {
    apiRoot = new protobuf.Root().loadSync(
      [
        path.join(PROTO_DIR, 'burrow', 'auth', 'v1', 'auth.proto'),
        path.join(PROTO_DIR, 'burrow', 'policy', 'v1', 'policy.proto'),
      ],
      { keepCase: true },
    );
    apiRoot.resolveAll();
  }
  return apiRoot;
}

function invalid(fieldPath: string, problem: string): BurrowError {
  return new BurrowError(Status.INVALID_ARGUMENT, `${fieldPath || 'request'}: ${problem}`);
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

// google.protobuf.Value in protobufjs object form <-> JSON. protobufjs ships the well-known types
// pre-parsed with camelCase field names, whatever keepCase says for our own files.
function valueToProto(v: unknown, at: string): Record<string, unknown> {
  if (v === null) return { nullValue: 0 };
  if (typeof v === 'boolean') return { boolValue: v };
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw invalid(at, 'numbers must be finite');
    return { numberValue: v };
  }
  if (typeof v === 'string') return { stringValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map((e, i) => valueToProto(e, `${at}[${i}]`)) } };
  if (isPlainObject(v)) return { structValue: structToProto(v, at) };
  throw invalid(at, `${typeof v} is not a JSON value`);
}

function structToProto(obj: Record<string, unknown>, at: string): Record<string, unknown> {
  const fields: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) {
    // As in JSON.stringify: a key whose value is undefined is absent.
    if (v !== undefined) fields[k] = valueToProto(v, at ? `${at}.${k}` : k);
  }
  return { fields };
}

function valueFromProto(v: Record<string, unknown> | undefined): JsonValue {
  if (!v) return null;
  if (v.structValue !== undefined && v.structValue !== null)
    return structFromProto(v.structValue as Record<string, unknown>);
  if (v.listValue !== undefined && v.listValue !== null)
    return ((v.listValue as { values?: Record<string, unknown>[] }).values ?? []).map(valueFromProto);
  if (v.stringValue !== undefined && v.stringValue !== null) return v.stringValue as string;
  if (v.numberValue !== undefined && v.numberValue !== null) return v.numberValue as number;
  if (v.boolValue !== undefined && v.boolValue !== null) return v.boolValue as boolean;
  return null;
}

function structFromProto(s: Record<string, unknown>): JsonObject {
  const out: JsonObject = {};
  for (const [k, v] of Object.entries((s.fields as Record<string, Record<string, unknown>> | undefined) ?? {}))
    out[k] = valueFromProto(v);
  return out;
}

function messageToProto(type: protobuf.Type, json: unknown, at: string): Record<string, unknown> {
  if (type.fullName === '.google.protobuf.Struct') {
    if (!isPlainObject(json)) throw invalid(at, 'must be a JSON object');
    return structToProto(json, at);
  }
  if (type.fullName === '.google.protobuf.Timestamp') {
    const ms = typeof json === 'string' ? Date.parse(json) : NaN;
    if (!Number.isFinite(ms)) throw invalid(at, 'must be an RFC 3339 timestamp');
    return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
  }
  if (!isPlainObject(json)) throw invalid(at, 'must be a JSON object');
  const out: Record<string, unknown> = {};
  for (const field of type.fieldsArray) {
    const v = json[field.name];
    if (v === undefined || v === null) continue;
    const fieldAt = at ? `${at}.${field.name}` : field.name;
    if (field instanceof protobuf.MapField) {
      out[field.name] = mapToProto(field, v, fieldAt);
    } else if (field.repeated) {
      if (!Array.isArray(v)) throw invalid(fieldAt, 'must be a JSON array');
      out[field.name] = v.map((e, i) => scalarOrMessageToProto(field, e, `${fieldAt}[${i}]`));
    } else {
      out[field.name] = scalarOrMessageToProto(field, v, fieldAt);
    }
  }
  return out;
}

// Map fields (string keys) as JSON objects, each value converted like a field of the value type.
function mapToProto(field: protobuf.MapField, v: unknown, at: string): Record<string, unknown> {
  if (!isPlainObject(v)) throw invalid(at, 'must be a JSON object');
  const out: Record<string, unknown> = {};
  for (const [k, e] of Object.entries(v)) {
    if (e !== undefined && e !== null) out[k] = scalarOrMessageToProto(field, e, `${at}.${k}`);
  }
  return out;
}

// Enum values by name (as JSON writes them) or by number; an unknown name is INVALID_ARGUMENT.
function enumToProto(type: protobuf.Enum, v: unknown, at: string): number {
  if (typeof v === 'string' && v in type.values) return type.values[v]!;
  if (typeof v === 'number' && Number.isInteger(v)) return v;
  throw invalid(at, `must be one of ${Object.keys(type.values).join(', ')}`);
}

function scalarOrMessageToProto(field: protobuf.FieldBase, v: unknown, at: string): unknown {
  if (field.resolvedType instanceof protobuf.Type) return messageToProto(field.resolvedType, v, at);
  if (field.resolvedType instanceof protobuf.Enum) return enumToProto(field.resolvedType, v, at);
  switch (field.type) {
    case 'string':
      if (typeof v !== 'string') throw invalid(at, 'must be a string');
      return v;
    case 'bool':
      if (typeof v !== 'boolean') throw invalid(at, 'must be true or false');
      return v;
    default:
      if (typeof v !== 'number' || !Number.isFinite(v)) throw invalid(at, 'must be a number');
      return v;
  }
}

function messageFromProto(type: protobuf.Type, msg: Record<string, unknown>): JsonObject {
  const out: JsonObject = {};
  for (const field of type.fieldsArray) {
    const v = msg[field.name];
    if (v === undefined || v === null) continue;
    if (field instanceof protobuf.MapField) {
      const entries = Object.entries(v as Record<string, unknown>);
      if (entries.length > 0)
        out[field.name] = Object.fromEntries(entries.map(([k, e]) => [k, fieldFromProto(field, e)]));
    } else if (field.repeated) {
      const items = v as unknown[];
      if (items.length === 0) continue;
      out[field.name] = items.map((e) => fieldFromProto(field, e));
    } else {
      out[field.name] = fieldFromProto(field, v);
    }
  }
  return out;
}

function fieldFromProto(field: protobuf.FieldBase, v: unknown): JsonValue {
  const t = field.resolvedType;
  if (t instanceof protobuf.Type) {
    if (t.fullName === '.google.protobuf.Struct') return structFromProto(v as Record<string, unknown>);
    if (t.fullName === '.google.protobuf.Timestamp') {
      const ts = v as { seconds?: number | { toNumber(): number }; nanos?: number };
      const seconds = typeof ts.seconds === 'object' && ts.seconds ? ts.seconds.toNumber() : Number(ts.seconds ?? 0);
      return new Date(seconds * 1000 + Math.floor((ts.nanos ?? 0) / 1e6)).toISOString();
    }
    return messageFromProto(t, v as Record<string, unknown>);
  }
  if (t instanceof protobuf.Enum) return t.valuesById[v as number] ?? (v as number);
  if (typeof v === 'object' && v !== null && 'toNumber' in v) return (v as { toNumber(): number }).toNumber();
  return v as JsonValue;
}

/** Encodes and decodes one message type of the auth/policy APIs in its JSON shape. */
export class ApiCodec {
  private constructor(private readonly type: protobuf.Type) {}

  /** `name` is the full message name, e.g. `burrow.policy.v1.EvaluationRequest`. */
  static of(name: string): ApiCodec {
    return new ApiCodec(root().lookupType(name));
  }

  /** JSON -> wire bytes. Throws INVALID_ARGUMENT naming the first bad field. */
  encode(json: unknown): Buffer {
    const msg = this.type.fromObject(messageToProto(this.type, json, ''));
    return Buffer.from(this.type.encode(msg).finish());
  }

  /** Wire bytes -> JSON. Throws INVALID_ARGUMENT when the bytes are not this message. */
  decode(bytes: Uint8Array): JsonObject {
    let msg: protobuf.Message;
    try {
      msg = this.type.decode(bytes);
    } catch (err) {
      throw new BurrowError(
        Status.INVALID_ARGUMENT,
        `request is not a valid ${this.type.name}: ${(err as Error).message}`,
        err,
      );
    }
    return messageFromProto(
      this.type,
      this.type.toObject(msg, { defaults: false, arrays: true, longs: Number }) as Record<string, unknown>,
    );
  }
}

/** The codecs of the built-in services, by message. */
export const API_CODECS = {
  get authenticateRequest(): ApiCodec {
    return cached('burrow.auth.v1.AuthenticateRequest');
  },
  get authenticateResponse(): ApiCodec {
    return cached('burrow.auth.v1.AuthenticateResponse');
  },
  get evaluationRequest(): ApiCodec {
    return cached('burrow.policy.v1.EvaluationRequest');
  },
  get evaluationResponse(): ApiCodec {
    return cached('burrow.policy.v1.EvaluationResponse');
  },
  get evaluationsRequest(): ApiCodec {
    return cached('burrow.policy.v1.EvaluationsRequest');
  },
  get evaluationsResponse(): ApiCodec {
    return cached('burrow.policy.v1.EvaluationsResponse');
  },
  get checkRequest(): ApiCodec {
    return cached('burrow.policy.v1.CheckRequest');
  },
  get checkResponse(): ApiCodec {
    return cached('burrow.policy.v1.CheckResponse');
  },
};

const codecCache = new Map<string, ApiCodec>();
function cached(name: string): ApiCodec {
  let c = codecCache.get(name);
  if (!c) {
    c = ApiCodec.of(name);
    codecCache.set(name, c);
  }
  return c;
}
