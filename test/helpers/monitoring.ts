import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import * as YAML from 'yaml';

/**
 * The monitoring assets (deploy/prometheus, deploy/grafana) as tests see them: alert rules, the
 * dashboard's queries, the metric names they use, and the metric names the code exports.
 */

// Compiled to test/dist/helpers/monitoring.js: the repository root is three levels up.
export const ROOT = path.resolve(__dirname, '..', '..', '..');
export const PROMETHEUS_DIR = path.join(ROOT, 'deploy', 'prometheus');
export const ALERTS_FILE = path.join(PROMETHEUS_DIR, 'alerts.yaml');
export const ALERT_TESTS_FILE = path.join(PROMETHEUS_DIR, 'alerts.test.yaml');
export const DASHBOARD_FILE = path.join(ROOT, 'deploy', 'grafana', 'burrow.json');
export const OPERATIONS_DOC = path.join(ROOT, 'docs', 'operations.md');

export interface AlertRule {
  group: string;
  alert: string;
  expr: string;
  labels: Record<string, string>;
  annotations: Record<string, string>;
}

/** Every alerting rule in deploy/prometheus/alerts.yaml. */
export function alertRules(): AlertRule[] {
  const doc = YAML.parse(readFileSync(ALERTS_FILE, 'utf8')) as {
    groups: { name: string; rules: Omit<AlertRule, 'group'>[] }[];
  };
  return doc.groups.flatMap((g) => g.rules.map((r) => ({ group: g.name, ...r })));
}

export interface DashboardQuery {
  panel: string;
  expr: string;
}

/** The Grafana dashboard JSON model. */
export function dashboard(): {
  panels: {
    id: number;
    type: string;
    title: string;
    gridPos: Record<string, number>;
    datasource?: unknown;
    targets?: { refId: string; expr: string; datasource?: unknown }[];
  }[];
  templating: { list: { name: string; type: string; query: unknown }[] };
  [k: string]: unknown;
} {
  return JSON.parse(readFileSync(DASHBOARD_FILE, 'utf8')) as ReturnType<typeof dashboard>;
}

/** Every PromQL query of the dashboard's panels. */
export function dashboardQueries(): DashboardQuery[] {
  return dashboard().panels.flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, expr: t.expr })));
}

/**
 * The dashboard's PromQL with Grafana's variables replaced by what Prometheus would get, so that
 * promtool can parse it.
 */
export function expandGrafanaVariables(expr: string): string {
  return expr.replace(/\$__rate_interval|\$__interval|\$__range/g, '5m').replace(/\$\{?[a-z_]+\}?/g, '.*');
}

/** Metric names a PromQL expression reads: Burrow's (burrow_*) and Prometheus' `up`. */
export function metricNamesIn(expr: string): string[] {
  const withoutStrings = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  const names = new Set<string>();
  for (const m of withoutStrings.matchAll(/\b(burrow_[a-z0-9_]+)\b/g)) names.add(m[1]!);
  if (/(^|[^a-z_])up\s*\{/.test(withoutStrings)) names.add('up');
  return [...names];
}

/**
 * The series names a Prometheus text exposition (a `/metrics` body) declares, as Prometheus
 * stores them: every `# TYPE` line's name, histograms also as `_bucket`, `_sum`, `_count`. A
 * labelled metric nobody has observed yet has its TYPE line and no sample, and still counts.
 */
export function metricNamesOfExposition(text: string): Set<string> {
  const names = new Set<string>();
  for (const m of text.matchAll(/^# TYPE (\S+) (\S+)$/gm)) {
    names.add(m[1]!);
    if (m[2] === 'histogram') for (const suffix of ['_bucket', '_sum', '_count']) names.add(m[1]! + suffix);
  }
  return names;
}

/**
 * The metric names README.md's metrics section documents (its tables' first column); a row
 * such as `burrow_broker_process_*` documents every name with that prefix.
 */
export function documentedMetrics(): { names: Set<string>; prefixes: string[] } {
  const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const at = readme.indexOf('\n## Metrics\n');
  if (at < 0) throw new Error('README.md has no "## Metrics" section');
  const section = readme.slice(at);
  const next = section.indexOf('\n## ', 1);
  const body = next < 0 ? section : section.slice(0, next);
  const names = new Set<string>();
  const prefixes: string[] = [];
  for (const m of body.matchAll(/^\| `(burrow_[a-z0-9_]+)(\*?)` \|/gm)) {
    if (m[2]) prefixes.push(m[1]!);
    else names.add(m[1]!);
  }
  return { names, prefixes };
}

/** Output of a finished child process. */
export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (no shell), with a generous timeout for slow shared machines. */
export function run(
  command: string,
  args: string[],
  opts: { cwd?: string; timeoutMs?: number } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => {
      stdout += s;
    });
    child.stderr.setEncoding('utf8').on('data', (s: string) => {
      stderr += s;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Installs Debian's prometheus package (promtool, prometheus) unless present; rejects on failure. */
export async function ensurePrometheus(): Promise<void> {
  const r = await run('bash', [path.join(PROMETHEUS_DIR, 'install-prometheus.sh')], { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`install-prometheus.sh failed (${r.code}): ${r.stderr.trim()}`);
}
