import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import * as protobuf from 'protobufjs';
import { Metadata, status as Status } from '@grpc/grpc-js';
import { issueCertificate, writeIssued } from '@burrow/pki';
import {
  EMBEDDED_PROTO_DIR,
  PROTO_DIR,
  PROTOCOL_VERSIONS,
  listProtoFiles,
  serveProtosFromAssets,
  type AssetSource,
} from '@burrow/tunnel';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { makeTempDir } from './helpers/pki-fixture';
import {
  AGENT_CLI,
  BurrowProcess,
  PKI_CLI,
  httpGet,
  killAll,
  liveProcessCount,
  runCli,
  startBroker,
  type Exit,
} from './helpers/processes';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';

// Compiled to test/dist/agent-binary.test.js: the repository root is two levels up.
const ROOT = path.resolve(__dirname, '..', '..');
const BINARY_NAME = 'burrow-agent-linux-x64';
const BINARY = path.join(ROOT, 'dist', BINARY_NAME);
const AGENT_VERSION = (require('../../packages/agent/package.json') as { version: string }).version;

/** The asset store of a single executable, imitated from the proto/ directory on disk. */
function diskAssets(dir: string, read: string[] = []): AssetSource {
  return {
    read(key) {
      read.push(key);
      if (key === 'proto/index.json') return JSON.stringify(listProtoFiles(dir, undefined));
      const file = path.join(dir, ...key.replace(/^proto\//, '').split('/'));
      return fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : undefined;
    },
  };
}

describe('embedded protos (what the single executable loads instead of proto/ on disk)', () => {
  let restore: (() => void) | undefined;
  afterEach(() => {
    restore?.();
    restore = undefined;
  });

  it('every proto loads from assets below EMBEDDED_PROTO_DIR exactly as from disk, sync and async', async () => {
    const files = listProtoFiles(PROTO_DIR, undefined);
    expect(files).to.include.members([
      'burrow/tunnel/v1/tunnel.proto',
      'grpc/health/v1/health.proto',
      'burrow/auth/v1/auth.proto',
    ]);
    const read: string[] = [];
    restore = serveProtosFromAssets(diskAssets(PROTO_DIR, read));
    // Imports resolved from the proto root, as `protoc -I` (the vendored OpenTelemetry protos need it).
    const rootIn = (dir: string): protobuf.Root => {
      const root = new protobuf.Root();
      root.resolvePath = (_origin, target) => (path.isAbsolute(target) ? target : path.join(dir, target));
      return root;
    };
    for (const f of files) {
      const fromDisk = rootIn(PROTO_DIR).loadSync(f).toJSON();
      expect(rootIn(EMBEDDED_PROTO_DIR).loadSync(f).toJSON(), f).to.deep.equal(fromDisk);
      expect((await rootIn(EMBEDDED_PROTO_DIR).load(f)).toJSON(), `${f} (async)`).to.deep.equal(fromDisk);
    }
    expect(read).to.include('proto/burrow/tunnel/v1/tunnel.proto');
  });

  it('@grpc/proto-loader reads through the same hook (absolute paths under PROTO_DIR)', () => {
    restore = serveProtosFromAssets(diskAssets(PROTO_DIR));
    const loader = require('@grpc/proto-loader') as typeof import('@grpc/proto-loader');
    const def = loader.loadSync(path.join(EMBEDDED_PROTO_DIR, 'grpc', 'health', 'v1', 'health.proto'));
    expect(Object.keys(def)).to.include('grpc.health.v1.Health');
  });

  it(
    'a file that is not embedded is ENOENT naming it; paths ' +
      'outside the directory still come from disk; restore undoes it',
    () => {
      restore = serveProtosFromAssets(diskAssets(PROTO_DIR));
      expect(() => protobuf.loadSync(path.join(EMBEDDED_PROTO_DIR, 'nope', 'x.proto'))).to.throw(
        /ENOENT.*nope\/x\.proto.*not embedded/,
      );
      expect(
        protobuf
          .loadSync(path.join(PROTO_DIR, 'grpc', 'health', 'v1', 'health.proto'))
          .lookupType('grpc.health.v1.HealthCheckRequest'),
      ).to.exist;
      restore();
      restore = undefined;
      // Without the hook the embedded directory does not exist: proof the files above came from it.
      expect(() => protobuf.loadSync(path.join(EMBEDDED_PROTO_DIR, 'grpc', 'health', 'v1', 'health.proto'))).to.throw(
        /ENOENT/,
      );
    },
  );

  it('the manifest lists the protos in a single executable', () => {
    expect(listProtoFiles(EMBEDDED_PROTO_DIR, diskAssets(PROTO_DIR))).to.deep.equal(
      listProtoFiles(PROTO_DIR, undefined),
    );
    expect(() => listProtoFiles(EMBEDDED_PROTO_DIR, { read: () => undefined })).to.throw(
      /embeds no proto\/index\.json/,
    );
  });
});

/** Runs `make agent-binary`, which rebuilds only when a source is newer than the binary. */
function makeAgentBinary(): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('make', ['-s', 'agent-binary'], { cwd: ROOT, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`make agent-binary failed: ${err.message}\n${stdout}${stderr}`));
      else resolve();
    });
  });
}

