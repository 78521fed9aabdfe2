// @peculiar/x509 resolves its algorithm providers through tsyringe, which needs the Reflect
// metadata polyfill loaded before the library itself; importing it here, first, means no
// other module has to remember the ordering.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { webcrypto } from 'node:crypto';

// Sign with Node's own WebCrypto (OpenSSL underneath) rather than any JS implementation.
x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

/** The @peculiar/x509 module, configured for Node's WebCrypto. Import it from here, never directly. */
export { x509 };
