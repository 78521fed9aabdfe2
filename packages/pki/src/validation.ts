import { isIP } from 'node:net';
// The file, not the package index: the PKI library must not load the gRPC stack.
import { ID_PATTERN, idProblem } from '@burrow/tunnel/dist/ids';
import { PkiError } from './pki-error';

/** The kinds of workload Burrow issues certificates to. */
export type Role = 'broker' | 'agent' | 'service';

/** All roles, in the order shown in help text. */
export const ROLES: readonly Role[] = ['broker', 'agent', 'service'];

/**
 * Agent, service and broker names: Burrow's one id grammar, defined in @burrow/tunnel (ids.ts) and
 * shared with the identity parser, so that nothing the PKI refuses can be accepted at a listener.
 */
export const NAME_PATTERN = ID_PATTERN;

/** One DNS label: letters, digits and inner hyphens, at most 63 characters (RFC 1123). */
const DNS_LABEL = '[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?';
const DNS_NAME_PATTERN = new RegExp(`^${DNS_LABEL}(\\.${DNS_LABEL})*$`);

/** Throws a PkiError unless `value` is one of {@link ROLES}. */
export function assertRole(value: unknown, field = 'role'): asserts value is Role {
  if (!ROLES.includes(value as Role)) {
    throw new PkiError(`${field}: must be one of ${ROLES.join(', ')} (got '${String(value)}')`);
  }
}

/** Throws a PkiError unless `value` matches {@link NAME_PATTERN}. */
export function assertName(value: unknown, field = 'name'): asserts value is string {
  const problem = idProblem(value);
  if (problem !== undefined) throw new PkiError(`${field}: ${problem}`);
}

/**
 * Throws a PkiError unless `value` is a lower-case DNS-like name (labels of letters, digits
 * and inner hyphens, at most 253 characters). Upper case is refused rather than folded so the
 * trust domain written into every SPIFFE ID is exactly what the operator typed.
 */
export function assertTrustDomain(value: unknown, field = 'trustDomain'): asserts value is string {
  if (typeof value !== 'string' || value.length > 253 || !DNS_NAME_PATTERN.test(value)) {
    throw new PkiError(`${field}: must be a lower-case DNS-like name such as 'burrow.local' (got '${String(value)}')`);
  }
}

/**
 * Validates a DNS name for a certificate SAN and returns it in lower case (DNS is
 * case-insensitive, and TLS hostname checks compare case-insensitively). Wildcards are
 * refused: a broker certificate names the exact hosts it serves.
 */
export function normalizeDnsName(value: unknown, field = 'dns'): string {
  const lower = typeof value === 'string' ? value.toLowerCase() : '';
  if (lower.length === 0 || lower.length > 253 || !DNS_NAME_PATTERN.test(lower)) {
    throw new PkiError(`${field}: not a valid DNS name (got '${String(value)}')`);
  }
  return lower;
}

/** Throws a PkiError unless `value` is an IPv4 or IPv6 address without a zone id. */
export function assertIpAddress(value: unknown, field = 'ip'): asserts value is string {
  // A zone id ('%eth0') only means something on one host; it cannot go into a certificate.
  if (typeof value !== 'string' || value.includes('%') || isIP(value) === 0) {
    throw new PkiError(`${field}: not a valid IPv4 or IPv6 address (got '${String(value)}')`);
  }
}

/** Throws a PkiError unless `value` is a positive whole number of milliseconds. */
export function assertPositiveMs(value: unknown, field: string): asserts value is number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw new PkiError(`${field}: must be a positive whole number of milliseconds (got ${String(value)})`);
  }
}
