import { expect } from 'chai';
import { freePort } from './helpers/free-port';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import {
  AGENT_CLI,
  BROKER_CLI,
  httpRequest,
  killAll,
  runCli,
  startAgent,
  startBroker,
  tlsArgs,
} from './helpers/processes';

/** A GET with exactly the headers given (Host included), as a DNS-rebinding page or a probe sends it. */
const get = (port: number, path: string, headers: Record<string, string>): Promise<{ status: number; body: string }> =>
  httpRequest(`http://127.0.0.1:${port}${path}`, 'GET', headers);

/**
 * Admin reads under a foreign `Host` or `Origin` (issue 13, item 10): a DNS-rebinding page reaches
 * the admin listener under its own name and used to read /agents, /status and /metrics. Real
 * broker and agent processes; the extra name comes from the flag (broker) and the environment
 * (agent).
 */
describe('admin listeners refuse foreign Host and Origin headers (DNS rebinding)', function () {
  this.timeout(60_000);

  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let agentCert: CertFiles;
  let brokerAdmin = 0;
  let agentAdmin = 0;

  before(async () => {
    pki = await PkiFixture.create();
    [brokerCert, agentCert] = await Promise.all([pki.issue('broker', 'broker-1'), pki.issue('agent', 'site-a')]);
    const b = await startBroker([
      ...tlsArgs(brokerCert),
      '--agent-listen',
      '127.0.0.1:0',
      '--api-listen',
      '127.0.0.1:0',
      '--admin-listen',
      '127.0.0.1:0',
      '--admin-allowed-host',
      'Admin.Example.',
    ]);
    const a = await startAgent(
      [
        '--broker',
        `127.0.0.1:${b.ports.agentPort}`,
        ...tlsArgs(agentCert),
        '--upstream',
        `*=127.0.0.1:${await freePort()}`,
        '--admin-listen',
        '127.0.0.1:0',
      ],
      { BURROW_AGENT_ADMIN_ALLOWED_HOST: 'agent-admin.example' },
    );
    await b.proc.waitForLog('agent connected');
    brokerAdmin = b.ports.adminPort!;
    agentAdmin = a.ports.adminPort!;
  });
  after(async () => {
    await killAll();
    pki.cleanup();
  });

  const brokerPaths = ['/agents', '/agents/site-a', '/status', '/metrics', '/healthz', '/readyz'];
  const agentPaths = ['/brokers', '/metrics', '/healthz', '/readyz'];

  it('a foreign Host is refused with 403 and a line naming it and the flag, on every path of both', async () => {
    const listeners = [
      [brokerAdmin, brokerPaths, 'broker'],
      [agentAdmin, agentPaths, 'agent'],
    ] as const;
    for (const [port, paths, name] of listeners) {
      for (const path of paths) {
        for (const host of ['evil.example', `evil.example:${port}`, 'EVIL.example.', 'localhost.evil.example']) {
          const r = await get(port, path, { host });
          expect(r.status, `${name} ${path} Host ${host}`).to.equal(403);
          expect(r.body).to.match(
            /^admin request refused: Host "[a-z.]+" is not an allowed admin host; .*--admin-allowed-host [a-z.]+ .*\n$/,
          );
          expect(r.body).to.not.include('site-a');
        }
      }
    }
    const r = await get(brokerAdmin, '/agents', { host: 'evil.example' });
    console.log(`      broker GET /agents, Host evil.example: ${r.status} ${r.body.trim()}`);
  });

  it('localhost, loopback and IP literals (with or without a port) and the listed names are served', async () => {
    const common = (port: number): string[] => [
      `127.0.0.1:${port}`,
      '127.0.0.1',
      'localhost',
      `localhost:${port}`,
      'LOCALHOST',
      '[::1]',
      `[::1]:${port}`,
      // A scrape by an address the process may not see as its own (NAT, container port mapping).
      `10.1.2.3:${port}`,
      '[fd00::5]:9090',
    ];
    for (const host of [...common(brokerAdmin), 'admin.example', `admin.example:${brokerAdmin}`, 'ADMIN.EXAMPLE']) {
      for (const path of brokerPaths) {
        expect((await get(brokerAdmin, path, { host })).status, `broker ${path} Host ${host}`).to.equal(200);
      }
    }
    for (const host of [...common(agentAdmin), 'agent-admin.example']) {
      for (const path of agentPaths) {
        expect((await get(agentAdmin, path, { host })).status, `agent ${path} Host ${host}`).to.equal(200);
      }
    }
    // Each listener knows only its own list.
    expect((await get(agentAdmin, '/brokers', { host: 'admin.example' })).status).to.equal(403);
    expect((await get(brokerAdmin, '/agents', { host: 'agent-admin.example' })).status).to.equal(403);
  });

  it('an Origin naming a foreign host (or none) is refused even under an allowed Host', async () => {
    const reads = [
      [brokerAdmin, '/agents'],
      [brokerAdmin, '/metrics'],
      [agentAdmin, '/brokers'],
    ] as const;
    for (const [port, path] of reads) {
      const host = `127.0.0.1:${port}`;
      for (const origin of ['http://evil.example', `http://evil.example:${port}`, 'null', 'http://10.1.2.3']) {
        const r = await get(port, path, { host, origin });
        expect(r.status, `${path} Origin ${origin}`).to.equal(403);
        expect(r.body).to.match(/^admin request refused: Origin "[^"]+" /);
      }
      for (const origin of [`http://127.0.0.1:${port}`, 'http://localhost']) {
        expect((await get(port, path, { host, origin })).status, `${path} Origin ${origin}`).to.equal(200);
      }
    }
    const listed = await get(brokerAdmin, '/agents', { host: 'admin.example', origin: 'https://admin.example' });
    expect(listed.status).to.equal(200);
  });

  it('a bad --admin-allowed-host is one line naming the flag, before anything listens', async () => {
    const broker = ['serve', '--tls-cert', brokerCert.cert, '--tls-key', brokerCert.key, '--ca', brokerCert.ca];
    const agent = ['run', '--broker', '127.0.0.1:1'];
    agent.push('--tls-cert', agentCert.cert, '--tls-key', agentCert.key, '--ca', agentCert.ca);
    for (const [cli, args] of [
      [BROKER_CLI, broker],
      [AGENT_CLI, agent],
    ] as const) {
      for (const bad of ['evil.example:80', '*.example', 'http://x']) {
        const r = await runCli(cli, [...args, '--admin-allowed-host', bad]);
        expect(r.exit.code, `${args[0]} ${bad}`).to.equal(2);
        const line = r.stderrLines.find((l) => l.includes('admin-allowed-host'));
        expect(line, r.stderrLines.join('\n')).to.include(`"${bad}" is not a host name or IP address`);
      }
    }
  });
});
