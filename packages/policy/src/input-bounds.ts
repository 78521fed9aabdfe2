import { PolicyInputError } from './policy-input';

/**
 * Bounds on one policy request (an AuthZEN evaluation or evaluations batch), checked before it is
 * decoded, converted or evaluated, so that its cost is bounded whatever a caller sends: a 1 M-element
 * set once cost the agent 3.9 s of CPU and delayed its other calls to 2.2 s.
 *
 * A real request is a subject, an action, a resource and a context of a few attributes: a few hundred
 * bytes, depth 4 to 6, tens of values. The bounds leave room for batches of a hundred such items
 * with properties, and keep the worst case in the low milliseconds.
 */
export const POLICY_INPUT_LIMITS = {
  /** Largest AuthZEN HTTP request body (JSON). 64 KiB. */
  maxBodyBytes: 64 * 1024,
  /**
   * Largest request message of the gRPC PolicyDecisionService (protobuf). 256 KiB: a Struct number
   * takes 11 bytes where JSON often needs 2, so the same request is larger here; this holds
   * `maxElements` values of any kind, and decoding it takes well under a millisecond.
   */
  maxMessageBytes: 256 * 1024,
  /** Deepest nesting of objects and arrays; the request object itself is depth 1. */
  maxDepth: 16,
  /** Most values in the request: every object member and array item, at any depth. */
  maxElements: 10_000,
} as const;

/** The bounds {@link checkInputBounds} applies; every field defaults to {@link POLICY_INPUT_LIMITS}. */
export interface PolicyInputLimits {
  maxDepth?: number;
  maxElements?: number;
}

/**
 * Throws {@link PolicyInputError} (INVALID_ARGUMENT) when `input` nests deeper than `maxDepth` or holds
 * more than `maxElements` values, naming the bound and the path where it was crossed. Iterative (no
 * recursion, so no stack to exhaust) and stops at the first crossing: its cost is bounded by the
 * limits, not by the input.
 */
export function checkInputBounds(input: unknown, limits: PolicyInputLimits = {}): void {
  const maxDepth = limits.maxDepth ?? POLICY_INPUT_LIMITS.maxDepth;
  const maxElements = limits.maxElements ?? POLICY_INPUT_LIMITS.maxElements;
  const stack: { value: unknown; depth: number; path: string }[] = [{ value: input, depth: 1, path: 'request' }];
  let elements = 0;
  for (let top = stack.pop(); top !== undefined; top = stack.pop()) {
    const { value, depth } = top;
    // Keys can be long; a message names where, not the whole key.
    const path = top.path.length > 200 ? `${top.path.slice(0, 197)}...` : top.path;
    if (typeof value !== 'object' || value === null) continue;
    if (depth > maxDepth) {
      const message = `${path} is nested ${depth} deep; policy requests may nest at most ${maxDepth} levels`;
      throw new PolicyInputError(path, message);
    }
    const keys = Array.isArray(value) ? undefined : Object.keys(value);
    // Counted before the children are listed, so that a huge array costs nothing more.
    elements += keys ? keys.length : (value as unknown[]).length;
    if (elements > maxElements) {
      const message =
        `the request holds more than ${maxElements} values (at ${path}); ` +
        `policy requests may hold at most ${maxElements}`;
      throw new PolicyInputError(path, message);
    }
    const next = depth + 1;
    const record = value as Record<string, unknown>;
    if (keys) for (const k of keys) stack.push({ value: record[k], depth: next, path: `${path}.${k}` });
    else
      (value as unknown[]).forEach((v, i) => {
        stack.push({ value: v, depth: next, path: `${path}[${i}]` });
      });
  }
}
