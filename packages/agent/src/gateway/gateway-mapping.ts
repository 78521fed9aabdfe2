import { readFileSync } from 'node:fs';
import {
  REQUEST_PLACEHOLDERS,
  TemplateError,
  compilePathPattern,
  compileTemplate,
  type PathPattern,
  type Template,
} from './mapping-template';

/**
 * The gateway mapping (agent flag --gateway-mapping FILE; the reference is docs/gateways.md): how
 * a gateway's Check request becomes an AuthZEN evaluation. One directive per line, `#` starts a
 * comment. Parsed and validated once at load; every problem is a {@link GatewayMappingError}
 * `FILE:LINE: problem`, and the agent does not start with it.
 */

/** Where a value comes from. */
export type MappingSource =
  | { readonly kind: 'literal'; readonly value: string }
  | { readonly kind: 'claim'; readonly name: string; readonly path: readonly string[] }
  | { readonly kind: 'header' | 'extension' | 'query' | 'param'; readonly name: string }
  | { readonly kind: 'request'; readonly field: RequestField };

/** Attributes of the Check request a source can name directly. */
export type RequestField = 'method' | 'path' | 'host' | 'scheme' | 'source_principal' | 'source_address';
const REQUEST_FIELDS: readonly RequestField[] = [
  'method',
  'path',
  'host',
  'scheme',
  'source_principal',
  'source_address',
];

/** The type a mapped value is converted to (`as long`); strings by default. */
export type MappedType = 'string' | 'long' | 'bool';

/** A named value: a subject property, a context entry, an upstream header. */
export interface MappedValue {
  readonly name: string;
  readonly source: MappingSource;
  readonly as: MappedType;
  readonly line: number;
}

/** An entity whose id is a template: `Type::"template"`. */
export interface EntityTemplate {
  readonly type: string;
  readonly id: Template;
}

/** What a matched request is evaluated as. */
export interface MappingTarget {
  readonly action: Template;
  readonly resource: EntityTemplate;
  readonly line: number;
}

/** `route METHODS PATTERN action=... resource=...`. */
export interface MappingRoute extends MappingTarget {
  /** Upper-case methods; empty for `*` (any method). */
  readonly methods: readonly string[];
  readonly pattern: PathPattern;
}

/** How a token is treated: verified and needed, verified when present, or never read. */
export type TokenMode = 'required' | 'optional' | 'none';

/** A parsed, validated gateway mapping. */
export interface GatewayMapping {
  readonly file: string;
  readonly token: TokenMode;
  /** The subject when `token optional` and the request has none. */
  readonly anonymous?: { readonly type: string; readonly id: string };
  readonly subjectType: MappingSource;
  readonly subjectId: MappingSource;
  readonly subjectProperties: readonly MappedValue[];
  readonly routes: readonly MappingRoute[];
  /** The target when no route matches, or `deny`. */
  readonly fallback: MappingTarget | 'deny';
  readonly context: readonly MappedValue[];
  readonly headers: readonly MappedValue[];
}

/** A problem in a mapping file: `FILE:LINE: problem`. */
export class GatewayMappingError extends Error {
  constructor(
    readonly file: string,
    readonly line: number,
    readonly problem: string,
  ) {
    super(line > 0 ? `${file}:${line}: ${problem}` : `${file}: ${problem}`);
  }
}

/** The prefix of every header a site adds to a request upstream. */
export const SITE_HEADER_PREFIX = 'x-burrow-';

/** Headers Check always sets itself; the mapping cannot set them. */
export const RESERVED_HEADERS: readonly string[] = ['x-burrow-subject', 'x-burrow-decision-id', 'x-burrow-advice'];
/** The engine keeps this context key for action properties. */
const RESERVED_CONTEXT = 'action_properties';

const IDENT = '[A-Za-z_][A-Za-z0-9_]*';
const ENTITY_TYPE = new RegExp(`^${IDENT}(?:::${IDENT})*$`);
const ENTITY_LITERAL = new RegExp(`^(${IDENT}(?:::${IDENT})*)::"((?:[^"\\\\]|\\\\.)*)"$`);
const CONTEXT_NAME = new RegExp(`^${IDENT}$`);
const HEADER_NAME = /^[a-z0-9!#$%&'*+.^_`|~-]+$/;
const METHOD = /^[A-Z][A-Z0-9_-]*$/;
const TYPES: readonly MappedType[] = ['string', 'long', 'bool'];

/** Reads and parses a mapping file; unreadable is a {@link GatewayMappingError} too. */
export function loadGatewayMapping(file: string): GatewayMapping {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new GatewayMappingError(file, 0, `cannot read the gateway mapping: ${(err as Error).message}`);
  }
  return parseGatewayMapping(text, file);
}

