import * as fs from 'node:fs';
import * as path from 'node:path';
import * as protobuf from 'protobufjs';

/**
 * The `.proto` files inside a single executable (`make agent-binary`).
 *
 * Burrow loads its protos at run time with `protobuf.loadSync(path.join(PROTO_DIR, ...))`. A single
 * executable has no proto/ directory next to it: the build stores every file under proto/ as a Node
 * SEA asset named `proto/<relative path>` plus the list of them as {@link PROTO_MANIFEST_ASSET}.
 * When the process is such an executable, PROTO_DIR becomes {@link EMBEDDED_PROTO_DIR} and protobufjs
 * reads files below it from the assets. Code that loads protos needs no change, including code merged
 * later, and @grpc/proto-loader (which reads through the same protobufjs) works too. Outside a single
 * executable nothing changes: files come from disk.
 */

/** Asset key of the JSON list of embedded proto paths (relative to proto/, `/`-separated). */
export const PROTO_MANIFEST_ASSET = 'proto/index.json';

/**
 * PROTO_DIR inside a single executable. No such directory exists on disk; the path only has to be
 * absolute (protobufjs resolves imports against it) and unmistakable in error messages.
 */
export const EMBEDDED_PROTO_DIR = path.resolve('/', '(burrow-embedded)', 'proto');

/** The asset store of a single executable; `undefined` in a normal Node process. */
export interface AssetSource {
  /** The asset's text, or `undefined` when there is no asset of that key. */
  read(key: string): string | undefined;
}

/**
 * The running single executable's assets (`node:sea`), or `undefined` when this process is plain
 * Node. `isSea()` and assets exist from Node 20.12; on older Node (the packages allow 20.11) the
 * module may be missing or lack them, and such a process is never a Burrow single executable.
 */
export function seaAssets(): AssetSource | undefined {
  let sea: Partial<typeof import('node:sea')>;
  try {
    sea = require('node:sea') as typeof import('node:sea');
  } catch {
    return undefined;
  }
  if (typeof sea.isSea !== 'function' || typeof sea.getAsset !== 'function' || !sea.isSea()) return undefined;
  const getAsset = sea.getAsset;
  return {
    read(key) {
      try {
        return getAsset(key, 'utf8');
      } catch {
        // getAsset throws ERR_SINGLE_EXECUTABLE_APPLICATION_ASSET_NOT_FOUND for an unknown key.
        return undefined;
      }
    },
  };
}

function enoent(file: string): NodeJS.ErrnoException {
  return Object.assign(
    new Error(`ENOENT: no such file or directory, open '${file}' (not embedded in this executable)`),
    { code: 'ENOENT', path: file },
  );
}

type FetchCallback = (err: Error | null, source?: string) => void;
type Fetch = (filename: string, options: unknown, callback?: FetchCallback) => unknown;

/**
 * Makes protobufjs read files below `dir` from `assets` (key `proto/<path below dir>`); other paths
 * still come from disk. protobufjs reads through two seams: `util.fs.readFileSync` (loadSync, which
 * @grpc/proto-loader uses too) and `Root.prototype.fetch` (load); both are wrapped. Returns a
 * function that restores the previous readers (tests use it).
 */
