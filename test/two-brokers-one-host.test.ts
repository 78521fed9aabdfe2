// Issue 13 item 8: two brokers on one host. Both are started as the README's cluster section
// starts them (--pki-dir, one Redis, no --broker-id), on one machine with their own ports: each
// names itself <hostname>-<agent port>, so the agent keeps a tunnel to each, and after kill -9 of
// one, calls through the other reach the agent within a few seconds. A broker whose id is already
// live in the directory at another address refuses to start, naming both addresses.
import { expect } from 'chai';
import { Metadata } from '@grpc/grpc-js';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { freePorts } from './helpers/free-port';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import {
  getJson,
  killAll,
  runCli,
  startAgent,
  startBroker,
  BROKER_CLI,
  type AgentListing,
  type BurrowProcess,
  tlsArgs,
} from './helpers/processes';
import { pollUntil } from './helpers/wait';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { TestRedis } from './helpers/redis-server';

describe('two brokers on one host (issue 13 item 8)', function () {
  this.timeout(60_000);
  let pki: PkiFixture;
  let redis: TestRedis;
  let echo: EchoUpstream;
  let agentCert: CertFiles;
  let serviceCert: CertFiles;
  const clients: RawClient[] = [];

  before(async () => {
    pki = await PkiFixture.create();
    [agentCert, serviceCert] = await Promise.all([pki.issue('agent', 'site-a'), pki.issue('service', 'billing')]);
    redis = await TestRedis.start();
    echo = await new EchoUpstream().start();
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await killAll();
  });
  after(async () => {
    await echo.stop();
    await redis.kill();
    pki.cleanup();
  });

  /** `burrow-broker serve` as README's cluster section has it, on this test's ports and directories. */
  async function broker(
    name: string,
    ports: { agent: number; api: number; peer: number; admin: number },
    extra: string[] = [],
  ): Promise<BurrowProcess> {
    const { proc } = await startBroker(
      [
        '--pki-dir',
        pki.pkiDir,
        '--redis-url',
        redis.url,
        '--advertise',
        `127.0.0.1:${ports.peer}`,
        '--agent-listen',
        `127.0.0.1:${ports.agent}`,
        '--api-listen',
        `127.0.0.1:${ports.api}`,
        '--admin-listen',
        `127.0.0.1:${ports.admin}`,
        '--tls-dns',
        'localhost',
        '--tls-ip',
        '127.0.0.1',
        '--registry-ttl',
        '3s',
        ...extra,
      ],
      {},
      name,
    );
    return proc;
  }

  it(
    'each broker gets its own id, the agent a tunnel to each, ' +
      'and calls resume through one after kill -9 of the other',
    async () => {
      const [a1, a2, a3, a4, b1, b2, b3, b4] = await freePorts(8);
      const a = await broker('broker-a', { agent: a1!, api: a2!, peer: a3!, admin: a4! });
      await broker('broker-b', { agent: b1!, api: b2!, peer: b3!, admin: b4! });
      const idOf = async (port: number): Promise<string> =>
        (await getJson<{ brokerId: string }>(`http://127.0.0.1:${port}/status`)).brokerId;
      const [idA, idB] = [await idOf(a4!), await idOf(b4!)];
      console.log(`      broker ids: ${idA}, ${idB}`);

      await startAgent([
        '--broker',
        `127.0.0.1:${a1}`,
        ...tlsArgs(agentCert),
        '--upstream',
        `*=${echo.address}`,
        '--broker-server-name',
        'localhost',
        '--reconnect-max',
        '500ms',
      ]);
      const holds = async (adminPort: number): Promise<boolean> =>
        (await getJson<AgentListing[]>(`http://127.0.0.1:${adminPort}/agents`)).some((x) => x.id === 'site-a');
      await pollUntil(
        'the agent connected to both brokers',
        async () => (await holds(a4!)) && (await holds(b4!)),
        15_000,
      );

      const caller = new RawClient(`127.0.0.1:${b2}`, mtlsCredentials(serviceCert));
      clients.push(caller);
      const md = (): Metadata => {
        const m = new Metadata();
        m.set('burrow-agent-id', 'site-a');
        return m;
      };
      await caller.unary(ECHO.unary, Buffer.from('before'), md(), { deadline: Date.now() + 5_000 });

      a.signal('SIGKILL');
      await a.exited;
      const killedMs = Date.now();
      await pollUntil(
        'a call through broker b reaches the agent',
        async () => {
          try {
            const res = await caller.unary(ECHO.unary, Buffer.from('after'), md(), { deadline: Date.now() + 1_000 });
            return res.response.toString() === 'after';
          } catch {
            return false;
          }
        },
        10_000,
      );
      const resumedMs = Date.now() - killedMs;
      console.log(`      calls through the surviving broker resumed ${resumedMs} ms after kill -9 of the other`);
      expect(resumedMs).to.be.below(5_000);
      expect(idA).to.not.equal(idB);
      expect(idA).to.match(new RegExp(`-${a1}$`));
    },
  );

  it('a broker whose id is live in the directory at another address refuses to start, naming both', async () => {
    const [a1, a2, a3, a4, b1, b2, b3, b4] = await freePorts(8);
    await broker('broker-a', { agent: a1!, api: a2!, peer: a3!, admin: a4! }, ['--broker-id', 'edge-1']);
    const second = await runCli(
      BROKER_CLI,
      [
        'serve',
        '--pki-dir',
        pki.pkiDir,
        '--redis-url',
        redis.url,
        '--advertise',
        `127.0.0.1:${b3}`,
        '--broker-id',
        'edge-1',
        '--agent-listen',
        `127.0.0.1:${b1}`,
        '--api-listen',
        `127.0.0.1:${b2}`,
        '--admin-listen',
        `127.0.0.1:${b4}`,
        '--tls-dns',
        'localhost',
        '--tls-ip',
        '127.0.0.1',
      ],
      {},
      15_000,
    );
    const text = second.stderrLines.join('\n');
    console.log(`      refusal: ${second.stderrLines.find((l) => l.includes('already live')) ?? text.slice(-300)}`);
    expect(second.exit.code).to.not.equal(0);
    expect(text).to.include(`broker id "edge-1" is already live in the cluster directory at 127.0.0.1:${a3}`);
    expect(text).to.include(`127.0.0.1:${b3}`);
  });
});
