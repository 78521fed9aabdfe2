/**
 * The one place that loads Cedar's WebAssembly build. The package is ESM-first but ships a
 * CommonJS build under `nodejs/`, which is what a CommonJS project can `require`.
 */
import { setFlagsFromString } from 'node:v8';

// V8 11.3 (Node 20) aborts the process ("Fatal error ... unreachable code" in
// Deoptimizer::DoComputeBuiltinContinuation, SIGTRAP) when an optimized function that inlined a
// call into WebAssembly is deoptimized while that call runs and the Wasm function returns a
// reference: every Cedar export does (wasm-bindgen passes JS objects as externref), and Cedar
// calls back into JS to read the request, where anything may invalidate the caller's code. Under
// mixed load the agent died of it within minutes. Turning off only this inlining (the JS side of
// each Cedar call is not inlined into its caller; everything else is) avoids it; set here, before
// any code that calls Cedar is optimized, so that every process evaluating policies (agent,
// broker, tests, the single executable) is covered. test/v8-wasm-deopt.test.ts reproduces it.
setFlagsFromString('--no-turbo-inline-js-wasm-calls');

// eslint-disable-next-line @typescript-eslint/no-require-imports
import cedar = require('@cedar-policy/cedar-wasm/nodejs');

export { cedar };
export type {
  DetailedError,
  Schema,
  EntityJson,
  AuthorizationAnswer,
  StatefulAuthorizationCall,
  Response as CedarResponse,
} from '@cedar-policy/cedar-wasm/nodejs';