export function serveProtosFromAssets(assets: AssetSource, dir: string = EMBEDDED_PROTO_DIR): () => void {
  const util = protobuf.util as unknown as { fs: Pick<typeof fs, 'readFileSync'> };
  const rootProto = protobuf.Root.prototype as unknown as { fetch: Fetch };
  const previousFs = util.fs;
  const previousFetch = rootProto.fetch;
  const prefix = dir + path.sep;
  /**
   * The embedded text of `file`, `undefined` when it is not below `dir`; throws ENOENT when it should be but is not.
   */
  const lookup = (file: unknown): string | undefined => {
    if (typeof file !== 'string') return undefined;
    const resolved = path.resolve(file);
    if (!resolved.startsWith(prefix)) return undefined;
    const text = assets.read(`proto/${resolved.slice(prefix.length).split(path.sep).join('/')}`);
    if (text === undefined) throw enoent(resolved);
    return text;
  };
  util.fs = {
    readFileSync: ((file: fs.PathOrFileDescriptor, options?: unknown) => {
      const text = lookup(file);
      if (text === undefined) return previousFs.readFileSync(file, options as BufferEncoding);
      return typeof options === 'string' || (options as { encoding?: string } | undefined)?.encoding
        ? text
        : Buffer.from(text, 'utf8');
    }) as typeof fs.readFileSync,
  };
  rootProto.fetch = function fetch(
    this: unknown,
    filename: string,
    options: unknown,
    callback?: FetchCallback,
  ): unknown {
    const cb = (typeof options === 'function' ? options : callback) as FetchCallback | undefined;
    let text: string | undefined;
    try {
      text = lookup(filename);
    } catch (err) {
      if (!cb) return Promise.reject(err);
      process.nextTick(cb, err);
      return undefined;
    }
    if (text === undefined) return previousFetch.call(this, filename, options, callback);
    if (!cb) return Promise.resolve(text);
    process.nextTick(cb, null, text);
    return undefined;
  };
  const restoreImports = resolveImportsFromRoot(dir);
  return () => {
    util.fs = previousFs;
    rootProto.fetch = previousFetch;
    restoreImports();
  };
}

type ResolvePath = (origin: string, target: string) => string | null;

/**
 * Imports inside proto/ name their files from proto/'s root, as `protoc -I proto` reads them (the
 * vendored Envoy protos: `import "envoy/config/core/v3/base.proto"`), where protobufjs resolves an
 * import against the importing file's directory. For a file below `dir`, an import that is neither
 * absolute nor `./` or `../` relative resolves against `dir` instead, so every proto loads on its
 * own (`protobuf.loadSync(path.join(PROTO_DIR, file))`) with its imports. Returns a function that
 * restores the previous resolver.
 */
export function resolveImportsFromRoot(dir: string): () => void {
  const rootProto = protobuf.Root.prototype as unknown as { resolvePath: ResolvePath };
  const previous = rootProto.resolvePath;
  const prefix = dir + path.sep;
  rootProto.resolvePath = function resolvePath(this: unknown, origin: string, target: string): string | null {
    if (origin.startsWith(prefix) && !target.startsWith('.') && !path.isAbsolute(target)) return path.join(dir, target);
    return previous.call(this, origin, target);
  };
  return () => {
    rootProto.resolvePath = previous;
  };
}

/**
 * Where the protos are: `diskDir` in a normal process; in a single executable,
 * {@link EMBEDDED_PROTO_DIR}, after pointing protobufjs at the embedded copies. Either way imports
 * resolve from that directory's root ({@link resolveImportsFromRoot}). Called once, by frames.ts to
 * define PROTO_DIR.
 */
export function resolveProtoDir(diskDir: string, assets: AssetSource | undefined = seaAssets()): string {
  if (!assets) {
    resolveImportsFromRoot(diskDir);
    return diskDir;
  }
  serveProtosFromAssets(assets);
  return EMBEDDED_PROTO_DIR;
}

/**
 * Every `.proto` file Burrow ships, as paths relative to PROTO_DIR (`/`-separated, sorted): from the
 * embedded manifest in a single executable, else by walking `dir`.
 */
export function listProtoFiles(dir: string, assets: AssetSource | undefined = seaAssets()): string[] {
  if (assets) {
    const manifest = assets.read(PROTO_MANIFEST_ASSET);
    if (manifest === undefined) throw new Error(`this executable embeds no ${PROTO_MANIFEST_ASSET}`);
    return (JSON.parse(manifest) as string[]).slice().sort();
  }
  const found: string[] = [];
  const walk = (rel: string): void => {
    for (const entry of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
      const child = rel ? `${rel}/${entry.name}` : entry.name;
      if (entry.isDirectory()) walk(child);
      else if (entry.name.endsWith('.proto')) found.push(child);
    }
  };
  walk('');
  return found.sort();
}
