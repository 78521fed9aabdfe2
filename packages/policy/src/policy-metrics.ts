import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** The metrics of one policy engine, all named `<prefix>_...` in the registry it is given. */
export class PolicyMetrics {
  readonly decisions: Counter<'decision'>;
  readonly decisionDuration: Histogram;
  readonly cacheHits: Counter;
  readonly evaluationErrors: Counter;
  readonly reloadFailures: Counter;
  readonly lastReloadSuccess: Gauge;
  readonly lastReloadTimestamp: Gauge;
  readonly policies: Gauge;
  readonly entities: Gauge;
  readonly auditDropped: Counter;

  constructor(registry: Registry, prefix: string) {
    const registers = [registry];
    this.decisions = new Counter({
      name: `${prefix}_decisions_total`,
      help: 'Policy decisions by outcome (error: the request could not be evaluated)',
      labelNames: ['decision'],
      registers,
    });
    for (const d of ['allow', 'deny', 'error']) this.decisions.inc({ decision: d }, 0);
    this.decisionDuration = new Histogram({
      name: `${prefix}_decision_duration_seconds`,
      help: 'Time to answer one policy decision, cache hits included',
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
      registers,
    });
    this.cacheHits = new Counter({
      name: `${prefix}_cache_hits_total`,
      help: 'Decisions answered from the decision cache',
      registers,
    });
    this.evaluationErrors = new Counter({
      name: `${prefix}_evaluation_errors_total`,
      help: 'Policies whose evaluation failed during a decision (they count as not satisfied)',
      registers,
    });
    this.reloadFailures = new Counter({
      name: `${prefix}_reload_failures_total`,
      help: 'Policy reloads that failed; the last good policy set stayed active',
      registers,
    });
    this.lastReloadSuccess = new Gauge({
      name: `${prefix}_last_reload_success`,
      help: '1 when the last policy (re)load succeeded, 0 when it failed',
      registers,
    });
    this.lastReloadTimestamp = new Gauge({
      name: `${prefix}_last_reload_timestamp_seconds`,
      help: 'Unix time of the last successful policy (re)load',
      registers,
    });
    this.policies = new Gauge({ name: `${prefix}_policies`, help: 'Policies in the active policy set', registers });
    this.entities = new Gauge({ name: `${prefix}_entities`, help: 'Entities in the active entity data', registers });
    this.auditDropped = new Counter({
      name: `${prefix}_audit_dropped_total`,
      help: 'Audit records dropped because the audit log could not keep up or failed',
      registers,
    });
  }
}
