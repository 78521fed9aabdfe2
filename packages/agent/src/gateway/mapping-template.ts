/**
 * The two small languages inside a gateway mapping line (docs/gateways.md): path patterns
 * (`/packages/{registry}/{name}`, `/admin/*`) that a request path is matched against, and
 * templates (`{registry}/{name}`) that action names and resource ids are made from. Both are
 * compiled once when the mapping loads; matching and rendering are plain loops over the parts,
 * with no regular expression built per request.
 */

/** Names every template may use; route parameters may not take them. */
export const REQUEST_PLACEHOLDERS: readonly string[] = ['method', 'host', 'path'];

const NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** A template problem, positioned by the caller (it knows the line). */
export class TemplateError extends Error {}

/** A compiled template: literal text and placeholder names, in order. */
export interface Template {
  readonly source: string;
  readonly parts: readonly (string | { readonly name: string })[];
}

/**
 * Compiles `text`: `{name}` is a placeholder, any other `{` or `}` is an error. Every placeholder
 * must be one of `known` (the request placeholders plus the route's parameters).
 */
export function compileTemplate(text: string, known: readonly string[]): Template {
  const parts: (string | { name: string })[] = [];
  let literal = '';
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (c === '}') throw new TemplateError(`template "${text}" has a "}" without its "{"`);
    if (c !== '{') {
      literal += c;
      i++;
      continue;
    }
    const end = text.indexOf('}', i);
    if (end < 0) throw new TemplateError(`template "${text}" has a "{" without its "}"`);
    const name = text.slice(i + 1, end);
    if (!NAME.test(name)) throw new TemplateError(`template "${text}" has a bad placeholder "{${name}}"`);
    if (!known.includes(name)) {
      throw new TemplateError(
        `template "${text}" uses {${name}}, which is not one of ${known.map((k) => `{${k}}`).join(', ')}`,
      );
    }
    if (literal) parts.push(literal);
    literal = '';
    parts.push({ name });
    i = end + 1;
  }
  if (literal) parts.push(literal);
  return { source: text, parts };
}

/** The template with its placeholders replaced by `values` (every name was checked at compile time). */
export function renderTemplate(t: Template, values: Readonly<Record<string, string>>): string {
  let out = '';
  for (const p of t.parts) out += typeof p === 'string' ? p : (values[p.name] ?? '');
  return out;
}

/** One segment of a path pattern. */
type PatternSegment =
  | { readonly kind: 'literal'; readonly text: string }
  | { readonly kind: 'param'; readonly name: string }
  | { readonly kind: 'rest'; readonly name?: string };

/** A compiled path pattern. */
export interface PathPattern {
  readonly source: string;
  readonly segments: readonly PatternSegment[];
  /** Parameter names, in order (a nameless `*` has none). */
  readonly params: readonly string[];
}

/**
 * Compiles a path pattern: `/`-separated segments, each a literal, `{name}` (exactly one
 * non-empty segment) or, last only, `{name*}` or `*` (the rest of the path: zero or more
 * segments). Literal segments are compared with the request's percent-decoded segments.
 */
export function compilePathPattern(text: string): PathPattern {
  if (!text.startsWith('/')) throw new TemplateError(`path pattern "${text}" must start with "/"`);
  const raw = text.slice(1).split('/');
  const segments: PatternSegment[] = [];
  const params: string[] = [];
  raw.forEach((s, i) => {
    const last = i === raw.length - 1;
    const seg = patternSegment(text, s, last);
    if (seg.kind !== 'literal' && seg.name !== undefined) {
      if (params.includes(seg.name)) throw new TemplateError(`path pattern "${text}" names {${seg.name}} twice`);
      if (REQUEST_PLACEHOLDERS.includes(seg.name))
        throw new TemplateError(`path pattern "${text}": {${seg.name}} is reserved for the request's ${seg.name}`);
      params.push(seg.name);
    }
    segments.push(seg);
  });
  return { source: text, segments, params };
}

function patternSegment(pattern: string, s: string, last: boolean): PatternSegment {
  const rest = s === '*' || /^\{[A-Za-z_][A-Za-z0-9_]*\*\}$/.test(s);
  if (rest) {
    if (!last) throw new TemplateError(`path pattern "${pattern}": "${s}" (the rest of the path) must come last`);
    return s === '*' ? { kind: 'rest' } : { kind: 'rest', name: s.slice(1, -2) };
  }
  if (s.startsWith('{') && s.endsWith('}')) {
    const name = s.slice(1, -1);
    if (!NAME.test(name)) throw new TemplateError(`path pattern "${pattern}" has a bad parameter "${s}"`);
    return { kind: 'param', name };
  }
  if (s.includes('{') || s.includes('}') || s.includes('*'))
    throw new TemplateError(
      `path pattern "${pattern}": "${s}" mixes text and a parameter; a parameter is a whole segment`,
    );
  return { kind: 'literal', text: s };
}

/**
 * Matches percent-decoded path segments (the path after its leading "/", split on "/") against
 * `pattern`; the parameters' values when it matches, else undefined.
 */
export function matchPath(pattern: PathPattern, segments: readonly string[]): Record<string, string> | undefined {
  const values: Record<string, string> = {};
  const ps = pattern.segments;
  for (let i = 0; i < ps.length; i++) {
    const p = ps[i]!;
    if (p.kind === 'rest') {
      if (p.name !== undefined) values[p.name] = segments.slice(i).join('/');
      return values;
    }
    const s = segments[i];
    if (s === undefined) return undefined;
    if (p.kind === 'literal') {
      if (s !== p.text) return undefined;
    } else {
      if (s === '') return undefined;
      values[p.name] = s;
    }
  }
  return segments.length === ps.length ? values : undefined;
}
