import { promises as fs } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { PkiError } from './pki-error';

/** Lock file inside the PKI directory, held while the manifest or the revocation list is rewritten. */
export const LOCK_FILE = '.lock';

/** How long {@link withPkiLock} waits for another holder before giving up. */
const LOCK_WAIT_MS = 10_000;

interface LockOwner {
  pid: number;
  host: string;
  since: string;
}

/**
 * Runs `fn` while holding `D/.lock`, a file created with O_EXCL, so read-modify-write of shared
 * state (pki.json, revocations.json) by several `burrow-pki` processes, or by brokers sharing the
 * directory, is serialised. Hot paths (issuing, consuming tokens, recording agent state) never
 * take it: they only create new files or append.
 *
 * A lock left by a process that died on this host is detected (its pid no longer exists) and
 * broken. A lock held by another host is waited for, up to 10 s, then reported with its owner.
 */
export async function withPkiLock<T>(absDir: string, what: string, fn: () => Promise<T>): Promise<T> {
  const lockPath = path.join(absDir, LOCK_FILE);
  const owner: LockOwner = { pid: process.pid, host: os.hostname(), since: new Date().toISOString() };
  const deadline = Date.now() + LOCK_WAIT_MS;
  let delayMs = 5;
  for (;;) {
    try {
      const handle = await fs.open(lockPath, 'wx', 0o600);
      try {
        await handle.writeFile(JSON.stringify(owner));
      } finally {
        await handle.close();
      }
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new PkiError(`dir: ${absDir} does not exist`, { cause: err });
      }
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = await readOwner(lockPath);
    if (holder !== undefined && isDeadLocalProcess(holder)) {
      // Move the stale lock aside under a unique name, then retry the O_EXCL create. Two
      // processes breaking the same stale lock both succeed in renaming at most once each, and
      // only one of them wins the create that follows.
      const aside = `${lockPath}.stale-${randomBytes(4).toString('hex')}`;
      await fs.rename(lockPath, aside).then(
        () => fs.rm(aside, { force: true }),
        () => undefined,
      );
      continue;
    }
    if (Date.now() >= deadline) {
      const who =
        holder === undefined ? 'another process' : `pid ${holder.pid} on ${holder.host} since ${holder.since}`;
      throw new PkiError(
        `dir: cannot ${what}: ${lockPath} is held by ${who}; retry, or remove the file if that process is gone`,
      );
    }
    // Waiting for another writer, which holds the lock for milliseconds; back off gently.
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    delayMs = Math.min(delayMs * 2, 100);
  }
  try {
    return await fn();
  } finally {
    await fs.rm(lockPath, { force: true });
  }
}

async function readOwner(lockPath: string): Promise<LockOwner | undefined> {
  try {
    const raw = JSON.parse(await fs.readFile(lockPath, 'utf8')) as Partial<LockOwner>;
    if (typeof raw.pid === 'number' && typeof raw.host === 'string' && typeof raw.since === 'string')
      return raw as LockOwner;
  } catch {
    // Missing (released meanwhile) or still being written: treat as held, retry.
  }
  return undefined;
}

function isDeadLocalProcess(owner: LockOwner): boolean {
  if (owner.host !== os.hostname()) return false;
  try {
    process.kill(owner.pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}