/** The mapping being built, with the line of each single directive (for duplicate errors). */
interface Draft {
  token?: TokenMode;
  anonymous?: { type: string; id: string };
  subjectType?: MappingSource;
  subjectId?: MappingSource;
  subjectProperties: MappedValue[];
  routes: MappingRoute[];
  fallback?: MappingTarget | 'deny';
  context: MappedValue[];
  headers: MappedValue[];
  lines: Map<string, number>;
}

/** Parses mapping text; `file` names it in errors. Throws {@link GatewayMappingError}. */
export function parseGatewayMapping(text: string, file: string): GatewayMapping {
  const draft: Draft = { subjectProperties: [], routes: [], context: [], headers: [], lines: new Map() };
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = i + 1;
    try {
      const words = tokenize(raw);
      if (words.length > 0) directive(draft, words, line);
    } catch (err) {
      if (err instanceof LineError || err instanceof TemplateError)
        throw new GatewayMappingError(file, line, err.message);
      throw err;
    }
  });
  return finish(draft, file);
}

/** A problem on the line being parsed (positioned by {@link parseGatewayMapping}). */
class LineError extends Error {}

/**
 * Splits a line into words at spaces and tabs; `"..."` keeps spaces and `#` inside a word (with
 * `\"` and `\\` escapes, kept as written for the word's own parser); `#` at the start of a word
 * starts a comment.
 */
function tokenize(line: string): string[] {
  const words: string[] = [];
  let word = '';
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (quoted) {
      word += c;
      if (c === '\\' && i + 1 < line.length) word += line[++i];
      else if (c === '"') quoted = false;
    } else if (c === ' ' || c === '\t') {
      if (word) words.push(word);
      word = '';
    } else if (c === '#' && word === '') {
      break;
    } else {
      word += c;
      if (c === '"') quoted = true;
    }
  }
  if (quoted) throw new LineError('a quoted string is not closed');
  if (word) words.push(word);
  return words;
}

type DirectiveParser = (draft: Draft, args: string[], line: number) => void;

const DIRECTIVES: Readonly<Record<string, DirectiveParser>> = {
  token: (d, a, line) => {
    once(d, 'token', line);
    const mode = single(a, 'token', 'required, optional or none');
    if (mode !== 'required' && mode !== 'optional' && mode !== 'none')
      throw new LineError(`token must be required, optional or none, not "${mode}"`);
    d.token = mode;
  },
  anonymous: (d, a, line) => {
    once(d, 'anonymous', line);
    const lit = single(a, 'anonymous', 'an entity such as User::"anonymous"');
    const m = ENTITY_LITERAL.exec(lit);
    if (!m) throw new LineError(`anonymous must be an entity such as User::"anonymous", not ${lit}`);
    d.anonymous = { type: m[1]!, id: unquote(m[2]!) };
  },
  'subject.type': (d, a, line) => {
    once(d, 'subject.type', line);
    d.subjectType = parseSource(single(a, 'subject.type', 'a type or a source such as claim:typ'));
    if (d.subjectType.kind === 'literal' && !ENTITY_TYPE.test(d.subjectType.value))
      throw new LineError(`subject.type "${d.subjectType.value}" is not a Cedar type name`);
  },
  'subject.id': (d, a, line) => {
    once(d, 'subject.id', line);
    d.subjectId = parseSource(single(a, 'subject.id', 'a source such as claim:sub'));
  },
  'subject.property': (d, a, line) => {
    const [name, ...rest] = a;
    if (name === undefined || !CONTEXT_NAME.test(name))
      throw new LineError(`subject.property needs a name (letters, digits, _) and a source, e.g. groups claim:groups`);
    once(d, `subject.property ${name}`, line);
    d.subjectProperties.push(mappedValue(name, rest, line, 'subject.property'));
  },
  route: (d, a, line) => d.routes.push(parseRoute(d, a, line)),
  default: (d, a, line) => {
    once(d, 'default', line);
    d.fallback = a.length === 1 && a[0] === 'deny' ? 'deny' : parseTarget(a, line, REQUEST_PLACEHOLDERS, 'default');
  },
  header: (d, a, line) => {
    const [name, ...rest] = a;
    const lower = name?.toLowerCase();
    if (lower === undefined || !HEADER_NAME.test(lower))
      throw new LineError(`header needs a header name and a source, e.g. header x-burrow-groups claim:groups`);
    // The site decides and annotates; it never rewrites the request (authorization, host, cookies):
    // the broker passes only x-burrow-* headers to a gateway, so any other name would be lost.
    if (!lower.startsWith(SITE_HEADER_PREFIX))
      throw new LineError(
        `header ${lower}: headers a site adds start with ${SITE_HEADER_PREFIX} (e.g. x-burrow-groups)`,
      );
    if (RESERVED_HEADERS.includes(lower)) throw new LineError(`header ${lower} is set by Burrow itself`);
    once(d, `header ${lower}`, line);
    if (rest.length !== 1) throw new LineError(`header ${lower} takes one source (headers are text; no "as")`);
    d.headers.push(mappedValue(lower, rest, line, 'header'));
  },
};

