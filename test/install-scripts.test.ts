import { expect } from 'chai';
import { execFile } from 'node:child_process';
import * as path from 'node:path';

// Compiled to test/dist: the repository root is two levels up.
const ROOT = path.resolve(__dirname, '..', '..');

function npm(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('npm', args, { cwd: ROOT, timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? Number((err as { code?: unknown }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

/**
 * A fresh `npm ci` prints no install-script warnings: every dependency with an install script is
 * reviewed in package.json's `allowScripts` (CONTRIBUTING.md), and what runs without the skipped
 * scripts still works.
 */
describe('dependency install scripts', function () {
  this.timeout(120_000);

  it('every dependency install script is reviewed in allowScripts (npm 11 prints no warning)', async function () {
    const version = await npm(['--version']);
    // The allowScripts review is npm 11's; older npm runs install scripts and has no such command.
    if (Number(version.stdout.split('.')[0]) < 11) this.skip();
    const r = await npm(['install-scripts', 'ls']);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout.trim()).to.equal('No packages with unreviewed install scripts.');
  });

  it('esbuild works without its postinstall (its binary is the optional @esbuild/linux-x64)', async () => {
    const esbuild = require('esbuild') as typeof import('esbuild');
    const out = await esbuild.transform('const answer: number = 42', { loader: 'ts' });
    expect(out.code.trim()).to.equal('const answer = 42;');
  });
});
