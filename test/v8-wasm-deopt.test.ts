import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { expect } from 'chai';

// Compiled to test/dist/: the repository root is two levels up.
const ROOT = path.resolve(__dirname, '..', '..');

/**
 * A child script that makes V8 deoptimize a function while it is inside an inlined call into
 * Cedar's WebAssembly: `decide` is optimized with the call inlined, then Cedar, reading the request
 * through a getter, runs `%DeoptimizeFunction(decide)` mid-call, which is what any code
 * invalidating `decide`'s assumptions does under load. `prelude` runs first.
 */
function reproduction(prelude: string): string {
  return (
    `${prelude}
const cedar = require('@cedar-policy/cedar-wasm/nodejs');
cedar.preparsePolicySet('p', { staticPolicies: { p0: 'permit(principal, action, resource);' } });
let deoptNow = false;
function request() {
  const call = { principal: { type: 'User', id: 'a' }, action: { type: 'Action', id: 'view' }, ` +
    `resource: { type: 'Doc', id: 'd' }, context: {}, entities: [], preparsedPolicySetId: 'p' };
  Object.defineProperty(call, 'validateRequest', { enumerable: true, ` +
    `get() { if (deoptNow) %DeoptimizeFunction(decide); return false; } });
  return call;
}
function decide(call) {
  const answer = cedar.statefulIsAuthorized(call);
  return answer.type === 'success' ? answer.response.decision : answer.type;
}
%PrepareFunctionForOptimization(decide);
%PrepareFunctionForOptimization(cedar.statefulIsAuthorized);
for (let i = 0; i < 20; i++) decide(request());
%OptimizeFunctionOnNextCall(decide);
decide(request());
deoptNow = true;
process.stdout.write(decide(request()));
`
  );
}

function runNode(
  script: string,
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--allow-natives-syntax', '-e', script],
      { cwd: ROOT, timeout: 30_000 },
      (err, stdout, stderr) => {
        const e = err as (NodeJS.ErrnoException & { code?: number | string; signal?: NodeJS.Signals }) | null;
        resolve({
          code: e ? (typeof e.code === 'number' ? e.code : null) : 0,
          signal: e?.signal ?? null,
          stdout,
          stderr,
        });
      },
    );
  });
}

describe('V8 deoptimization inside a Cedar call (the agent crash under mixed load)', function () {
  this.timeout(60_000);

  it("without Burrow's V8 setting, Node 20 aborts: the reproduction reaches the bug", async function () {
    if (!process.versions.node.startsWith('20.')) this.skip(); // the bug is V8 11.3's; newer V8 may not have it
    const r = await runNode(reproduction(''));
    expect(r.signal, `exit ${r.code}, stderr: ${r.stderr.slice(-400)}`).to.equal('SIGTRAP');
    expect(r.stderr).to.include('unreachable code').and.to.include('DoComputeBuiltinContinuation');
  });

  it('a process that loads @burrow/policy survives it and gets the decision', async () => {
    const r = await runNode(reproduction("require('@burrow/policy');"));
    expect(r.signal, r.stderr.slice(-400)).to.equal(null);
    expect(r.code, r.stderr.slice(-400)).to.equal(0);
    expect(r.stdout).to.equal('allow');
  });
});
