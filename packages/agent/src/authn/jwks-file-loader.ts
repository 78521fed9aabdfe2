import { watch, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import type { JwksLoader } from './jwks-source';

/** Largest JWKS file read: a key set is a few KiB; anything near this is the wrong file. */
export const MAX_JWKS_BYTES = 1024 * 1024;
// Editors and config managers write a file in several steps; one reload after they settle.
const SETTLE_MS = 50;

/**
 * Reads an air-gapped site's JWKS from a file and reports changes. The directory is watched, not
 * the file: tools that replace a file atomically (rename over it, Kubernetes ConfigMap symlink
 * swaps) leave a watch on the old inode silent. Any event in the directory triggers a reload; the
 * source compares digests, so unrelated files cost one read.
 */
export class JwksFileLoader implements JwksLoader {
  readonly description: string;

  constructor(private readonly file: string) {
    this.description = `jwks ${file}`;
  }

  async load(): Promise<Buffer> {
    let bytes: Buffer;
    try {
      bytes = await readFile(this.file);
    } catch (err) {
      throw new Error(`cannot read ${this.file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    if (bytes.length > MAX_JWKS_BYTES)
      throw new Error(`${this.file} is ${bytes.length} bytes, larger than a JWKS can be (${MAX_JWKS_BYTES})`);
    return bytes;
  }

  watch(changed: () => void): () => void {
    let settle: NodeJS.Timeout | undefined;
    let watcher: FSWatcher | undefined;
    const name = basename(this.file);
    try {
      watcher = watch(dirname(this.file), { persistent: false }, (_event, filename) => {
        // Names other than the file's matter too (a ConfigMap swaps a `..data` symlink), but a
        // directory full of unrelated churn should not cause a read per event.
        if (filename !== null && filename !== name && !filename.startsWith('..')) return;
        clearTimeout(settle);
        settle = setTimeout(changed, SETTLE_MS);
      });
      // A watcher that fails later (directory removed) leaves the last keys in place; the
      // background reload still runs.
      watcher.on('error', () => watcher?.close());
    } catch {
      // No inotify (some containers): the background reload and unknown-key reloads still work.
    }
    return () => {
      clearTimeout(settle);
      watcher?.close();
    };
  }
}
