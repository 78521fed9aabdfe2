import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import type { ServiceDefinition } from '@grpc/grpc-js';
import { PROTO_DIR } from './frames';

/** burrow.pki.v1 messages as the code sees them (proto/burrow/pki/v1/enrollment.proto). */
export interface EnrollRequest {
  token: string;
  csrPem: string;
}
export interface RenewRequest {
  csrPem: string;
  bundleVersion: number;
}
export interface IssuedAgentCertificate {
  certificateChainPem: string;
  trustBundlePem: string;
  bundleVersion: number;
  agentId: string;
  spiffeId: string;
}

let root: protobuf.Root | undefined;
function type(name: string): protobuf.Type {
  root ??= protobuf.loadSync(path.join(PROTO_DIR, 'burrow', 'pki', 'v1', 'enrollment.proto'));
  return root.lookupType(name);
}

function codec<T extends object>(name: string): { serialize(v: T): Buffer; deserialize(b: Buffer): T } {
  return {
    serialize: (v) => Buffer.from(type(name).encode(type(name).fromObject(v)).finish()),
    deserialize: (b) => type(name).toObject(type(name).decode(b), { longs: Number, defaults: true }) as T,
  };
}

const enrollReq = codec<EnrollRequest>('burrow.pki.v1.EnrollRequest');
const renewReq = codec<RenewRequest>('burrow.pki.v1.RenewRequest');
const cert = codec<IssuedAgentCertificate>('burrow.pki.v1.Certificate');

/**
 * Why `burrow-agent enroll` cannot work against a broker without a PKI directory: said by the
 * agent (enroll) and logged by the broker, word for word, so either side's log finds the other's.
 */
export const ENROLLMENT_NOT_ENABLED = 'enrollment is not enabled on this broker (start it with --pki-dir)';

/** The Enrollment service for grpc-js clients and servers (served on the broker's agent listener). */
export const ENROLLMENT_SERVICE = {
  enroll: {
    path: '/burrow.pki.v1.Enrollment/Enroll',
    requestStream: false,
    responseStream: false,
    requestSerialize: enrollReq.serialize,
    requestDeserialize: enrollReq.deserialize,
    responseSerialize: cert.serialize,
    responseDeserialize: cert.deserialize,
  },
  renew: {
    path: '/burrow.pki.v1.Enrollment/Renew',
    requestStream: false,
    responseStream: false,
    requestSerialize: renewReq.serialize,
    requestDeserialize: renewReq.deserialize,
    responseSerialize: cert.serialize,
    responseDeserialize: cert.deserialize,
  },
} satisfies ServiceDefinition;
