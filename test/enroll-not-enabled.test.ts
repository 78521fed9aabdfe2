import * as path from 'node:path';
import { expect } from 'chai';
import { createJoinToken } from '@burrow/pki';
import { type CertFiles, PkiFixture } from './helpers/pki-fixture';
import { AGENT_CLI, tlsArgs, killAll, liveProcessCount, runCli, startBroker } from './helpers/processes';

const NOT_ENABLED = 'enrollment is not enabled on this broker (start it with --pki-dir)';

/**
 * `burrow-agent enroll` against a broker started without --pki-dir (issue 16, section 4): both the
 * agent and the broker's log say why, instead of a CA pin mismatch or a bare TLS refusal.
 */
describe('enrollment against a broker without --pki-dir (processes)', () => {
  let pki: PkiFixture;
  let brokerCert: CertFiles;

  before(async () => {
    pki = await PkiFixture.create();
    brokerCert = await pki.issue('broker', 'broker-1');
  });
  afterEach(async () => {
    await killAll();
  });
  after(() => {
    pki?.cleanup();
    expect(liveProcessCount(), 'child processes left').to.equal(0);
  });

  it('burrow-agent enroll exits non-zero saying so, and the broker logs it', async () => {
    const listen = ['--agent-listen', '127.0.0.1:0', '--api-listen', '127.0.0.1:0'];
    const { proc: broker, ports } = await startBroker([...listen, ...tlsArgs(brokerCert)]);
    const { token } = await createJoinToken({ dir: pki.pkiDir, agentId: 'site-a' });
    const { exit, stderrLines } = await runCli(AGENT_CLI, [
      'enroll',
      '--broker',
      `127.0.0.1:${ports.agentPort}`,
      '--token',
      token,
      '--state-dir',
      path.join(pki.root, 'state'),
    ]);
    expect(exit.code).to.not.equal(0);
    expect(stderrLines.join('\n')).to.equal(
      `burrow-agent: enroll: broker 127.0.0.1:${ports.agentPort}: ${NOT_ENABLED}`,
    );
    const refused = await broker.waitForLog('TLS handshake refused');
    expect(refused.hint).to.equal(`${NOT_ENABLED} (a client without a certificate, e.g. burrow-agent enroll)`);
  });
});
