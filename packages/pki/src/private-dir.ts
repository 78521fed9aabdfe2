import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { PkiError } from './pki-error';

/**
 * Directories that hold private keys (a PKI directory, `issue --out`, an agent's `--state-dir`)
 * must be mode 0700. A key file is written 0600, but a group- or world-writable directory lets
 * another user rename it away and put their own key (or certificate) in its place, and a readable
 * one lists what is there. Burrow creates such directories 0700; this module also tightens one
 * that already existed with a looser mode.
 */

/** What {@link securePrivateDir} did to a directory. */
export interface PrivateDirOutcome {
  /** Absolute path of the directory. */
  dir: string;
  /** The directory did not exist and was created 0700. */
  created: boolean;
  /** Set when an existing directory was group/world accessible: its old permission bits. */
  tightenedFromMode?: number;
}

/** `0o777` as `0777`, the way `ls -l` users and chmod think of it. */
export function formatMode(mode: number): string {
  return `0${(mode & 0o777).toString(8).padStart(3, '0')}`;
}

/** The one-line notice for a tightened directory (for a CLI's stderr or a log line's message). */
export function describeTightened(outcome: PrivateDirOutcome): string | undefined {
  if (outcome.tightenedFromMode === undefined) return undefined;
  return `tightened ${outcome.dir} from mode ${formatMode(outcome.tightenedFromMode)} to 0700: it holds private keys`;
}

/**
 * Makes `dir` a directory of mode 0700: creates it (and missing parents) if absent, or removes
 * group and other permissions from an existing one (its owner keeps theirs). Rejects with a
 * {@link PkiError} starting with `field` when the path is not a directory, or when a loose
 * directory belongs to another user (this process could not tighten it, and that user could swap
 * the keys): the message names the directory, its mode and both users. Callers report
 * {@link describeTightened} so the operator learns of the change.
 */
export async function securePrivateDir(dir: string, field: string): Promise<PrivateDirOutcome> {
  const abs = path.resolve(dir);
  try {
    await fs.mkdir(abs, { mode: 0o700 });
    return { dir: abs, created: true };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      await fs.mkdir(abs, { recursive: true, mode: 0o700 });
      return { dir: abs, created: true };
    }
    if (code !== 'EEXIST') {
      throw new PkiError(`${field}: cannot create ${dir} (${(err as Error).message})`, { cause: err });
    }
  }
  const st = await fs.stat(abs);
  if (!st.isDirectory()) throw new PkiError(`${field}: ${dir} exists and is not a directory`);
  if ((st.mode & 0o077) === 0) return { dir: abs, created: false };
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new PkiError(
      `${field}: ${dir} is mode ${formatMode(st.mode)} and owned by uid ${st.uid}, not by this user (uid ${uid}): ` +
        'other users could read or replace the keys in it; chmod 700 it as its owner or use another directory',
    );
  }
  await fs.chmod(abs, st.mode & 0o700);
  return { dir: abs, created: false, tightenedFromMode: st.mode & 0o777 };
}

/**
 * {@link securePrivateDir} for a PKI directory and its key sub-directories (`ca/`, `tokens/`),
 * each only if it exists: a missing one is left to the command that creates it (or reports it
 * missing). Returns every directory it tightened.
 */
export async function securePkiDir(dir: string, field = 'dir'): Promise<PrivateDirOutcome[]> {
  const outcomes: PrivateDirOutcome[] = [];
  for (const d of [dir, path.join(dir, 'ca'), path.join(dir, 'tokens')]) {
    const exists = await fs.stat(d).then(
      (s) => s.isDirectory(),
      () => false,
    );
    if (exists) outcomes.push(await securePrivateDir(d, field));
  }
  return outcomes.filter((o) => o.tightenedFromMode !== undefined);
}
