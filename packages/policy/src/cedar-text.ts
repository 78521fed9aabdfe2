/**
 * Small helpers over Cedar policy text: splitting a file into its policies (so each gets its own
 * id and source location) and turning byte offsets from Cedar's errors into line:column.
 */

/** One policy statement cut out of a file: its text and where it starts. */
export interface PolicyStatement {
  text: string;
  /** Offset of the first character of the statement in the file (its first annotation or effect). */
  offset: number;
}

/**
 * Splits policy text at top-level `;` into statements. Cedar has no block comments and `;` only
 * ends a policy, so a scanner that skips string literals (with backslash escapes) and `//` comments
 * is enough. Call it only on text Cedar has parsed; it does not check syntax.
 */
export function splitPolicyStatements(text: string): PolicyStatement[] {
  const statements: PolicyStatement[] = [];
  let start = -1;
  let i = 0;
  while (i < text.length) {
    const ch = text[i]!; // i < text.length
    if (ch === '/' && text[i + 1] === '/') {
      const eol = text.indexOf('\n', i);
      i = eol < 0 ? text.length : eol + 1;
      continue;
    }
    if (/\s/.test(ch)) {
      i++;
      continue;
    }
    if (start < 0) start = i;
    if (ch === '"') {
      i++;
      while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
      i++;
      continue;
    }
    if (ch === ';') {
      statements.push({ text: text.slice(start, i + 1), offset: start });
      start = -1;
    }
    i++;
  }
  return statements;
}

/**
 * 1-based line and column of `offset` in `text` (Cedar reports offsets in UTF-16 units of the JS string it was given).
 */
export function lineColumnAt(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  const end = Math.max(0, Math.min(offset, text.length));
  for (let i = 0; i < end; i++) {
    if (text.charCodeAt(i) === 10) {
      line++;
      lineStart = i + 1;
    }
  }
  return { line, column: end - lineStart + 1 };
}

// Identifiers Cedar reserves; they cannot name an entity type.
const RESERVED = new Set(['true', 'false', 'if', 'then', 'else', 'in', 'is', 'like', 'has', '__cedar']);
const IDENT = /^[_a-zA-Z][_a-zA-Z0-9]*$/;

/** True when `name` is a Cedar entity type name: identifiers joined by `::`, none reserved. */
export function isCedarTypeName(name: string): boolean {
  if (name === '') return false;
  return name.split('::').every((part) => IDENT.test(part) && !RESERVED.has(part));
}

/** The Cedar literal of an entity uid, as policies write it: `User::"alice"`. */
export function entityLiteral(type: string, id: string): string {
  return `${type}::${JSON.stringify(id)}`;
}
