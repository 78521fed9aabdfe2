import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import { AGENT_DEFAULTS } from '@burrow/agent';
import { parseDurationMs } from '@burrow/tunnel';
import { PkiFixture } from './helpers/pki-fixture';
import { makeTempDir } from './helpers/pki-fixture';
import { BurrowProcess, AGENT_CLI, killAll, liveProcessCount } from './helpers/processes';

// Compiled to test/dist/systemd-unit.test.js: the repository root is two levels up.
const DEPLOY = path.resolve(__dirname, '..', '..', 'deploy', 'systemd');
const UNIT = path.join(DEPLOY, 'burrow-agent.service');

/** The unit as section -> key -> values (a key may repeat, e.g. SystemCallFilter=). */
function parseUnit(text: string): Map<string, Map<string, string[]>> {
  const sections = new Map<string, Map<string, string[]>>();
  let current: Map<string, string[]> | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      current = new Map();
      sections.set(header[1]!, current);
      continue;
    }
    const eq = line.indexOf('=');
    if (!current || eq < 0) throw new Error(`unparseable unit line: ${line}`);
    const key = line.slice(0, eq);
    current.set(key, [...(current.get(key) ?? []), line.slice(eq + 1)]);
  }
  return sections;
}

function run(cmd: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 60_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }),
    );
  });
}

const hasCommand = (name: string): boolean => spawnSync('sh', ['-c', `command -v ${name}`]).status === 0;

