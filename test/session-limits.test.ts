import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { Metadata, status as Status, type StatusObject } from '@grpc/grpc-js';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { expectNoLeaks, snapshotResources, type ResourceSnapshot } from './helpers/leaks';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import {
  getJson,
  httpGet,
  killAll,
  startAgent,
  startBroker,
  type AgentListing,
  type BurrowProcess,
  type LogLine,
  tlsArgs,
} from './helpers/processes';
import { pollUntil } from './helpers/wait';
import type { CallFrame } from '@burrow/tunnel';
import { RawAgent, type RawCallStream, type RawSession } from './helpers/raw-agent';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';

/**
 * A rogue agent (a valid agent certificate, hand-made frames: RawAgent) against a real broker
 * process while a second, real agent process serves calls: oversized but well-formed session
 * frames, many sessions and many offers from one certificate. Each is refused with a message
 * naming the bound; the broker's memory and CPU stay bounded; the other agent's calls keep
 * working with a bounded latency. The assertions are about outcomes only (refused, bounded, others
 * unaffected), so they hold whatever carries the calls.
 */

const ROGUE = 'site-a';
const GOOD = 'site-b';
/** What the broker is started with for the offers test (its default is 4096). */
const OFFER_CAP = 256;

/** Broker CPU time (user + system, ms) and resident memory (bytes), from /proc. */
function usage(pid: number): { cpuMs: number; rssBytes: number } {
  // Fields after the command name (which may contain spaces): utime and stime are fields 14, 15.
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]);
  const rssKb = Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
  return { cpuMs: ticks * 10, rssBytes: rssKb * 1024 };
}

const MiB = 1024 * 1024;

/** A varint, as protobuf writes lengths. */
function varint(n: number): Buffer {
  const out: number[] = [];
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return Buffer.from(out);
}

/**
 * A well-formed SessionFrame{hello{protocol_versions: [1 x count]}}, built by hand: protobufjs
 * would need an array of `count` numbers in the test process first.
 */
function helloWithVersions(count: number): Buffer {
  // Hello.protocol_versions, packed.
  const versions = Buffer.concat([Buffer.from([0x0a]), varint(count), Buffer.alloc(count, 1)]);
  return Buffer.concat([Buffer.from([0x0a]), varint(versions.length), versions]); // SessionFrame.hello
}

/**
 * Calls the good agent in a loop (one call in flight) until stop() and reports the latencies; every
 * call must succeed.
 */
interface CallStats {
  calls: number;
  failures: string[];
  p50Ms: number;
  maxMs: number;
}

