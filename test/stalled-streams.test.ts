import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { Metadata, status as Status, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { expectNoLeaks, snapshotResources, type ResourceSnapshot } from './helpers/leaks';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { killAll, liveProcessCount, startAgent, startBroker, tlsArgs, type BurrowProcess } from './helpers/processes';
import { RawClient, collect, mtlsCredentials } from './helpers/raw-grpc';
import { pollUntil } from './helpers/wait';

/**
 * Callers that stop reading server streams of 1 MiB messages, with real broker and agent processes.
 *
 * Issue 15: in the offer-protocol data plane eight such callers grew the agent's RSS by 125-195 MiB
 * and the broker's by ~45 MiB, and the slowest of 100 unary calls to the same agent took 3.8-4.8 s.
 * In the v4 data plane a stalled call holds at most its stream windows plus one message at each hop,
 * and calls beside it do not slow down.
 */

const MiB = 1024 * 1024;
const STALLED_STREAMS = 8;
const UNARY_CALLS = 100;

/** VmRSS of a process, from /proc/<pid>/status, in bytes. */
function rssBytes(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

/**
 * Samples the RSS of `pids` (and `extra`, e.g. bytes the upstream produced) every `intervalMs` until
 * none of them grew by more than `slackBytes` over `stableSamples` samples in a row; resolves with the
 * last RSS sample. There is no event for "the process stopped allocating", hence the polling.
 */
async function settledRss(
  pids: number[],
  extra: () => number = () => 0,
  opts = { intervalMs: 100, stableSamples: 5, slackBytes: 256 * 1024, timeoutMs: 20_000 },
): Promise<number[]> {
  const sample = (): number[] => [...pids.map(rssBytes), extra()];
  let window = [sample()];
  const end = Date.now() + opts.timeoutMs;
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, opts.intervalMs));
    window = [...window, sample()].slice(-(opts.stableSamples + 1));
    const first = window[0]!;
    const grew = window.some((s) => s.some((v, i) => v - first[i]! > opts.slackBytes));
    if (window.length > opts.stableSamples && !grew) return window.at(-1)!.slice(0, pids.length);
    if (Date.now() > end) throw new Error(`RSS still growing after ${opts.timeoutMs} ms: ${JSON.stringify(window)}`);
  }
}

const mib = (bytes: number): string => (bytes / MiB).toFixed(1);

