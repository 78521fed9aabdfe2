/**
 * Test helpers for anything that needs Burrow certificates: a throw-away PKI in a temp directory, leaves issued
 * into files (as the binaries take them) or in memory, and node:tls options from an issued certificate.
 *
 *   const pki = await PkiFixture.create();
 *   after(() => pki.cleanup());
 *   const broker = await pki.issuePem('broker', 'b', { ip: ['127.0.0.1'] });
 *   tls.createServer({ ...tlsOptions(broker), requestCert: true }, ...);
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import {
  initPki,
  issueCertificate,
  writeIssued,
  type InitOptions,
  type IssueOptions,
  type IssuedCertificate,
  type Role,
} from '@burrow/pki';

/** Files of one issued certificate, as the binaries take them. */
export interface CertFiles {
  cert: string;
  key: string;
  ca: string;
}

/** Creates a temp directory under os.tmpdir(); the caller removes it. */
export function makeTempDir(prefix = 'burrow-test-'): string {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

/**
 * A throwaway PKI made by packages/pki at test time (no key is ever committed): one directory with
 * a root and issuing CA, and helpers to issue leaves for any role into files or in memory.
 */
export class PkiFixture {
  readonly root: string;
  /** The PKI directory (pass as `dir` to the pki functions or `--dir` to the CLI). */
  readonly pkiDir: string;
  readonly trustDomain: string;
  private counter = 0;

  private constructor(root: string, trustDomain: string) {
    this.root = root;
    this.pkiDir = path.join(root, 'pki');
    this.trustDomain = trustDomain;
  }

  /** Initialises a fresh PKI (ECDSA P-256, trust domain burrow.local unless overridden) in a temp directory. */
  static async create(options: Omit<InitOptions, 'dir'> = {}): Promise<PkiFixture> {
    const f = new PkiFixture(makeTempDir(), options.trustDomain ?? 'burrow.local');
    try {
      await initPki({ ...options, dir: f.pkiDir });
    } catch (err) {
      f.cleanup();
      throw err;
    }
    return f;
  }

  /** Issues a certificate in memory; `extra` may set dns, ip, ttlMs, keyAlgorithm. */
  issuePem(
    role: Role,
    name: string,
    extra: Omit<IssueOptions, 'dir' | 'role' | 'name'> = {},
  ): Promise<IssuedCertificate> {
    return issueCertificate({ ...extra, dir: this.pkiDir, role, name });
  }

  /** Issues a certificate into files; a broker's is for localhost, 127.0.0.1 and ::1 unless `opts` says. */
  async issue(
    role: Role,
    name: string,
    opts: { ttlMs?: number; dns?: string[]; ip?: string[] } = {},
  ): Promise<CertFiles> {
    const issued = await this.issuePem(role, name, {
      dns: opts.dns ?? (role === 'broker' ? ['localhost'] : undefined),
      ip: opts.ip ?? (role === 'broker' ? ['127.0.0.1', '::1'] : undefined),
      ttlMs: opts.ttlMs,
    });
    const out = path.join(this.root, `${role}-${name}-${++this.counter}`);
    await writeIssued(out, issued);
    return { cert: path.join(out, 'tls.crt'), key: path.join(out, 'tls.key'), ca: path.join(out, 'ca.crt') };
  }

  /** Removes the temp directory. */
  cleanup(): void {
    rmSync(this.root, { recursive: true, force: true });
  }
}

/** `key`, `cert` (leaf + issuing CA) and `ca` (trust bundle) for tls.createServer / tls.connect. */
export function tlsOptions(issued: IssuedCertificate): { key: string; cert: string; ca: string } {
  return { key: issued.keyPem, cert: issued.certPem, ca: issued.caPem };
}

/** Splits concatenated PEM certificates into individual PEM blocks. */
export function splitPem(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----\n?/g) ?? [];
}