function directive(d: Draft, words: string[], line: number): void {
  const [head, ...args] = words as [string, ...string[]];
  if (head.startsWith('context.')) {
    const name = head.slice('context.'.length);
    if (!CONTEXT_NAME.test(name)) throw new LineError(`"${name}" is not a context name (letters, digits, _)`);
    if (name === RESERVED_CONTEXT) throw new LineError(`context.${RESERVED_CONTEXT} is reserved for action properties`);
    once(d, head, line);
    d.context.push(mappedValue(name, args, line, head));
    return;
  }
  const parse = Object.hasOwn(DIRECTIVES, head) ? DIRECTIVES[head] : undefined;
  if (!parse) {
    throw new LineError(
      `unknown directive "${head}"; known: token, anonymous, subject.type, subject.id, subject.property, ` +
        'route, default, context.<name>, header',
    );
  }
  parse(d, args, line);
}

/** Records that `key` is set on `line`; a second one is a duplicate naming the first. */
function once(d: Draft, key: string, line: number): void {
  const first = d.lines.get(key);
  if (first !== undefined) throw new LineError(`duplicate ${key} (first on line ${first})`);
  d.lines.set(key, line);
}

function single(args: string[], what: string, expected: string): string {
  if (args.length !== 1) throw new LineError(`${what} takes one value: ${expected}`);
  return args[0]!;
}

/** `SOURCE [as TYPE]` for a named value. */
function mappedValue(name: string, args: string[], line: number, what: string): MappedValue {
  if (args.length !== 1 && !(args.length === 3 && args[1] === 'as'))
    throw new LineError(`${what} takes a source and optionally "as string|long|bool"`);
  const as = (args[2] ?? 'string') as MappedType;
  if (!TYPES.includes(as)) throw new LineError(`${what}: "as ${args[2]}" is not one of as string, as long, as bool`);
  return { name, source: parseSource(args[0]!), as, line };
}

/**
 * A source: `claim:<name or dotted.path>`, `header:<name>`, `extension:<name>`, `query:<name>`,
 * `param:<route parameter>`, one
 * of the request fields (method, path, host, scheme, source_principal, source_address), `"text"`,
 * or a bare word without a colon (a literal).
 */
function parseSource(word: string): MappingSource {
  if ((REQUEST_FIELDS as readonly string[]).includes(word)) return { kind: 'request', field: word as RequestField };
  if (word.startsWith('"')) {
    if (word.length < 2 || !word.endsWith('"')) throw new LineError(`literal ${word} is not one quoted string`);
    return { kind: 'literal', value: unquote(word.slice(1, -1)) };
  }
  const colon = word.indexOf(':');
  // A namespaced type (Acme::User) is a literal, not a source prefix.
  if (colon < 0 || ENTITY_TYPE.test(word)) return { kind: 'literal', value: word };
  const prefix = word.slice(0, colon);
  const name = word.slice(colon + 1);
  if (name === '') throw new LineError(`source "${word}" names nothing after "${prefix}:"`);
  switch (prefix) {
    case 'claim':
      return { kind: 'claim', name, path: name.split('.') };
    case 'header':
      return { kind: 'header', name: name.toLowerCase() };
    case 'extension':
    case 'query':
    case 'param':
      return { kind: prefix, name };
    default:
      throw new LineError(
        `unknown source "${word}"; sources: claim:, header:, extension:, query:, param:, ` +
          `${REQUEST_FIELDS.join(', ')}, or a literal (quote it when it has a colon)`,
      );
  }
}

