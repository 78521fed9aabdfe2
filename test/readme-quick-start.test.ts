import { expect } from 'chai';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { BackgroundTerminal } from './helpers/background-terminal';
import { expectNoLeaks, type ResourceSnapshot, snapshotResources } from './helpers/leaks';
import { type QuickStartStep, quickStartSteps } from './helpers/quick-start-steps';
import { ShellTerminal } from './helpers/shell-terminal';

/**
 * Runs the README's quick start ("By hand, on localhost") as a user would: every command exactly as
 * written, from a directory that looks like the checkout, in a long-lived bash for "terminal 1" and in a
 * process group of its own for each "other terminal". The markers that say which block is which are
 * HTML comments in the README (test/helpers/quick-start-steps.ts). If the README drifts from the
 * binaries, this fails.
 */

// Compiled to test/dist/: the repository root is two levels up.
const ROOT = path.resolve(__dirname, '..', '..');
const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
const STEPS = quickStartSteps(README);
/**
 * `burrow-call` (issue 16 §2) lands from another branch; until it is built here, the steps that call it
 * are skipped and say so. Every other step runs.
 */
const CALLER_BUILT = fs.existsSync(path.join(ROOT, 'node_modules', '.bin', 'burrow-call'));
const usesCaller = (step: QuickStartStep) => step.kind !== 'interrupt' && /\bburrow-call\b/.test(step.script);
/** What the quick start writes into the checkout: never mirrored, so every run starts clean. */
const QUICK_START_DIR = 'burrow-quickstart';

const READY_TIMEOUT_MS = 30_000;
const STEP_TIMEOUT_MS = 60_000;
const EXIT_TIMEOUT_MS = 20_000;

/** The test's environment for the shells: no BURROW_* variables, and no node_modules/.bin already on PATH. */
function userEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BURROW_')) env[k] = v;
  // make (and npm scripts) may have put node_modules/.bin on PATH already; a user's shell has not.
  env.PATH = (process.env.PATH ?? '')
    .split(path.delimiter)
    .filter((dir) => !/node_modules[\\/]\.bin$/.test(dir))
    .join(path.delimiter);
  return env;
}

/** Fails with a clear message when a fixed port of the quick start is taken (before anything starts). */
async function assertPortFree(port: number): Promise<void> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(
        new Error(
          err.code === 'EADDRINUSE'
            ? `port ${port} on 127.0.0.1 is in use; the README quick start uses fixed ports, free it first`
            : `port ${port}: ${err.message}`,
        ),
      ),
    );
    server.listen(port, '127.0.0.1', () => resolve());
  });
  await new Promise((resolve) => server.close(resolve));
}

/** Does `.gitignore` (in the repository root) ignore the top-level entry `name`? */
function ignoredAtRoot(name: string): boolean {
  const lines = fs
    .readFileSync(path.join(ROOT, '.gitignore'), 'utf8')
    .split('\n')
    .map((l) => l.trim());
  return [name, `${name}/`, `/${name}`, `/${name}/`].some((form) => lines.includes(form));
}

function title(step: QuickStartStep): string {
  const at = `README.md:${step.line}`;
  if (step.kind === 'interrupt') return `Ctrl-C in the terminals of ${step.names.join(', ')}: each exits 0 (${at})`;
  const commands = step.script.split('\n').filter((l) => l.trim() !== '' && !l.startsWith(' '));
  const last = (commands[commands.length - 1] ?? '').replace(/\s*\\$/, '');
  const shown = step.kind === 'background' ? last : commands.map((c) => c.replace(/\s*\\$/, '')).join('; ');
  const what = step.kind === 'background' ? `starts ${step.name} in its own terminal: ${shown}` : `runs: ${shown}`;
  const skipped = usesCaller(step) && !CALLER_BUILT ? ' [SKIPPED: burrow-call is not built in this checkout yet]' : '';
  return `${what} (${at})${skipped}`;
}

