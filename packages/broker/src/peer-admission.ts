import type { PeerCertificate, TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  certificateIdentityProblem,
  identityOfPeerCertificate,
  type PeerIdentity,
  type PeerRole,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';

/** What a client presented: the identity its certificate names, if any, and the certificate itself. */
export interface PresentedPeer {
  identity: PeerIdentity | undefined;
  /** The certificate (DER), to say why it names no identity; absent where the listener has none. */
  raw?: Buffer;
}

const certificates = new WeakMap<TLSSocket, PeerCertificate>();

/**
 * The client certificate of a TLS connection, read once per connection: Node builds a whole object
 * (every extension parsed) each time it is asked, and every call on a connection would ask.
 */
export function peerCertificateOf(socket: TLSSocket): PeerCertificate {
  let cert = certificates.get(socket);
  if (!cert) {
    cert = socket.getPeerCertificate();
    certificates.set(socket, cert);
  }
  return cert;
}

/**
 * What the client of a TLS connection presented. A certificate that did not verify (a listener
 * that lets such connections through for enrollment) names no identity, whatever its SANs say;
 * it is kept to explain the refusal.
 */
export function presentedBy(socket: TLSSocket): PresentedPeer {
  const cert = peerCertificateOf(socket);
  return socket.authorized ? presentedPeer(cert) : { identity: undefined, raw: cert?.raw };
}

/** The client certificate of a TLS connection or gRPC call, as {@link checkPeer} reads it. */
export function presentedPeer(cert: PeerCertificate | undefined): PresentedPeer {
  return { identity: identityOfPeerCertificate(cert), raw: cert?.raw };
}

/**
 * Who may use one listener, and how its refusals read (they are part of the interface: clients and
 * operators match on them). One per listener, below.
 */
export interface PeerRule {
  /** The `listener` label of rejected_handshakes_total. */
  listener: 'api' | 'peer' | 'agent';
  role: PeerRole;
  /** What the role's certificate lets its holder do here, and which certificate that takes. */
  may: string;
  required: string;
  /** The refusal when the client presented no certificate that could explain itself. */
  withoutIdentity: string;
  revoked(id: PeerIdentity): string;
  /** The rejected_handshakes_total reason of a revoked certificate (the agent listener tells it apart). */
  revokedReason: 'revoked' | 'wrong_role';
}

/** The caller API (and the AuthZEN binding through it): service certificates call agents. */
export const CALLER_RULE: PeerRule = {
  listener: 'api',
  role: 'service',
  may: 'call agents',
  required: 'a service certificate',
  withoutIdentity: 'client certificate has no Burrow identity',
  revoked: (id) => `certificate ${id.spiffeId} (serial ${id.serialHex}) is revoked`,
  revokedReason: 'wrong_role',
};

/** The broker-to-broker API: other brokers of the trust domain forward calls. */
export const PEER_BROKER_RULE: PeerRule = {
  listener: 'peer',
  role: 'broker',
  may: 'use the peer API',
  required: 'a broker certificate',
  withoutIdentity: 'client certificate has no Burrow identity',
  revoked: (id) => `certificate ${id.spiffeId} is revoked`,
  revokedReason: 'wrong_role',
};

/** The agent listener: agents open tunnels and make their site calls. */
export const AGENT_RULE: PeerRule = {
  listener: 'agent',
  role: 'agent',
  may: 'open tunnels',
  required: 'an agent certificate',
  // With enrollment on, TLS lets a connection without a valid client certificate through (for
  // Enroll only); such a connection has no identity here.
  withoutIdentity:
    'no valid client certificate (missing, expired, or not issued by a trusted CA); ' +
    'enroll again with a new join token',
  revoked: (id) => `certificate of agent "${id.name}" (serial ${id.serialHex}) is revoked`,
  revokedReason: 'revoked',
};

/** What {@link checkPeer} needs of the broker besides the rule. */
export interface PeerAdmissionContext {
  trustDomain: string;
  isRevoked(id: PeerIdentity): boolean;
  metrics: Pick<BrokerMetrics, 'rejectedHandshakes'>;
}

/**
 * The one admission check of every broker listener: the client's certificate must name a Burrow
 * identity of `rule.role`, in the broker's trust domain, not revoked. Returns the identity, or
 * the refusal (PERMISSION_DENIED, counted in rejected_handshakes_total) for the listener to send
 * and log its own way. Synchronous; never throws.
 */
export function checkPeer(
  presented: PresentedPeer,
  rule: PeerRule,
  ctx: PeerAdmissionContext,
): { identity: PeerIdentity } | { refusal: BurrowError } {
  const refuse = (problem: string, reason: string): { refusal: BurrowError } => {
    ctx.metrics.rejectedHandshakes.inc({ listener: rule.listener, reason });
    return { refusal: new BurrowError(Status.PERMISSION_DENIED, problem) };
  };
  const id = presented.identity;
  if (!id) {
    const why = presented.raw ? certificateIdentityProblem(presented.raw) : undefined;
    return refuse(why ? `client certificate has no Burrow identity: ${why}` : rule.withoutIdentity, 'no_identity');
  }
  if (id.role !== rule.role)
    return refuse(`certificate role "${id.role}" may not ${rule.may}; ${rule.required} is required`, 'wrong_role');
  if (id.trustDomain !== ctx.trustDomain)
    return refuse(`certificate trust domain "${id.trustDomain}" is not "${ctx.trustDomain}"`, 'wrong_role');
  if (ctx.isRevoked(id)) return refuse(rule.revoked(id), rule.revokedReason);
  return { identity: id };
}
