import type { MethodDefinition } from '@grpc/grpc-js';
import { identity } from './grpc-server-hooks';

/**
 * The definition of a bidirectional-streaming method whose messages stay raw bytes (the tunnel's
 * Session, Offer and Forward streams, the brokers' peer Forward): frames are decoded by Burrow,
 * not by grpc-js, so that a malformed frame is a protocol error with a reason.
 */
export function rawBidiMethod(path: string): MethodDefinition<Buffer, Buffer> {
  return {
    path,
    requestStream: true,
    responseStream: true,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  };
}
