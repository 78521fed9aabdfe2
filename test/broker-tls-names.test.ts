// Issue 16 item 4: `--tls-dns` adds to the default names of the broker's self-issued serving
// certificate (hostname, localhost, 127.0.0.1, ::1) instead of replacing them;
// `--no-default-names` keeps only the names given.
import { connect } from 'node:tls';
import { expect } from 'chai';
import { PkiFixture } from './helpers/pki-fixture';
import { killAll, runCli, startBroker, BROKER_CLI } from './helpers/processes';

/** The subjectAltName of the certificate served on 127.0.0.1:`port` (not verified: only read). */
function servedNames(port: number): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port, rejectUnauthorized: false, ALPNProtocols: ['h2'] }, () => {
      const names = (socket.getPeerCertificate().subjectaltname ?? '').split(', ');
      socket.destroy();
      resolve(names);
    });
    socket.on('error', reject);
  });
}

describe('broker self-issued certificate names (--tls-dns, --no-default-names)', function () {
  this.timeout(60_000);
  let pki: PkiFixture;

  before(async () => {
    pki = await PkiFixture.create();
  });
  afterEach(() => killAll());
  after(() => pki.cleanup());

  const serve = (extra: string[]) =>
    startBroker(['--pki-dir', pki.pkiDir, '--agent-listen', '127.0.0.1:0', '--api-listen', '127.0.0.1:0', ...extra]);

  it('--tls-dns adds to localhost, 127.0.0.1 and ::1', async () => {
    const { ports } = await serve(['--tls-dns', 'example.internal']);
    const names = await servedNames(ports.agentPort);
    expect(names).to.include.members(['DNS:example.internal', 'DNS:localhost', 'IP Address:127.0.0.1']);
    expect(names.some((n) => n.startsWith('IP Address:0:0:0:0:0:0:0:1') || n === 'IP Address:::1')).to.equal(true);
  });

  it('--no-default-names keeps only the names given', async () => {
    const { ports } = await serve(['--tls-dns', 'example.internal', '--no-default-names']);
    const names = await servedNames(ports.agentPort);
    expect(names).to.include('DNS:example.internal');
    expect(names.filter((n) => n.startsWith('DNS:') || n.startsWith('IP Address:'))).to.deep.equal([
      'DNS:example.internal',
    ]);
  });

  it('--no-default-names without --tls-dns or --tls-ip is one line naming the field', async () => {
    const run = await runCli(
      BROKER_CLI,
      ['serve', '--pki-dir', pki.pkiDir, '--agent-listen', '127.0.0.1:0', '--api-listen', '127.0.0.1:0'],
      { BURROW_BROKER_DEFAULT_NAMES: 'false' },
      30_000,
    );
    expect(run.exit.code).to.equal(2);
    expect(run.stderrLines).to.have.length(1);
    expect(run.stderrLines[0]).to.match(/^burrow-broker: default-names: .*--tls-dns or --tls-ip/);
  });
});
