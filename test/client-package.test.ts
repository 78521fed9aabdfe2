import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { makeTempDir } from './helpers/pki-fixture';
import { runCli } from './helpers/processes';
import { AGENT_ID, Stack } from './helpers/stack';

const execFileP = promisify(execFile);
// Compiled to test/dist: the repository root is two levels up.
const ROOT = path.resolve(__dirname, '..', '..');
const TSC = path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');

/**
 * Issue 16 section 2: a service team installs @burrow/client from its tarball into an empty
 * project and calls a site. npm runs with an unreachable registry and an empty cache: the install
 * must need nothing but the tarball (the public registry has unrelated @burrow/* packages, which
 * must never be fetched). Then the installed burrow-call and a script using the library (and a
 * TypeScript file type-checked against the shipped declarations) call a real broker and agent.
 */
describe('@burrow/client installed from its tarball', function () {
  this.timeout(120_000);
  let stack: Stack;
  let tmp: string;
  let project: string;
  let tarball: string;

  const npm = (args: string[], cwd: string) =>
    execFileP('npm', [...args, '--registry', 'http://127.0.0.1:9/', '--cache', path.join(tmp, 'npm-cache')], {
      cwd,
      // npm_config_* from a parent `npm test` would override the flags above.
      env: Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k))),
      timeout: 90_000,
    });

  before(async () => {
    // Outside the checkout: from inside it, require() would find the repository's node_modules and
    // hide a dependency the tarball lacks.
    tmp = makeTempDir('burrow-client-package-');
    const packDir = path.join(tmp, 'pack');
    project = path.join(tmp, 'project');
    mkdirSync(packDir);
    mkdirSync(project);
    // npm pack runs the package's prepack (scripts/bundle-client.js) as a maintainer's would.
    await npm(['pack', path.join(ROOT, 'packages', 'client'), '--pack-destination', packDir], tmp);
    const files = readdirSync(packDir);
    expect(files).to.deep.equal(['burrow-client-0.1.0.tgz']);
    tarball = path.join(packDir, files[0]!);
    writeFileSync(path.join(project, 'package.json'), '{ "name": "platform-service", "private": true }\n');
    await npm(['install', '--offline', '--no-audit', '--no-fund', tarball], project);
    stack = await Stack.start();
  });
  after(async () => {
    await stack?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it('installs as one package with no dependencies, from the tarball alone', () => {
    expect(readdirSync(path.join(project, 'node_modules'))).to.have.members(['@burrow', '.bin', '.package-lock.json']);
    expect(readdirSync(path.join(project, 'node_modules', '@burrow'))).to.deep.equal(['client']);
  });

  it('the installed burrow-call pings the site', async () => {
    const bin = path.join(project, 'node_modules', '.bin', 'burrow-call');
    const certDir = path.dirname(stack.serviceCert.cert);
    const r = await runCli(bin, ['ping', '--broker', stack.apiAddress, '--cert-dir', certDir, '--agent', AGENT_ID]);
    expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
    expect(r.stdout).to.match(new RegExp(`^${AGENT_ID} via ${stack.apiAddress}: SERVING in [\\d.]+ ms\\n$`));
  });

  it('a script requiring @burrow/client calls the site: ping, invoke, and an error with its status', async () => {
    const script = path.join(project, 'call.js');
    writeFileSync(
      script,
      `const { BurrowClient, BurrowCallError } = require('@burrow/client');
const [broker, dir, agent] = process.argv.slice(2);
const client = new BurrowClient({
  broker,
  tls: { certFile: dir + '/tls.crt', keyFile: dir + '/tls.key', caFile: dir + '/ca.crt' },
});
(async () => {
  const ping = await client.ping(agent);
  const echo = await client.invoke(agent, '/burrow.test.Echo/Unary', Buffer.from('hi'));
  let error;
  try {
    await client.ping('no-such-site', { timeoutMs: 10000 });
  } catch (err) {
    error = { isBurrowCallError: err instanceof BurrowCallError, code: err.code };
  }
  client.close();
  console.log(JSON.stringify({ status: ping.status, echo: echo.toString(), error }));
})();
`,
    );
    const { stdout } = await execFileP(
      process.execPath,
      [script, stack.apiAddress, path.dirname(stack.serviceCert.cert), AGENT_ID],
      { cwd: project, timeout: 30_000 },
    );
    expect(JSON.parse(stdout)).to.deep.equal({
      status: 'SERVING',
      echo: 'hi',
      error: { isBurrowCallError: true, code: 14 },
    });
  });

  it('its type declarations stand alone: a TypeScript caller type-checks', async () => {
    writeFileSync(
      path.join(project, 'caller.ts'),
      `import { BurrowClient, type EvaluationRequest } from '@burrow/client';
const client = new BurrowClient({ broker: 'b:1', tls: { certFile: 'c', keyFile: 'k', caFile: 'a' } });
const request: EvaluationRequest = { subject: { type: 'User', id: 'alice' }, action: { name: 'read' } };
export const decision: Promise<boolean> = client.evaluate('site-a', request).then((r) => r.decision);
`,
    );
    const args = ['--noEmit', '--strict', '--types', 'node', '--typeRoots', path.join(ROOT, 'node_modules', '@types')];
    await execFileP(process.execPath, [TSC, ...args, 'caller.ts'], { cwd: project, timeout: 60_000 });
  });
});
