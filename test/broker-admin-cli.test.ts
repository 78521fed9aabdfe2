import { expect } from 'chai';
import { X509Certificate } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { freePort } from './helpers/free-port';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import {
  BROKER_CLI,
  httpGet,
  httpRequest as request,
  killAll,
  runCli,
  startAgent,
  startBroker,
  type BurrowProcess,
  tlsArgs,
} from './helpers/processes';

/**
 * `burrow-broker agents list|show|disconnect` and `burrow-broker status` against real broker and
 * agent processes on a PKI made now, and the admin listener's rules for mutating requests.
 */
describe('burrow-broker agents / status (admin CLI, real processes)', function () {
  this.timeout(120_000);

  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let agentCert: CertFiles;

  before(async () => {
    pki = await PkiFixture.create();
    [brokerCert, agentCert] = await Promise.all([pki.issue('broker', 'broker-1'), pki.issue('agent', 'site-a')]);
  });
  afterEach(() => killAll());
  after(() => pki.cleanup());

  const certFlags = (): string[] => [
    ...tlsArgs(brokerCert),
    '--agent-listen',
    '127.0.0.1:0',
    '--api-listen',
    '127.0.0.1:0',
  ];

  /** A broker whose admin listener is at `adminHost`, with one agent connected. */
  async function brokerWithAgent(
    adminHost: string,
    extra: string[] = [],
  ): Promise<{ broker: BurrowProcess; agent: BurrowProcess; admin: string }> {
    const b = await startBroker([...certFlags(), '--admin-listen', `${adminHost}:0`, ...extra]);
    const a = await startAgent([
      '--broker',
      `127.0.0.1:${b.ports.agentPort}`,
      ...tlsArgs(agentCert),
      '--upstream',
      `*=127.0.0.1:${await freePort()}`,
    ]);
    await b.proc.waitForLog('agent connected');
    return { broker: b.proc, agent: a.proc, admin: `127.0.0.1:${b.ports.adminPort}` };
  }

  const cli = (args: string[], env: Record<string, string> = {}) => runCli(BROKER_CLI, args, env, 30_000);

  it('status names the AuthZEN listener with its bound port', async () => {
    const { admin } = await brokerWithAgent('127.0.0.1', ['--authzen-listen', '127.0.0.1:0']);
    const status = JSON.parse((await cli(['status', '--admin-listen', admin, '--json'])).stdout) as {
      listeners: { authzen?: string };
    };
    expect(status.listeners.authzen).to.match(/^127\.0\.0\.1:[1-9]\d*$/);
    const text = await cli(['status', '--admin-listen', admin]);
    expect(text.exit.code, text.stderrLines.join('\n')).to.equal(0);
    expect(/^authzen listener\s+(\S+)$/m.exec(text.stdout)?.[1]).to.equal(status.listeners.authzen);
  });

  it('lists, shows, reports status and disconnects an agent that then reconnects', async () => {
    const { broker, admin } = await brokerWithAgent('127.0.0.1');
    const serial = new X509Certificate(readFileSync(agentCert.cert)).serialNumber.toLowerCase();

    const list = await cli(['agents', 'list', '--admin-listen', admin]);
    expect(list.exit.code, list.stderrLines.join('\n')).to.equal(0);
    expect(list.stdout.split('\n')[0]).to.match(/^AGENT\s+SESSIONS\s+CONNECTED SINCE/);
    expect(list.stdout).to.match(/^site-a\s+1\s+/m);
    const listJson = JSON.parse((await cli(['agents', 'list', '--admin-listen', admin, '--json'])).stdout) as {
      id: string;
      connections: number;
    }[];
    expect(listJson.map((a) => [a.id, a.connections])).to.deep.equal([['site-a', 1]]);

    // The admin address from the environment.
    const fromEnv = await cli(['agents', 'list', '--json'], {
      BURROW_BROKER_ADMIN_LISTEN: admin,
      BURROW_BROKER_AGENT_LISTEN: '127.0.0.1:1',
    });
    expect(fromEnv.exit.code, fromEnv.stderrLines.join('\n')).to.equal(0);

    // The old name of the flag still works, with a warning naming the new one; both at once is an error.
    const oldName = await cli(['agents', 'list', '--json', '--admin', admin]);
    expect(oldName.exit.code, oldName.stderrLines.join('\n')).to.equal(0);
    expect(oldName.stderrLines).to.deep.equal([
      'burrow-broker: --admin (BURROW_BROKER_ADMIN) is deprecated: use --admin-listen',
    ]);
    const both = await cli(['agents', 'list', '--admin', admin, '--admin-listen', admin]);
    expect(both.exit.code).to.equal(2);
    expect(both.stderrLines).to.deep.equal([
      'burrow-broker: admin: is the old name of --admin-listen: give only --admin-listen',
    ]);

    // ... and from a YAML config file; an unknown key there is one line naming it.
    const configFile = path.join(pki.root, 'admin-cli.yaml');
    writeFileSync(configFile, `admin-listen: ${admin}\njson: true\ntimeout: 10s\n`);
    const fromConfig = await cli(['agents', 'list', '--config', configFile]);
    expect(fromConfig.exit.code, fromConfig.stderrLines.join('\n')).to.equal(0);
    expect((JSON.parse(fromConfig.stdout) as { id: string }[])[0]!.id).to.equal('site-a');
    writeFileSync(configFile, `admin-listen: ${admin}\nagent-listen: 127.0.0.1:1\n`);
    const badConfig = await cli(['status', '--config', configFile]);
    expect(badConfig.exit.code).to.equal(2);
    expect(badConfig.stderrLines).to.have.length(1);
    expect(badConfig.stderrLines[0]).to.match(/^burrow-broker: agent-listen: unknown key in /);

    const show = await cli(['agents', 'show', 'site-a', '--admin-listen', admin]);
    expect(show.exit.code).to.equal(0);
    expect(show.stdout).to.match(/^agent\s+site-a$/m);
    expect(show.stdout).to.include(serial);
    const detail = JSON.parse((await cli(['agents', 'show', 'site-a', '--admin-listen', admin, '--json'])).stdout) as {
      id: string;
      callsInFlight: number;
      sessions: {
        peer: string;
        certificate: { serial: string; spiffeId: string; notAfter: string; secondsLeft: number };
      }[];
    };
    expect(detail.id).to.equal('site-a');
    expect(detail.sessions).to.have.length(1);
    expect(detail.sessions[0]!.peer).to.match(/^127\.0\.0\.1:\d+$/);
    expect(detail.sessions[0]!.certificate.serial).to.equal(serial);
    expect(detail.sessions[0]!.certificate.spiffeId).to.equal('spiffe://burrow.local/agent/site-a');
    expect(Date.parse(detail.sessions[0]!.certificate.notAfter)).to.equal(
      Date.parse(new X509Certificate(readFileSync(agentCert.cert)).validTo),
    );
    expect(detail.callsInFlight).to.equal(0);

    const status = JSON.parse((await cli(['status', '--admin-listen', admin, '--json'])).stdout) as {
      agents: number;
      sessions: number;
      draining: boolean;
      ready: boolean;
      version: string;
      uptimeSeconds: number;
      pki: { enabled: boolean };
      listeners: { admin: string };
      servingCertificate: { spiffeId: string };
    };
    expect(status).to.include({ agents: 1, sessions: 1, draining: false, ready: true });
    expect(status.version).to.match(/^\d+\.\d+\.\d+/);
    expect(status.pki.enabled).to.equal(false);
    expect(status.listeners.admin).to.equal(admin);
    expect(status.servingCertificate.spiffeId).to.equal('spiffe://burrow.local/broker/broker-1');
    // A serving certificate from files has its expiry exported too (the file-certificate alert).
    const metrics = await httpGet(`http://${admin}/metrics`);
    const exported = /^burrow_pki_certificate_expiry_seconds\{role="broker"\} (\S+)$/m.exec(metrics.body);
    expect(exported, 'broker certificate expiry gauge').to.not.equal(null);
    const expectedSeconds =
      (Date.parse(new X509Certificate(readFileSync(brokerCert.cert)).validTo) - Date.now()) / 1000;
    expect(Number(exported![1])).to.be.closeTo(expectedSeconds, 60);
    const statusText = await cli(['status', '--admin-listen', admin]);
    expect(statusText.exit.code).to.equal(0);
    expect(statusText.stdout).to.match(/^state\s+ready$/m);
    expect(statusText.stdout).to.match(/^agents\s+1$/m);
    expect(statusText.stdout).to.match(/^authzen listener\s+off$/m);

    const connectsBefore = broker.logs.filter((l) => l.message === 'agent connected').length;
    const logIndex = broker.logs.length;
    const disconnect = await cli([
      'agents',
      'disconnect',
      'site-a',
      '--reason',
      'moving site-a to broker-2',
      '--admin-listen',
      admin,
    ]);
    expect(disconnect.exit.code, disconnect.stderrLines.join('\n')).to.equal(0);
    expect(disconnect.stdout).to.include('disconnected agent "site-a": closed 1 session(s)');
    expect(disconnect.stdout).to.include('will reconnect after its backoff unless its certificate is revoked');
    const logged = await broker.waitForLog('agent disconnected by an operator', () => true, { from: logIndex });
    expect(logged).to.include({ agentId: 'site-a', reason: 'moving site-a to broker-2' });
    // The agent comes back by itself.
    await broker.waitForLog('agent connected', () => true, { from: logIndex, timeoutMs: 30_000 });
    expect(broker.logs.filter((l) => l.message === 'agent connected').length).to.equal(connectsBefore + 1);
  });

  it('exits 1 for an agent that is not connected and 2 when the broker is unreachable, with one line', async () => {
    const { admin } = await brokerWithAgent('127.0.0.1');
    for (const args of [
      ['agents', 'show', 'nope'],
      ['agents', 'disconnect', 'nope'],
    ]) {
      const r = await cli([...args, '--admin-listen', admin]);
      expect(r.exit.code, args.join(' ')).to.equal(1);
      expect(r.stderrLines).to.deep.equal(['burrow-broker: agent "nope" is not connected to this broker']);
      expect(r.stdout).to.equal('');
    }
    const closed = `127.0.0.1:${await freePort()}`;
    for (const args of [['agents', 'list'], ['status'], ['agents', 'disconnect', 'site-a']]) {
      const r = await cli([...args, '--admin-listen', closed]);
      expect(r.exit.code, args.join(' ')).to.equal(2);
      expect(r.stderrLines).to.have.length(1);
      expect(r.stderrLines[0]).to.include(closed);
    }
    const noId = await cli(['agents', 'show', '--admin-listen', admin]);
    expect(noId.exit.code).to.equal(2);
    expect(noId.stderrLines).to.deep.equal(['burrow-broker: agent-id: agents show needs an agent id']);
  });

  it('serves disconnect only by POST, and never to a request a web page could forge', async () => {
    const { admin } = await brokerWithAgent('127.0.0.1');
    const url = `http://${admin}/agents/site-a/disconnect`;
    expect((await request(url, 'GET')).status).to.equal(405);
    expect((await request(`http://${admin}/agents/site-a`, 'POST')).status).to.equal(405);
    expect((await request(url, 'POST', { origin: 'http://evil.example' })).status).to.equal(403);
    expect((await request(url, 'POST', { host: 'evil.example' })).status).to.equal(403);
    // Still connected after the refused attempts.
    const r = await cli(['agents', 'list', '--admin-listen', admin, '--json']);
    expect((JSON.parse(r.stdout) as unknown[]).length).to.equal(1);
  });

  it('refuses disconnect off loopback without a token; with --admin-token-file it needs the token', async () => {
    const open = await brokerWithAgent('0.0.0.0');
    const refused = await cli(['agents', 'disconnect', 'site-a', '--admin-listen', open.admin]);
    expect(refused.exit.code).to.equal(3);
    expect(refused.stderrLines).to.have.length(1);
    expect(refused.stderrLines[0]).to.include('not loopback, and no admin token file is configured');
    // Read-only commands still work.
    expect((await cli(['agents', 'show', 'site-a', '--admin-listen', open.admin])).exit.code).to.equal(0);
    await killAll();

    const tokenFile = path.join(pki.root, 'admin-token');
    const wrongFile = path.join(pki.root, 'wrong-token');
    writeFileSync(tokenFile, 'c0ffee-admin-token-0123456789\n', { mode: 0o600 });
    writeFileSync(wrongFile, 'not-the-admin-token-0123456789\n', { mode: 0o600 });
    const guarded = await brokerWithAgent('0.0.0.0', ['--admin-token-file', tokenFile]);
    const noToken = await cli(['agents', 'disconnect', 'site-a', '--admin-listen', guarded.admin]);
    expect(noToken.exit.code).to.equal(3);
    expect(noToken.stderrLines[0]).to.include('missing or wrong admin token');
    expect(
      (await cli(['agents', 'disconnect', 'site-a', '--admin-listen', guarded.admin, '--admin-token-file', wrongFile]))
        .exit.code,
    ).to.equal(3);
    const ok = await cli(['agents', 'disconnect', 'site-a', '--admin-listen', guarded.admin], {
      BURROW_BROKER_ADMIN_TOKEN_FILE: tokenFile,
    });
    expect(ok.exit.code, ok.stderrLines.join('\n')).to.equal(0);
    expect(ok.stdout).to.include('closed 1 session(s)');
  });

  it('refuses a token file that is too short, naming the field', async () => {
    const short = path.join(pki.root, 'short-token');
    writeFileSync(short, 'abc\n');
    const r = await cli(['serve', ...certFlags(), '--admin-listen', '127.0.0.1:0', '--admin-token-file', short]);
    expect(r.exit.code).to.equal(2);
    expect(r.stderrLines).to.have.length(1);
    expect(r.stderrLines[0]).to.match(/^burrow-broker: admin-token-file: .* at least 16 characters/);
  });
});
