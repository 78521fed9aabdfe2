import { expect } from 'chai';
import * as http from 'node:http';
import * as path from 'node:path';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { status as Status } from '@grpc/grpc-js';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import { issueCertificate, writeIssued } from '@burrow/pki';
import { silentLogger } from '@burrow/tunnel';
import { EchoUpstream } from './helpers/echo-upstream';
import {
  AGENT_WAIT_MS,
  ClusterWorld,
  REGISTRY_TTL_MS,
  metricSum,
  percentile,
  type CallResult,
} from './helpers/cluster';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { getJson, liveProcessCount, type AgentListing } from './helpers/processes';
import { pollUntil } from './helpers/wait';
import { TestRedis } from './helpers/redis-server';

/**
 * Issue 5, "faults that must be survived": a cluster of real `burrow-broker serve` processes
 * sharing a real redis-server, real `burrow-agent run` processes, callers with service
 * certificates in this process. Every fault is a real one: SIGKILL/SIGTERM of processes, SIGKILL of
 * redis-server, a DEL of a directory key. Measured numbers are printed as `cluster-numbers:` lines.
 *
 * Timing: every broker runs with --registry-ttl 3s (claims refreshed every 1 s) and --agent-wait
 * 3s; agents reconnect with a 100 ms..500 ms backoff.
 */

const UNREACHABLE_LINE =
  'agent directory (Redis) unreachable; serving only agents connected to this broker until it returns';
const REACHABLE_LINE = "agent directory (Redis) reachable; registering this broker's agents";
/** Slack for a loaded 2-CPU machine on top of any bound a test asserts. */
const SLACK_MS = 500;

function numbers(line: string): void {
  console.log(`      cluster-numbers: ${line}`);
}

/** POST on a plain-HTTP admin listener (loopback: no token needed). */
function httpPost(url: string, body: unknown): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const data = Buffer.from(JSON.stringify(body));
    const req = http.request(
      url,
      { method: 'POST', agent: false, headers: { 'content-type': 'application/json', 'content-length': data.length } },
      (res) => {
        let text = '';
        res
          .setEncoding('utf8')
          .on('data', (c: string) => {
            text += c;
          })
          .on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('error', reject);
    req.end(data);
  });
}

