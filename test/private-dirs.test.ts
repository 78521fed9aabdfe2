import { expect } from 'chai';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { AGENT_CLI, PKI_CLI, killAll, runCli, startAgent, startBroker } from './helpers/processes';

/** The permission bits of `p`, as `0700`. */
const modeOf = (p: string): string => `0${(statSync(p).mode & 0o777).toString(8)}`;

/** Makes `dir` (and parents) and sets its mode to `mode`, whatever the umask. */
function looseDir(dir: string, mode = 0o777): string {
  mkdirSync(dir, { recursive: true });
  chmodSync(dir, mode);
  return dir;
}

/**
 * Directories that hold private keys and already existed with a loose mode (issue 13, item 13):
 * `burrow-pki init --dir` / `issue --out` / any command's `--dir`, the broker's `--pki-dir`, and
 * the agent's `--state-dir` (enroll and run) end up 0700, and each says so in one line; a loose
 * directory owned by another user is refused, naming it and its mode. Real CLI processes.
 */
describe('key directories are tightened to 0700 (or refused)', function () {
  this.timeout(60_000);

  let root: string;
  let pkiDir: string;
  const pki = (args: string[]) => runCli(PKI_CLI, args, {}, 20_000);
  let init: Awaited<ReturnType<typeof pki>>;

  before(async () => {
    root = mkdtempSync(path.join(tmpdir(), 'burrow-private-dirs-'));
    pkiDir = looseDir(path.join(root, 'pki'));
    init = await pki(['init', '--dir', pkiDir]);
    expect(init.exit.code, init.stderrLines.join('\n')).to.equal(0);
  });
  afterEach(() => killAll());
  after(() => rmSync(root, { recursive: true, force: true }));

  it('burrow-pki init into an existing empty 0777 directory: 0700 after, and one line on stderr says so', () => {
    console.log(`      init: ${init.stderrLines.join(' | ')}`);
    const line = `burrow-pki: tightened ${pkiDir} from mode 0777 to 0700: it holds private keys`;
    expect(init.stderrLines).to.deep.equal([line]);
    expect(modeOf(pkiDir)).to.equal('0700');
  });

  it('burrow-pki issue --out into an existing 0777 directory: 0700 after, one line on stderr, key 0600', async () => {
    const out = looseDir(path.join(root, 'out'));
    const r = await pki(['issue', '--dir', pkiDir, '--role', 'service', '--name', 'svc', '--out', out]);
    expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
    expect(r.stderrLines).to.deep.equal([`burrow-pki: tightened ${out} from mode 0777 to 0700: it holds private keys`]);
    expect(modeOf(out)).to.equal('0700');
    expect(modeOf(path.join(out, 'tls.key'))).to.equal('0600');
    // A second issue into the now-tight directory says nothing more.
    const again = await pki(['issue', '--dir', pkiDir, '--role', 'service', '--name', 'svc', '--out', out]);
    expect(again.stderrLines).to.deep.equal([]);
  });

  it('any burrow-pki command tightens a loosened PKI directory and its ca/ and tokens/', async () => {
    chmodSync(pkiDir, 0o777);
    chmodSync(path.join(pkiDir, 'ca'), 0o755);
    const out = path.join(root, 'fresh-out');
    const r = await pki(['issue', '--dir', pkiDir, '--role', 'agent', '--name', 'site-x', '--out', out]);
    expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
    expect(r.stderrLines).to.deep.equal([
      `burrow-pki: tightened ${pkiDir} from mode 0777 to 0700: it holds private keys`,
      `burrow-pki: tightened ${path.join(pkiDir, 'ca')} from mode 0755 to 0700: it holds private keys`,
    ]);
    expect([modeOf(pkiDir), modeOf(path.join(pkiDir, 'ca')), modeOf(out)]).to.deep.equal(['0700', '0700', '0700']);
  });

  it('a loose directory owned by another user is refused, naming it and its mode', async function () {
    if (process.getuid?.() !== 0) this.skip(); // only root can give a directory away
    const theirs = looseDir(path.join(root, 'theirs'));
    chownSync(theirs, 65534, 65534);
    const r = await pki(['issue', '--dir', pkiDir, '--role', 'service', '--name', 'svc', '--out', theirs]);
    expect(r.exit.code).to.equal(2);
    expect(r.stderrLines).to.have.length(1);
    const refusal = `burrow-pki: out: ${theirs} is mode 0777 and owned by uid 65534, not by this user (uid 0): `;
    expect(r.stderrLines[0]).to.satisfy((l: string) => l.startsWith(refusal));
    expect(modeOf(theirs)).to.equal('0777');
    expect(statSync(theirs).uid).to.equal(65534);
  });

  it("the broker's --pki-dir and the agent's --state-dir (enroll, then run) end up 0700, each logged", async () => {
    chmodSync(pkiDir, 0o777);
    const b = await startBroker([
      '--pki-dir',
      pkiDir,
      '--agent-listen',
      '127.0.0.1:0',
      '--api-listen',
      '127.0.0.1:0',
      '--tls-ip',
      '127.0.0.1',
    ]);
    const brokerLine = b.proc.logs.find((l) => String(l.message ?? '').startsWith('tightened'));
    expect(brokerLine, b.proc.stderrTail()).to.not.equal(undefined);
    expect(modeOf(pkiDir)).to.equal('0700');

    const broker = `127.0.0.1:${b.ports.agentPort}`;
    const token = await pki([
      'token',
      'create',
      '--dir',
      pkiDir,
      '--agent-id',
      'site-z',
      '--ttl',
      '10m',
      '--broker',
      broker,
    ]);
    expect(token.exit.code, token.stderrLines.join('\n')).to.equal(0);
    const stateDir = looseDir(path.join(root, 'state'));
    const enroll = ['enroll', '--broker', broker, '--token', token.stdout.trim(), '--state-dir', stateDir];
    const enrolled = await runCli(AGENT_CLI, enroll);
    expect(enrolled.exit.code, enrolled.stderrLines.join('\n')).to.equal(0);
    expect(enrolled.stderrLines).to.deep.equal([
      `burrow-agent: enroll: tightened ${stateDir} from mode 0777 to 0700: it holds private keys`,
    ]);
    expect(modeOf(stateDir)).to.equal('0700');

    chmodSync(stateDir, 0o770);
    const a = await startAgent(['--broker', broker, '--state-dir', stateDir]);
    const agentLine = a.proc.logs.find((l) => String(l.message ?? '').startsWith('tightened'));
    expect(agentLine, a.proc.stderrTail()).to.not.equal(undefined);
    console.log(`      broker: ${JSON.stringify(brokerLine)}\n      agent: ${JSON.stringify(agentLine)}`);
    expect(modeOf(stateDir)).to.equal('0700');
  });
});
