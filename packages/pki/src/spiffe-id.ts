import { PkiError } from './pki-error';
import { assertName, assertRole, assertTrustDomain, type Role } from './validation';

/** The parts of a Burrow SPIFFE ID. */
export interface SpiffeIdParts {
  readonly trustDomain: string;
  readonly role: Role;
  readonly name: string;
}

/**
 * Builds the SPIFFE ID for a workload: `spiffe://<td>/<role>/<name>` for agents, services and
 * brokers alike.
 *
 * Brokers carry their name (the broker id) so that a client can tell a broker from every other
 * certificate of the trust domain by the ID alone, and brokers from each other (agents recognise
 * brokers by id).
 *
 * @throws PkiError if the trust domain, role or name is invalid.
 */
export function spiffeIdFor(trustDomain: string, role: Role, name: string): string {
  assertTrustDomain(trustDomain);
  assertRole(role);
  assertName(name);
  return `spiffe://${trustDomain}/${role}/${name}`;
}

/**
 * Parses a Burrow SPIFFE ID (the inverse of {@link spiffeIdFor}), e.g. from a peer
 * certificate's URI SAN. Accepts only the three shapes Burrow issues.
 *
 * @throws PkiError naming the ID if it is not one of them.
 */
export function parseSpiffeId(id: string): SpiffeIdParts {
  const match = /^spiffe:\/\/([^/]+)\/(broker|agent|service)\/([^/]+)$/.exec(typeof id === 'string' ? id : '');
  const bad = (): never => {
    throw new PkiError(`spiffeId: not a Burrow SPIFFE ID (got '${String(id)}')`);
  };
  if (match === null) return bad();
  const [, trustDomain, role, name] = match as unknown as [string, string, Role, string];
  try {
    assertTrustDomain(trustDomain);
    assertName(name);
  } catch {
    return bad();
  }
  return { trustDomain, role, name };
}
