/**
 * The single error type the PKI package throws for bad input and refused operations.
 *
 * Messages are one line and start with the name of the offending field
 * (`role: ...`, `dir: ...`, `ttl: ...`), so the CLI can print them verbatim
 * and callers can show them to an operator without rewording.
 */
export class PkiError extends Error {
  override readonly name: string = 'PkiError';

  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
  }
}
