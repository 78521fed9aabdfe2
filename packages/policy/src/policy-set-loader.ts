import { readFile, readdir } from 'node:fs/promises';
import * as path from 'node:path';
import { cedar, type DetailedError, type Schema } from './cedar';
import { lineColumnAt, splitPolicyStatements } from './cedar-text';
import { EntityStore, collectEntityRefs, toEntityRecord, type EntityRecord } from './entity-store';
import { sha256Hex } from './policy-input';

/** Where a policy set comes from. */
export interface PolicySources {
  /** Directory whose `*.cedar` files (not subdirectories) hold the policies. */
  policiesDir: string;
  /** Cedar JSON entity file. */
  entitiesFile?: string;
  /** Cedar schema, JSON (starts with `{`) or the human-readable format; policies are validated against it. */
  schemaFile?: string;
}

/** One problem found while loading: a file and, when Cedar gives one, the line and column. */
export interface PolicyIssue {
  file: string;
  line?: number;
  column?: number;
  message: string;
}

/** `file:line:column: message`, the form editors and compilers use. */
export function formatPolicyIssue(issue: PolicyIssue): string {
  const where = issue.line === undefined ? issue.file : `${issue.file}:${issue.line}:${issue.column ?? 1}`;
  return `${where}: ${issue.message}`;
}

/**
 * A policy set that cannot be loaded. `message` is one line (the first issue, and how many more);
 * `issues` has them all.
 */
export class PolicyLoadError extends Error {
  override readonly name = 'PolicyLoadError';
  constructor(readonly issues: PolicyIssue[]) {
    super(
      issues.length === 0
        ? 'policy set failed to load'
        : `${formatPolicyIssue(issues[0]!)}${issues.length > 1 ? ` (and ${issues.length - 1} more)` : ''}`,
    );
  }
}

interface SourceText {
  path: string;
  text: string;
}

/** The raw text of every source, read once per load; `fingerprint` tells whether anything changed. */
export interface PolicyInputs {
  policyFiles: (SourceText & { name: string })[];
  entities?: SourceText;
  schema?: SourceText;
  fingerprint: string;
}

/** One policy of the set, with where it was written. */
export interface CompiledPolicy {
  /** `<file name>#<index in file>`, or the value of its `@id("...")` annotation. */
  id: string;
  effect: 'permit' | 'forbid';
  file: string;
  line: number;
  column: number;
  text: string;
  /** Its `@advice("...")` annotation: a word returned with the decisions it decides (docs/policy.md). */
  advice?: string;
  /** Its `@reason("...")` annotation: why, in words, returned with the decisions it decides. */
  reason?: string;
  /** Its place in the set (files in name order, policies in file order): advice comes in this order. */
  order: number;
}

/** A parsed and validated policy set with its entity data, ready to be activated. */
export interface CompiledPolicySet {
  policies: CompiledPolicy[];
  byId: Map<string, CompiledPolicy>;
  entities: EntityStore;
  schema?: Schema;
  /** Keys of entities named literally in policy conditions (their attributes may be read by any decision). */
  literalEntityKeys: Set<string>;
  /** True when some policy carries @advice or @reason (decisions look them up only then). */
  annotated: boolean;
  /** Validator warnings, formatted; the set is still usable. */
  warnings: string[];
  fingerprint: string;
}

async function readSource(file: string): Promise<SourceText> {
  try {
    return { path: file, text: await readFile(file, 'utf8') };
  } catch (err) {
    throw new PolicyLoadError([
      { file, message: `cannot read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}` },
    ]);
  }
}

/**
 * Reads every source of a policy set. Throws {@link PolicyLoadError} naming the file when one
 * cannot be read (missing directory, permissions, a file removed while reading).
 */