function unquote(s: string): string {
  return s.replace(/\\(.)/g, '$1');
}

/** `route METHODS PATTERN action=... resource=...`; METHODS is `*` or a comma-separated list. */
function parseRoute(d: Draft, args: string[], line: number): MappingRoute {
  const [methodWord, patternWord, ...options] = args;
  if (methodWord === undefined || patternWord === undefined)
    throw new LineError('route takes METHODS PATH action=... resource=Type::"..."');
  const methods = methodWord === '*' ? [] : methodWord.split(',').map((m) => m.toUpperCase());
  for (const m of methods) if (!METHOD.test(m)) throw new LineError(`route: "${m}" is not an HTTP method`);
  const pattern = compilePathPattern(patternWord);
  once(d, `route ${[...methods].sort().join(',') || '*'} ${patternWord}`, line);
  const target = parseTarget(options, line, [...REQUEST_PLACEHOLDERS, ...pattern.params], 'route');
  return { ...target, methods, pattern };
}

/** `action=TEMPLATE resource=Type::"TEMPLATE"`, both required, in any order. */
function parseTarget(options: string[], line: number, known: readonly string[], what: string): MappingTarget {
  const values = new Map<string, string>();
  for (const o of options) {
    const eq = o.indexOf('=');
    const key = eq < 0 ? o : o.slice(0, eq);
    if (eq < 0 || (key !== 'action' && key !== 'resource'))
      throw new LineError(`${what}: "${o}" is not action=... or resource=...`);
    if (values.has(key)) throw new LineError(`${what}: ${key}= is given twice`);
    values.set(key, o.slice(eq + 1));
  }
  const action = values.get('action');
  const resource = values.get('resource');
  if (action === undefined || resource === undefined)
    throw new LineError(`${what} needs action=... and resource=Type::"..."${what === 'default' ? ', or deny' : ''}`);
  const m = ENTITY_LITERAL.exec(resource);
  if (!m) throw new LineError(`${what}: resource=${resource} is not Type::"id template"`);
  const actionText = action.startsWith('"') && action.endsWith('"') ? unquote(action.slice(1, -1)) : action;
  if (actionText === '') throw new LineError(`${what}: action= is empty`);
  return {
    action: compileTemplate(actionText, known),
    resource: { type: m[1]!, id: compileTemplate(unquote(m[2]!), known) },
    line,
  };
}

/** Required directives and the rules across lines. */
function finish(d: Draft, file: string): GatewayMapping {
  const missing = (what: string, example: string): GatewayMappingError =>
    new GatewayMappingError(file, 0, `missing required directive ${what} (e.g. ${example})`);
  if (d.token === undefined) throw missing('token', 'token required');
  if (d.subjectType === undefined) throw missing('subject.type', 'subject.type User');
  if (d.subjectId === undefined) throw missing('subject.id', 'subject.id claim:sub');
  if (d.fallback === undefined) throw missing('default', 'default deny');
  const at = (key: string): number => d.lines.get(key) ?? 0;
  if (d.token === 'optional' && !d.anonymous)
    throw new GatewayMappingError(
      file,
      at('token'),
      'token optional needs an anonymous directive (e.g. anonymous User::"anonymous")',
    );
  if (d.token !== 'optional' && d.anonymous)
    throw new GatewayMappingError(file, at('anonymous'), 'anonymous applies only with token optional');
  if (d.token === 'none') {
    const sources: [number, MappingSource][] = [
      [at('subject.type'), d.subjectType],
      [at('subject.id'), d.subjectId],
      ...[...d.subjectProperties, ...d.context, ...d.headers].map((v): [number, MappingSource] => [v.line, v.source]),
    ];
    const claims = sources.filter(([, s]) => s.kind === 'claim').map(([line]) => line);
    if (claims.length > 0)
      throw new GatewayMappingError(
        file,
        Math.min(...claims),
        'claim: sources need a token; this mapping says token none',
      );
  }
  return {
    file,
    token: d.token,
    anonymous: d.anonymous,
    subjectType: d.subjectType,
    subjectId: d.subjectId,
    subjectProperties: d.subjectProperties,
    routes: d.routes,
    fallback: d.fallback,
    context: d.context,
    headers: d.headers,
  };
}

/** True when the mapping reads a token (a verifier is needed). */
export function mappingNeedsVerifier(m: GatewayMapping): boolean {
  return m.token !== 'none';
}
