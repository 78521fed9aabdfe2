import { readFileSync } from 'node:fs';
import * as http2 from 'node:http2';
import { expect } from 'chai';
import { Metadata, status as Status } from '@grpc/grpc-js';
import { GRPC_CONTENT_TYPE, frameMessage, statusOfHeaders } from '@burrow/tunnel';
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
import { RawAgent } from './helpers/raw-agent';
import { expectRefused, firstAnswer } from './helpers/raw-call';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';

/**
 * A rogue agent (a valid agent certificate, hand-made session frames: RawAgent) against a real
 * broker process while a second, real agent process serves calls: session frames whose length
 * prefix is over the bound, Hello fields over theirs, many sessions from one certificate, a
 * megabyte method name. Each is refused with a message naming the bound; the broker's memory and
 * CPU stay bounded; the other agent's calls keep working with a bounded latency. The assertions are
 * about outcomes only (refused, bounded, others unaffected), so they hold whatever carries the calls.
 */

const ROGUE = 'site-a';
const GOOD = 'site-b';

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

/** The 5-byte gRPC message prefix alone: uncompressed, declaring a message of `bytes` bytes. */
function lengthPrefix(bytes: number): Buffer {
  const b = Buffer.alloc(5);
  b.writeUInt32BE(bytes, 1);
  return b;
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

/**
 * A site -> platform call as the rogue agent makes it (tunnel.proto, "Site -> platform calls"): ALPN
 * `h2`, its certificate, `:path` = `method`. Resolves with the gRPC status, or the reset that ended it.
 */
async function siteCall(address: string, cert: CertFiles, method: string): Promise<string> {
  const session = http2.connect(`https://${address}`, {
    ca: readFileSync(cert.ca),
    cert: readFileSync(cert.cert),
    key: readFileSync(cert.key),
    ALPNProtocols: ['h2'],
    checkServerIdentity: () => undefined,
    maxSendHeaderBlockLength: 4 * MiB,
  } as http2.SecureClientSessionOptions);
  session.on('error', () => {});
  try {
    return await new Promise<string>((resolve) => {
      let status: { code: number; details: string } | undefined;
      let stream: http2.ClientHttp2Stream;
      try {
        stream = session.request({
          ':method': 'POST',
          ':path': method,
          'content-type': GRPC_CONTENT_TYPE,
          te: 'trailers',
          'burrow-call-id': 'c'.repeat(2048),
        });
      } catch (err) {
        resolve(`not sent: ${(err as Error).message}`);
        return;
      }
      stream.on('response', (h) => (status ??= statusOfHeaders(h)));
      stream.on('trailers', (h) => (status ??= statusOfHeaders(h)));
      stream.on('error', () => {});
      stream.resume();
      stream.on('close', () =>
        resolve(status ? `${Status[status.code]}: ${status.details.slice(0, 80)}` : `reset ${stream.rstCode}`),
      );
      stream.end(frameMessage(Buffer.from('x')));
    });
  } finally {
    session.destroy();
  }
}

describe("session limits: a rogue agent's oversized session frames (real broker and agent processes)", function () {
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

  const rogue = async (): Promise<RawAgent> => {
    const a = await RawAgent.connect(agentAddress, rogueCert);
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

  it('a frame declaring 10 MiB is refused from its prefix; a Hello of 1,000 versions names the bound', async () => {
    const refusals: { code: number; message: string }[] = [];
    await underAttack(
      '8 x a 5-byte prefix declaring 10 MiB',
      async () => {
        for (let i = 0; i < 8; i++) {
          const agent = await rogue();
          // Only the prefix: a broker that waited for (or allocated) the body would hold the session open.
          (await agent.control()).sendRaw(lengthPrefix(10 * MiB));
          const control = await agent.control();
          refusals.push(await expectRefused(control));
          // The broker ends the control stream after Refused (and cuts the connection).
          expect(await control.next()).to.equal(undefined);
          agent.close();
        }
      },
      { cpuMs: 1_500, rssBytes: 16 * MiB },
    );
    for (const r of refusals) {
      expect(r.code).to.equal(Status.INTERNAL);
      expect(r.message).to.equal('tunnel protocol error: session frame of 10485760 bytes; at most 65536 allowed');
    }
    const logged = (l: LogLine): boolean =>
      l.agentId === ROGUE && String(l.error).startsWith('tunnel protocol error: session frame of 10485760');
    await broker.waitForLog('agent broke the tunnel protocol; closing its session', logged);

    const control = await (await rogue()).control();
    control.send({ kind: 'hello', hello: { protocolVersions: new Array<number>(1_000).fill(4), agentVersion: 'x' } });
    const status = await expectRefused(control);
    expect(status.code).to.equal(Status.INTERNAL);
    expect(status.message).to.equal('tunnel protocol error: Hello lists 1000 versions; at most 16 allowed');
  });

  it('8 sessions with a 10 MiB agent_version are refused, and neither the log nor /agents carries it', async () => {
    const logBytesBefore = broker.stderrLines.reduce((n, l) => n + l.length, 0);
    const refusals: { code: number; message: string }[] = [];
    await underAttack(
      '8 x Hello with a 10 MiB agent_version',
      async () => {
        for (let i = 0; i < 8; i++) {
          const control = await (await rogue()).control();
          control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'v'.repeat(10 * MiB) } });
          refusals.push(await expectRefused(control));
        }
      },
      { cpuMs: 2_000, rssBytes: 150 * MiB },
    );
    for (const r of refusals) {
      expect(r.code).to.equal(Status.INTERNAL);
      expect(r.message).to.match(/^tunnel protocol error: session frame of 104857\d\d bytes; at most 65536 allowed$/);
    }
    const control = await (await rogue()).control();
    control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'v'.repeat(300) } });
    const status = await expectRefused(control);
    expect(status.message).to.equal(
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
    const welcomed: RawAgent[] = [];
    const refusals: { code: number; message: string }[] = [];
    await underAttack(
      '30 sessions from one certificate',
      async () => {
        for (let i = 0; i < 30; i++) {
          const agent = await rogue();
          const control = await agent.control();
          control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'rogue' } });
          const answer = await firstAnswer(control);
          if (answer.kind === 'welcome') welcomed.push(agent);
          else if (answer.kind === 'refused') refusals.push(answer);
          else throw new Error('the control stream ended with neither Welcome nor Refused');
        }
      },
      { cpuMs: 2_000, rssBytes: 80 * MiB },
    );
    expect(welcomed).to.have.length(4);
    expect(refusals).to.have.length(26);
    for (const s of refusals) {
      expect(s.code).to.equal(Status.RESOURCE_EXHAUSTED);
      expect(s.message).to.equal(
        `agent "${ROGUE}" holds 4 sessions at this broker; at most 4 allowed (--max-sessions-per-agent)`,
      );
    }
    expect((await listing(ROGUE))?.connections).to.equal(4);
    // One line per agent while it stays over its cap, not one per refused connection.
    const refusalLines = broker.logs
      .slice(logFrom)
      .filter((l) => l.agentId === ROGUE && String(l.reason ?? l.error ?? '').includes('--max-sessions-per-agent'));
    const perAgent = broker.logs.slice(logFrom).filter((l) => l.message === 'tunnel refused: per-agent limit');
    expect(perAgent).to.have.length(1);
    expect(perAgent[0]).to.include({ agentId: ROGUE, limit: 'sessions' });
    expect(refusalLines.length, 'log lines about the refused sessions').to.be.at.most(1);

    // A session that ends frees its place.
    welcomed[0]!.close();
    await pollUntil('the rogue agent down to 3 sessions', async () => (await listing(ROGUE))?.connections === 3);
    await (await rogue()).welcome([4]);
  });

  it('a call from an agent naming a 1 MiB method leaves bounded log lines and /metrics labels', async () => {
    const logFrom = broker.stderrLines.length;
    const agent = await rogue();
    await agent.welcome([4]);
    const results: string[] = [];
    // 60 KiB fits Node's default HTTP/2 header limits and reaches the broker's call handling; 1 MiB
    // is refused by HTTP/2 itself (or makes it through, if a limit is raised).
    for (const length of [60 * 1024, MiB])
      results.push(await siteCall(agentAddress, rogueCert, `/x.Y/${'m'.repeat(length)}`));
    console.log(`      site calls: ${results.join(' | ')}`);
    expect(results[0]).to.match(/^UNIMPLEMENTED: /); // this broker has no platform upstreams
    const line = await broker.waitForLog('call finished', (l) => l.direction === 'from_agent' && l.agentId === ROGUE);
    expect(String(line.method)).to.match(/^\/x\.Y\/m+… \(61445 characters\)$/);
    const metrics = await httpGet(`${adminUrl}/metrics`);
    const longestLine = Math.max(...broker.stderrLines.slice(logFrom).map((l) => l.length));
    console.log(`      long methods: longest log line ${longestLine}, /metrics ${metrics.body.length} bytes`);
    expect(longestLine).to.be.below(8 * 1024);
    expect(metrics.body.length).to.be.below(256 * 1024);
    // The rogue agent's tunnel is not touched by its calls' fate.
    expect((await listing(ROGUE))?.connections).to.equal(1);
  });
});
