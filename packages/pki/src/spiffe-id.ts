import { PkiError } from './pki-error';
import { assertName, assertRole, assertTrustDomain, type Role } from './validation';

/** The parts of a Burrow SPIFFE ID. `name` is absent for brokers, which share one identity. */
export interface SpiffeIdParts {
  readonly trustDomain: string;
  readonly role: Role;
  readonly name?: string;
}

/**
 * Builds the SPIFFE ID for a workload:
 * `spiffe://<td>/agent/<name>`, `spiffe://<td>/service/<name>`, or `spiffe://<td>/broker`.
 *
 * Brokers carry no name in their ID because every broker replica is interchangeable to
 * agents; they are told apart by their DNS/IP SANs instead.
 *
 * @throws PkiError if the trust domain, role or (for agent/service) name is invalid.
 */
export function spiffeIdFor(trustDomain: string, role: Role, name: string): string {
  assertTrustDomain(trustDomain);
  assertRole(role);
  if (role === 'broker') return `spiffe://${trustDomain}/broker`;
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
  const match = /^spiffe:\/\/([^/]+)\/(broker|agent|service)(?:\/([^/]+))?$/.exec(typeof id === 'string' ? id : '');
  const bad = (): never => {
    throw new PkiError(`spiffeId: not a Burrow SPIFFE ID (got '${String(id)}')`);
  };
  if (match === null) return bad();
  const [, trustDomain, role, name] = match as unknown as [string, string, Role, string | undefined];
  try {
    assertTrustDomain(trustDomain);
    if (role === 'broker') {
      if (name !== undefined) bad();
      return { trustDomain, role };
    }
    assertName(name);
  } catch {
    return bad();
  }
  return { trustDomain, role, name };
}
