import type { JsonObject, JsonValue } from '@burrow/tunnel';
import type { CheckInput } from './check-input';
import type { GatewayMapping, MappedType, MappedValue, MappingSource, MappingTarget } from './gateway-mapping';
import { matchPath, renderTemplate } from './mapping-template';

/**
 * Turns a Check request into an AuthZEN evaluation with the site's gateway mapping: the route (or
 * the default) gives the action and resource, the sources give the subject and context.
 */

/** What the sources of a mapping read from. */
export interface SourceEnv {
  readonly input: CheckInput;
  /** The verified token's claims; empty when there is no token. */
  readonly claims: Readonly<Record<string, unknown>>;
  /** The percent-decoded path, without the query. */
  readonly path: string;
  readonly query: string;
  /** Parsed on first use: most mappings read no query parameter. */
  queryParams?: URLSearchParams;
  /** The matched route's parameters (none when the default applies). */
  params?: Readonly<Record<string, string>>;
}

/** A request the mapping cannot turn into an evaluation: denied with this reason. */
export class MappingDenial extends Error {}

/** The value of `source`, or undefined when absent (an empty request field is absent). */
export function readSource(source: MappingSource, env: SourceEnv): unknown {
  switch (source.kind) {
    case 'literal':
      return source.value;
    case 'claim':
      return claimAt(env.claims, source.name, source.path);
    case 'header':
      return env.input.headers[source.name];
    case 'extension':
      return env.input.extensions[source.name];
    case 'query':
      env.queryParams ??= new URLSearchParams(env.query);
      return env.queryParams.get(source.name) ?? undefined;
    case 'param':
      return env.params?.[source.name];
    case 'request':
      return requestField(env, source.field) || undefined;
  }
}

function requestField(env: SourceEnv, field: Extract<MappingSource, { kind: 'request' }>['field']): string {
  const i = env.input;
  switch (field) {
    case 'method':
      return i.method;
    case 'path':
      return env.path;
    case 'host':
      return i.host;
    case 'scheme':
      return i.scheme;
    case 'source_principal':
      return i.sourcePrincipal;
    case 'source_address':
      return i.sourceAddress;
  }
}

/** A claim by its exact name (names may hold dots, as URL claims do), else by its dotted path. */
function claimAt(claims: Readonly<Record<string, unknown>>, name: string, path: readonly string[]): unknown {
  if (Object.hasOwn(claims, name)) return claims[name];
  let v: unknown = claims;
  for (const key of path) {
    if (typeof v !== 'object' || v === null || Array.isArray(v) || !Object.hasOwn(v, key)) return undefined;
    v = (v as Record<string, unknown>)[key];
  }
  return v;
}

/** How a source is named in a reason. */
export function describeSource(s: MappingSource): string {
  switch (s.kind) {
    case 'literal':
      return JSON.stringify(s.value);
    case 'request':
      return s.field;
    default:
      return `${s.kind}:${s.name}`;
  }
}

const WHOLE_NUMBER = /^-?\d{1,19}$/;

/** `value` as `type`; a value that is not one is a {@link MappingDenial} naming `what`. */
function convert(value: unknown, type: MappedType, what: string, source: MappingSource): JsonValue {
  const bad = (expected: string): MappingDenial =>
    new MappingDenial(`${what}: ${describeSource(source)} is ${JSON.stringify(value)}, not ${expected}`);
  if (type === 'long') {
    const n = typeof value === 'string' && WHOLE_NUMBER.test(value.trim()) ? Number(value.trim()) : value;
    if (typeof n !== 'number' || !Number.isSafeInteger(n)) throw bad('a whole number');
    return n;
  }
  if (type === 'bool') {
    if (value === true || value === 'true') return true;
    if (value === false || value === 'false') return false;
    throw bad('true or false');
  }
  return value as JsonValue;
}

/** The present values of `values`, converted, by name. */
export function mappedValues(values: readonly MappedValue[], env: SourceEnv, what: string): JsonObject | undefined {
  let out: JsonObject | undefined;
  for (const v of values) {
    const raw = readSource(v.source, env);
    if (raw === undefined || raw === null) continue;
    out ??= {};
    out[v.name] = convert(raw, v.as, `${what}.${v.name}`, v.source);
  }
  return out;
}

/** A subject type or id: a string (a number is written in decimal); absent or another shape is a denial. */
function subjectPart(source: MappingSource, env: SourceEnv, what: string): string {
  const v = readSource(source, env);
  if (typeof v === 'string' && v !== '') return v;
  if (typeof v === 'number' && Number.isFinite(v)) return String(v);
  if (v === undefined || v === '') throw new MappingDenial(`${what} (${describeSource(source)}) is absent`);
  throw new MappingDenial(`${what} (${describeSource(source)}) is not a string`);
}

/** The subject the evaluation uses: the anonymous one for an optional token not sent. */
export function subjectOf(m: GatewayMapping, env: SourceEnv): { type: string; id: string } {
  if (m.token === 'optional' && env.input.token === '' && m.anonymous) return { ...m.anonymous };
  return { type: subjectPart(m.subjectType, env, 'subject.type'), id: subjectPart(m.subjectId, env, 'subject.id') };
}

/** The first route that matches, with its parameters, else the default; a denial for `default deny`. */
export function targetOf(
  m: GatewayMapping,
  input: CheckInput,
  segments: readonly string[],
): { target: MappingTarget; params: Record<string, string> } {
  for (const r of m.routes) {
    if (r.methods.length > 0 && !r.methods.includes(input.method)) continue;
    const params = matchPath(r.pattern, segments);
    if (params) return { target: r, params };
  }
  if (m.fallback === 'deny')
    throw new MappingDenial(`no route of the gateway mapping matches ${input.method} /${segments.join('/')}`);
  return { target: m.fallback, params: {} };
}

/** The AuthZEN evaluation for a request; throws {@link MappingDenial}. */
export function evaluationOf(m: GatewayMapping, env: SourceEnv, segments: readonly string[]): JsonObject {
  const { target, params } = targetOf(m, env.input, segments);
  env.params = params;
  const vars = { ...params, method: env.input.method, host: env.input.host, path: env.path };
  const subject: JsonObject = subjectOf(m, env);
  const properties = mappedValues(m.subjectProperties, env, 'subject.property');
  if (properties) subject.properties = properties;
  return {
    subject,
    action: { name: renderTemplate(target.action, vars) },
    resource: { type: target.resource.type, id: renderTemplate(target.resource.id, vars) },
    context: mappedValues(m.context, env, 'context') ?? {},
  };
}

/** A header value as it may travel: characters outside printable ASCII percent-encoded (UTF-8). */
export function headerValue(v: unknown): string {
  const s = typeof v === 'string' ? v : Array.isArray(v) ? v.map(String).join(',') : JSON.stringify(v);
  if (/^[\x20-\x7e]*$/.test(s)) return s;
  // Byte by byte from UTF-8 (a lone surrogate becomes U+FFFD), so no value can end a header line.
  return s.replace(/[^\x20-\x7e]+/g, (run) =>
    [...Buffer.from(run, 'utf8')].map((b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`).join(''),
  );
}

/** The headers the mapping adds upstream (only present values). */
export function mappedHeaders(m: GatewayMapping, env: SourceEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const h of m.headers) {
    const v = readSource(h.source, env);
    if (v !== undefined && v !== null) out[h.name] = headerValue(v);
  }
  return out;
}
