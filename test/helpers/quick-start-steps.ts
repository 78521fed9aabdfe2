/**
 * Reads the steps of the README's quick start out of its Markdown, so a test can run them as written.
 *
 * Every fenced block of the section carries an HTML comment (invisible on GitHub) right before it that
 * says what to do with it:
 *
 *   <!-- quick-start: run -->                                      terminal 1: run it, in one long-lived shell
 *   <!-- quick-start: expect /REGEX/FLAGS -->                      (repeatable) its output must match
 *   <!-- quick-start: background NAME; ready when URL answers 200 -->
 *   <!-- quick-start: background NAME; ready when the output matches /REGEX/ -->
 *                                                                  a terminal of its own, left running
 *   <!-- quick-start: not run: REASON -->                          shown to readers only
 *   <!-- quick-start: interrupt NAME... -->                        (alone) Ctrl-C in those terminals, in order
 *
 * A block without a marker, a marker not followed by a block, or a marker this parser does not know
 * throws: a README edit cannot silently drop a command from the test.
 */

/** What to wait for before the steps after a background process may run. */
export type Readiness = { url: string } | { output: RegExp };

export type QuickStartStep =
  | { kind: 'run'; line: number; script: string; expect: RegExp[] }
  | { kind: 'background'; line: number; name: string; script: string; ready: Readiness; expect: RegExp[] }
  | { kind: 'interrupt'; line: number; names: string[] };

const MARKER = /^<!--\s*quick-start:\s*(.*?)\s*-->$/;
const FENCE = /^```(\S*)\s*$/;
const BACKGROUND =
  /^background ([a-z][a-z0-9-]*); ready when (?:(https?:\/\/\S+) answers 200|the output matches (\/.*))$/;

/** `/source/flags` as written in a marker, to a RegExp; throws on anything else. */
function regexLiteral(text: string, where: string): RegExp {
  const m = /^\/(.+)\/([dgimsuy]*)$/.exec(text.trim());
  if (!m?.[1]) throw new Error(`${where}: "${text}" is not a /regex/flags literal`);
  return new RegExp(m[1], m[2]);
}

interface Pending {
  line: number;
  kind?: { run: true } | { background: string; ready: Readiness } | { notRun: string };
  expect: RegExp[];
}

/**
 * The steps of the section headed `## <heading>` of `markdown`, in order. `file` names the document in
 * error messages (`README.md:42: ...`).
 */
export function quickStartSteps(markdown: string, heading = 'Quick start', file = 'README.md'): QuickStartStep[] {
  const lines = markdown.split(/\r?\n/);
  const start = lines.findIndex((l) => l.trim() === `## ${heading}`);
  if (start < 0) throw new Error(`${file} has no "## ${heading}" section`);
  const steps: QuickStartStep[] = [];
  const names = new Set<string>();
  let pending: Pending | undefined;
  for (let i = start + 1; i < lines.length; i++) {
    const text = lines[i] ?? '';
    const where = `${file}:${i + 1}`;
    if (/^## /.test(text)) break;
    const marker = MARKER.exec(text.trim());
    if (marker) {
      const body = marker[1] ?? '';
      if (body.startsWith('interrupt ')) {
        if (pending) throw new Error(`${file}:${pending.line}: marker not followed by a code block`);
        const stop = body.slice('interrupt '.length).trim().split(/\s+/);
        for (const name of stop)
          if (!names.has(name)) throw new Error(`${where}: interrupt names "${name}", which no step started`);
        steps.push({ kind: 'interrupt', line: i + 1, names: stop });
        continue;
      }
      pending ??= { line: i + 1, expect: [] };
      let kind: Pending['kind'];
      const background = BACKGROUND.exec(body);
      if (body === 'run') kind = { run: true };
      else if (body.startsWith('not run:')) kind = { notRun: body.slice('not run:'.length).trim() };
      else if (background?.[1]) {
        const ready: Readiness = background[2]
          ? { url: background[2] }
          : { output: regexLiteral(background[3] ?? '', where) };
        kind = { background: background[1], ready };
      } else if (body.startsWith('expect ')) pending.expect.push(regexLiteral(body.slice('expect '.length), where));
      else throw new Error(`${where}: unknown quick-start marker "${body}"`);
      if (kind) {
        if (pending.kind) throw new Error(`${where}: a second run/background/not-run marker for one block`);
        pending.kind = kind;
      }
      continue;
    }
    const fence = FENCE.exec(text);
    if (fence) {
      const lang = fence[1] ?? '';
      const body: string[] = [];
      let end = i + 1;
      while (end < lines.length && !/^```\s*$/.test(lines[end] ?? '')) body.push(lines[end++] ?? '');
      if (end >= lines.length) throw new Error(`${where}: code block never closed`);
      const block = pending;
      const line = i + 1;
      pending = undefined;
      i = end;
      if (!block?.kind)
        throw new Error(`${where}: code block without a <!-- quick-start: run|background|not run --> marker`);
      if ('notRun' in block.kind) {
        if (block.expect.length > 0) throw new Error(`${where}: "expect" on a block that is not run`);
        continue;
      }
      if (lang !== 'sh') throw new Error(`${where}: a block the test runs must be \`\`\`sh, not "${lang}"`);
      const script = body.join('\n');
      if ('run' in block.kind) steps.push({ kind: 'run', line, script, expect: block.expect });
      else {
        const name = block.kind.background;
        if (names.has(name)) throw new Error(`${where}: a second background step named "${name}"`);
        names.add(name);
        steps.push({ kind: 'background', line, name, script, ready: block.kind.ready, expect: block.expect });
      }
      continue;
    }
    if (pending && text.trim() !== '') throw new Error(`${file}:${pending.line}: marker not followed by a code block`);
  }
  if (pending) throw new Error(`${file}:${pending.line}: marker not followed by a code block`);
  return steps;
}
