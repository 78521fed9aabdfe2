import { isIP } from 'node:net';
import { PkiError } from './pki-error';

/** The kinds of workload Burrow issues certificates to. */
export type Role = 'broker' | 'agent' | 'service';

/** All roles, in the order shown in help text. */
export const ROLES: readonly Role[] = ['broker', 'agent', 'service'];

/**
 * Agent and service names: 1-64 characters, lower-case letters, digits, '.', '_' and '-',
 * starting and ending with a letter or digit.
 *
 * Lower case only because the name becomes a SPIFFE ID path segment, and those compare
 * case-sensitively: allowing 'Site-A' next to 'site-a' would mint two identities that an
 * operator reads as one. 64 is the X.509 upper bound for a common name, which the name also is.
 * The first/last-character rule rules out '.' and '..', which SPIFFE forbids as segments.
 */
export const NAME_PATTERN = /^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$/;

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
  if (typeof value !== 'string' || !NAME_PATTERN.test(value)) {
    throw new PkiError(
      `${field}: must be 1-64 lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit (got '${String(value)}')`,
    );
  }
}

/**
 * Throws a PkiError unless `value` is a lower-case DNS-like name (labels of letters, digits
 * and inner hyphens, at most 253 characters). Upper case is refused rather than folded so the
 * trust domain written into every SPIFFE ID is exactly what the operator typed.
 */
export function assertTrustDomain(value: unknown, field = 'trustDomain'): asserts value is string {
  if (typeof value !== 'string' || value.length > 253 || !DNS_NAME_PATTERN.test(value)) {
    throw new PkiError(
      `${field}: must be a lower-case DNS-like name such as 'burrow.local' (got '${String(value)}')`,
    );
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
