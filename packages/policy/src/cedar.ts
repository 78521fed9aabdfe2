/**
 * The one place that loads Cedar's WebAssembly build. The package is ESM-first but ships a
 * CommonJS build under `nodejs/`, which is what a CommonJS project can `require`.
 */
// eslint-disable-next-line @typescript-eslint/no-require-imports
import cedar = require('@cedar-policy/cedar-wasm/nodejs');

export { cedar };
export type { DetailedError, Schema, EntityJson, AuthorizationAnswer } from '@cedar-policy/cedar-wasm/nodejs';