function callLoop(caller: RawClient): { stop(): Promise<CallStats> } {
  const latencies: number[] = [];
  const failures: string[] = [];
  let running = true;
  const md = (): Metadata => {
    const m = new Metadata();
    m.set('burrow-agent-id', GOOD);
    return m;
  };
  const loop = (async () => {
    while (running) {
      const t0 = performance.now();
      try {
        const r = await caller.unary(ECHO.unary, Buffer.from('ping'), md(), { deadline: Date.now() + 10_000 });
        if (r.response.toString() !== 'ping') failures.push(`echo answered ${r.response.toString()}`);
      } catch (err) {
        failures.push((err as Error).message);
      }
      latencies.push(performance.now() - t0);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      const sorted = [...latencies].sort((a, b) => a - b);
      const p50Ms = Math.round(sorted[Math.floor(sorted.length / 2)] ?? 0);
      return { calls: sorted.length, failures, p50Ms, maxMs: Math.round(sorted[sorted.length - 1] ?? 0) };
    },
  };
}

describe("session limits: a rogue agent's oversized but valid frames (real broker and agent processes)", function () {
  this.timeout(120_000);

  let pki: PkiFixture;
  let rogueCert: CertFiles;
  let echo: EchoUpstream;
  let broker: BurrowProcess;
  let agentAddress: string;
  let adminUrl: string;
  let caller: RawClient;
  const rogues: RawAgent[] = [];

  /** The broker's /agents entry of `id`, if it is connected. */
  const listing = async (id: string): Promise<AgentListing | undefined> =>
    (await getJson<AgentListing[]>(`${adminUrl}/agents`)).find((a) => a.id === id);

  const rogue = (): RawAgent => {
    const a = new RawAgent(agentAddress, rogueCert);
    rogues.push(a);
    return a;
  };

  /** Runs `attack` while the good agent is called in a loop; asserts the calls and prints the cost. */
  async function underAttack(
    name: string,
    attack: () => Promise<void>,
    bounds: { cpuMs: number; rssBytes: number },
  ): Promise<void> {
    const before = usage(broker.pid);
    const loop = callLoop(caller);
    const attacked = attack().then(
      () => undefined,
      (err: unknown) => err,
    );
    const failed = await attacked;
    const calls = await loop.stop();
    const after = usage(broker.pid);
    const cpuMs = after.cpuMs - before.cpuMs;
    const rssBytes = after.rssBytes - before.rssBytes;
    const rss = `${(before.rssBytes / MiB).toFixed(0)} -> ${(after.rssBytes / MiB).toFixed(0)} MiB`;
    console.log(
      `      ${name}: broker +${cpuMs} ms CPU, RSS ${rss}; ` +
        `${GOOD}: ${calls.calls} calls, p50 ${calls.p50Ms} ms, max ${calls.maxMs} ms`,
    );
    if (failed) throw failed;
    expect(calls.failures, 'calls to the other agent').to.deep.equal([]);
    expect(calls.calls, 'calls to the other agent').to.be.greaterThan(0);
    expect(calls.maxMs, 'slowest call to the other agent (ms)').to.be.below(2_000);
    expect(cpuMs, 'broker CPU spent on the attack (ms)').to.be.below(bounds.cpuMs);
    expect(rssBytes, 'broker RSS growth (bytes)').to.be.below(bounds.rssBytes);
  }

  /** The status a session ends with when the broker refuses it; a Welcome fails the test at once. */
  async function refused(session: RawSession): Promise<StatusObject> {
    const welcomed = session.seen((f) => f.kind === 'welcome').then(() => 'welcome' as const);
    const outcome = await Promise.race([welcomed, session.ended()]);
    if (outcome === 'welcome') throw new Error('the broker welcomed the session instead of refusing it');
    return outcome;
  }

  let baseline: ResourceSnapshot;

  before(async () => {
    baseline = snapshotResources();
    pki = await PkiFixture.create();
    const [brokerCert, goodCert, serviceCert] = await Promise.all([
      pki.issue('broker', 'broker-1'),
      pki.issue('agent', GOOD),
      pki.issue('service', 'platform-svc'),
    ]);
    rogueCert = await pki.issue('agent', ROGUE);
    echo = await new EchoUpstream().start();
    const b = await startBroker([
      ...tlsArgs(brokerCert),
      '--agent-listen',
      '127.0.0.1:0',
      '--api-listen',
      '127.0.0.1:0',
      '--admin-listen',
      '127.0.0.1:0',
      '--max-offers-per-agent',
      String(OFFER_CAP),
      '--agent-max-concurrent',
      String(OFFER_CAP),
    ]);
    broker = b.proc;
    agentAddress = `127.0.0.1:${b.ports.agentPort}`;
    adminUrl = `http://127.0.0.1:${b.ports.adminPort}`;
    await startAgent(['--broker', agentAddress, ...tlsArgs(goodCert), '--upstream', `*=${echo.address}`]);
    await broker.waitForLog('agent connected', (l) => l.agentId === GOOD);
    caller = new RawClient(`127.0.0.1:${b.ports.apiPort}`, mtlsCredentials(serviceCert));
    // Warm up the path, so that the first measured call is not the first call.
    const md = new Metadata();
    md.set('burrow-agent-id', GOOD);
    await caller.unary(ECHO.unary, Buffer.from('warm'), md);
  });

  afterEach(async () => {
    for (const a of rogues.splice(0)) a.close();
    // The next test starts with the rogue agent's sessions gone (they count against its cap).
    await pollUntil('the rogue agent gone from /agents', async () => !(await listing(ROGUE)));
  });

  after(async () => {
    caller?.close();
    await killAll();
    await echo?.stop();
    pki?.cleanup();
    await expectNoLeaks(baseline);
  });

  it(
    'a Hello listing 15,000,000 versions is refused before it is read; ' + 'one listing 1,000 names the bound',
    async () => {
      let huge!: StatusObject;
      await underAttack(
        'Hello with 15,000,000 versions',
        async () => {
          const session = rogue().session();
          session.writeBytes(helloWithVersions(15_000_000));
          huge = await refused(session);
        },
        { cpuMs: 1_500, rssBytes: 150 * MiB },
      );
      expect(huge.code).to.equal(Status.INTERNAL);
      expect(huge.details).to.match(
        /^tunnel protocol error: session frame of 150000\d\d bytes; at most 65536 allowed$/,
      );
      const logged = (l: LogLine): boolean =>
        l.agentId === ROGUE && String(l.error).startsWith('tunnel protocol error: session frame of 150000');
      await broker.waitForLog('tunnel session failed', logged);

      const session = rogue().session();
      session.writeBytes(helloWithVersions(1_000));
      const status = await refused(session);
      expect(status.code).to.equal(Status.INTERNAL);
      expect(status.details).to.equal('tunnel protocol error: Hello lists 1000 versions; at most 16 allowed');
    },
  );

  it('8 sessions with a 10 MiB agent_version are refused, and neither the log nor /agents carries it', async () => {
    const logBytesBefore = broker.stderrLines.reduce((n, l) => n + l.length, 0);
    const statuses: StatusObject[] = [];
    await underAttack(
      '8 x Hello with a 10 MiB agent_version',
      async () => {
        for (let i = 0; i < 8; i++) {
          const session = rogue().session();
          session.hello({ protocolVersions: [1, 2, 3], agentVersion: 'v'.repeat(10 * MiB) });
          statuses.push(await refused(session));
        }
      },
      { cpuMs: 2_000, rssBytes: 150 * MiB },
    );
    for (const s of statuses) {
      expect(s.code).to.equal(Status.INTERNAL);
      expect(s.details).to.match(/^tunnel protocol error: session frame of 104857\d\d bytes; at most 65536 allowed$/);
    }
    const session = rogue().session();
    session.hello({ protocolVersions: [1, 2, 3], agentVersion: 'v'.repeat(300) });
    const status = await refused(session);
    expect(status.details).to.equal(
      'tunnel protocol error: Hello agent_version is 300 characters; at most 256 allowed',
    );

    const logBytes = broker.stderrLines.reduce((n, l) => n + l.length, 0) - logBytesBefore;
    const longest = Math.max(...broker.stderrLines.map((l) => l.length));
    const agents = await httpGet(`${adminUrl}/agents`);
    console.log(`      log: +${logBytes} bytes, longest line ${longest}; GET /agents: ${agents.body.length} bytes`);
    expect(logBytes, 'log bytes written during the attack').to.be.below(64 * 1024);
    expect(longest, 'longest broker log line').to.be.below(2_048);
    expect(agents.body.length, 'GET /agents').to.be.below(16 * 1024);
    expect((JSON.parse(agents.body) as AgentListing[]).map((a) => a.id)).to.deep.equal([GOOD]);
  });

  it('one certificate gets at most --max-sessions-per-agent (default 4) sessions; the rest are refused', async () => {
    const logFrom = broker.logs.length;
    const welcomed: RawSession[] = [];
    const statuses: StatusObject[] = [];
    await underAttack(
      '30 sessions from one certificate on 3 connections',
      async () => {
        const connections = [rogue(), rogue(), rogue()];
        for (let i = 0; i < 30; i++) {
          const session = connections[i % 3]!.session();
          session.hello({ protocolVersions: [1, 2, 3] });
          const first = await Promise.race([session.welcome().then(() => 'welcome' as const), session.ended()]);
          if (first === 'welcome') welcomed.push(session);
          else statuses.push(first);
        }
      },
      { cpuMs: 2_000, rssBytes: 80 * MiB },
    );
    expect(welcomed).to.have.length(4);
    expect(statuses).to.have.length(26);
    for (const s of statuses) {
      expect(s.code).to.equal(Status.RESOURCE_EXHAUSTED);
      expect(s.details).to.equal(
        `agent "${ROGUE}" holds 4 sessions at this broker; at most 4 allowed (--max-sessions-per-agent)`,
      );
    }
    for (const s of welcomed) expect(s.status, 'a session within the cap').to.equal(undefined);
    const refusalLines = broker.logs
      .slice(logFrom)
      .filter((l) => l.message === 'tunnel stream refused: per-agent limit');
    expect(refusalLines).to.have.length(1);
    expect(refusalLines[0]).to.include({ agentId: ROGUE, limit: 'sessions' });

    // A session that ends frees its place.
    welcomed[0]!.cancel();
    await pollUntil('the rogue agent down to 3 sessions', async () => (await listing(ROGUE))?.connections === 3);
    const again = rogue().session();
    again.hello({ protocolVersions: [1, 2, 3] });
    await again.welcome();
  });

  it('a call from an agent naming a 1 MiB method leaves bounded log lines and /metrics labels', async () => {
    const logFrom = broker.stderrLines.length;
    const agent = rogue();
    const session = agent.session();
    session.hello({ protocolVersions: [1, 2, 3] });
    const { sessionId } = await session.welcome();
    const forward = agent.forward(sessionId);
    const method = `/x.Y/${'m'.repeat(MiB)}`;
    forward.send({ kind: 'start', start: { method, metadata: [], timeoutMs: 5_000, callId: 'c'.repeat(MiB) } });
    forward.send({ kind: 'halfClose' });
    const trailers = (await forward.seen((f) => f.kind === 'trailers')) as Extract<CallFrame, { kind: 'trailers' }>;
    expect(trailers.trailers.code).to.equal(Status.UNIMPLEMENTED); // this broker has no platform upstreams
    const line = await broker.waitForLog('call finished', (l) => l.direction === 'from_agent' && l.agentId === ROGUE);
    const metrics = await httpGet(`${adminUrl}/metrics`);
    const longestLine = Math.max(...broker.stderrLines.slice(logFrom).map((l) => l.length));
    console.log(`      1 MiB method: longest log line ${longestLine}, /metrics ${metrics.body.length} bytes`);
    expect(String(line.method)).to.match(/^\/x\.Y\/m+… \(1048581 characters\)$/);
    expect(longestLine).to.be.below(8 * 1024);
    expect(metrics.body.length).to.be.below(256 * 1024);
    expect(session.status, "the agent's session").to.equal(undefined);
  });

  it(`one agent gets at most --max-offers-per-agent (${OFFER_CAP} here) offers; its session lives on`, async () => {
    const agent = rogue();
    const session = agent.session();
    session.hello({ protocolVersions: [1, 2, 3] });
    const { sessionId } = await session.welcome();
    const offers: RawCallStream[] = [];
    const statuses: StatusObject[] = [];
    await underAttack(
      `2,000 idle offers from one agent (cap ${OFFER_CAP})`,
      async () => {
        // In batches: the caller of the other agent shares this process's event loop.
        for (let i = 0; i < 2_000; i++) {
          offers.push(agent.offer(sessionId));
          if (i % 50 === 49) await new Promise((resolve) => setImmediate(resolve));
        }
        const refusedAll = (): boolean => offers.filter((o) => o.status).length >= 2_000 - OFFER_CAP;
        await pollUntil('every offer past the cap refused', refusedAll, 20_000);
        statuses.push(...offers.flatMap((o) => (o.status ? [o.status] : [])));
      },
      { cpuMs: 4_000, rssBytes: 100 * MiB },
    );
    expect(statuses).to.have.length(2_000 - OFFER_CAP);
    for (const s of statuses) {
      expect(s.code).to.equal(Status.RESOURCE_EXHAUSTED);
      expect(s.details).to.equal(
        `agent "${ROGUE}" holds ${OFFER_CAP} tunnel streams (offers) at this broker; at most ${OFFER_CAP} allowed` +
          ' (--max-offers-per-agent)',
      );
    }
    expect((await listing(ROGUE))?.idleOffers).to.equal(OFFER_CAP);
    expect(session.status, "the rogue agent's session").to.equal(undefined);
  });
});
