import { once } from 'node:events';
import { expect } from 'chai';
import { Agent, type AgentConfig, connectHint } from '@burrow/agent';
import { Broker } from '@burrow/broker';
import { silentLogger } from '@burrow/tunnel';
import { freePort } from './helpers/free-port';
import { type CertFiles, PkiFixture } from './helpers/pki-fixture';
import { recordingLogger } from './helpers/recording-logger';
import { Stack } from './helpers/stack';

const ENROLL_AGAIN = /enroll again/;

/**
 * The hint of `cannot establish tunnel session`, one cause each (issue 16, section 4): only a
 * refusal of the agent's own certificate tells the operator to spend a join token.
 */
describe('agent connect hints', () => {
  let stack: Stack;
  let other: PkiFixture;
  let foreign: CertFiles;

  before(async () => {
    stack = await Stack.start({ startAgent: false });
    other = await PkiFixture.create();
    foreign = await other.issue('agent', 'site-a');
  });
  after(async () => {
    other?.cleanup();
    await stack?.stop();
  });

  /** Runs an agent with `overrides` until its first failed attempt; returns that warning. */
  async function firstFailure(overrides: Partial<AgentConfig>): Promise<Record<string, unknown>> {
    const { logger, records, events } = recordingLogger();
    const agent = new Agent(
      stack.agentConfigWith({ reconnectBaseMs: 20, reconnectMaxMs: 100, ...overrides }),
      logger,
      'test-agent/1',
    );
    await agent.start();
    try {
      for (;;) {
        const failure = records.find((r) => r.message === 'cannot establish tunnel session');
        if (failure) return failure;
        await once(events, 'record');
      }
    } finally {
      await agent.stop();
    }
  }

  it("the broker's caller API port: says so and names the agent port, not enroll again", async () => {
    const failure = await firstFailure({ brokers: [stack.apiAddress] });
    expect(failure.hint).to.equal(
      `${stack.apiAddress} is the broker's caller API, not its agent listener: point --broker at the broker's ` +
        'agent port (its --agent-listen)',
    );
  });

  it("the broker's admin port (plain HTTP): says so, not enroll again", async () => {
    const admin = stack.adminUrl.replace('http://', '');
    const failure = await firstFailure({ brokers: [admin] });
    expect(failure.hint).to.equal(
      `${admin} answers in plain HTTP, not TLS (the broker's admin port?): point --broker at the broker's agent ` +
        'port (its --agent-listen)',
    );
  });

  it("a name the broker's certificate lacks: names the names it has, not enroll again", async () => {
    const failure = await firstFailure({ brokerServerName: 'broker.example.com' });
    expect(failure.hint).to.equal(
      "the broker's certificate is not for the name broker.example.com (it has " +
        'URI:spiffe://burrow.local/broker/broker-1, DNS:localhost, IP Address:127.0.0.1, ' +
        'IP Address:0:0:0:0:0:0:0:1): dial one of its names, or set --broker-server-name',
    );
  });

  it('a broker certificate from another CA: names the CA file, not enroll again', async () => {
    const failure = await firstFailure({ caFile: foreign.ca });
    expect(failure.hint).to.equal(
      `the broker's certificate is not signed by the CA in ${foreign.ca}: check --ca-file and --broker`,
    );
  });

  it('connection refused: nothing listens at the address', async () => {
    const address = `127.0.0.1:${await freePort()}`;
    const failure = await firstFailure({ brokers: [address] });
    expect(failure.hint).to.equal(
      `nothing listens at ${address}: is the broker running, and is ${address} its agent port?`,
    );
  });

  it('a name that does not resolve: says so', async () => {
    const failure = await firstFailure({ brokers: ['no-such-host.invalid:7443'] });
    expect(failure.hint).to.equal("no-such-host.invalid does not resolve: check --broker and the site's DNS");
  });

  it("a cluster broker's peer listener: says so (the peer listener's own refusal), not enroll again", () => {
    // The words of the peer listener's admission check (broker peer-admission.ts, PEER_RULE).
    const message = 'certificate role "agent" may not use the peer API; a broker certificate is required';
    expect(connectHint({ address: '10.0.0.5:7444', message, code: 7, caFile: 'ca.crt' })).to.equal(
      "10.0.0.5:7444 is a broker's peer listener (its --peer-listen), not its agent listener: point --broker at " +
        "the broker's agent port (its --agent-listen)",
    );
  });

  it("the agent's own certificate refused (not from the broker's CA): enroll again", async () => {
    // With enrollment on, the broker lets such a connection through TLS and refuses it with a status.
    const broker = new Broker(
      {
        ...stack.brokerConfig,
        agentListen: '127.0.0.1:0',
        apiListen: '127.0.0.1:0',
        adminListen: '127.0.0.1:0',
        pkiDir: stack.pki.pkiDir,
      },
      silentLogger(),
    );
    const ports = await broker.start();
    try {
      const failure = await firstFailure({
        brokers: [`127.0.0.1:${ports.agentPort}`],
        tlsCertFile: foreign.cert,
        tlsKeyFile: foreign.key,
      });
      expect(String(failure.hint)).to.match(ENROLL_AGAIN);
      expect(String(failure.hint)).to.match(/^the broker refused this agent's certificate/);
    } finally {
      await broker.stop();
    }
  });
});