describe('deploy/systemd: the hardened agent unit', () => {
  const unit = parseUnit(fs.readFileSync(UNIT, 'utf8'));
  const service = unit.get('Service')!;
  const one = (key: string): string | undefined => {
    const v = service.get(key);
    if (v && v.length > 1) throw new Error(`${key}= is set ${v.length} times`);
    return v?.[0];
  };
  const temps: string[] = [];
  after(() => {
    for (const t of temps) fs.rmSync(t, { recursive: true, force: true });
  });

  it(
    'runs the agent as the burrow system user with --config /etc/burrow-agent/agent.yaml, and the sysusers file ' +
      'creates that user',
    () => {
      expect(one('ExecStart')).to.equal('/usr/local/bin/burrow-agent run --config /etc/burrow-agent/agent.yaml');
      expect(one('User')).to.equal('burrow');
      expect(one('Group')).to.equal('burrow');
      const sysusers = fs
        .readFileSync(path.join(DEPLOY, 'burrow-agent.sysusers'), 'utf8')
        .split('\n')
        .filter((l) => l.trim() && !l.startsWith('#'));
      expect(sysusers).to.have.length(1);
      expect(sysusers[0]!.split(/\s+/).slice(0, 3)).to.deep.equal(['u', 'burrow', '-']);
      expect(sysusers[0]).to.contain('/var/lib/burrow-agent');
      expect(one('StateDirectory')).to.equal('burrow-agent');
      expect(one('StateDirectoryMode')).to.equal('0700');
      expect(one('ConfigurationDirectory')).to.equal('burrow-agent');
    },
  );

  it('has every hardening key, an empty capability set, and no MemoryDenyWriteExecute', () => {
    const expected: Record<string, string> = {
      NoNewPrivileges: 'yes',
      ProtectSystem: 'strict',
      ProtectHome: 'yes',
      PrivateTmp: 'yes',
      PrivateDevices: 'yes',
      ProtectKernelTunables: 'yes',
      ProtectKernelModules: 'yes',
      ProtectKernelLogs: 'yes',
      ProtectControlGroups: 'yes',
      RestrictAddressFamilies: 'AF_INET AF_INET6 AF_UNIX',
      CapabilityBoundingSet: '',
      AmbientCapabilities: '',
      LockPersonality: 'yes',
      RestrictNamespaces: 'yes',
      RestrictSUIDSGID: 'yes',
      SystemCallArchitectures: 'native',
      UMask: '0077',
    };
    for (const [key, value] of Object.entries(expected)) expect(one(key), key).to.equal(value);
    expect(service.get('SystemCallFilter')![0]).to.equal('@system-service');
    expect(service.has('MemoryDenyWriteExecute'), 'MemoryDenyWriteExecute breaks V8 and WebAssembly').to.equal(false);
  });

  it(
    'restarts on failure and stops with SIGTERM, waiting ' +
      'longer than the drain timeout (default and example config)',
    () => {
      expect(one('Restart')).to.equal('on-failure');
      expect(one('KillSignal')).to.equal('SIGTERM');
      const stopMs = parseDurationMs('TimeoutStopSec', one('TimeoutStopSec'));
      expect(stopMs).to.be.above(AGENT_DEFAULTS.drainTimeoutMs);
      const example = fs.readFileSync(path.join(DEPLOY, 'agent.yaml.example'), 'utf8');
      const drain = /^drain-timeout: (\S+)$/m.exec(example);
      expect(drain, 'drain-timeout in agent.yaml.example').to.not.equal(null);
      expect(stopMs).to.be.above(parseDurationMs('drain-timeout', drain![1]));
    },
  );

  it(
    'agent.yaml.example is a configuration the agent starts with ' +
      '(state-dir, broker and admin port overridden for the test)',
    async function () {
      this.timeout(60_000);
      const pki = await PkiFixture.create();
      temps.push(pki.root);
      const state = await pki.issue('agent', 'example-site');
      try {
        const agent = new BurrowProcess('agent-example', AGENT_CLI, [
          'run',
          '--config',
          path.join(DEPLOY, 'agent.yaml.example'),
          '--state-dir',
          path.dirname(state.cert),
          '--broker',
          '127.0.0.1:1',
          '--admin-listen',
          '127.0.0.1:0',
        ]);
        const started = await agent.waitForLog('agent started');
        expect(started).to.include({ agentId: 'example-site', upstreams: 1 });
        agent.signal('SIGTERM');
        expect(await agent.waitExit()).to.deep.equal({ code: 0, signal: null });
      } finally {
        await killAll();
      }
      expect(liveProcessCount()).to.equal(0);
    },
  );

  it(
    'systemd-analyze verify accepts the unit without ' + 'a single warning (and does flag a misspelt key)',
    async function () {
      if (!hasCommand('systemd-analyze')) this.skip();
      const systemUnits = ['/usr/lib/systemd/system', '/lib/systemd/system'].find((d) =>
        fs.existsSync(path.join(d, 'sysinit.target')),
      );
      if (!systemUnits) this.skip();
      // An offline root: systemd's own units (for the default dependencies), the unit, and an
      // executable where ExecStart= expects the agent (verify checks that it exists).
      const root = makeTempDir('burrow-unit-root-');
      temps.push(root);
      fs.cpSync(systemUnits!, path.join(root, 'usr', 'lib', 'systemd', 'system'), { recursive: true });
      fs.mkdirSync(path.join(root, 'usr', 'local', 'bin'), { recursive: true });
      fs.copyFileSync('/bin/true', path.join(root, 'usr', 'local', 'bin', 'burrow-agent'));
      const installed = path.join(root, 'etc', 'systemd', 'system', 'burrow-agent.service');
      fs.mkdirSync(path.dirname(installed), { recursive: true });
      fs.copyFileSync(UNIT, installed);
      const ok = await run('systemd-analyze', ['verify', `--root=${root}`, 'burrow-agent.service']);
      expect(ok, `${ok.stdout}${ok.stderr}`).to.deep.equal({ code: 0, stdout: '', stderr: '' });
      fs.writeFileSync(installed, fs.readFileSync(UNIT, 'utf8').replace('NoNewPrivileges=', 'NoNewPrivilege='));
      const typo = await run('systemd-analyze', ['verify', `--root=${root}`, 'burrow-agent.service']);
      expect(typo.stderr).to.contain("Unknown key 'NoNewPrivilege'");
    },
  );

  it("systemd-analyze security rates the unit's exposure 2.0 or lower", async function () {
    if (!hasCommand('systemd-analyze')) this.skip();
    const r = await run('systemd-analyze', ['security', '--offline=true', UNIT]);
    const m = /Overall exposure level for burrow-agent\.service: (\d+(?:\.\d+)?)/.exec(r.stdout + r.stderr);
    if (!m && /unrecognized option|--offline/.test(r.stderr)) this.skip(); // systemd older than 252
    expect(m, r.stdout + r.stderr).to.not.equal(null);
    expect(Number(m![1])).to.be.at.most(2.0);
  });

  it(
    "MemoryDenyWriteExecute would break the agent: Node aborts under the kernel's equivalent, and --jitless loses " +
      'WebAssembly',
    async function () {
      // PR_SET_MDWE (Linux 6.3+) through python3's ctypes; skipped where either is missing.
      if (!hasCommand('python3')) this.skip();
      const mdwe =
        'import ctypes,os,sys\nlibc=ctypes.CDLL(None,use_errno=True)\nif libc.prctl(65,1,0,0,0)!=0: ' +
        'sys.exit(77)\nos.execv(sys.argv[1],sys.argv[1:])';
      const underMdwe = (args: string[]): ReturnType<typeof spawnSync> =>
        spawnSync('python3', ['-c', mdwe, process.execPath, ...args], { encoding: 'utf8', timeout: 60_000 });
      const plain = underMdwe(['-e', 'console.log(1 + 1)']);
      if (plain.status === 77) this.skip(); // kernel without PR_SET_MDWE
      expect(plain.status, String(plain.stdout)).to.not.equal(0);
      expect(String(plain.stderr)).to.contain('SetPermissions');
      const jitless = underMdwe(['--jitless', '-p', 'typeof WebAssembly']);
      expect(String(jitless.stdout).trim()).to.equal('undefined');
    },
  );
});
