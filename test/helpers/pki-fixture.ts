import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { initPki, issueCertificate, writeIssued, type Role } from '@burrow/pki';

/** Files of one issued certificate, as the binaries take them. */
export interface CertFiles {
  cert: string;
  key: string;
  ca: string;
}

/**
 * A throwaway PKI made by packages/pki at test time (no key is ever committed): one directory with
 * a root and issuing CA, and helpers to issue leaves for any role into files.
 */
export class PkiFixture {
  readonly root: string;
  readonly pkiDir: string;
  private counter = 0;

  private constructor(root: string) {
    this.root = root;
    this.pkiDir = path.join(root, 'pki');
  }

  static async create(trustDomain = 'burrow.local'): Promise<PkiFixture> {
    const f = new PkiFixture(mkdtempSync(path.join(tmpdir(), 'burrow-test-')));
    await initPki({ dir: f.pkiDir, trustDomain });
    return f;
  }

  async issue(
    role: Role,
    name: string,
    opts: { ttlMs?: number; dns?: string[]; ip?: string[] } = {},
  ): Promise<CertFiles> {
    const issued = await issueCertificate({
      dir: this.pkiDir,
      role,
      name,
      dns: opts.dns ?? (role === 'broker' ? ['localhost'] : undefined),
      ip: opts.ip ?? (role === 'broker' ? ['127.0.0.1', '::1'] : undefined),
      ttlMs: opts.ttlMs,
    });
    const out = path.join(this.root, `${role}-${name}-${++this.counter}`);
    await writeIssued(out, issued);
    return { cert: path.join(out, 'tls.crt'), key: path.join(out, 'tls.key'), ca: path.join(out, 'ca.crt') };
  }

  cleanup(): void {
    rmSync(this.root, { recursive: true, force: true });
  }
}