export async function readPolicyInputs(sources: PolicySources): Promise<PolicyInputs> {
  let names: string[];
  try {
    names = (await readdir(sources.policiesDir, { withFileTypes: true }))
      // A symlink to a file counts (Kubernetes ConfigMaps mount files as symlinks).
      .filter((d) => (d.isFile() || d.isSymbolicLink()) && d.name.endsWith('.cedar') && !d.name.startsWith('.'))
      .map((d) => d.name)
      .sort();
  } catch (err) {
    throw new PolicyLoadError([
      {
        file: sources.policiesDir,
        message: `cannot read policy directory: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
      },
    ]);
  }
  const policyFiles = await Promise.all(
    names.map(async (name) => ({ name, ...(await readSource(path.join(sources.policiesDir, name))) })),
  );
  const entities = sources.entitiesFile ? await readSource(sources.entitiesFile) : undefined;
  const schema = sources.schemaFile ? await readSource(sources.schemaFile) : undefined;
  const fingerprint = sha256Hex(
    JSON.stringify([policyFiles.map((f) => [f.name, f.text]), entities?.text ?? null, schema?.text ?? null]),
  );
  return { policyFiles, entities, schema, fingerprint };
}

function cedarIssue(file: string, text: string | undefined, err: DetailedError, baseOffset = 0): PolicyIssue {
  const message = err.help ? `${err.message} (${err.help})` : err.message;
  const loc = err.sourceLocations?.[0];
  if (!loc || text === undefined) return { file, message };
  return { file, message, ...lineColumnAt(text, baseOffset + loc.start) };
}

function jsonIssue(file: string, text: string, err: Error): PolicyIssue {
  const pos = /position (\d+)/.exec(err.message);
  const message = `invalid JSON: ${err.message}`;
  if (pos) return { file, message, ...lineColumnAt(text, Number(pos[1])) };
  // V8 gives no position for a truncated document; the end of the text is where it broke.
  if (/end of JSON input/.test(err.message)) return { file, message, ...lineColumnAt(text, text.length) };
  return { file, message };
}

function parseSchema(source: SourceText, issues: PolicyIssue[]): Schema | undefined {
  let schema: Schema = source.text;
  if (source.text.trimStart().startsWith('{')) {
    try {
      schema = JSON.parse(source.text) as Schema;
    } catch (err) {
      issues.push(jsonIssue(source.path, source.text, err as Error));
      return undefined;
    }
  }
  const answer = cedar.checkParseSchema(schema);
  if (answer.type === 'failure') {
    for (const e of answer.errors)
      issues.push(cedarIssue(source.path, typeof schema === 'string' ? source.text : undefined, e));
    return undefined;
  }
  return schema;
}

/** What an @advice annotation may say: it travels in a comma-separated header (x-burrow-advice). */
const ADVICE_WORD = /^[A-Za-z0-9_.-]{1,64}$/;

interface FilePolicy extends CompiledPolicy {
  offset: number;
  fileText: string;
}

function compileFile(
  file: SourceText & { name: string },
  issues: PolicyIssue[],
  literalKeys: Set<string>,
): FilePolicy[] {
  const parsed = cedar.checkParsePolicySet({ staticPolicies: file.text });
  if (parsed.type === 'failure') {
    for (const e of parsed.errors) issues.push(cedarIssue(file.path, file.text, e));
    return [];
  }
  const statements = splitPolicyStatements(file.text);
  const out: FilePolicy[] = [];
  statements.forEach((stmt, index) => {
    const where = lineColumnAt(file.text, stmt.offset);
    const json = cedar.policyToJson(stmt.text);
    if (json.type === 'failure') {
      // Cedar parsed the file, so a statement that is not a static policy is a template (a `?principal` or `?resource`
      // slot).
      issues.push({
        file: file.path,
        ...where,
        message: 'policy templates (?principal / ?resource slots) are not supported; write a static policy',
      });
      return;
    }
    // Entities named in the scope (`principal in Group::"admins"`) need not be passed: an `in`
    // test reads the request entity's ancestors. Only literals in conditions can have their
    // attributes or ancestors read (`Settings::"global".open`), so only those join every slice.
    collectEntityRefs(json.json.conditions, literalKeys);
    const annotations = json.json.annotations ?? {};
    const annotated = annotations.id;
    const advice = annotations.advice;
    if (advice !== undefined && !ADVICE_WORD.test(advice)) {
      issues.push({
        file: file.path,
        ...where,
        message: `@advice("${advice}") must be one word (letters, digits, "-", "_", "."), e.g. @advice("quarantine")`,
      });
      return;
    }
    out.push({
      id: annotated !== undefined ? annotated : `${file.name}#${index}`,
      advice,
      reason: annotations.reason,
      order: 0,
      effect: json.json.effect,
      file: file.path,
      line: where.line,
      column: where.column,
      text: stmt.text,
      offset: stmt.offset,
      fileText: file.text,
    });
  });
  return out;
}

