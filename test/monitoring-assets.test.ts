import { expect } from 'chai';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import * as YAML from 'yaml';
import {
  alertRules,
  dashboard,
  dashboardQueries,
  ensurePrometheus,
  expandGrafanaVariables,
  ROOT,
  documentedMetrics,
  metricNamesIn,
  metricNamesOfExposition,
  run,
} from './helpers/monitoring';
import { loadJose } from '@burrow/agent';
import { freePort } from './helpers/free-port';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { httpGet, killAll, startAgent, startBroker, tlsArgs } from './helpers/processes';
import { TestRedis } from './helpers/redis-server';
import { ISS, jwksOf, makeKey } from './helpers/token-fixture';

// The dashboard's data source is the Grafana template variable, written literally in the JSON.
const DATASOURCE_VARIABLE = '$' + '{datasource}';
const EXAMPLES = path.join(ROOT, 'examples');

describe('monitoring assets: Grafana dashboard and metric names', function () {
  this.timeout(600_000);

  describe('deploy/grafana/burrow.json', () => {
    it('is a Grafana dashboard JSON model whose data source is a variable', () => {
      const d = dashboard();
      expect(d.uid).to.be.a('string');
      expect(d.title).to.equal('Burrow');
      expect(d.schemaVersion).to.be.a('number');
      const vars = d.templating.list;
      const ds = vars.find((v) => v.name === 'datasource');
      expect(ds, 'a datasource variable').to.not.equal(undefined);
      expect(ds!.type).to.equal('datasource');
      expect(ds!.query).to.equal('prometheus');
      const ids = d.panels.map((p) => p.id);
      expect(new Set(ids).size, 'panel ids are unique').to.equal(ids.length);
      for (const p of d.panels) {
        for (const k of ['x', 'y', 'w', 'h']) expect(p.gridPos[k], `${p.title} gridPos.${k}`).to.be.a('number');
        expect(p.gridPos.x! + p.gridPos.w!, `${p.title} fits in 24 columns`).to.be.at.most(24);
        if (p.type === 'row') continue;
        expect(p.datasource, `${p.title} datasource`).to.deep.equal({ type: 'prometheus', uid: DATASOURCE_VARIABLE });
        expect(p.targets, `${p.title} targets`).to.be.an('array').that.is.not.empty;
        for (const t of p.targets!)
          expect(t.datasource, `${p.title} ${t.refId}`).to.deep.equal({ type: 'prometheus', uid: DATASOURCE_VARIABLE });
      }
      // Every variable a query uses is defined.
      const defined = new Set(vars.map((v) => v.name));
      for (const q of dashboardQueries()) {
        for (const m of q.expr.matchAll(/\$\{?([a-z_]+)\}?/g)) {
          if (!m[1]!.startsWith('__')) expect(defined.has(m[1]!), `${q.panel}: $${m[1]} is defined`).to.equal(true);
        }
      }
    });

    it(
      'covers what operators watch: agents, calls by status, latency, streams, waiting calls, certificates, ' +
        'enrollments, policy',
      () => {
        const used = new Set(dashboardQueries().flatMap((q) => metricNamesIn(q.expr)));
        for (const name of [
          'burrow_broker_connected_agents',
          'burrow_broker_calls_total',
          'burrow_broker_call_duration_seconds_bucket',
          'burrow_broker_tunnel_streams',
          'burrow_broker_calls_waiting',
          'burrow_pki_certificate_expiry_seconds',
          'burrow_pki_ca_expiry_seconds',
          'burrow_pki_enrollments_total',
          'burrow_agent_authn_requests_total',
          'burrow_agent_policy_last_reload_success',
        ])
          expect(used.has(name), name).to.equal(true);
      },
    );

    it('every query parses as PromQL (promtool check rules)', async () => {
      await ensurePrometheus();
      const dir = mkdtempSync(path.join(tmpdir(), 'burrow-dashboard-'));
      try {
        const rules = dashboardQueries().map((q, i) => ({
          record: `burrow_dashboard_query_${i}`,
          expr: expandGrafanaVariables(q.expr),
        }));
        writeFileSync(path.join(dir, 'queries.yaml'), YAML.stringify({ groups: [{ name: 'dashboard', rules }] }));
        const r = await run('promtool', ['check', 'rules', 'queries.yaml'], { cwd: dir });
        expect(r.code, r.stdout + r.stderr).to.equal(0);
        expect(r.stdout).to.include(`SUCCESS: ${rules.length} rules found`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe('metric names, against a running broker and agent', () => {
    let pki: PkiFixture | undefined;
    let redis: TestRedis | undefined;
    /** Names the two processes' /metrics declare, with where each came from. */
    const exported = new Map<string, string>();

    // Every optional feature with metrics of its own is on: a (one-replica) cluster broker on a
    // Redis of the test's own, with its PKI, caller policies and AuthZEN; an agent that verifies
    // tokens and decides policies.
    before(async () => {
      pki = await PkiFixture.create();
      redis = await TestRedis.start();
      const agentCert: CertFiles = await pki.issue('agent', 'site-a');
      const broker = await startBroker([
        ...['--pki-dir', pki.pkiDir, '--redis-url', redis.url, '--advertise', `127.0.0.1:${await freePort()}`],
        ...['--agent-listen', '127.0.0.1:0', '--api-listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'],
        ...['--authzen-listen', '127.0.0.1:0', '--caller-policies', path.join(EXAMPLES, 'callers')],
        ...['--caller-entities', path.join(EXAMPLES, 'callers', 'entities.json')],
      ]);
      const jwksFile = path.join(pki.root, 'jwks.json');
      writeFileSync(jwksFile, jwksOf(await makeKey(await loadJose(), 'ES256', 'k1')));
      const agent = await startAgent([
        ...['--broker', `127.0.0.1:${broker.ports.agentPort}`, ...tlsArgs(agentCert)],
        ...['--upstream', `*=127.0.0.1:${await freePort()}`, '--admin-listen', '127.0.0.1:0'],
        ...['--jwks', jwksFile, '--token-issuer', ISS, '--token-audience', 'site-api'],
        ...['--policies', path.join(EXAMPLES, 'policy', 'policies')],
        ...['--entities', path.join(EXAMPLES, 'policy', 'entities.json')],
      ]);
      await broker.proc.waitForLog('agent connected');
      for (const [who, port] of [
        ['broker', broker.ports.adminPort],
        ['agent', agent.ports.adminPort],
      ] as const) {
        const res = await httpGet(`http://127.0.0.1:${port}/metrics`);
        expect(res.status, `${who} /metrics`).to.equal(200);
        for (const name of metricNamesOfExposition(res.body)) exported.set(name, who);
      }
    });
    after(async () => {
      await killAll();
      await redis?.kill();
      pki?.cleanup();
    });

    it('every metric the alerts and the dashboard use is exported by the broker or the agent', () => {
      const used = new Map<string, string>();
      for (const r of alertRules()) for (const n of metricNamesIn(r.expr)) used.set(n, `alert ${r.alert}`);
      for (const q of dashboardQueries())
        for (const n of metricNamesIn(q.expr)) used.set(n, `dashboard panel "${q.panel}"`);
      expect(used.size).to.be.greaterThan(20);
      const unknown = [...used].filter(([n]) => n !== 'up' && !exported.has(n)).map(([n, where]) => `${n} (${where})`);
      expect(unknown, 'metric names nobody exports').to.deep.equal([]);
    });

    it('every metric the broker and the agent export is in the README metrics table', () => {
      const { names, prefixes } = documentedMetrics();
      expect(names.size).to.be.greaterThan(40);
      const histogramPart = /_(bucket|sum|count)$/;
      const undocumented = [...exported]
        .filter(([n]) => !names.has(n) && !names.has(n.replace(histogramPart, '')))
        .filter(([n]) => !prefixes.some((p) => n.startsWith(p)))
        .map(([n, who]) => `${n} (${who})`);
      expect(undocumented, 'exported but not documented in README.md').to.deep.equal([]);
      // And the other way: a documented name nobody exports is a stale row.
      const stale = [...names].filter((n) => !exported.has(n));
      expect(stale, 'documented in README.md but not exported').to.deep.equal([]);
    });

    it('covers admission, authorization, limits, policy decisions and AuthZEN on the dashboard', () => {
      const used = new Set(dashboardQueries().flatMap((q) => metricNamesIn(q.expr)));
      for (const name of [
        'burrow_broker_handshakes_shed_total',
        'burrow_broker_handshakes_pending',
        'burrow_broker_authz_decisions_total',
        'burrow_broker_limited_calls_total',
        'burrow_broker_authzen_requests_total',
        'burrow_broker_caller_policy_decisions_total',
        'burrow_agent_policy_decisions_total',
      ])
        expect(used.has(name), name).to.equal(true);
    });

    it('the name checks can fail: a misspelt or undocumented name is reported', () => {
      for (const bogus of ['burrow_broker_connected_agent', 'burrow_broker_call_duration_bucket']) {
        expect(metricNamesIn(`sum(${bogus}{job="x"})`)).to.deep.equal([bogus]);
        expect(exported.has(bogus)).to.equal(false);
      }
      expect(exported.has('burrow_broker_call_duration_seconds_bucket')).to.equal(true);
      expect(exported.has('burrow_broker_process_nodejs_eventloop_lag_p99_seconds')).to.equal(true);
      expect(documentedMetrics().names.has('burrow_broker_connected_agent')).to.equal(false);
    });
  });
});
