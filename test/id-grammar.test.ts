// Issue 13 item 9: one grammar for ids (agent, service and broker names; packages/tunnel ids.ts).
// Certificates the CA signed with names outside it (made directly, bypassing burrow-pki's checks)
// have no identity: the agent listener opens no session for them and the caller API serves no
// call, each with a log line naming the grammar; issuing, token creation and enrollment refuse
// such names with a message naming it.
import { expect } from 'chai';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import { enroll } from '@burrow/agent';
import { Broker, BROKER_DEFAULTS, brokerConfigFromArgs, serveDefaults } from '@burrow/broker';
import { createJoinToken, initPki, issueCertificate } from '@burrow/pki';
import { AGENT_ID_KEY, ID_GRAMMAR } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { forgeLeaf } from './helpers/forged-cert';
import { expectNoLeaks, snapshotResources, type ResourceSnapshot } from './helpers/leaks';
import { capturingLogger } from './helpers/policy-fixture';
import { RawAgent } from './helpers/raw-agent';
import { firstAnswer } from './helpers/raw-call';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';

const BAD_IDS: [string, string][] = [
  ['..', '..'],
  ['SITE-A', 'SITE-A'],
  ['3,000 characters', 'a'.repeat(3000)],
];

describe('one id grammar, enforced at issuing, enrollment and the listeners (issue 13 item 9)', function () {
  this.timeout(60_000);
  let root: string;
  let dir: string;
  let broker: Broker;
  let agentAddress: string;
  let apiAddress: string;
  let records: Record<string, unknown>[];
  let baseline: ResourceSnapshot;
  const stack = (): Broker => broker;

  before(async () => {
    baseline = snapshotResources();
    root = mkdtempSync(path.join(tmpdir(), 'burrow-ids-'));
    dir = path.join(root, 'pki');
    await initPki({ dir });
    const log = capturingLogger();
    records = log.records;
    broker = new Broker(
      {
        ...BROKER_DEFAULTS,
        agentListen: '127.0.0.1:0',
        apiListen: '127.0.0.1:0',
        pkiDir: dir,
        tlsDns: ['localhost'],
        tlsIp: ['127.0.0.1'],
        agentWaitMs: 500,
        drainTimeoutMs: 1_000,
      },
      log.logger,
    );
    const ports = await broker.start();
    agentAddress = `127.0.0.1:${ports.agentPort}`;
    apiAddress = `127.0.0.1:${ports.apiPort}`;
  });

  after(async () => {
    await broker.stop();
    rmSync(root, { recursive: true, force: true });
    await expectNoLeaks(baseline);
  });

  for (const [what, id] of BAD_IDS) {
    describe(`a name of ${what}`, () => {
      it('in an agent certificate signed by the CA opens no session at the agent listener', async () => {
        const cert = await forgeLeaf(dir, path.join(root, `agent-${what.length}-${id.length}`), {
          uris: [`spiffe://burrow.local/agent/${id}`],
          ekus: ['clientAuth'],
        });
        const agent = await RawAgent.connect(agentAddress, cert);
        try {
          const control = await agent.control();
          control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw-agent' } });
          const answer = await firstAnswer(control);
          if (answer.kind !== 'refused') throw new Error(`the broker answered with ${answer.kind}, not Refused`);
          console.log(`      session: ${Status[answer.code]}: ${answer.message.slice(0, 160)}`);
          expect(answer.code).to.equal(Status.PERMISSION_DENIED);
          expect(stack().registry.counts().sessions, 'sessions registered').to.equal(0);
        } finally {
          agent.close();
        }
        const line = records.find((r) => r.message === 'tunnel refused' && String(r.reason).includes(id.slice(0, 60)));
        expect(line, "the broker's log line").to.not.equal(undefined);
        expect(String(line!.reason)).to.include(ID_GRAMMAR);
      });

      it('in a service certificate signed by the CA gets no call through the caller API', async () => {
        const cert = await forgeLeaf(dir, path.join(root, `service-${what.length}-${id.length}`), {
          uris: [`spiffe://burrow.local/service/${id}`],
          ekus: ['clientAuth'],
        });
        const caller = new RawClient(apiAddress, mtlsCredentials(cert));
        try {
          const md = new Metadata();
          md.set(AGENT_ID_KEY, 'site-a');
          const err = await caller.unary(ECHO.unary, Buffer.from('x'), md, { deadline: Date.now() + 5_000 }).then(
            () => undefined,
            (e: ServiceError) => e,
          );
          expect(err, 'the call must fail').to.not.equal(undefined);
          console.log(`      call: ${Status[err!.code]}: ${err!.details.slice(0, 160)}`);
          expect(err!.code).to.equal(Status.PERMISSION_DENIED);
          expect(err!.details).to.include(ID_GRAMMAR);
        } finally {
          caller.client.close();
        }
      });

      it('is refused when issuing and when creating a join token, naming the grammar', async () => {
        for (const role of ['agent', 'service', 'broker'] as const) {
          const err = await issueCertificate({
            dir,
            role,
            name: id,
            ...(role === 'broker' ? { dns: ['localhost'] } : {}),
          }).then(
            () => undefined,
            (e: Error) => e,
          );
          expect(err?.message, role)
            .to.match(/^name: must be /)
            .and.include(ID_GRAMMAR);
        }
        const err = await createJoinToken({ dir, agentId: id }).then(
          () => undefined,
          (e: Error) => e,
        );
        expect(err?.message).to.include(ID_GRAMMAR);
      });
    });
  }

  it(
    'enrollment with a token whose stored agent id breaks ' + 'the grammar is refused before the token is used',
    async () => {
      const { token, tokenId } = (await createJoinToken({ dir, agentId: 'site-x' })) as {
        token: string;
        tokenId: string;
      };
      const file = path.join(dir, 'tokens', `${tokenId}.json`);
      const stored = JSON.parse(readFileSync(file, 'utf8')) as { agentId: string };
      writeFileSync(file, JSON.stringify({ ...stored, agentId: 'SITE-A' }));
      const err = await enroll({ broker: agentAddress, token, stateDir: path.join(root, 'state-x') }).then(
        () => undefined,
        (e: Error) => e,
      );
      console.log(`      enroll: ${err?.message}`);
      expect(err?.message).to.include('"SITE-A"').and.include(ID_GRAMMAR);
      expect(
        readdirSync(path.join(dir, 'tokens')).includes('used') ? readdirSync(path.join(dir, 'tokens', 'used')) : [],
      ).to.not.include(`${tokenId}.json`);
    },
  );

  it('a broker id outside the grammar is a configuration error', () => {
    expect(() =>
      brokerConfigFromArgs({
        ...serveDefaults(),
        'agent-listen': '127.0.0.1:0',
        'api-listen': '127.0.0.1:0',
        'broker-id': 'Broker A',
        'pki-dir': dir,
      }),
    ).to.throw(/broker-id: must be .*got 'Broker A'/);
  });
});
