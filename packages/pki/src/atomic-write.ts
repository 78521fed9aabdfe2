import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';

/** Options for {@link writeFileAtomic}. */
export interface AtomicWriteOptions {
  /** File mode for a newly created file (the process umask still applies). Default 0o644. */
  readonly mode?: number;
  /**
   * Fail with an `EEXIST` error instead of replacing an existing file. Implemented with
   * link(2), which, unlike rename(2), refuses to overwrite, so two racing writers cannot both win.
   */
  readonly noClobber?: boolean;
  /**
   * fsync the data before it goes into place (default true). Readers see the old or the new file
   * either way; without it a crash soon after may leave the new name with no data, so pass false
   * only for files whose readers skip an unreadable one (informational state, last writer wins).
   */
  readonly sync?: boolean;
}

/**
 * Writes `data` to `filePath` so that readers see either the old file or the complete new
 * one, never a partial write: the data goes to a temporary file in the same directory
 * (same filesystem, so the final step is atomic), is fsync'd, and is then renamed (or
 * linked, with `noClobber`) into place. The temporary file is created with `mode` from the
 * start, so a private key is never readable by others, not even briefly.
 */
export async function writeFileAtomic(
  filePath: string,
  data: string | Uint8Array,
  options: AtomicWriteOptions = {},
): Promise<void> {
  const mode = options.mode ?? 0o644;
  const dir = path.dirname(filePath);
  const tempPath = path.join(dir, `.${path.basename(filePath)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  let handle: fs.FileHandle | undefined;
  try {
    handle = await fs.open(tempPath, 'wx', mode);
    await handle.writeFile(data);
    // Flush before the rename so a crash cannot leave a renamed but empty file.
    if (options.sync !== false) await handle.sync();
    await handle.close();
    handle = undefined;
    if (options.noClobber) {
      await fs.link(tempPath, filePath);
      await fs.unlink(tempPath);
    } else {
      await fs.rename(tempPath, filePath);
    }
  } catch (err) {
    await handle?.close().catch(() => undefined);
    await fs.unlink(tempPath).catch(() => undefined);
    throw err;
  }
}
