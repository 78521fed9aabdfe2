import { expect } from 'chai';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import * as YAML from 'yaml';
import {
  ALERTS_FILE,
  ALERT_TESTS_FILE,
  OPERATIONS_DOC,
  PROMETHEUS_DIR,
  alertRules,
  ensurePrometheus,
  run,
} from './helpers/monitoring';

interface AlertTestCase {
  eval_time: string;
  alertname: string;
  exp_alerts?: unknown[];
}
interface AlertTestGroup {
  name: string;
  alert_rule_test?: AlertTestCase[];
}

/** GitHub-style anchor of a markdown heading. */
function anchor(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/[^a-z0-9 _-]/g, '')
    .replace(/ /g, '-');
}

describe('Prometheus alerting rules (deploy/prometheus)', function () {
  // Installing the prometheus package on a busy machine can take minutes the first time.
  this.timeout(600_000);

  before(async () => {
    await ensurePrometheus();
  });

  it('check.sh passes: promtool check rules and promtool test rules', async () => {
    const r = await run('bash', [path.join(PROMETHEUS_DIR, 'check.sh')]);
    expect(r.code, `${r.stdout}\n${r.stderr}`).to.equal(0);
    expect(r.stdout).to.match(/SUCCESS: \d+ rules found/);
    expect(r.stdout).to.match(/Unit Testing:\s+alerts\.test\.yaml\s+SUCCESS/);
  });

  it('every alert has a unit test where it fires and one where it stays silent', () => {
    const tests = (YAML.parse(readFileSync(ALERT_TESTS_FILE, 'utf8')) as { tests: AlertTestGroup[] }).tests;
    const cases = tests.flatMap((t) => t.alert_rule_test ?? []);
    const missing: string[] = [];
    for (const { alert } of alertRules()) {
      const mine = cases.filter((c) => c.alertname === alert);
      if (!mine.some((c) => (c.exp_alerts ?? []).length > 0)) missing.push(`${alert}: no firing case`);
      if (!mine.some((c) => (c.exp_alerts ?? []).length === 0)) missing.push(`${alert}: no silent case`);
    }
    expect(missing).to.deep.equal([]);
  });

  it('every alert has a severity and a runbook entry in docs/operations.md', () => {
    const headings = new Set(
      [...readFileSync(OPERATIONS_DOC, 'utf8').matchAll(/^#{2,4} (.+)$/gm)].map((m) => anchor(m[1]!)),
    );
    for (const rule of alertRules()) {
      expect(rule.labels.severity, rule.alert).to.be.oneOf(['warning', 'critical']);
      const m = /^docs\/operations\.md#(.+)$/.exec(rule.annotations.runbook_url ?? '');
      expect(m, `${rule.alert} runbook_url`).to.not.equal(null);
      expect(headings.has(m![1]!), `${rule.alert}: docs/operations.md has no heading with anchor #${m![1]}`).to.equal(
        true,
      );
    }
  });

  describe('the unit tests catch a broken rule', () => {
    let dir: string;
    beforeEach(() => {
      dir = mkdtempSync(path.join(tmpdir(), 'burrow-rules-'));
      copyFileSync(ALERT_TESTS_FILE, path.join(dir, 'alerts.test.yaml'));
    });
    afterEach(() => rmSync(dir, { recursive: true, force: true }));

    const mutations: [string, string, string][] = [
      ['BurrowBrokerDown', 'expr: up{job="burrow-broker"} == 0', 'expr: up{job="burrow-broker"} == 2'],
      ['BurrowTunneledCallErrorRate', ') > 0.05', ') > 0.5'],
      [
        'BurrowPolicyReloadFailed',
        '[15m]) > 0\n            or on (job, instance)',
        '[15m]) > 0\n            and on (job, instance)',
      ],
    ];
    for (const [alert, from, to] of mutations) {
      it(`a changed ${alert} fails promtool test rules`, async () => {
        const rules = readFileSync(ALERTS_FILE, 'utf8');
        expect(rules.includes(from), `alerts.yaml contains ${JSON.stringify(from)}`).to.equal(true);
        writeFileSync(path.join(dir, 'alerts.yaml'), rules.replace(from, to));
        const r = await run('promtool', ['test', 'rules', 'alerts.test.yaml'], { cwd: dir });
        expect(r.code).to.not.equal(0);
        expect(r.stdout + r.stderr).to.include(`alertname: ${alert}`);
      });
    }
  });
});