/** TCP sockets of process `pid` from /proc (IPv4 and IPv6): listening local ports and connected peers. */
function tcpSocketsOf(pid: number): { listening: string[]; peers: string[] } {
  const inodes = new Set<string>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      /* closed meanwhile */
    }
  }
  // Addresses in /proc/net/tcp* are hex, IPv4 in host (little-endian) byte order: 0100007F:1F90.
  const address = (hex: string): string => {
    const [ip, port] = hex.split(':') as [string, string];
    const v4 = ip.length === 8 ? ip : ip.startsWith('0000000000000000FFFF0000') ? ip.slice(24) : undefined;
    const host = v4
      ? v4
          .match(/../g)!
          .reverse()
          .map((b) => parseInt(b, 16))
          .join('.')
      : ip === '00000000000000000000000001000000'
        ? '::1'
        : `[${ip}]`;
    return `${host}:${parseInt(port, 16)}`;
  };
  const listening: string[] = [];
  const peers: string[] = [];
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of fs
      .readFileSync(`/proc/${pid}/net/${path.basename(table)}`, 'utf8')
      .split('\n')
      .slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || !inodes.has(f[9]!)) continue;
      if (f[3] === '0A') listening.push(address(f[1]!));
      else if (f[3] === '01') peers.push(address(f[2]!));
    }
  }
  return { listening: [...new Set(listening)].sort(), peers: [...new Set(peers)].sort() };
}

/** PATH of this machine without any directory that holds a `node`: the site has no Node. */
function pathWithoutNode(): string {
  return (process.env.PATH ?? '')
    .split(':')
    .filter((d) => d && !fs.existsSync(path.join(d, 'node')))
    .join(':');
}

