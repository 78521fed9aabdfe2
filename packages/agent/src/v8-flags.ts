/**
 * V8 settings the agent process runs with, applied before any other module is loaded (cli.ts
 * imports this file first), so that they hold for all the code V8 compiles afterwards.
 *
 * `--no-turbo-inlining`: on Node 20.20 the agent died of a V8 fatal error ("unreachable code" in
 * Deoptimizer::DoComputeBuiltinContinuation, SIGTRAP) under mixed unary, policy and streaming
 * load: in each of 5 bench runs (`BENCH_CASES=unary,policy,stream`), and in none of 3 with
 * inlining off, at no loss of throughput (README, Performance). The single executable has no way
 * to pass node flags, hence setting it here.
 */
import { setFlagsFromString } from 'node:v8';

setFlagsFromString('--no-turbo-inlining');
