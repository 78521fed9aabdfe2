import { expect } from 'chai';
import { mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { loadJose } from '@burrow/agent';
import { parseDurationMs } from '@burrow/tunnel';
import { accepts, freePorts, portsThatAccepted } from './helpers/free-port';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { AUD, ISS, jwksOf, makeKey } from './helpers/token-fixture';
import {
  AGENT_CLI,
  BROKER_CLI,
  BurrowProcess,
  httpGet,
  PKI_CLI,
  killAll,
  runCli,
  startAgent,
  startBroker,
} from './helpers/processes';

/**
 * The two binaries as an operator meets them: help, version, configuration from flags, environment
 * and a YAML file, and the promise that a bad value is one line on stderr naming the field, exit
 * code 2, before anything listens.
 */
describe('cli', function () {
  this.timeout(20_000);
  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let agentCert: CertFiles;
  const version = (require('../../packages/broker/package.json') as { version: string }).version;
  const agentVersion = (require('../../packages/agent/package.json') as { version: string }).version;

  before(async () => {
    pki = await PkiFixture.create();
    [brokerCert, agentCert] = await Promise.all([pki.issue('broker', 'b'), pki.issue('agent', 'site-a')]);
  });
  afterEach(async () => {
    await killAll();
  });
  after(() => pki?.cleanup());

  /** Flag list from a map; `undefined` leaves a flag out (flags given twice become lists in yargs). */
  const argv = (flags: Record<string, string | undefined>): string[] =>
    Object.entries(flags).flatMap(([k, v]) => (v === undefined ? [] : [`--${k}`, v]));

  const brokerFlags = (ports: number[], overrides: Record<string, string | undefined> = {}): string[] =>
    argv({
      'agent-listen': `127.0.0.1:${ports[0]}`,
      'api-listen': `127.0.0.1:${ports[1]}`,
      'admin-listen': `127.0.0.1:${ports[2]}`,
      'tls-cert': brokerCert.cert,
      'tls-key': brokerCert.key,
      ca: brokerCert.ca,
      ...overrides,
    });

  const agentFlags = (ports: number[], overrides: Record<string, string | undefined> = {}): string[] =>
    argv({
      broker: `127.0.0.1:${ports[0]}`,
      'local-listen': `127.0.0.1:${ports[1]}`,
      'admin-listen': `127.0.0.1:${ports[2]}`,
      'tls-cert': agentCert.cert,
      'tls-key': agentCert.key,
      ca: agentCert.ca,
      ...overrides,
    });

  /**
   * Runs the CLI, probing `ports` the whole time it lives: it must exit 2 with exactly one stderr
   * line `<prog>: <field>: ...`, and no port may ever have accepted a connection.
   */
  async function expectConfigError(
    cli: string,
    flags: string[],
    field: string,
    ports: number[],
    env: Record<string, string> = {},
  ): Promise<string> {
    const prog = cli === BROKER_CLI ? 'burrow-broker' : 'burrow-agent';
    const args = [cli === BROKER_CLI ? 'serve' : 'run', ...flags];
    // Precondition: the ports are free, so a hit below can only be this process.
    for (const p of ports) expect(await accepts(p), `port ${p} free before the run`).to.equal(false);
    const proc = new BurrowProcess(prog, cli, args, env);
    // A binary that accepted the bad value runs on; stop it at once so the test fails fast.
    void proc.waitForLog(cli === BROKER_CLI ? 'broker started' : 'agent started').then(
      () => proc.signal('SIGKILL'),
      () => {},
    );
    const hits = await portsThatAccepted(ports, proc.exited);
    const exit = await proc.waitExit();
    const lines = proc.stderrLines.filter((l) => l !== '');
    expect(exit, `stderr:\n${lines.join('\n')}`).to.deep.equal({ code: 2, signal: null });
    expect(lines, 'exactly one stderr line').to.have.length(1);
    expect(lines[0]).to.match(new RegExp(`^${prog}: ${field.replace(/[-]/g, '\\-')}: \\S`));
    expect(proc.stdout).to.equal('');
    expect(hits, 'ports that accepted a connection').to.deep.equal([]);
    return lines[0]!;
  }

  describe('usage errors: one line, the flag as typed, where else it can come from', () => {
    /** Runs a binary that must refuse its command line: exit 2, nothing on stdout, exactly `line` on stderr. */
    const refused = async (cli: string, args: string[], line: string): Promise<void> => {
      const r = await runCli(cli, args);
      expect(r.exit, r.stderrLines.join('\n')).to.deep.equal({ code: 2, signal: null });
      expect(r.stdout).to.equal('');
      expect(r.stderrLines).to.deep.equal([line]);
    };

    it('a misspelt flag is named once, without its camelCase twin', async () => {
      await refused(
        BROKER_CLI,
        ['serve', '--admin-listn', '127.0.0.1:0'],
        'burrow-broker: unknown argument: --admin-listn',
      );
      await refused(
        AGENT_CLI,
        ['run', '--bogus-flag', '1', 'extra'],
        'burrow-agent: unknown arguments: --bogus-flag, extra',
      );
    });

    it('a flag in snake_case or camelCase is pointed to its real name, not reported missing', async () => {
      const dir = path.join(pki.root, 'no-such-pki');
      await refused(
        PKI_CLI,
        ['token', 'create', '--dir', dir, '--agent_id', 'site-a'],
        'burrow-pki: unknown flag --agent_id: did you mean --agent-id?',
      );
      await refused(
        BROKER_CLI,
        ['serve', '--agent_listen', '127.0.0.1:0'],
        'burrow-broker: unknown flag --agent_listen: did you mean --agent-listen?',
      );
      // yargs would take the camelCase spelling silently: one name per flag.
      await refused(
        BROKER_CLI,
        ['status', '--adminListen', '127.0.0.1:1'],
        'burrow-broker: unknown flag --adminListen: did you mean --admin-listen?',
      );
      await refused(
        PKI_CLI,
        ['token', 'create', '--dir', dir, '--agentId', 'site-a'],
        'burrow-pki: unknown flag --agentId: did you mean --agent-id?',
      );
    });

    it('a missing required flag names its environment variable', async () => {
      const state = path.join(pki.root, 'enroll-state');
      await refused(
        AGENT_CLI,
        ['enroll', '--broker', '127.0.0.1:1', '--state-dir', state],
        'burrow-agent: missing required flag: --token (or BURROW_AGENT_TOKEN)',
      );
      await refused(
        AGENT_CLI,
        // The broker comes from a self-contained token: only the token itself is required.
        ['enroll', '--state-dir', state],
        'burrow-agent: missing required flag: --token (or BURROW_AGENT_TOKEN)',
      );
      await refused(
        PKI_CLI,
        ['issue', '--dir', path.join(pki.root, 'no-such-pki')],
        'burrow-pki: missing required flags: --role (or BURROW_PKI_ROLE), --out (or BURROW_PKI_OUT)',
      );
    });

    it('a value outside the choices is one line naming the argument', async () => {
      await refused(
        BROKER_CLI,
        ['agents', 'frob'],
        'burrow-broker: action: "frob" is not one of "list", "show", "disconnect"',
      );
    });

    it('the admin commands name the admin address as serve does: --admin-listen', async () => {
      const r = await runCli(BROKER_CLI, ['status', '--help']);
      expect(r.exit.code).to.equal(0);
      expect(r.stdout).to.match(/--admin-listen\s/);
      expect(r.stdout).not.to.match(/--admin\s/);
    });
  });

  describe('help and version', () => {
    it('broker `serve --help` exits 0 and lists every flag', async () => {
      const r = await runCli(BROKER_CLI, ['serve', '--help']);
      expect(r.exit.code).to.equal(0);
      for (const flag of [
        '--agent-listen',
        '--api-listen',
        '--admin-listen',
        '--tls-cert',
        '--tls-key',
        '--ca',
        '--upstream',
        '--config',
        '--drain-timeout',
        '--agent-wait',
        '--keepalive-time',
        '--keepalive-timeout',
        '--log-format',
        '--log-level',
        '--max-message-bytes',
      ]) {
        expect(r.stdout, flag).to.include(flag);
      }
    });

    it('broker `--help` exits 0 and names the serve command', async () => {
      const r = await runCli(BROKER_CLI, ['--help']);
      expect(r.exit.code).to.equal(0);
      expect(r.stdout).to.match(/burrow-broker serve/);
    });

    it('agent `run --help` exits 0 and lists every flag', async () => {
      const r = await runCli(AGENT_CLI, ['run', '--help']);
      expect(r.exit.code).to.equal(0);
      for (const flag of [
        '--broker',
        '--tls-cert',
        '--tls-key',
        '--ca',
        '--upstream',
        '--local-listen',
        '--admin-listen',
        '--reconnect-base',
        '--reconnect-max',
        '--keepalive-time',
        '--keepalive-timeout',
        '--config',
      ]) {
        expect(r.stdout, flag).to.include(flag);
      }
    });

    it('`--version` prints the package version and the protocol versions it speaks (broker and agent)', async () => {
      const [b, a] = await Promise.all([runCli(BROKER_CLI, ['--version']), runCli(AGENT_CLI, ['--version'])]);
      expect(b.exit.code).to.equal(0);
      expect(a.exit.code).to.equal(0);
      expect(b.stdout.trim()).to.equal(`${version} (protocol 4)`);
      expect(a.stdout.trim()).to.equal(`${agentVersion} (protocol 4)`);
    });
  });

  describe('bad values: one line naming the field, exit 2, nothing listens', () => {
    it('--agent-listen nope', async () => {
      const ports = await freePorts(3);
      const line = await expectConfigError(
        BROKER_CLI,
        brokerFlags(ports, { 'agent-listen': 'nope' }),
        'agent-listen',
        ports.slice(1),
      );
      expect(line).to.include('"nope"');
    });

    it('--gateway-mapping with an error: FILE:LINE: problem; a mapping reading tokens needs a key source', async () => {
      const ports = await freePorts(3);
      const file = path.join(pki.root, 'gw.conf');
      writeFileSync(
        file,
        'token required\nsubject.type User\nsubject.id claim:sub\nroute GET /a action=a\ndefault deny\n',
      );
      const line = await expectConfigError(
        AGENT_CLI,
        agentFlags(ports, { 'gateway-mapping': file }),
        'gateway-mapping',
        ports.slice(1),
      );
      expect(line).to.equal(
        `burrow-agent: gateway-mapping: ${file}:4: route needs action=... and resource=Type::"..."`,
      );
      writeFileSync(file, 'token required\nsubject.type User\nsubject.id claim:sub\ndefault deny\n');
      const policies = path.join(pki.root, 'gw-policies');
      mkdirSync(policies, { recursive: true });
      const noKeys = await expectConfigError(
        AGENT_CLI,
        agentFlags(ports, { 'gateway-mapping': file, policies }),
        'gateway-mapping',
        ports.slice(1),
      );
      expect(noKeys).to.include('says token required: set --jwks, --jwks-url or --introspection-url');
      const jwks = path.join(pki.root, 'gw-jwks.json');
      writeFileSync(jwks, '{"keys": []}');
      const keysOnly = { 'gateway-mapping': file, policies, jwks, 'token-issuer': 'https://idp.test' };
      const noAudience = await expectConfigError(
        AGENT_CLI,
        agentFlags(ports, keysOnly),
        'gateway-mapping',
        ports.slice(1),
      );
      expect(noAudience).to.include('set --token-audience');
      const noPolicies = await expectConfigError(AGENT_CLI, agentFlags(ports), 'gateway-mapping', ports.slice(1), {
        BURROW_AGENT_GATEWAY_MAPPING: file,
      });
      expect(noPolicies).to.include('needs --policies');
    });

    it('--max-message-bytes 5x', async () => {
      const ports = await freePorts(3);
      await expectConfigError(
        BROKER_CLI,
        brokerFlags(ports, { 'max-message-bytes': '5x' }),
        'max-message-bytes',
        ports,
      );
    });

    it('--agent-wait forever', async () => {
      const ports = await freePorts(3);
      await expectConfigError(BROKER_CLI, brokerFlags(ports, { 'agent-wait': 'forever' }), 'agent-wait', ports);
    });

    it('a duration without a unit, from the flag, the environment and the config file (broker and agent)', async () => {
      const ports = await freePorts(3);
      const file = path.join(pki.root, 'drain.yaml');
      writeFileSync(file, 'drain-timeout: 30\n');
      const runs: [string[], Record<string, string>][] = [
        [brokerFlags(ports, { 'drain-timeout': '30' }), {}],
        [brokerFlags(ports), { BURROW_BROKER_DRAIN_TIMEOUT: '30' }],
        [[...brokerFlags(ports), '--config', file], {}],
      ];
      for (const [flags, env] of runs) {
        expect(await expectConfigError(BROKER_CLI, flags, 'drain-timeout', ports, env)).to.equal(
          'burrow-broker: drain-timeout: "30" has no unit; write 30s or 30ms',
        );
      }
      const agent = agentFlags(ports, { 'reconnect-base': '1.5' });
      expect(await expectConfigError(AGENT_CLI, agent, 'reconnect-base', ports.slice(1))).to.equal(
        'burrow-agent: reconnect-base: "1.5" has no unit; write 1.5s or 1.5ms',
      );
    });

    it('0 needs no unit (it means the same in every unit); other durations do', () => {
      expect(parseDurationMs('drain-timeout', 0)).to.equal(0);
      expect(parseDurationMs('drain-timeout', '0')).to.equal(0);
      expect(parseDurationMs('drain-timeout', '1m30s')).to.equal(90_000);
      expect(() => parseDurationMs('agent-wait', 5000)).to.throw(
        'agent-wait: "5000" has no unit; write 5000s or 5000ms',
      );
    });

    it('--handshake-timeout 10ms (below 100ms)', async () => {
      const ports = await freePorts(3);
      const line = await expectConfigError(
        BROKER_CLI,
        brokerFlags(ports, { 'handshake-timeout': '10ms' }),
        'handshake-timeout',
        ports,
      );
      expect(line).to.include('must be from 100ms to 1h');
    });

    it('--max-sessions-per-agent -1', async () => {
      const ports = await freePorts(3);
      await expectConfigError(
        BROKER_CLI,
        brokerFlags(ports, { 'max-sessions-per-agent': '-1' }),
        'max-sessions-per-agent',
        ports,
      );
    });

    it('--upstream foo (no =)', async () => {
      const ports = await freePorts(3);
      await expectConfigError(BROKER_CLI, brokerFlags(ports, { upstream: 'foo' }), 'upstream', ports);
    });

    it('missing --tls-cert', async () => {
      const ports = await freePorts(3);
      const line = await expectConfigError(
        BROKER_CLI,
        brokerFlags(ports, { 'tls-cert': undefined }),
        'tls-cert',
        ports,
      );
      expect(line).to.include('required');
    });

    it('unreadable --ca /nonexistent', async () => {
      const ports = await freePorts(3);
      const line = await expectConfigError(BROKER_CLI, brokerFlags(ports, { ca: '/nonexistent' }), 'ca', ports);
      expect(line).to.include('/nonexistent');
    });

    it('agent without --broker', async () => {
      const ports = await freePorts(3);
      await expectConfigError(AGENT_CLI, agentFlags(ports, { broker: undefined }), 'broker', ports.slice(1));
    });

    it('agent --max-brokers 0', async () => {
      const ports = await freePorts(3);
      const line = await expectConfigError(
        AGENT_CLI,
        agentFlags(ports, { 'max-brokers': '0' }),
        'max-brokers',
        ports.slice(1),
      );
      expect(line).to.include('"0" is not a whole number from 1 to 64');
    });

    it('agent --local-listen 0.0.0.0:0 without local TLS', async () => {
      const ports = await freePorts(3);
      const line = await expectConfigError(
        AGENT_CLI,
        agentFlags(ports, { 'local-listen': '0.0.0.0:0' }),
        'local-listen',
        ports.slice(2),
      );
      expect(line).to.match(/loopback/);
    });

    it('a YAML config file with an unknown key names the key', async () => {
      const ports = await freePorts(3);
      const file = path.join(pki.root, 'unknown-key.yaml');
      writeFileSync(file, `admin-listen: 127.0.0.1:${ports[2]}\nagent-wiat: 5s\n`);
      const line = await expectConfigError(
        BROKER_CLI,
        [...brokerFlags(ports, { 'admin-listen': undefined }), '--config', file],
        'agent-wiat',
        ports,
      );
      expect(line).to.include('unknown key');
    });

    it('a YAML config file with a syntax error names the line', async () => {
      const ports = await freePorts(3);
      const file = path.join(pki.root, 'syntax.yaml');
      writeFileSync(file, 'log-level: info\nlog-format: json\nbroker-id: a: b\nagent-wait: 5s\n');
      const line = await expectConfigError(BROKER_CLI, [...brokerFlags(ports), '--config', file], 'config', ports);
      expect(line).to.match(/line 3\b/);
    });
  });

  describe('certificate files are checked before anything listens', () => {
    it('broker --tls-cert holding an AGENT certificate', async () => {
      const ports = await freePorts(3);
      await expectConfigError(
        BROKER_CLI,
        brokerFlags(ports, { 'tls-cert': agentCert.cert, 'tls-key': agentCert.key }),
        'tls-cert',
        ports,
      );
    });

    it('broker --tls-key that does not match --tls-cert', async () => {
      const ports = await freePorts(3);
      await expectConfigError(BROKER_CLI, brokerFlags(ports, { 'tls-key': agentCert.key }), 'tls-key', ports);
    });

    it('agent --tls-cert holding a BROKER certificate', async () => {
      const ports = await freePorts(3);
      await expectConfigError(
        AGENT_CLI,
        agentFlags(ports, { 'tls-cert': brokerCert.cert, 'tls-key': brokerCert.key }),
        'tls-cert',
        ports.slice(1),
      );
    });
  });

  describe('configuration sources', () => {
    /** Asserts the broker answers /healthz on `port` and nothing answers on `notPorts`, then stops it with SIGTERM. */
    async function expectAdminOn(
      proc: BurrowProcess,
      adminPort: number | undefined,
      port: number,
      notPorts: number[],
    ): Promise<void> {
      expect(adminPort).to.equal(port);
      const res = await httpGet(`http://127.0.0.1:${port}/healthz`);
      expect(res.status).to.equal(200);
      for (const p of notPorts) expect(await accepts(p), `port ${p}`).to.equal(false);
      proc.signal('SIGTERM');
      expect(await proc.waitExit()).to.deep.equal({ code: 0, signal: null });
    }

    it('a config file with valid keys applies (admin-listen only in the file -> /healthz answers)', async () => {
      const ports = await freePorts(3);
      const file = path.join(pki.root, 'valid.yaml');
      writeFileSync(file, `admin-listen: 127.0.0.1:${ports[2]}\nbroker-id: from-file\nagent-wait: 2s\n`);
      const {
        proc,
        ports: got,
        started,
      } = await startBroker([...brokerFlags(ports, { 'admin-listen': undefined }), '--config', file]);
      expect(started.brokerId).to.equal('from-file');
      await expectAdminOn(proc, got.adminPort, ports[2]!, []);
    });

    it('BURROW_BROKER_ADMIN_LISTEN applies', async () => {
      const ports = await freePorts(3);
      const { proc, ports: got } = await startBroker(brokerFlags(ports, { 'admin-listen': undefined }), {
        BURROW_BROKER_ADMIN_LISTEN: `127.0.0.1:${ports[2]}`,
      });
      await expectAdminOn(proc, got.adminPort, ports[2]!, []);
    });

    it(
      'agent max-brokers: default 3; the config file, BURROW_AGENT_MAX_BROKERS and --max-brokers each apply, in ' +
        'that order of precedence',
      async () => {
        const ports = await freePorts(3);
        const file = path.join(pki.root, 'max-brokers.yaml');
        writeFileSync(file, 'max-brokers: 2\n');
        const flags = agentFlags(ports, { 'local-listen': undefined, 'admin-listen': undefined });
        const cases: [string[], Record<string, string>, number][] = [
          [flags, {}, 3],
          [[...flags, '--config', file], {}, 2],
          [[...flags, '--config', file], { BURROW_AGENT_MAX_BROKERS: '4' }, 4],
          [[...flags, '--config', file, '--max-brokers', '5'], { BURROW_AGENT_MAX_BROKERS: '4' }, 5],
        ];
        for (const [args, env, want] of cases) {
          const { proc, started } = await startAgent(args, env);
          expect(started.maxBrokers, JSON.stringify({ args: args.slice(-4), env })).to.equal(want);
          proc.signal('SIGTERM');
          expect(await proc.waitExit()).to.deep.equal({ code: 0, signal: null });
        }
      },
    );

    it('agent gateway-mapping from the config file: the agent starts with it and says which', async () => {
      const ports = await freePorts(3);
      const example = path.join(__dirname, '..', '..', 'examples', 'package-proxy');
      const jose = await loadJose();
      const jwks = path.join(pki.root, 'started-jwks.json');
      writeFileSync(jwks, jwksOf(await makeKey(jose, 'ES256', 'k1')));
      const mapping = path.join(example, 'gateway-mapping.conf');
      const file = path.join(pki.root, 'gateway.yaml');
      writeFileSync(file, `gateway-mapping: ${mapping}\npolicies: ${path.join(example, 'policies')}\n`);
      const flags = agentFlags(ports, { 'local-listen': undefined, 'admin-listen': undefined });
      const { proc, started } = await startAgent([
        ...flags,
        ...['--config', file, '--jwks', jwks, '--token-issuer', ISS, '--token-audience', AUD],
      ]);
      expect(started.gatewayMapping).to.equal(mapping);
      proc.signal('SIGTERM');
      expect(await proc.waitExit()).to.deep.equal({ code: 0, signal: null });
    });

    it('a flag beats the environment, which beats the config file', async () => {
      const [a, b, fromFile, fromEnv, fromFlag] = await freePorts(5);
      const file = path.join(pki.root, 'precedence.yaml');
      writeFileSync(file, `admin-listen: 127.0.0.1:${fromFile}\nbroker-id: from-file\n`);
      const base = [...brokerFlags([a!, b!, 0], { 'admin-listen': undefined }), '--config', file];
      const env = { BURROW_BROKER_ADMIN_LISTEN: `127.0.0.1:${fromEnv}`, BURROW_BROKER_BROKER_ID: 'from-env' };

      const flagWins = await startBroker(
        [...base, '--admin-listen', `127.0.0.1:${fromFlag}`, '--broker-id', 'from-flag'],
        env,
      );
      expect(flagWins.started.brokerId).to.equal('from-flag');
      await expectAdminOn(flagWins.proc, flagWins.ports.adminPort, fromFlag!, [fromEnv!, fromFile!]);

      const envWins = await startBroker(base, env);
      expect(envWins.started.brokerId).to.equal('from-env');
      await expectAdminOn(envWins.proc, envWins.ports.adminPort, fromEnv!, [fromFlag!, fromFile!]);
    });
  });
});
