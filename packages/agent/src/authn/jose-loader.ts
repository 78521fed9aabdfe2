import type * as Jose from 'jose';
import { pathToFileURL } from 'node:url';

/** The jose module's namespace, as `import * as jose from 'jose'` would give it. */
export type JoseModule = typeof Jose;

// A real dynamic import(). TypeScript compiles `import()` to `require()` under `module: commonjs`,
// which is exactly what fails for an ES module on Node versions without require(esm); a Function
// body is not rewritten.
const importModule = new Function('specifier', 'return import(specifier)') as (specifier: string) => Promise<unknown>;

let loading: Promise<JoseModule> | undefined;

/**
 * Loads jose (ESM-only since v6) from this CommonJS package, once per process.
 *
 * Node 20.19+ (and so the 20.20 Burrow is built on) loads ES modules with `require()` by default,
 * which is synchronous and cheap; older Node 20 releases, or a Node started with
 * `--no-experimental-require-module`, throw ERR_REQUIRE_ESM, and then the module is loaded with a
 * real `import()` of the file `require.resolve` finds (an absolute file URL, so the resolution does
 * not depend on the working directory). Never rejects for a present jose. In the agent binary jose
 * is bundled and the `require` always succeeds (why esbuild's advice to make jose external is not
 * followed: scripts/build-agent-binary.js).
 */
export function loadJose(): Promise<JoseModule> {
  loading ??= (async () => {
    try {
      return require('jose') as JoseModule;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ERR_REQUIRE_ESM' && code !== 'ERR_REQUIRE_ASYNC_MODULE') throw err;
    }
    return (await importModule(pathToFileURL(require.resolve('jose')).href)) as JoseModule;
  })();
  return loading;
}
