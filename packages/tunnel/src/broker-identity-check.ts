import { checkServerIdentity, type PeerCertificate } from 'node:tls';
import { certificateIdentityProblem, identityOfCertificate } from './identity';

/** Words every refusal by {@link brokerIdentityCheck} starts with after the host (logs, hints, tests). */
export const NOT_A_BROKER = 'is not a Burrow broker';

/**
 * Why the server certificate `raw` (DER) is not a broker of `trustDomain`, naming what it
 * presented; undefined when it is one: exactly one URI SAN, `spiffe://<trustDomain>/broker/<name>`.
 * `trustDomain` undefined accepts a broker of any trust domain.
 */
export function brokerCertificateProblem(raw: Buffer, trustDomain: string | undefined): string | undefined {
  const id = identityOfCertificate(raw);
  if (!id) return certificateIdentityProblem(raw) ?? 'the certificate has no Burrow identity';
  if (id.role !== 'broker') {
    return `it presented ${id.spiffeId}, a${id.role === 'agent' ? 'n' : ''} ${id.role} certificate`;
  }
  if (trustDomain !== undefined && id.trustDomain !== trustDomain) {
    return `it presented ${id.spiffeId}, of trust domain "${id.trustDomain}", not "${trustDomain}"`;
  }
  return undefined;
}

/**
 * The `checkServerIdentity` every Burrow client that dials a broker passes to TLS (grpc-js channel
 * credentials, including the certificate-provider ones the agent and the peer forwarder use, take
 * it in their verify options): the server's certificate must be a broker's of the expected trust
 * domain, and then pass Node's usual hostname check. TLS calls it only after the chain verified,
 * so a certificate from a foreign CA is refused before it gets here. A refusal is an Error
 * `server <host> is not a Burrow broker of trust domain "<td>": <what it presented>`, which ends
 * the handshake: nothing of a call (headers, tokens) is sent.
 *
 * `trustDomain` is read at each handshake (a function) or fixed; undefined accepts any.
 */
export function brokerIdentityCheck(
  trustDomain: string | undefined | (() => string | undefined),
): (host: string, cert: PeerCertificate) => Error | undefined {
  return (host, cert) => {
    const td = typeof trustDomain === 'function' ? trustDomain() : trustDomain;
    const problem = cert.raw ? brokerCertificateProblem(cert.raw, td) : 'it presented no certificate';
    if (problem !== undefined) {
      const of = td === undefined ? '' : ` of trust domain "${td}"`;
      const err = new Error(`server ${host} ${NOT_A_BROKER}${of}: ${problem}`);
      return Object.assign(err, { code: 'ERR_BURROW_NOT_A_BROKER' });
    }
    return checkServerIdentity(host, cert);
  };
}
