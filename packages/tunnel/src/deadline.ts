import type { Deadline } from '@grpc/grpc-js';

/**
 * A gRPC deadline as milliseconds since the epoch: grpc-js gives a call's deadline as a `Date` or
 * a number (`Infinity` when the client set none), and every wait Burrow computes is in ms.
 */
export function deadlineMsOf(call: { getDeadline(): Deadline }): number {
  const deadline = call.getDeadline();
  return deadline instanceof Date ? deadline.getTime() : deadline;
}
