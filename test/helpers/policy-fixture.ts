import { mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import * as winston from 'winston';

// Compiled to test/dist/helpers: the repository root is three levels up.
export const EXAMPLES_DIR = path.resolve(__dirname, '..', '..', '..', 'examples', 'policy');

/**
 * The agent's policy settings for the example site (examples/policy), decision cache off, audit
 * records to `auditLog`; with `schema`, validated against the example schema.
 */
export function examplePolicyConfig(
  auditLog: string,
  schema = false,
): {
  policiesDir: string;
  entitiesFile: string;
  schemaFile?: string;
  cacheTtlMs: number;
  auditLog: string;
} {
  return {
    policiesDir: path.join(EXAMPLES_DIR, 'policies'),
    entitiesFile: path.join(EXAMPLES_DIR, 'entities.json'),
    ...(schema ? { schemaFile: path.join(EXAMPLES_DIR, 'schema.cedarschema') } : {}),
    cacheTtlMs: 0,
    auditLog,
  };
}

/**
 * A throwaway policy set on disk: a temp directory with a `policies/` folder, and optionally an
 * entities file and a schema next to it. Files are replaced atomically (write + rename) unless a
 * test asks for an in-place write.
 */
export class PolicyFixture {
  readonly root = mkdtempSync(path.join(tmpdir(), 'burrow-policy-'));
  readonly policiesDir = path.join(this.root, 'policies');
  readonly entitiesFile = path.join(this.root, 'entities.json');
  readonly schemaFile = path.join(this.root, 'schema.cedarschema');

  constructor(policies: Record<string, string>, entities?: unknown[]) {
    mkdirSync(this.policiesDir);
    for (const [name, text] of Object.entries(policies)) writeFileSync(path.join(this.policiesDir, name), text);
    if (entities) this.writeEntities(entities);
  }

  policyPath(name: string): string {
    return path.join(this.policiesDir, name);
  }

  /** Replaces a policy file the way editors and config tools do: a new file renamed over the old one. */
  replacePolicy(name: string, text: string): void {
    const tmp = path.join(this.root, `.${name}.tmp`);
    writeFileSync(tmp, text);
    renameSync(tmp, this.policyPath(name));
  }

  /** Rewrites a policy file in place (truncate and write, same inode). */
  editPolicyInPlace(name: string, text: string): void {
    writeFileSync(this.policyPath(name), text);
  }

  writeEntities(entities: unknown[]): void {
    const tmp = path.join(this.root, '.entities.tmp');
    writeFileSync(tmp, JSON.stringify(entities, null, 2));
    renameSync(tmp, this.entitiesFile);
  }

  writeSchema(text: string): void {
    writeFileSync(this.schemaFile, text);
  }

  read(file: string): string {
    return readFileSync(file, 'utf8');
  }

  cleanup(): void {
    rmSync(this.root, { recursive: true, force: true });
  }
}

/** A winston logger whose records land in `records`, for asserting on what was logged. */
export function capturingLogger(): { logger: winston.Logger; records: Record<string, unknown>[] } {
  const records: Record<string, unknown>[] = [];
  const stream = new Writable({
    objectMode: true,
    write(chunk: unknown, _enc, done) {
      records.push(chunk as Record<string, unknown>);
      done();
    },
  });
  const logger = winston.createLogger({ level: 'debug', transports: [new winston.transports.Stream({ stream })] });
  return { logger, records };
}

/** Shorthand for an entity in Cedar's JSON entity format. */
export function entity(
  type: string,
  id: string,
  attrs: Record<string, unknown> = {},
  parents: [string, string][] = [],
): unknown {
  return { uid: { type, id }, attrs, parents: parents.map(([t, i]) => ({ type: t, id: i })) };
}

/** Shorthand for an AuthZEN request. */
export function request(
  subject: string,
  action: string,
  resource: string,
  extra: Record<string, unknown> = {},
): Record<string, unknown> {
  const [st, sid] = subject.split(':');
  const [rt, rid] = resource.split(':');
  return { subject: { type: st, id: sid }, action: { name: action }, resource: { type: rt, id: rid }, ...extra };
}
