/**
 * Test helpers for anything that needs Burrow certificates: a throw-away PKI in a temp
 * directory, and node:tls options from an issued certificate.
 *
 *   const pki = await createTestPki();
 *   after(() => pki.cleanup());
 *   const broker = await pki.issue('broker', 'b', { ip: ['127.0.0.1'] });
 *   tls.createServer({ ...tlsOptions(broker), requestCert: true }, ...);
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  initPki,
  issueCertificate,
  type InitOptions,
  type IssueOptions,
  type IssuedCertificate,
  type Role,
} from '@burrow/pki';

/** A PKI initialised in its own temp directory. */
export interface TestPki {
  /** The PKI directory (pass as `dir` to issueCertificate or `--dir` to the CLI). */
  readonly dir: string;
  readonly trustDomain: string;
  /** Issues a certificate; `extra` may set dns, ip, ttlMs, keyAlgorithm. */
  issue(role: Role, name: string, extra?: Omit<IssueOptions, 'dir' | 'role' | 'name'>): Promise<IssuedCertificate>;
  /** Removes the temp directory. */
  cleanup(): void;
}

/** Creates a temp directory under os.tmpdir(); the caller removes it. */
export function makeTempDir(prefix = 'burrow-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Initialises a fresh PKI (ECDSA P-256, trust domain burrow.local unless overridden) in a temp directory. */
export async function createTestPki(options: Omit<InitOptions, 'dir'> = {}): Promise<TestPki> {
  const tempRoot = makeTempDir('burrow-pki-');
  const dir = path.join(tempRoot, 'pki');
  try {
    await initPki({ ...options, dir });
  } catch (err) {
    fs.rmSync(tempRoot, { recursive: true, force: true });
    throw err;
  }
  return {
    dir,
    trustDomain: options.trustDomain ?? 'burrow.local',
    issue: (role, name, extra = {}) => issueCertificate({ ...extra, dir, role, name }),
    cleanup: () => fs.rmSync(tempRoot, { recursive: true, force: true }),
  };
}

/** `key`, `cert` (leaf + issuing CA) and `ca` (trust bundle) for tls.createServer / tls.connect. */
export function tlsOptions(issued: IssuedCertificate): { key: string; cert: string; ca: string } {
  return { key: issued.keyPem, cert: issued.certPem, ca: issued.caPem };
}

/** Splits concatenated PEM certificates into individual PEM blocks. */
export function splitPem(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----\n?/g) ?? [];
}
