import { status as Status } from '@grpc/grpc-js';
import { BurrowError, toBurrowError } from '@burrow/tunnel';

/**
 * The gRPC status for what an engine (token verifier, policy engine) threw. Engines report bad
 * input with their own error types; anything carrying a gRPC code (numeric or its name) keeps it,
 * the rest is INTERNAL with the message.
 */
export function engineError(err: unknown, what: string): BurrowError {
  const code = (err as { code?: unknown } | undefined)?.code;
  if (typeof code === 'string' && code in Status) {
    return new BurrowError((Status as unknown as Record<string, number>)[code]!, (err as Error).message, err);
  }
  const e = toBurrowError(err, what);
  return e.code === Status.UNKNOWN ? new BurrowError(Status.INTERNAL, e.message, err) : e;
}
