/**
 * The one grammar of Burrow names: agent ids, service names and broker names. Each is the last
 * segment of a SPIFFE id (`spiffe://<td>/<role>/<name>`), a routing key and a Redis key part, so
 * the PKI (issuing, CSR signing, enrollment, revocation), the identity parser (every session and
 * call) and the caller API's agent selector all check this one pattern.
 *
 * This file imports nothing, so `@burrow/pki` can load it (`@burrow/tunnel/dist/ids`) without
 * the gRPC stack.
 */

/**
 * 1-64 characters: lower-case letters, digits, '.', '_' and '-', starting and ending with a
 * letter or digit.
 *
 * Lower case only because the name is a SPIFFE path segment, and those compare case-sensitively:
 * 'Site-A' next to 'site-a' would be two identities an operator reads as one. The first/last
 * character rule rules out '.' and '..', which SPIFFE forbids as segments. 64 keeps ids short
 * enough for log lines, metrics labels and X.509 name fields.
 */
export const ID_PATTERN = /^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$/;

/** {@link ID_PATTERN} in words, for error messages. */
export const ID_GRAMMAR =
  "1-64 lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit";

/** True when `value` is a Burrow name ({@link ID_PATTERN}). */
export function isValidId(value: unknown): value is string {
  return typeof value === 'string' && ID_PATTERN.test(value);
}

/**
 * Why `value` is not a Burrow name, for one-line errors (`must be <grammar> (got '<value>')`), or
 * undefined when it is one. Long values are cut in the message.
 */
export function idProblem(value: unknown): string | undefined {
  if (isValidId(value)) return undefined;
  const text = String(value);
  const shown = text.length > 80 ? `${text.slice(0, 80)}… (${text.length} characters)` : text;
  return `must be ${ID_GRAMMAR} (got '${shown}')`;
}
