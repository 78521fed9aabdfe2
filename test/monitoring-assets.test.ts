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
  exportedMetricNames,
  metricNamesIn,
  run,
} from './helpers/monitoring';

// The dashboard's data source is the Grafana template variable, written literally in the JSON.
const DATASOURCE_VARIABLE = '$' + '{datasource}';

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

  describe('metric names', () => {
    it('every metric the alerts and the dashboard use is exported by the broker or the agent', async () => {
      const exported = await exportedMetricNames();
      const used = new Map<string, string>();
      for (const r of alertRules()) for (const n of metricNamesIn(r.expr)) used.set(n, `alert ${r.alert}`);
      for (const q of dashboardQueries())
        for (const n of metricNamesIn(q.expr)) used.set(n, `dashboard panel "${q.panel}"`);
      expect(used.size).to.be.greaterThan(20);
      const unknown = [...used].filter(([n]) => n !== 'up' && !exported.has(n)).map(([n, where]) => `${n} (${where})`);
      expect(unknown, 'metric names nobody exports').to.deep.equal([]);
    });

    it('the name check can fail: a misspelt name is reported', async () => {
      const exported = await exportedMetricNames();
      for (const bogus of ['burrow_broker_connected_agent', 'burrow_broker_call_duration_bucket']) {
        expect(metricNamesIn(`sum(${bogus}{job="x"})`)).to.deep.equal([bogus]);
        expect(exported.has(bogus)).to.equal(false);
      }
      expect(exported.has('burrow_broker_call_duration_seconds_bucket')).to.equal(true);
      expect(exported.has('burrow_broker_process_nodejs_eventloop_lag_p99_seconds')).to.equal(true);
    });
  });
});