function loadEntities(source: SourceText, schema: Schema | undefined, issues: PolicyIssue[]): EntityStore | undefined {
  let raw: unknown;
  try {
    raw = JSON.parse(source.text);
  } catch (err) {
    issues.push(jsonIssue(source.path, source.text, err as Error));
    return undefined;
  }
  if (!Array.isArray(raw)) {
    issues.push({
      file: source.path,
      message: 'must be a JSON array of entities ({"uid": {"type", "id"}, "attrs", "parents"})',
    });
    return undefined;
  }
  const answer = cedar.checkParseEntities({ entities: raw as never, schema: schema ?? null });
  if (answer.type === 'failure') {
    for (const e of answer.errors)
      issues.push({ file: source.path, message: e.help ? `${e.message} (${e.help})` : e.message });
    return undefined;
  }
  const records: EntityRecord[] = [];
  for (const [i, entity] of raw.entries()) {
    const record = toEntityRecord(entity);
    if (!record) {
      issues.push({ file: source.path, message: `entity [${i}] is not in the Cedar JSON entity format` });
      return undefined;
    }
    records.push(record);
  }
  try {
    return new EntityStore(records);
  } catch (err) {
    issues.push({ file: source.path, message: (err as Error).message });
    return undefined;
  }
}

/**
 * Parses and validates a policy set: every policy file, the schema (policies are validated
 * against it in strict mode), the entity data (checked against the schema). Policy ids are
 * `<file name>#<index>` unless annotated `@id("...")`; a duplicate id is an error naming both
 * places. Throws {@link PolicyLoadError} with every issue found, each with file and line:column
 * when Cedar reports a location. Pure: touches no Cedar state shared between calls.
 */
export function compilePolicySet(inputs: PolicyInputs): CompiledPolicySet {
  const issues: PolicyIssue[] = [];
  const schema = inputs.schema ? parseSchema(inputs.schema, issues) : undefined;
  const literalKeys = new Set<string>();
  const policies: FilePolicy[] = [];
  const byId = new Map<string, FilePolicy>();
  for (const file of inputs.policyFiles) {
    for (const policy of compileFile(file, issues, literalKeys)) {
      const first = byId.get(policy.id);
      if (first) {
        issues.push({
          file: policy.file,
          line: policy.line,
          column: policy.column,
          message: `policy id "${policy.id}" is already used at ${first.file}:${first.line}`,
        });
        continue;
      }
      policy.order = policies.length;
      byId.set(policy.id, policy);
      policies.push(policy);
    }
  }
  const warnings: string[] = [];
  if (schema !== undefined && inputs.schema && issues.length === 0) {
    const staticPolicies: Record<string, string> = {};
    for (const p of policies) staticPolicies[p.id] = p.text;
    const answer = cedar.validate({ schema, policies: { staticPolicies }, validationSettings: { mode: 'strict' } });
    if (answer.type === 'failure') {
      for (const e of answer.errors) issues.push(cedarIssue(inputs.schema.path, undefined, e));
    } else {
      const located = (v: { policyId: string; error: DetailedError }): PolicyIssue => {
        const p = byId.get(v.policyId);
        return p
          ? {
              ...cedarIssue(p.file, p.fileText, v.error, p.offset),
              message: `policy ${p.id}: ${cedarIssue(p.file, undefined, v.error).message}`,
            }
          : { file: inputs.schema!.path, message: v.error.message };
      };
      for (const v of answer.validationErrors) issues.push(located(v));
      for (const v of answer.validationWarnings) warnings.push(formatPolicyIssue(located(v)));
    }
  }
  const entities = inputs.entities ? loadEntities(inputs.entities, schema, issues) : new EntityStore([]);
  if (issues.length > 0 || !entities) throw new PolicyLoadError(issues);
  const clean = policies.map(({ offset: _o, fileText: _t, ...p }) => p);
  return {
    policies: clean,
    byId: new Map(clean.map((p) => [p.id, p])),
    entities,
    schema,
    literalEntityKeys: literalKeys,
    annotated: clean.some((p) => p.advice !== undefined || p.reason !== undefined),
    warnings,
    fingerprint: inputs.fingerprint,
  };
}

/** Reads and compiles in one step: what `burrow-agent policy check` and a reload do. */
export async function loadPolicySet(sources: PolicySources): Promise<CompiledPolicySet> {
  return compilePolicySet(await readPolicyInputs(sources));
}