describe('agent single executable (make agent-binary), run as an air-gapped site would', function () {
  // The build itself takes seconds, but it competes with other builds on a shared 2-core machine.
  this.timeout(60_000);
  let site: string;
  let binary: string;
  let siteEnv: Record<string, string>;
  const temps: string[] = [];
  const clients: RawClient[] = [];
  let echo: EchoUpstream | undefined;

  before(async function () {
    this.timeout(600_000);
    await makeAgentBinary();
    site = makeTempDir('burrow-site-');
    temps.push(site);
    binary = path.join(site, 'burrow-agent');
    fs.copyFileSync(BINARY, binary);
    fs.chmodSync(binary, 0o755);
    siteEnv = { PATH: pathWithoutNode(), HOME: site, LANG: 'C.UTF-8' };
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await killAll();
  });
  after(async () => {
    await echo?.stop();
    for (const t of temps) fs.rmSync(t, { recursive: true, force: true });
    expect(liveProcessCount(), 'child processes left').to.equal(0);
  });

  /** The copied binary as a process in the site directory, with no node anywhere on its PATH. */
  const agentBinary = (name: string, args: string[]): BurrowProcess =>
    new BurrowProcess(name, '', args, {}, { executable: binary, cwd: site, env: siteEnv });
  const runToEnd = async (args: string[]): Promise<{ exit: Exit; stdout: string; stderr: string }> => {
    const p = agentBinary(`burrow-agent ${args[0]}`, args);
    const exit = await p.waitExit(30_000);
    return { exit, stdout: p.stdout, stderr: p.stderrLines.join('\n') };
  };

  it('the site really has no node: not on PATH, no NODE_PATH, an empty working directory besides the binary', () => {
    expect((siteEnv.PATH ?? '').split(':').some((d) => fs.existsSync(path.join(d, 'node')))).to.equal(false);
    expect(siteEnv).to.not.have.property('NODE_PATH');
    expect(fs.readdirSync(site)).to.deep.equal(['burrow-agent']);
  });

  it('the .sha256 file is in sha256sum format and matches the binary', async () => {
    const line = fs.readFileSync(`${BINARY}.sha256`, 'utf8');
    const m = /^([0-9a-f]{64}) {2}(\S+)\n$/.exec(line);
    expect(m, line).to.not.equal(null);
    expect(m![2]).to.equal(BINARY_NAME);
    expect(m![1]).to.equal(createHash('sha256').update(fs.readFileSync(binary)).digest('hex'));
    // The way the install guide verifies it.
    const check = await new Promise<string>((resolve, reject) =>
      execFile('sha256sum', ['-c', `${BINARY_NAME}.sha256`], { cwd: path.dirname(BINARY) }, (err, out) =>
        err ? reject(err) : resolve(out),
      ),
    );
    expect(check.trim()).to.equal(`${BINARY_NAME}: OK`);
  });

  it(
    '--version prints the agent version and protocol versions on one line, the same as node ' +
      'packages/agent/dist/cli.js',
    async () => {
      const fromBinary = await runToEnd(['--version']);
      const fromNode = await runCli(AGENT_CLI, ['--version']);
      expect(fromBinary.exit).to.deep.equal({ code: 0, signal: null });
      expect(fromBinary.stdout).to.equal(`${AGENT_VERSION} (protocol ${PROTOCOL_VERSIONS.join(', ')})\n`);
      expect(fromBinary.stdout).to.equal(fromNode.stdout);
      // No "single executable applications are experimental" warning, nothing else on stderr.
      expect(fromBinary.stderr).to.equal('');
    },
  );

  it('self-check: every proto, the Cedar wasm engine and jose work from inside the binary', async () => {
    const r = await runToEnd(['self-check']);
    expect(r.exit.code, r.stderr).to.equal(0);
    const protos = listProtoFiles(PROTO_DIR, undefined);
    const cedarVersion = (
      require('@cedar-policy/cedar-wasm/nodejs') as { getCedarVersion(): string }
    ).getCedarVersion();
    expect(r.stdout).to.equal(
      `self-check ok: single executable yes; ${protos.length} protos (${protos.join(', ')}); ` +
        `cedar ${cedarVersion} allow/deny; jose ES256 sign/verify\n`,
    );
    expect(r.stderr).to.equal('');
    // The same check passes in plain Node, and says so.
    const plain = await runCli(AGENT_CLI, ['self-check']);
    expect(plain.stdout).to.equal(r.stdout.replace('single executable yes', 'single executable no'));
  });

  it(
    'enrolls with a join token against a real broker process, ' + 'then runs and answers a call through the caller API',
    async () => {
      const world = makeTempDir('burrow-binary-e2e-');
      temps.push(world);
      const pkiDir = path.join(world, 'pki');
      expect((await runCli(PKI_CLI, ['init', '--dir', pkiDir])).exit.code).to.equal(0);
      const broker = await startBroker([
        '--pki-dir',
        pkiDir,
        '--agent-listen',
        '127.0.0.1:0',
        '--api-listen',
        '127.0.0.1:0',
        '--tls-dns',
        'localhost',
        '--tls-ip',
        '127.0.0.1',
        '--agent-wait',
        '5s',
      ]);
      const brokerAddress = `127.0.0.1:${broker.ports.agentPort}`;
      const token = await runCli(PKI_CLI, [
        'token',
        'create',
        '--dir',
        pkiDir,
        '--agent-id',
        'air-gapped-site',
        '--ttl',
        '10m',
        '--broker',
        brokerAddress,
      ]);
      expect(token.exit.code).to.equal(0);

      // A relative state directory: the binary resolves it against its working directory.
      const enrolled = await runToEnd([
        'enroll',
        '--broker',
        brokerAddress,
        '--token',
        token.stdout.trim(),
        '--state-dir',
        'state',
      ]);
      expect(enrolled.exit.code, enrolled.stderr).to.equal(0);
      expect(enrolled.stdout).to.match(
        /^enrolled as spiffe:\/\/burrow\.local\/agent\/air-gapped-site; state in state;/,
      );
      expect(fs.statSync(path.join(site, 'state', 'tls.key')).mode & 0o777).to.equal(0o600);

      echo = await new EchoUpstream().start();
      const agent = agentBinary('agent-binary', [
        'run',
        '--broker',
        brokerAddress,
        '--state-dir',
        'state',
        '--upstream',
        `*=${echo.address}`,
        '--admin-listen',
        '127.0.0.1:0',
        '--drain-timeout',
        '5s',
      ]);
      const started = await agent.waitForLog('agent started', () => true, { timeoutMs: 20_000 });
      await Promise.all([
        agent.waitForLog('tunnel session established'),
        broker.proc.waitForLog('agent connected', (l) => l.agentId === 'air-gapped-site'),
      ]);
      expect((await httpGet(`http://127.0.0.1:${String(started.adminPort)}/readyz`)).status).to.equal(200);

      const svc = await issueCertificate({ dir: pkiDir, role: 'service', name: 'platform' });
      await writeIssued(path.join(world, 'svc'), svc);
      const caller = new RawClient(
        `127.0.0.1:${broker.ports.apiPort}`,
        mtlsCredentials({
          cert: path.join(world, 'svc', 'tls.crt'),
          key: path.join(world, 'svc', 'tls.key'),
          ca: path.join(world, 'svc', 'ca.crt'),
        }),
        { 'grpc.ssl_target_name_override': 'localhost' },
      );
      clients.push(caller);
      const md = new Metadata();
      md.set('burrow-agent-id', 'air-gapped-site');
      const res = await caller.unary(ECHO.unary, Buffer.from('answered by the single executable'), md);
      expect(res.status.code).to.equal(Status.OK);
      expect(res.response.toString()).to.equal('answered by the single executable');
      expect(echo.calls.map((c) => c.method)).to.deep.equal([ECHO.unary]);

      // No telemetry, no update check: the binary's only TCP peers are its broker and its upstream,
      // and it listens only where told to.
      const sockets = tcpSocketsOf(agent.pid);
      expect(sockets.listening).to.deep.equal([`127.0.0.1:${String(started.adminPort)}`]);
      expect(sockets.peers.length).to.be.at.least(2);
      for (const peer of sockets.peers) expect([brokerAddress, echo.address], peer).to.include(peer);

      // SIGTERM drains and exits 0, as systemd's stop does.
      agent.signal('SIGTERM');
      expect(await agent.waitExit(15_000)).to.deep.equal({ code: 0, signal: null });
      broker.proc.signal('SIGTERM');
      expect(await broker.proc.waitExit(15_000)).to.deep.equal({ code: 0, signal: null });
    },
  );
});