describe('cluster faults (real broker and agent processes, real Redis)', function () {
  this.timeout(60_000);
  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let serviceCert: CertFiles;
  let echo: EchoUpstream;
  let world: ClusterWorld | undefined;

  before(async () => {
    pki = await PkiFixture.create();
    [brokerCert, serviceCert] = await Promise.all([
      pki.issue('broker', 'cluster'),
      pki.issue('service', 'platform-svc'),
    ]);
    echo = await new EchoUpstream().start();
  });
  afterEach(async () => {
    // Processes, clients, proxies and this test's redis-server; the PKI and the upstream are shared.
    await world?.close(true);
    world = undefined;
  });
  after(async () => {
    await echo?.stop();
    pki?.cleanup();
    expect(liveProcessCount(), 'child processes left').to.equal(0);
  });

  const newWorld = async (names: string[]): Promise<ClusterWorld> => {
    world = await ClusterWorld.create(names, { redis: await TestRedis.start(), pki, brokerCert, serviceCert, echo });
    return world;
  };

  it(
    "1. SIGKILL of the broker holding an agent's only tunnel: every surviving broker reaches it again within the " +
      'backoff; no call outlives its deadline',
    async () => {
      const w = await newWorld(['a', 'b', 'c']);
      await Promise.all(['a', 'b', 'c'].map((n) => w.startBroker(n)));
      // The agent dials one address, as a fleet behind a balancer or DNS name does; the balancer
      // sends it to A while A accepts, so its only tunnel is to A.
      const lb = await w.failoverProxy(['a', 'b', 'c']);
      await w.startAgent('site-k', [lb.address]);
      await w.waitListed('a', 'site-k');
      expect(await w.listed('b')).to.deep.equal([]);
      expect(await w.listed('c')).to.deep.equal([]);
      for (const n of ['b', 'c']) {
        const r = await w.call(n, 'site-k');
        expect(r.code, `forwarded via ${n}: ${r.details}`).to.equal(Status.OK);
      }

      const killedAt = Date.now();
      w.brokerProc('a').signal('SIGKILL');
      // Callers keep calling B and C with 1 s deadlines through the outage until each got an OK.
      const seen: (CallResult & { broker: string; issuedMs: number })[] = [];
      const recoveredMs: Record<string, number> = {};
      await Promise.all(
        ['b', 'c'].map(async (n) => {
          while (Date.now() - killedAt < 15_000) {
            const issuedMs = Date.now() - killedAt;
            const r = await w.call(n, 'site-k', 1_000);
            seen.push({ ...r, broker: n, issuedMs });
            if (r.code === Status.OK) {
              recoveredMs[n] = issuedMs + r.ms;
              return;
            }
          }
        }),
      );
      await w.brokerProc('a').waitExit();
      const codes = seen.map((s) => `${s.broker}:${Status[s.code]}:${s.ms}ms`);
      numbers(
        `kill -9 of the only tunnel's broker: reachable again via b after ${recoveredMs.b} ms, via c ` +
          `after ${recoveredMs.c} ms; calls during the outage: ${codes.join(', ')}`,
      );
      expect(recoveredMs.b, 'reachable via b again').to.be.a('number');
      expect(recoveredMs.c, 'reachable via c again').to.be.a('number');
      // Backoff ceiling 500 ms for the agent's first retry, plus one directory refresh for c.
      expect(recoveredMs.b).to.be.below(500 + 1_000 + SLACK_MS);
      expect(recoveredMs.c).to.be.below(500 + 1_000 + SLACK_MS);
      for (const s of seen) {
        expect([Status.OK, Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED], `${s.broker}: ${s.details}`).to.include(
          s.code,
        );
        expect(s.ms, `a call via ${s.broker} outlived its 1 s deadline: ${Status[s.code]} ${s.details}`).to.be.below(
          1_000 + 300,
        );
      }
      const holder = (await w.listed('b')).includes('site-k') ? 'b' : 'c';
      // A's claim is not released by a dead broker: it expires within the registry TTL.
      await pollUntil(
        'only the surviving holder claims site-k',
        async () => {
          const claims = await w.liveClaims('site-k');
          return claims.length === 1 && claims[0] === w.peerAddress(holder);
        },
        REGISTRY_TTL_MS + SLACK_MS,
      );
      for (const n of ['b', 'c']) expect((await w.call(n, 'site-k')).code).to.equal(Status.OK);
    },
  );

  it(
    '2. Redis killed: each broker keeps serving its own agents, the outage is visible, nothing hangs; Redis back ' +
      '(empty): the directory is rebuilt without a broker restart',
    async () => {
      const w = await newWorld(['a', 'b']);
      await Promise.all(['a', 'b'].map((n) => w.startBroker(n)));
      await w.startAgent('site-x', ['a']);
      await w.startAgent('site-y', ['b']);
      await w.waitListed('a', 'site-x');
      await w.waitListed('b', 'site-y');
      // A looks site-y up once (and caches where it is); B never looks site-x up.
      const primed = await w.call('a', 'site-y');
      expect(primed.code, primed.details).to.equal(Status.OK);
      const logsFrom = { a: w.brokerProc('a').logs.length, b: w.brokerProc('b').logs.length };

      const killedAt = Date.now();
      await w.redis.kill();
      for (const n of ['a', 'b']) {
        await pollUntil(
          `burrow_broker_redis_up 0 at ${n}`,
          async () => (await w.metrics(n)).get('burrow_broker_redis_up') === 0,
          5_000,
        );
      }
      numbers(`redis outage noticed (redis_up 0 at both) ${Date.now() - killedAt} ms after SIGKILL`);
      for (let i = 0; i < 5; i++) {
        const rx = await w.call('a', 'site-x', 2_000);
        expect(rx.code, `A serves its own agent without Redis: ${rx.details}`).to.equal(Status.OK);
        const ry = await w.call('b', 'site-y', 2_000);
        expect(ry.code, `B serves its own agent without Redis: ${ry.details}`).to.equal(Status.OK);
      }
      // A for site-y: from the last lookup, or UNAVAILABLE naming Redis; never a hang.
      const cross = await w.call('a', 'site-y', 10_000);
      numbers(
        `redis down: call at A for B's agent (cached lookup): ${Status[cross.code]} in ${cross.ms} ms ${cross.details}`,
      );
      expect([Status.OK, Status.UNAVAILABLE]).to.include(cross.code);
      if (cross.code !== Status.OK) expect(cross.details).to.match(/Redis/);
      expect(cross.ms).to.be.below(AGENT_WAIT_MS + SLACK_MS);
      // B never looked site-x up: nothing to fall back on.
      const blind = await w.call('b', 'site-x', 10_000);
      numbers(
        `redis down: call at B for A's agent (never looked up): ${Status[blind.code]} in ${blind.ms} ` +
          `ms: ${blind.details}`,
      );
      expect(blind.code, blind.details).to.equal(Status.UNAVAILABLE);
      expect(blind.details).to.match(/Redis/);
      expect(blind.ms).to.be.below(AGENT_WAIT_MS + SLACK_MS);

      for (const n of ['a', 'b'] as const) {
        const logs = w.brokerProc(n).logs.slice(logsFrom[n]);
        expect(
          logs.filter((l) => l.message === UNREACHABLE_LINE),
          `one "unreachable" line at ${n}`,
        ).to.have.length(1);
        // The outage lasted through several reconnect attempts, so "once" is meaningful.
        expect(metricSum(await w.metrics(n), 'burrow_broker_redis_errors_total'), `redis errors at ${n}`).to.be.above(
          2,
        );
      }

      await w.redis.restart();
      const restartedAt = Date.now();
      // Empty Redis: the claims come back only by the brokers' own re-registration.
      await pollUntil(
        'both claims back in the restarted Redis',
        async () =>
          (await w.liveClaims('site-x')).includes(w.peerAddress('a')) &&
          (await w.liveClaims('site-y')).includes(w.peerAddress('b')),
        3 * 1_000 + 2_000 + SLACK_MS,
      );
      const rebuiltMs = Date.now() - restartedAt;
      for (const n of ['a', 'b']) {
        await pollUntil(
          `burrow_broker_redis_up 1 at ${n}`,
          async () => (await w.metrics(n)).get('burrow_broker_redis_up') === 1,
          5_000,
        );
      }
      numbers(`redis restarted empty: registry rebuilt (ZRANGE shows both claims) in ${rebuiltMs} ms`);
      for (const n of ['a', 'b'] as const) {
        expect(
          w
            .brokerProc(n)
            .logs.slice(logsFrom[n])
            .filter((l) => l.message === REACHABLE_LINE),
          `one "reachable" line at ${n}`,
        ).to.have.length(1);
      }
      const back = await w.call('a', 'site-y');
      expect(back.code, back.details).to.equal(Status.OK);
      const fresh = await w.call('b', 'site-x');
      expect(fresh.code, `B finds site-x through the rebuilt directory: ${fresh.details}`).to.equal(Status.OK);
    },
  );

  // Under the offer protocol this test found two races, both fixed: the agent closed its connection on
  // the broker's Drain while calls the broker had opened before it were still on the way (the Drain
  // that answers the agent's is written after every call stream opened before it: tunnel.proto,
  // "Drain"), and a cancel crossing the agent's trailers dropped the whole tunnel.
  /**
   * Restarts every broker in turn (SIGTERM, drain, start on the same ports) while 20 caller loops
   * run. `learn`: the agents are given broker A only and find B and C in the replica set, as a
   * real deployment does; otherwise each is given its brokers and learns none.
   */
  async function rollingRestart(learn: boolean): Promise<void> {
    const w = await newWorld(['a', 'b', 'c']);
    const names = ['a', 'b', 'c'];
    await Promise.all(names.map((n) => w.startBroker(n)));
    // Without learning: site-p has tunnels to all three brokers; site-q to A and B only, so C
    // forwards its calls. With learning: both are given A and open tunnels to B and C themselves.
    const homes: Record<string, string[]> = learn
      ? { 'site-p': ['a', 'b', 'c'], 'site-q': ['a', 'b', 'c'] }
      : { 'site-p': ['a', 'b', 'c'], 'site-q': ['a', 'b'] };
    for (const [id, brokers] of Object.entries(homes)) await w.startAgent(id, learn ? ['a'] : brokers, [], learn);
    for (const [id, brokers] of Object.entries(homes)) for (const n of brokers) await w.waitListed(n, id);

    const up = new Set(names);
    const counts = { ok: 0, refusedDraining: 0, refusedNoConnection: 0, retries: 0 };
    const failed: string[] = [];
    let stop = false;
    let turn = 0;
    /** A refusal that happened before the call started: the broker said so, or it was not there. */
    const notStarted = (r: CallResult): 'draining' | 'no-connection' | undefined => {
      if (r.code !== Status.UNAVAILABLE) return undefined;
      if (/draining/i.test(r.details)) return 'draining';
      if (/ECONNREFUSED|No connection established|connection refused/i.test(r.details)) return 'no-connection';
      return undefined;
    };
    let phase = 'steady';
    const t0All = Date.now();
    const loop = async (i: number): Promise<void> => {
      while (!stop) {
        const agentId = i % 2 ? 'site-p' : 'site-q';
        // A broker that refused this call is not asked again for it: callers retry elsewhere.
        const refusedBy = new Set<string>();
        for (;;) {
          const candidates = [...up].filter((b) => !refusedBy.has(b));
          if (candidates.length === 0) {
            failed.push(`${agentId}: refused by every broker (${[...refusedBy].join(', ')}) during ${phase}`);
            break;
          }
          const n = candidates[turn++ % candidates.length]!;
          const atMs = Date.now() - t0All;
          const r = await w.call(n, agentId, 2_000);
          if (r.code === Status.OK) {
            counts.ok++;
            break;
          }
          const why = notStarted(r);
          if (!why) {
            failed.push(
              `${n} for ${agentId} at ${atMs} ms during ${phase}: ${Status[r.code]} after ${r.ms} ms: ${r.details}`,
            );
            break;
          }
          if (why === 'draining') counts.refusedDraining++;
          else counts.refusedNoConnection++;
          refusedBy.add(n);
          counts.retries++;
        }
      }
    };
    const loops = Array.from({ length: 20 }, (_, i) => loop(i));
    const phases: string[] = [];
    const undrained: string[] = [];
    try {
      for (const n of names) {
        const okBefore = counts.ok;
        const t0 = Date.now();
        // Still in `up` while it drains: callers learn it from its refusals, as real ones would.
        phase = `SIGTERM to ${n} at ${t0 - t0All} ms`;
        console.log(`      (${new Date().toISOString()} ${phase})`);
        const exit = await w.stopBroker(n, 'SIGTERM');
        up.delete(n);
        phase = `${n} exited at ${Date.now() - t0All} ms, restarting`;
        const stopped = w.brokerProc(n).logs.find((l) => l.message === 'broker stopped');
        expect(exit, `broker ${n} exit after SIGTERM`).to.deep.equal({ code: 0, signal: null });
        if (stopped?.drained !== true) {
          const timeout = w
            .brokerProc(n)
            .logs.find((l) => l.message === 'drain timeout reached; cutting off calls still in flight');
          undrained.push(
            `${n}: ${JSON.stringify(timeout ?? stopped)}; ` +
              `draining: ${JSON.stringify(w.brokerProc(n).logs.find((l) => l.message === 'broker draining'))}`,
          );
        }
        // After the GOAWAY every caller, peer and agent connection closes by itself: a cut means
        // one kept taking calls (each refused) until the grace ran out, and cut calls fail CANCELLED.
        const cut = w
          .brokerProc(n)
          .logs.find((l) => l.message === 'connections still open after the drain grace; cutting them');
        if (cut) undrained.push(`${n}: ${JSON.stringify(cut)}`);
        const drainMs = Date.now() - t0;
        await w.startBroker(n);
        phase = `${n} restarted at ${Date.now() - t0All} ms, waiting for its agents`;
        for (const [id, brokers] of Object.entries(homes)) if (brokers.includes(n)) await w.waitListed(n, id);
        up.add(n);
        phase = `steady after ${n} back at ${Date.now() - t0All} ms`;
        phases.push(
          `${n}: drained and exited in ${drainMs} ms, back with its agents after ${Date.now() - t0} ` +
            `ms, ${counts.ok - okBefore} calls OK meanwhile`,
        );
      }
    } finally {
      stop = true;
      await Promise.all(loops);
    }
    numbers(
      `rolling restart of 3 brokers under 20 ` +
        `loops${learn ? ' (agents learning the replica set)' : ''}: ${JSON.stringify(counts)}, ` +
        `failed ${failed.length}; ${phases.join('; ')}`,
    );
    if ((failed.length || undrained.length) && process.env.BURROW_FAULTS_DEBUG) {
      for (const line of w.logLines(
        (l) =>
          l.message !== 'cannot establish tunnel session' &&
          !String(l.message).startsWith('NO CALLER') &&
          (l.level !== 'info' ||
            (l.code !== undefined && l.code !== 0) ||
            /drain|stopp|started|connected/.test(String(l.message))),
      ))
        console.log(line);
    }
    expect(failed, 'calls that failed after they started').to.deep.equal([]);
    expect(undrained, 'brokers that cut connections or hit their drain timeout').to.deep.equal([]);
    expect(counts.ok).to.be.above(500);
  }

  it(
    '3. rolling restart of every broker (SIGTERM, drain, start on the same ports) under 20 caller loops: no call ' +
      'fails except refusals before it started',
    async function () {
      this.timeout(120_000);
      await rollingRestart(false);
    },
  );

  it(
    '3b. the same with agents that were given one ' + 'broker and learned the others from the replica set',
    async function () {
      this.timeout(120_000);
      await rollingRestart(true);
    },
  );

  it(
    '4. a flapping agent (SIGKILLed and restarted, then disconnected by an operator, again and again) leaves no ' +
      'stale route',
    async () => {
      const w = await newWorld(['a', 'b', 'c']);
      await Promise.all(['a', 'b', 'c'].map((n) => w.startBroker(n)));
      for (let i = 0; i < 6; i++) {
        const proc = await w.startAgent('site-f', ['a']);
        await w.waitListed('a', 'site-f');
        proc.signal('SIGKILL');
        await proc.waitExit();
      }
      const proc = await w.startAgent('site-f', ['a']);
      await w.waitListed('a', 'site-f');
      for (let i = 0; i < 5; i++) {
        const before = w.brokerProc('a').logs.length;
        const res = await httpPost(w.adminUrl('a', '/agents/site-f/disconnect'), { reason: `flap ${i}` });
        expect(res.status, res.body).to.equal(200);
        await w.brokerProc('a').waitForLog('agent connected', (l) => l.agentId === 'site-f', { from: before });
      }
      proc.signal('SIGKILL');
      await proc.waitExit();
      const stoppedAt = Date.now();
      await pollUntil(
        'no live claim on site-f',
        async () => (await w.liveClaims('site-f')).length === 0,
        REGISTRY_TTL_MS,
      );
      numbers(`flapping agent: claim gone ${Date.now() - stoppedAt} ms after the last SIGKILL`);
      expect(await w.listed('a')).to.deep.equal([]);
      for (const n of ['b', 'c']) {
        const r = await w.call(n, 'site-f', 10_000);
        expect(r.code, `${n}: ${r.details}`).to.equal(Status.UNAVAILABLE);
        expect(r.ms, `${n} fails within the agent wait`).to.be.below(AGENT_WAIT_MS + SLACK_MS);
        expect(r.details).to.include('"site-f" is not connected to this broker or any other');
      }
      await w.startAgent('site-f', ['a']);
      await w.waitListed('a', 'site-f');
      for (const n of ['a', 'b', 'c']) {
        const r = await w.call(n, 'site-f');
        expect(r.code, `${n}: ${r.details}`).to.equal(Status.OK);
      }
    },
  );

  it(
    '5a. two brokers claim one agent; one is SIGKILLed: a third ' +
      "broker's calls reach it through the other at the first try",
    async () => {
      const w = await newWorld(['a', 'b', 'c']);
      await Promise.all(['a', 'b', 'c'].map((n) => w.startBroker(n)));
      await w.startAgent('site-r', ['a', 'b']);
      await w.waitListed('a', 'site-r');
      await w.waitListed('b', 'site-r');
      await pollUntil('both claims', async () => (await w.liveClaims('site-r')).length === 2, 3_000);
      expect((await w.liveClaims('site-r')).sort()).to.deep.equal([w.peerAddress('a'), w.peerAddress('b')].sort());
      // Warm C's peer connections to both owners, so the kill breaks a live connection.
      for (let i = 0; i < 4; i++) expect((await w.call('c', 'site-r')).code).to.equal(Status.OK);
      const before = await w.metrics('c');
      // Kill whichever owner C would try first: the freshest claim.
      const first = (await w.redis.command('ZREVRANGE', `${w.prefix}agent:site-r`, '0', '0')).includes(
        w.peerAddress('a'),
      )
        ? 'a'
        : 'b';
      const other = first === 'a' ? 'b' : 'a';
      w.brokerProc(first).signal('SIGKILL');
      await w.brokerProc(first).waitExit();
      const results: CallResult[] = [];
      const killedAt = Date.now();
      // Until the dead broker's claim has expired, C is offered it again at each lookup.
      while (Date.now() - killedAt < REGISTRY_TTL_MS + 500) results.push(await w.call('c', 'site-r', 2_000));
      const after = await w.metrics('c');
      const delta = (result: string): number =>
        metricSum(after, 'burrow_broker_peer_forwards_total', `result="${result}"`) -
        metricSum(before, 'burrow_broker_peer_forwards_total', `result="${result}"`);
      const slowest = Math.max(...results.map((r) => r.ms));
      numbers(
        `racing claims, owner ${first} SIGKILLed: ${results.length} calls at ` +
          `C, ${results.filter((r) => r.code === Status.OK).length} OK, slowest ${slowest} ms; C's peer forwards: ` +
          `served ${delta('served')}, unreachable ${delta('unreachable')}, refused ${delta('refused')}`,
      );
      for (const r of results) expect(r.code, r.details).to.equal(Status.OK);
      expect(slowest, 'no call waited for the dead owner').to.be.below(1_000);
      expect(delta('served')).to.equal(results.length);
      await pollUntil(
        `only ${other} claims site-r`,
        async () => {
          const c = await w.liveClaims('site-r');
          return c.length === 1 && c[0] === w.peerAddress(other);
        },
        REGISTRY_TTL_MS,
      );
    },
  );

  it(
    '5b. a broker that lost its Redis entry but holds the tunnel re-claims it at its next refresh; calls from ' +
      'another broker come back within 3 s',
    async () => {
      const w = await newWorld(['a', 'b']);
      await Promise.all(['a', 'b'].map((n) => w.startBroker(n)));
      await w.startAgent('site-d', ['a']);
      await w.waitListed('a', 'site-d');
      expect((await w.call('b', 'site-d')).code).to.equal(Status.OK);
      const key = `${w.prefix}agent:site-d`;
      expect(await w.redis.command('DEL', key)).to.equal(':1\r\n');
      const deletedAt = Date.now();
      let reclaimedMs: number | undefined;
      const watcher = pollUntil(
        'A re-claims site-d',
        async () => (await w.liveClaims('site-d')).includes(w.peerAddress('a')),
        3_000,
        10,
      ).then(() => {
        reclaimedMs = Date.now() - deletedAt;
      });
      const results: (CallResult & { atMs: number })[] = [];
      while (Date.now() - deletedAt < 3_000) {
        const atMs = Date.now() - deletedAt;
        results.push({ ...(await w.call('b', 'site-d', 500)), atMs });
      }
      await watcher;
      const failures = results.filter((r) => r.code !== Status.OK);
      const lastFailureEndMs = failures.length ? Math.max(...failures.map((f) => f.atMs + f.ms)) : 0;
      numbers(
        `DEL of a held agent's key: re-claimed after ${reclaimedMs} ms; ${results.length} calls at B with 500 ms ` +
          `deadlines, ${failures.length} failed, last failure ended ${lastFailureEndMs} ms after the DEL`,
      );
      expect(reclaimedMs, 're-claimed within one refresh interval (1 s) plus slack').to.be.below(1_000 + SLACK_MS);
      for (const f of failures) expect([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED], f.details).to.include(f.code);
      // Calls may fail only until the re-claim is visible to B (refresh interval + its 250 ms absent cache + one
      // deadline).
      expect(lastFailureEndMs).to.be.below(1_000 + 250 + 500 + SLACK_MS);
      expect(results.at(-1)!.code).to.equal(Status.OK);
    },
  );

  it(
    'numbers: forwarded (caller -> B -> A -> agent) vs direct (caller -> A -> agent) latency, and Redis commands ' +
      'per forwarded call',
    async () => {
      const w = await newWorld(['a', 'b']);
      await Promise.all(['a', 'b'].map((n) => w.startBroker(n)));
      await w.startAgent('site-n', ['a']);
      await w.waitListed('a', 'site-n');
      for (let i = 0; i < 20; i++) {
        await w.call('a', 'site-n');
        await w.call('b', 'site-n');
      } // warm both paths
      const direct: number[] = [];
      const forwarded: number[] = [];
      // Interleaved, so both paths see the same machine load.
      const hr = (): number => Number(process.hrtime.bigint()) / 1e6;
      const commands = async (): Promise<{ total: number; lookup: number }> => {
        const ms = await Promise.all(['a', 'b'].map((n) => w.metrics(n)));
        return {
          total: ms.reduce((s, m) => s + metricSum(m, 'burrow_broker_redis_commands_total'), 0),
          lookup: ms.reduce((s, m) => s + metricSum(m, 'burrow_broker_redis_commands_total', 'command="lookup"'), 0),
        };
      };
      const c0 = await commands();
      const t0 = Date.now();
      for (let i = 0; i < 200; i++) {
        let t = hr();
        const d = await w.call('a', 'site-n');
        direct.push(hr() - t);
        t = hr();
        const f = await w.call('b', 'site-n');
        forwarded.push(hr() - t);
        expect(d.code, d.details).to.equal(Status.OK);
        expect(f.code, f.details).to.equal(Status.OK);
      }
      const elapsedS = (Date.now() - t0) / 1000;
      const c1 = await commands();
      const fmt = (v: number): string => v.toFixed(2);
      numbers(
        `200 sequential unary calls: p50 direct ${fmt(percentile(direct, 50))} ms ` +
          `(p99 ${fmt(percentile(direct, 99))}), p50 forwarded ${fmt(percentile(forwarded, 50))} ms ` +
          `(p99 ${fmt(percentile(forwarded, 99))}), forwarding ` +
          `adds ${fmt(percentile(forwarded, 50) - percentile(direct, 50))} ms at p50`,
      );
      numbers(
        `redis commands during 200 forwarded (+200 direct) calls over ${elapsedS.toFixed(1)} s, both ` +
          `brokers: ${c1.total - c0.total} total (${((c1.total - c0.total) / 200).toFixed(3)} per forwarded call, ` +
          `background refreshes included), ${c1.lookup - c0.lookup} lookups ` +
          `(${((c1.lookup - c0.lookup) / 200).toFixed(3)} per forwarded call)`,
      );
      // Lookups are cached for 1 s: far fewer than one per call.
      expect(c1.lookup - c0.lookup).to.be.at.most(Math.ceil(elapsedS) + 2);
    },
  );

  it(
    'scale: a 1,000-agent fleet is reachable again after ' + 'one of three brokers is killed (BURROW_CLUSTER_SCALE=1)',
    async function () {
      if (process.env.BURROW_CLUSTER_SCALE !== '1') this.skip();
      this.timeout(600_000);
      const fleet = Number(process.env.BURROW_CLUSTER_SCALE_AGENTS ?? 1000);
      const w = await newWorld(['a', 'b', 'c']);
      await Promise.all(['a', 'b', 'c'].map((n) => w.startBroker(n, ['--agent-max-concurrent', '0'])));
      // Three balancers with the brokers in rotated orders: agent i prefers broker i % 3.
      const lbs = await Promise.all(
        [
          ['a', 'b', 'c'],
          ['b', 'c', 'a'],
          ['c', 'a', 'b'],
        ].map((order) => w.failoverProxy(order)),
      );
      const root = mkdtempSync(path.join(tmpdir(), 'burrow-fleet-'));
      const agents: Agent[] = [];
      try {
        const t0 = Date.now();
        const ids = Array.from({ length: fleet }, (_, i) => `fleet-${i}`);
        for (let i = 0; i < ids.length; i += 50) {
          await Promise.all(
            ids.slice(i, i + 50).map(async (id) => {
              const issued = await issueCertificate({ dir: pki.pkiDir, role: 'agent', name: id });
              await writeIssued(path.join(root, id), issued);
            }),
          );
        }
        const issueMs = Date.now() - t0;
        for (let i = 0; i < ids.length; i++) {
          const d = path.join(root, ids[i]!);
          const agent = new Agent(
            {
              ...AGENT_DEFAULTS,
              brokers: [lbs[i % 3]!.address],
              tlsCertFile: path.join(d, 'tls.crt'),
              tlsKeyFile: path.join(d, 'tls.key'),
              caFile: path.join(d, 'ca.crt'),
              upstreams: [{ service: '*', address: echo.address }],
              reconnectBaseMs: 500,
              reconnectMaxMs: 5_000,
              drainTimeoutMs: 1_000,
            },
            silentLogger(),
          );
          agents.push(agent);
          void agent.start();
        }
        const union = async (names: string[]): Promise<Set<string>> => {
          const lists = await Promise.all(names.map((n) => getJson<AgentListing[]>(w.adminUrl(n, '/agents'))));
          return new Set(lists.flat().map((a) => a.id));
        };
        await pollUntil(
          'whole fleet connected',
          async () => (await union(['a', 'b', 'c'])).size === fleet,
          120_000,
          250,
        );
        const connectMs = Date.now() - t0 - issueMs;
        const onA = (await w.listed('a')).length;
        const killedAt = Date.now();
        w.brokerProc('a').signal('SIGKILL');
        await w.brokerProc('a').waitExit();
        await pollUntil(
          'whole fleet connected to b or c',
          async () => (await union(['b', 'c'])).size === fleet,
          120_000,
          100,
        );
        const reconnectedMs = Date.now() - killedAt;
        // Reachable: a call at the broker that does NOT hold each of a sample of moved agents.
        const moved = ids.filter((_, i) => i % 3 === 0).slice(0, 50);
        const onB = new Set(await w.listed('b'));
        const results = await Promise.all(moved.map((id) => w.call(onB.has(id) ? 'c' : 'b', id, 5_000)));
        const reachableMs = Date.now() - killedAt;
        numbers(
          `fleet of ${fleet} agents (${onA} on the killed broker): certificates ${issueMs} ms, connected ` +
            `in ${connectMs} ms; after SIGKILL of one of 3 brokers, all connected again in ${reconnectedMs} ms, a ` +
            `forwarded sample of ${moved.length} moved agents answered by ${reachableMs} ms ` +
            `(${results.filter((r) => r.code === Status.OK).length} OK)`,
        );
        for (const r of results) expect(r.code, r.details).to.equal(Status.OK);
      } finally {
        await Promise.all(agents.map((a) => a.stop().catch(() => undefined)));
        rmSync(root, { recursive: true, force: true });
      }
    },
  );
});