describe('stalled server streams (real broker and agent processes)', function () {
  this.timeout(60_000);
  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let agentCert: CertFiles;
  let serviceCert: CertFiles;
  let echo: EchoUpstream;
  const clients: RawClient[] = [];
  let baseline: ResourceSnapshot;

  before(async () => {
    baseline = snapshotResources();
    pki = await PkiFixture.create();
    [brokerCert, agentCert, serviceCert] = await Promise.all([
      pki.issue('broker', 'b'),
      pki.issue('agent', 'site-a'),
      pki.issue('service', 'platform-svc'),
    ]);
    echo = await new EchoUpstream().start();
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await killAll();
  });
  after(async () => {
    await echo?.stop();
    pki?.cleanup();
    expect(liveProcessCount(), 'child processes left').to.equal(0);
    await expectNoLeaks(baseline);
  });

  const md = (): Metadata => {
    const m = new Metadata();
    m.set('burrow-agent-id', 'site-a');
    return m;
  };

  async function startPair(): Promise<{ broker: BurrowProcess; agent: BurrowProcess; apiPort: number }> {
    const b = await startBroker([
      '--agent-listen',
      '127.0.0.1:0',
      '--api-listen',
      '127.0.0.1:0',
      '--admin-listen',
      '127.0.0.1:0',
      ...tlsArgs(brokerCert),
    ]);
    const a = await startAgent([
      '--broker',
      `127.0.0.1:${b.ports.agentPort}`,
      ...tlsArgs(agentCert),
      '--upstream',
      `*=${echo.address}`,
      ...(process.env.BURROW_TEST_LOG ? ['--log-level', 'debug'] : []),
    ]);
    await Promise.all([
      a.proc.waitForLog('tunnel session established'),
      b.proc.waitForLog('agent connected', (l) => l.agentId === 'site-a'),
    ]);
    return { broker: b.proc, agent: a.proc, apiPort: b.ports.apiPort };
  }

  it(
    `${STALLED_STREAMS} callers stop reading 1 MiB server streams: ${UNARY_CALLS} unary calls to the same agent ` +
      'all succeed in under 1 s, and agent and broker RSS grow by less than 40 MiB each',
    async () => {
      const { broker, agent, apiPort } = await startPair();
      const caller = (): RawClient => {
        const c = new RawClient(`127.0.0.1:${apiPort}`, mtlsCredentials(serviceCert));
        clients.push(c);
        return c;
      };
      const unaryClient = caller();

      // Warm-up: every path the measurement uses has run once (code loaded, buffers and sessions made),
      // so the growth measured below is what the stalled streams hold.
      await Promise.all(
        Array.from({ length: UNARY_CALLS }, (_, i) => unaryClient.unary(ECHO.unary, Buffer.from(`w${i}`), md())),
      );
      const warm = caller().bidi(ECHO.serverStream, md());
      warm.end(Buffer.from(JSON.stringify({ count: 16, size: MiB })));
      const warmed = await collect(warm);
      expect(warmed.status.code, warmed.status.details).to.equal(Status.OK);
      expect(warmed.messages).to.have.length(16);

      const [agentBefore, brokerBefore] = await settledRss([agent.pid, broker.pid]);

      // Eight callers, each on its own connection, ask for 1 MiB messages without end and stop
      // reading after the first one arrives.
      const streamedBefore = echo.streamedBytes;
      const stalled: ClientDuplexStream<Buffer, Buffer>[] = [];
      await Promise.all(
        Array.from({ length: STALLED_STREAMS }, async () => {
          const call = caller().bidi(ECHO.serverStream, md());
          call.on('error', () => {});
          stalled.push(call);
          call.end(Buffer.from(JSON.stringify({ count: 1_000_000, size: MiB })));
          await new Promise<void>((resolve) =>
            call.once('data', () => {
              call.pause();
              resolve();
            }),
          );
        }),
      );
      try {
        // Settled: neither process grows any more, and the upstream cannot write any more.
        const [agentStalled, brokerStalled] = await settledRss([agent.pid, broker.pid], () => echo.streamedBytes);
        const produced = echo.streamedBytes - streamedBefore;

        const latencies: number[] = [];
        const codes = await Promise.all(
          Array.from({ length: UNARY_CALLS }, async (_, i) => {
            const started = performance.now();
            const r = await unaryClient
              .unary(ECHO.unary, Buffer.from(`u${i}`), md(), { deadline: Date.now() + 10_000 })
              .then(
                (res) => (res.response.toString() === `u${i}` ? Status.OK : Status.DATA_LOSS),
                (err: ServiceError) => err.code,
              );
            latencies.push(performance.now() - started);
            return r;
          }),
        );
        latencies.sort((a, b) => a - b);
        const p50 = latencies[Math.floor(latencies.length / 2)]!;
        const max = latencies.at(-1)!;
        const agentGrowth = agentStalled! - agentBefore!;
        const brokerGrowth = brokerStalled! - brokerBefore!;
        console.log(
          `      ${STALLED_STREAMS} stalled 1 MiB streams: ` +
            `agent RSS ${mib(agentBefore!)} -> ${mib(agentStalled!)} MiB (+${mib(agentGrowth)}), ` +
            `broker RSS ${mib(brokerBefore!)} -> ${mib(brokerStalled!)} MiB ` +
            `(+${mib(brokerGrowth)}), upstream produced ${mib(produced)} MiB; ${UNARY_CALLS} unary: ` +
            `p50 ${p50.toFixed(1)} ms, max ${max.toFixed(1)} ms`,
        );

        expect(
          codes.filter((c) => c !== Status.OK),
          'unary calls that failed',
        ).to.deep.equal([]);
        expect(max, 'slowest unary call, ms').to.be.lessThan(1_000);
        expect(agentGrowth, 'agent RSS growth, bytes').to.be.lessThan(40 * MiB);
        expect(brokerGrowth, 'broker RSS growth, bytes').to.be.lessThan(40 * MiB);
        // Backpressure reached the upstream: streams of a million messages each produced only what the
        // windows of the hops and the grpc-js buffers in this process hold (the paused caller's and the
        // upstream's writer: up to 16 messages each, object-mode streams' high-water mark).
        expect(produced, 'bytes the upstream produced for the stalled streams').to.be.lessThan(
          STALLED_STREAMS * 40 * MiB,
        );
      } finally {
        const ended = stalled.map((call) => collect(call));
        for (const call of stalled) call.cancel();
        for (const r of await Promise.all(ended)) expect(r.status.code).to.equal(Status.CANCELLED);
      }
      // The cancellations crossed both hops: the upstream's handlers all ended.
      await pollUntil('the upstream calls cancelled', () => echo.active === 0);
    },
  );
});
