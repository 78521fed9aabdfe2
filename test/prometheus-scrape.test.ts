import { expect } from 'chai';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { Metadata } from '@grpc/grpc-js';
import { freePort } from './helpers/free-port';
import { loadJose } from '@burrow/agent';
import { ALERTS_FILE, alertRules, ensurePrometheus, metricNamesIn } from './helpers/monitoring';
import { EXAMPLES_DIR } from './helpers/policy-fixture';
import { TestRedis } from './helpers/redis-server';
import { ISS, jwksOf, makeKey } from './helpers/token-fixture';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { getJson, killAll, startAgent, startBroker, tlsArgs } from './helpers/processes';
import { pollUntil } from './helpers/wait';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';

interface PromResponse<T> {
  status: string;
  data: T;
  error?: string;
}
interface Target {
  labels: { job: string; instance: string };
  health: string;
  lastError: string;
}
interface RuleGroup {
  rules: { name: string; health: string; lastError?: string; type: string }[];
}

/**
 * The real thing end to end: a broker and an agent as processes, on a PKI made now, scraped by
 * Debian's prometheus binary with deploy/prometheus/alerts.yaml loaded. Every metric the alerts
 * use must reach Prometheus, and every rule must evaluate without error against real data.
 */
describe('Prometheus scrapes a real broker and agent', function () {
  this.timeout(600_000);

  let pki: PkiFixture;
  let prometheus: ChildProcess | undefined;
  let prometheusExited: Promise<void> | undefined;
  let prometheusLog = '';
  let promUrl = '';
  let caller: RawClient | undefined;
  let redis: TestRedis | undefined;

  before(async () => {
    await ensurePrometheus();
    pki = await PkiFixture.create();
    redis = await TestRedis.start();
  });

  after(async () => {
    caller?.close();
    if (prometheus && prometheus.exitCode === null && prometheus.signalCode === null) {
      prometheus.kill('SIGTERM');
      const killer = setTimeout(() => prometheus?.kill('SIGKILL'), 10_000);
      await prometheusExited;
      clearTimeout(killer);
    }
    await killAll();
    await redis?.kill();
    pki?.cleanup();
  });

  async function promGet<T>(pathAndQuery: string): Promise<T> {
    const res = await getJson<PromResponse<T>>(`${promUrl}${pathAndQuery}`);
    if (res.status !== 'success') throw new Error(`prometheus ${pathAndQuery}: ${res.error}`);
    return res.data;
  }

  it('finds every metric the alerts use and evaluates every rule', async () => {
    const agentCert: CertFiles = await pki.issue('agent', 'site-a');
    const serviceCert: CertFiles = await pki.issue('service', 'caller');
    // --pki-dir without --tls-cert: the broker issues its own certificate, so the PKI gauges exist.
    // Every optional feature whose metrics an alert reads is on: the broker is a (one-replica)
    // cluster on a Redis of the test's own, the agent verifies tokens and decides policies.
    const broker = await startBroker([
      '--pki-dir',
      pki.pkiDir,
      '--agent-listen',
      '127.0.0.1:0',
      '--api-listen',
      '127.0.0.1:0',
      '--admin-listen',
      '127.0.0.1:0',
      '--agent-wait',
      '1s',
      '--redis-url',
      redis!.url,
      '--advertise',
      `127.0.0.1:${await freePort()}`,
    ]);
    const jwksFile = path.join(pki.root, 'jwks.json');
    writeFileSync(jwksFile, jwksOf(await makeKey(await loadJose(), 'ES256', 'k1')));
    const closedPort = await freePort();
    const agent = await startAgent([
      '--broker',
      `127.0.0.1:${broker.ports.agentPort}`,
      ...tlsArgs(agentCert),
      '--upstream',
      `burrow.test.Echo=127.0.0.1:${closedPort}`,
      '--admin-listen',
      '127.0.0.1:0',
      '--jwks',
      jwksFile,
      '--token-issuer',
      ISS,
      '--token-audience',
      'site-api',
      '--policies',
      path.join(EXAMPLES_DIR, 'policies'),
      '--entities',
      path.join(EXAMPLES_DIR, 'entities.json'),
      '--audit-log',
      path.join(pki.root, 'audit.jsonl'),
    ]);
    await broker.proc.waitForLog('agent connected');

    // One call through the tunnel, so that the call counters have a series (its upstream is
    // closed: the call fails UNAVAILABLE, which is counted like any other).
    caller = new RawClient(`127.0.0.1:${broker.ports.apiPort}`, mtlsCredentials(serviceCert));
    const md = new Metadata();
    md.set('burrow-agent-id', 'site-a');
    const call = await caller
      .unary('/burrow.test.Echo/Unary', Buffer.from('x'), md, { deadline: Date.now() + 10_000 })
      .catch((err: Error) => err);
    expect(call).to.be.instanceOf(Error);
    // And one token check (a refused token: field 1 of AuthenticateRequest, "not-a-jwt"), so the
    // authentication counter has a series.
    const token = Buffer.from('not-a-jwt');
    const authn = await caller.unary(
      '/burrow.auth.v1.AuthenticationService/Authenticate',
      Buffer.concat([Buffer.from([0x0a, token.length]), token]),
      md,
      { deadline: Date.now() + 10_000 },
    );
    expect(authn.status.code).to.equal(0);

    const dir = path.join(pki.root, 'prometheus');
    mkdirSync(dir);
    const port = await freePort();
    promUrl = `http://127.0.0.1:${port}`;
    writeFileSync(
      path.join(dir, 'prometheus.yml'),
      [
        'global: { scrape_interval: 1s, evaluation_interval: 1s }',
        `rule_files: [${JSON.stringify(ALERTS_FILE)}]`,
        'scrape_configs:',
        `  - { job_name: burrow-broker, static_configs: [ { targets: ["127.0.0.1:${broker.ports.adminPort}"] } ] }`,
        `  - { job_name: burrow-agent, static_configs: [ { targets: ["127.0.0.1:${agent.ports.adminPort}"] } ] }`,
        '',
      ].join('\n'),
    );
    prometheus = spawn(
      'prometheus',
      [
        `--config.file=${path.join(dir, 'prometheus.yml')}`,
        `--storage.tsdb.path=${path.join(dir, 'data')}`,
        `--web.listen-address=127.0.0.1:${port}`,
        '--log.level=warn',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    prometheus.stderr!.setEncoding('utf8').on('data', (s: string) => {
      prometheusLog = (prometheusLog + s).slice(-4000);
    });
    prometheusExited = new Promise((resolve) => prometheus!.once('close', () => resolve()));

    // Both admin listeners up as scrape targets.
    const targets = await pollUntil(
      'both scrape targets up',
      async () => {
        if (prometheus!.exitCode !== null)
          throw new Error(`prometheus exited ${prometheus!.exitCode}: ${prometheusLog}`);
        const t = await promGet<{ activeTargets: Target[] }>('/api/v1/targets?state=active');
        return t.activeTargets.length === 2 && t.activeTargets.every((x) => x.health === 'up')
          ? t.activeTargets
          : undefined;
      },
      120_000,
      250,
    );
    expect(targets.map((t) => t.labels.job).sort()).to.deep.equal(['burrow-agent', 'burrow-broker']);

    // Every metric name an alert reads has at least one series.
    const expected = [...new Set(alertRules().flatMap((r) => metricNamesIn(r.expr)))].sort();
    expect(expected).to.include.members([
      'burrow_broker_redis_up',
      'burrow_agent_authn_requests_total',
      'burrow_agent_policy_last_reload_success',
    ]);
    expect(expected.length).to.be.greaterThan(15);
    let missing: string[] = [];
    await pollUntil(
      'every alert metric in prometheus',
      async () => {
        missing = [];
        for (const name of expected) {
          const r = await promGet<{ result: unknown[] }>(
            `/api/v1/query?query=${encodeURIComponent(`count(${name === 'up' ? 'up{job=~"burrow-.*"}' : name})`)}`,
          );
          if (r.result.length === 0) missing.push(name);
        }
        return missing.length === 0;
      },
      60_000,
      500,
    ).catch((err: Error) => {
      throw new Error(`${err.message}; missing: ${missing.join(', ')}`);
    });

    // Spot-check values that prove the scrape saw the real state, not just the names.
    const value = async (q: string): Promise<number> => {
      const r = await promGet<{ result: { value: [number, string] }[] }>(
        `/api/v1/query?query=${encodeURIComponent(q)}`,
      );
      return r.result.length ? Number(r.result[0]!.value[1]) : NaN;
    };
    await pollUntil(
      'the agent and its call in prometheus',
      async () =>
        (await value('sum(burrow_broker_connected_agents)')) === 1 &&
        (await value('burrow_broker_agent_sessions{agent_id="site-a"}')) === 1 &&
        (await value('burrow_agent_connected_brokers')) === 1 &&
        (await value('burrow_broker_redis_up')) === 1 &&
        (await value('burrow_agent_policy_last_reload_success')) === 1 &&
        (await value('sum(burrow_broker_calls_total{direction="to_agent"})')) === 2,
      30_000,
      500,
    );
    expect(await value('min(burrow_pki_ca_expiry_seconds)')).to.be.greaterThan(300 * 86_400);
    expect(await value('burrow_pki_certificate_expiry_seconds{role="broker"}')).to.be.within(3600, 86_400);

    // Every rule loaded and evaluated without error on this data (health "ok").
    const rules = await pollUntil(
      'every rule evaluated',
      async () => {
        const g = await promGet<{ groups: RuleGroup[] }>('/api/v1/rules');
        const all = g.groups.flatMap((x) => x.rules);
        return all.length > 0 && all.every((r) => r.health !== 'unknown') ? all : undefined;
      },
      60_000,
      500,
    );
    expect(rules.length).to.equal(alertRules().length);
    expect(rules.filter((r) => r.health !== 'ok').map((r) => `${r.name}: ${r.lastError}`)).to.deep.equal([]);
    // Nothing is wrong with this healthy pair: no alert fires (pending ones have 'for' clauses).
    const alerts = await promGet<{ alerts: { labels: { alertname: string }; state: string }[] }>('/api/v1/alerts');
    expect(alerts.alerts.filter((a) => a.state === 'firing').map((a) => a.labels.alertname)).to.deep.equal([]);
  });
});
