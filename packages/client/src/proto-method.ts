import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import { ConfigError } from '@burrow/tunnel';
import type { JsonObject } from './burrow-client';

/**
 * One unary method of a .proto file, for `burrow-call invoke --proto`: JSON in (field names as
 * written in the .proto, or their lowerCamelCase JSON names), protobuf on the wire, JSON out with
 * the .proto names (64-bit integers and enums as strings, bytes as base64). A key that names no
 * field is an error rather than silently dropped: a typo would otherwise send a default value.
 */
export class ProtoMethod {
  private constructor(
    private readonly requestType: protobuf.Type,
    private readonly responseType: protobuf.Type,
  ) {}

  /**
   * Loads `file` (imports resolved next to it; google/protobuf well-known types are built in) and
   * finds `/pkg.Service/Method`.
   * @throws ConfigError naming `proto` for an unreadable or invalid file, an unknown or streaming method.
   */
  static load(file: string, method: string): ProtoMethod {
    let root: protobuf.Root;
    try {
      root = new protobuf.Root();
      root.resolvePath = (origin, target) =>
        path.isAbsolute(target) ? target : path.resolve(origin ? path.dirname(origin) : path.dirname(file), target);
      root.loadSync(path.resolve(file), { keepCase: true }).resolveAll();
    } catch (err) {
      throw new ConfigError('proto', `${file}: ${(err as Error).message}`);
    }
    const [, serviceName = '', methodName = ''] = method.split('/');
    const service = root.lookup(serviceName);
    if (!(service instanceof protobuf.Service))
      throw new ConfigError('proto', `${file} defines no service ${serviceName}`);
    const m = service.methods[methodName];
    if (!m) throw new ConfigError('proto', `service ${serviceName} in ${file} has no method ${methodName}`);
    if (m.requestStream || m.responseStream)
      throw new ConfigError('proto', `${method} is a streaming method; invoke calls unary methods`);
    return new ProtoMethod(m.resolvedRequestType!, m.resolvedResponseType!);
  }

  /** `--data` JSON to the request's wire bytes. @throws ConfigError naming `data`. */
  encodeRequest(json: string): Buffer {
    let value: unknown;
    try {
      value = JSON.parse(json);
    } catch (err) {
      throw new ConfigError('data', `is not JSON (${(err as Error).message})`);
    }
    const object = normalize(this.requestType, value, this.requestType.name);
    return Buffer.from(this.requestType.encode(this.requestType.fromObject(object)).finish());
  }

  /** The response's wire bytes to JSON. */
  decodeResponse(bytes: Buffer): JsonObject {
    const message = this.responseType.decode(bytes);
    return this.responseType.toObject(message, {
      longs: String,
      enums: String,
      bytes: String,
      json: true,
    }) as JsonObject;
  }
}

function camel(name: string): string {
  return name.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Maps JSON names to .proto field names, recursively, and refuses keys that name no field. */
function normalize(type: protobuf.Type, value: unknown, at: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new ConfigError('data', `${at}: expected a JSON object for ${type.fullName.slice(1)}`);
  // Well-known types have their own JSON forms; protobufjs converts what it supports.
  if (type.fullName.startsWith('.google.protobuf.')) return value as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(value)) {
    const field = type.fields[key] ?? type.fieldsArray.find((f) => camel(f.name) === key);
    if (!field) throw new ConfigError('data', `${at}: ${type.fullName.slice(1)} has no field "${key}"`);
    const sub = field.resolvedType;
    const where = `${at}.${field.name}`;
    if (sub instanceof protobuf.Type && v !== null) {
      if (field.map) {
        const m: Record<string, unknown> = {};
        for (const [k, mv] of Object.entries(v as Record<string, unknown>)) m[k] = normalize(sub, mv, `${where}[${k}]`);
        out[field.name] = m;
      } else if (field.repeated) {
        if (!Array.isArray(v)) throw new ConfigError('data', `${where}: expected a JSON array`);
        out[field.name] = v.map((item, i) => normalize(sub, item, `${where}[${i}]`));
      } else out[field.name] = normalize(sub, v, where);
    } else if (field.repeated && !field.map) {
      if (!Array.isArray(v)) throw new ConfigError('data', `${where}: expected a JSON array`);
      for (const [i, item] of v.entries()) checkScalar(field, item, `${where}[${i}]`);
      out[field.name] = v;
    } else {
      if (field.map) for (const [k, mv] of Object.entries(v as object)) checkScalar(field, mv, `${where}[${k}]`);
      else checkScalar(field, v, where);
      out[field.name] = v;
    }
  }
  return out;
}

const NUMBER_TYPES = new Set(['double', 'float', 'int32', 'uint32', 'sint32', 'fixed32', 'sfixed32']);
const INT64_TYPES = new Set(['int64', 'uint64', 'sint64', 'fixed64', 'sfixed64']);

/**
 * The JSON type a scalar field takes (proto3 JSON: 64-bit integers also as decimal strings, bytes
 * as base64, enums by name or number); protobufjs would coerce anything else to a wrong value.
 */
function checkScalar(field: protobuf.Field, v: unknown, at: string): void {
  if (v === null) return;
  const t = field.type;
  const ok =
    field.resolvedType instanceof protobuf.Enum
      ? typeof v === 'number' || (typeof v === 'string' && v in field.resolvedType.values)
      : t === 'string' || t === 'bytes'
        ? typeof v === 'string'
        : t === 'bool'
          ? typeof v === 'boolean'
          : NUMBER_TYPES.has(t)
            ? typeof v === 'number'
            : INT64_TYPES.has(t)
              ? (typeof v === 'number' && Number.isInteger(v)) || (typeof v === 'string' && /^-?\d+$/.test(v))
              : true;
  if (!ok) {
    const expected =
      field.resolvedType instanceof protobuf.Enum
        ? `one of ${Object.keys(field.resolvedType.values).join(', ')}`
        : `of type ${t}`;
    throw new ConfigError('data', `${at}: ${JSON.stringify(v)} is not ${expected}`);
  }
}
