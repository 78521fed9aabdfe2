/**
 * The issued-leaf log: every leaf an issuing CA signs, so that `rotate finish` knows when the old
 * CA's last leaf expires, `revoke --agent-id` can list the serials it revokes, and CRLs name the
 * right issuer.
 *
 * `D/issued/<issuingCaId>/<YYYY-MM-DD>.jsonl`, one JSON object per line ({@link IssuedLeafRecord}),
 * appended with O_APPEND. Each record is written by a single write(2) of a few hundred bytes, so
 * concurrent writers (several brokers sharing the directory) never interleave inside a line on a
 * local filesystem; readers skip any line that does not parse anyway. A day's file is no longer
 * appended to after that day (UTC), so once every leaf in it has expired it can be deleted
 * without losing a concurrent append: {@link pruneIssuedLogs} does that.
 */
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { PkiError } from './pki-error';
import type { Role } from './validation';

export const ISSUED_SUBDIR = 'issued';

/** One issued leaf. */
export interface IssuedLeafRecord {
  /** Upper-case hex, as issued. */
  readonly serialHex: string;
  readonly role: Role;
  /** Agent or service name; 'broker' for brokers. */
  readonly name: string;
  readonly issuerCaId: string;
  /** ISO 8601: when it was signed (exact, unlike notBefore which is backdated and whole seconds). */
  readonly issuedAt: string;
  readonly notBefore: string;
  readonly notAfter: string;
}

const knownDirs = new Set<string>();

/** Appends `record` to its CA's log for the issue day. */
export async function appendIssuedLeaf(absDir: string, record: IssuedLeafRecord): Promise<void> {
  const caDir = path.join(absDir, ISSUED_SUBDIR, record.issuerCaId);
  const file = path.join(caDir, `${record.issuedAt.slice(0, 10)}.jsonl`);
  const line = `${JSON.stringify(record)}\n`;
  try {
    if (!knownDirs.has(caDir)) {
      await fs.mkdir(caDir, { recursive: true, mode: 0o700 });
      knownDirs.add(caDir);
    }
    await fs.appendFile(file, line, { mode: 0o644 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') knownDirs.delete(caDir);
    throw new PkiError(`dir: cannot record the issued certificate in ${file} (${(err as Error).message})`, {
      cause: err,
    });
  }
}

/** Every record in `issuingCaId`'s log (empty if it has none). */
export async function readIssuedLeaves(absDir: string, issuingCaId: string): Promise<IssuedLeafRecord[]> {
  const caDir = path.join(absDir, ISSUED_SUBDIR, issuingCaId);
  const names = await fs.readdir(caDir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [] as string[];
    throw err;
  });
  const records: IssuedLeafRecord[] = [];
  for (const name of names.filter((n) => n.endsWith('.jsonl')).sort()) {
    const text = await fs.readFile(path.join(caDir, name), 'utf8').catch(() => '');
    for (const line of text.split('\n')) {
      const record = parseRecord(line);
      if (record !== undefined) records.push(record);
    }
  }
  return records;
}

/** Every record of every CA that has a log. */
export async function readAllIssuedLeaves(absDir: string): Promise<IssuedLeafRecord[]> {
  const ids = await fs.readdir(path.join(absDir, ISSUED_SUBDIR)).catch(() => [] as string[]);
  const all = await Promise.all(ids.map((id) => readIssuedLeaves(absDir, id)));
  return all.flat();
}

/** Leaves of `issuingCaId` still valid at `nowMs`: how many, and the last expiry. */
export async function validLeavesOf(
  absDir: string,
  issuingCaId: string,
  nowMs: number,
): Promise<{ count: number; lastNotAfter?: Date }> {
  let count = 0;
  let last = -Infinity;
  for (const record of await readIssuedLeaves(absDir, issuingCaId)) {
    const notAfterMs = Date.parse(record.notAfter);
    if (notAfterMs > nowMs) {
      count++;
      last = Math.max(last, notAfterMs);
    }
  }
  return count === 0 ? { count } : { count, lastNotAfter: new Date(last) };
}

/**
 * Deletes day files from before yesterday (UTC) whose leaves have all expired by `nowMs`, so
 * the log holds roughly the leaves that are still valid. Best effort; run under the PKI lock.
 */
export async function pruneIssuedLogs(absDir: string, nowMs: number): Promise<void> {
  const root = path.join(absDir, ISSUED_SUBDIR);
  const yesterday = new Date(nowMs - 86_400_000).toISOString().slice(0, 10);
  const ids = await fs.readdir(root).catch(() => [] as string[]);
  for (const id of ids) {
    const caDir = path.join(root, id);
    const names = await fs.readdir(caDir).catch(() => [] as string[]);
    for (const name of names) {
      if (!name.endsWith('.jsonl') || name.slice(0, 10) >= yesterday) continue;
      const text = await fs.readFile(path.join(caDir, name), 'utf8').catch(() => undefined);
      if (text === undefined) continue;
      const live = text.split('\n').some((line) => {
        const record = parseRecord(line);
        return record !== undefined && Date.parse(record.notAfter) > nowMs;
      });
      if (!live) await fs.rm(path.join(caDir, name), { force: true }).catch(() => undefined);
    }
  }
}

function parseRecord(line: string): IssuedLeafRecord | undefined {
  if (line.trim() === '') return undefined;
  try {
    const r = JSON.parse(line) as Partial<IssuedLeafRecord>;
    if (
      typeof r.serialHex === 'string' &&
      typeof r.notAfter === 'string' &&
      typeof r.issuerCaId === 'string' &&
      typeof r.name === 'string'
    ) {
      return r as IssuedLeafRecord;
    }
  } catch {
    // A torn line (crash mid-write): skip it.
  }
  return undefined;
}