describe('README quick start, run as written', function () {
  // Each step needs the ones before it: after the first failure the rest would only repeat it.
  this.bail(true);

  let base = '';
  let checkout = '';
  let baseline: ResourceSnapshot = {};
  const ports = new Set<number>();
  let terminal: ShellTerminal | undefined;
  const background = new Map<string, BackgroundTerminal>();
  /** Top-level entries the steps created in the checkout (anything that is not one of the mirror's links). */
  const written = new Set<string>();

  const noteWrites = () => {
    for (const entry of fs.readdirSync(checkout, { withFileTypes: true }))
      if (!entry.isSymbolicLink()) written.add(entry.name);
  };

  before(async () => {
    baseline = snapshotResources();
    for (const step of STEPS) {
      const text = step.kind === 'interrupt' ? '' : step.script;
      const ready = step.kind === 'background' && 'url' in step.ready ? step.ready.url : '';
      for (const m of `${text}\n${ready}`.matchAll(/127\.0\.0\.1:(\d+)/g)) ports.add(Number(m[1]));
    }
    for (const port of ports) await assertPortFree(port);

    base = fs.mkdtempSync(path.join(os.tmpdir(), 'burrow-quick-start-'));
    // The checkout as a user has it: every top-level entry of this one (links, so `make build` and the
    // examples are the real ones), minus git and anything an earlier quick start left behind.
    checkout = path.join(base, 'checkout');
    fs.mkdirSync(checkout);
    for (const name of fs.readdirSync(ROOT))
      if (name !== '.git' && name !== QUICK_START_DIR) fs.symlinkSync(path.join(ROOT, name), path.join(checkout, name));
    const scripts = path.join(base, 'terminal-1');
    fs.mkdirSync(scripts);
    terminal = new ShellTerminal(checkout, userEnv(), scripts);
  });

  after(async () => {
    await Promise.all([...background.values()].map((b) => b.kill()));
    await terminal?.close();
    if (base) fs.rmSync(base, { recursive: true, force: true });
    await expectNoLeaks(baseline);
    // Every process of the quick start is gone: its fixed ports can be taken again.
    for (const port of ports) await assertPortFree(port);
  });

  it('has the steps it promises: build, PKI, upstream, broker, enroll, agent, calls, Ctrl-C, clean up', () => {
    const kinds = STEPS.map((s) => (s.kind === 'background' ? s.name : s.kind));
    expect(kinds).to.include.members(['upstream', 'broker', 'agent', 'interrupt']);
    const scripts = STEPS.map((s) => (s.kind === 'interrupt' ? '' : s.script)).join('\n');
    expect(scripts).to.match(/^make build$/m);
    expect(scripts).to.include('export PATH="$PWD/node_modules/.bin:$PATH"');
    expect(scripts).to.match(/burrow-call ping .*--agent site-a/);
    expect(scripts).to.match(/burrow-call evaluate .*--agent site-a/);
    expect(scripts).to.not.match(/\bnpx\b/);
  });

  for (const step of STEPS) {
    it(title(step), async function () {
      if (usesCaller(step) && !CALLER_BUILT) {
        // Not a failure: the caller CLI comes from issue 16 §2 on another branch. Once it is built
        // (node_modules/.bin/burrow-call), this step runs like the others.
        this.skip();
      }
      this.timeout(STEP_TIMEOUT_MS + READY_TIMEOUT_MS);
      if (!terminal) throw new Error('no terminal');
      if (step.kind === 'run') {
        const output = await terminal.run(step.script, STEP_TIMEOUT_MS);
        for (const pattern of step.expect) expect(output, `output of README.md:${step.line}`).to.match(pattern);
      } else if (step.kind === 'background') {
        const proc = new BackgroundTerminal(step.name, step.script, checkout, userEnv());
        background.set(step.name, proc);
        if ('url' in step.ready) await proc.waitForUrl(step.ready.url, READY_TIMEOUT_MS);
        else await proc.waitForOutput(step.ready.output, READY_TIMEOUT_MS);
        for (const pattern of step.expect) expect(proc.output, `output of ${step.name}`).to.match(pattern);
      } else {
        for (const name of step.names) {
          const proc = background.get(name);
          if (!proc) throw new Error(`nothing named ${name} is running`);
          proc.interrupt();
          const exit = await Promise.race([
            proc.exited,
            new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), EXIT_TIMEOUT_MS).unref()),
          ]);
          expect(exit, `${name} still running ${EXIT_TIMEOUT_MS} ms after Ctrl-C; it printed:\n${proc.output}`).to
            .exist;
          expect(exit, `${name} after Ctrl-C; it printed:\n${proc.output}`).to.deep.equal({ code: 0, signal: null });
        }
      }
      noteWrites();
    });
  }

  it('wrote only into git-ignored paths of the checkout, and its last step removed them', () => {
    expect([...written], 'top-level entries the quick start created').to.not.be.empty;
    for (const name of written) expect(ignoredAtRoot(name), `${name} is not in .gitignore`).to.equal(true);
    const left = fs.readdirSync(checkout, { withFileTypes: true }).filter((e) => !e.isSymbolicLink());
    expect(left.map((e) => e.name)).to.deep.equal([]);
  });
});

describe('README and example docs: binaries run from the checkout, never through npx', () => {
  it('no code block runs a Burrow binary with npx (outside the checkout npx fetches an unrelated package)', () => {
    const docs = ['README.md', 'examples/auth/README.md', 'examples/policy/README.md'];
    for (const doc of docs) {
      const text = fs.readFileSync(path.join(ROOT, doc), 'utf8');
      const blocks = text.match(/^```[^\n]*\n[\s\S]*?^```/gm) ?? [];
      for (const block of blocks) expect(block, doc).to.not.match(/\bnpx\s+burrow-/);
    }
  });
});

describe('quick-start markers', () => {
  const md = (body: string) => `# X\n\n## Quick start\n\n${body}\n\n## Next\n\n\`\`\`sh\nignored\n\`\`\`\n`;

  it('reads run, expect, background and interrupt steps in order, and ignores blocks marked not run', () => {
    const steps = quickStartSteps(
      md(
        [
          '<!-- quick-start: not run: shown only -->',
          '```sh',
          'make demo',
          '```',
          '<!-- quick-start: background up; ready when the output matches /listening/ -->',
          '```sh',
          'node up.js',
          '```',
          '<!-- quick-start: run -->',
          '<!-- quick-start: expect /^ok$/m -->',
          '```sh',
          'echo ok',
          '```',
          '<!-- quick-start: interrupt up -->',
        ].join('\n'),
      ),
    );
    expect(steps.map((s) => s.kind)).to.deep.equal(['background', 'run', 'interrupt']);
    const run = steps[1];
    expect(run?.kind === 'run' && run.expect[0]?.test('ok\n')).to.equal(true);
    expect(run?.line).to.equal(15);
  });

  it('refuses a block without a marker, so a new command cannot escape the test', () => {
    expect(() => quickStartSteps(md('```sh\nburrow-pki init --dir x\n```'))).to.throw(/README\.md:5: .*without a/);
  });

  it('refuses a marker followed by prose instead of a block, and an unknown marker', () => {
    expect(() => quickStartSteps(md('<!-- quick-start: run -->\nSome text.\n```sh\nx\n```'))).to.throw(
      /not followed by a code block/,
    );
    expect(() => quickStartSteps(md('<!-- quick-start: runn -->\n```sh\nx\n```'))).to.throw(/unknown quick-start/);
    expect(() => quickStartSteps(md('<!-- quick-start: interrupt nobody -->'))).to.throw(/no step started/);
  });
});
