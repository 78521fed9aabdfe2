import { EventEmitter } from 'node:events';
import { existsSync, watch, type FSWatcher } from 'node:fs';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { Registry } from 'prom-client';
import type { Logger } from 'winston';
import { silentLogger } from '@burrow/tunnel';
import { AuditLog, type AuditRecord } from './audit-log';
import { cedar, type CedarResponse, type DetailedError, type StatefulAuthorizationCall } from './cedar';
import { entityLiteral, lineColumnAt } from './cedar-text';
import { DecisionCache } from './decision-cache';
import { collectEntityRefs, entityKey, type EntityRecord, type EntityStore, type EntityUid } from './entity-store';
import { checkInputBounds } from './input-bounds';
import {
  PolicyInputError,
  canonicalJson,
  expandEvaluations,
  normalizeRequest,
  sha256Hex,
  type EvaluationResponse,
  type EvaluationsResponse,
  type ExplainedError,
  type ExplainedPolicy,
  type Explanation,
  type JsonObject,
  type NormalizedRequest,
} from './policy-input';
import { PolicyMetrics } from './policy-metrics';
import {
  PolicyLoadError,
  compilePolicySet,
  formatPolicyIssue,
  readPolicyInputs,
  type CompiledPolicy,
  type CompiledPolicySet,
  type PolicyInputs,
  type PolicyIssue,
  type PolicySources,
} from './policy-set-loader';

/** Defaults of {@link PolicyEngineOptions}. */
export const POLICY_ENGINE_DEFAULTS = {
  cacheTtlMs: 5000,
  cacheMaxEntries: 10_000,
  watchDebounceMs: 100,
  metricsPrefix: 'burrow_policy',
} as const;

/**
 * The context key that carries `action.properties` into Cedar: Cedar actions are entities of
 * the schema, not of the request, so request data about the action goes in the context, as
 * `context.action_properties.<key>`.
 */
export const ACTION_PROPERTIES_CONTEXT_KEY = 'action_properties';

/** Options of {@link PolicyEngine.open}. */
export interface PolicyEngineOptions extends PolicySources {
  /** How long a decision is served from the cache; 0 turns the cache off. Default 5000. */
  cacheTtlMs?: number;
  /** Most decisions cached (least recently used out first). Default 10000. */
  cacheMaxEntries?: number;
  /** Audit log: a writable stream (not closed by the engine) or a file path (appended to, mode 0600). */
  auditLog?: Writable | string;
  /** Audit records are dropped (counted) while more than this many bytes wait for the disk. Default 8 MiB. */
  auditMaxBufferedBytes?: number;
  logger?: Logger;
  /** Where the metrics go; default a fresh registry. */
  registry?: Registry;
  /** Metric name prefix, e.g. `burrow_agent_policy` or `burrow_broker_caller_policy`. Default `burrow_policy`. */
  metricsPrefix?: string;
  /** Reload when a policy file, the entities file or the schema changes. Default false. */
  watch?: boolean;
  /** Changes closer together than this make one reload. Default 100. */
  watchDebounceMs?: number;
  /** Milliseconds now, for cache expiry and audit times; default Date.now. */
  clock?: () => number;
}

/** Per-call options of {@link PolicyEngine.evaluate}. */
export interface EvaluateOptions {
  /** Who asks, as the caller has verified it (a service identity, an agent id); written to the audit log. */
  caller?: string;
  /** The request was admitted by another broker first (broker caller policy): its id, for the audit log. */
  forwardedBy?: string;
  /** Ids of that broker's policies that permitted the request, for the audit log. */
  entryPolicies?: string[];
  /** The gateway decision this evaluation answers (Check's decision_id), for the audit log. */
  decisionId?: string;
}

/** Outcome of one (re)load. */
export interface ReloadResult {
  ok: boolean;
  /** False when the sources were byte-for-byte what is already active (nothing was done). */
  changed: boolean;
  /** Policies and entities now active (the old set's counts after a failure). */
  policies: number;
  entities: number;
  durationMs: number;
  /** One line: the first problem and how many more. */
  error?: string;
  issues?: PolicyIssue[];
}

interface ActiveSet {
  compiled: CompiledPolicySet;
  /** Id of the preparsed set in Cedar's Wasm-side cache. */
  policySetId: string;
  /** The same set without its forbids, to find the permits a forbid overrode (explain only). */
  permitsOnlyId: string;
  schemaName?: string;
  /** Entities reachable from the policies' entity literals: part of every decision's slice. */
  literalClosure: Set<string>;
  loadedAtMs: number;
}

type DecisionOutcome = 'allow' | 'deny' | 'error';

/** The principal, action and resource of a request, as Cedar takes them. */
interface RequestUids {
  principal: EntityUid;
  action: EntityUid;
  resource: EntityUid;
}

/** A Cedar call whose uids are known to be in `{type, id}` form (the explanation prints them). */
type CedarCall = StatefulAuthorizationCall & RequestUids;

/** How often a watch that was lost (its directory removed) is tried again. */
const REWATCH_INTERVAL_MS = 1000;

let engineSerial = 0;

/**
 * The Burrow policy decision point: answers AuthZEN access evaluations from Cedar policies and
 * entity data (mapping in docs/policy.md and proto/burrow/policy/v1/policy.proto). Used by the
 * agent for site decisions and by the broker for caller authorization.
 *
 * Decisions are synchronous and CPU-bound (tens of microseconds; see docs/policy.md), cached
 * for `cacheTtlMs`, and each one is written to the audit log. With `watch`, the sources are
 * reloaded when they change; a set that fails to load leaves the last good one active.
 *
 * Events: `reload` (ReloadResult) after every reload attempt that read the sources.
 */
export class PolicyEngine extends EventEmitter {
  private active: ActiveSet;
  private readonly cache: DecisionCache<EvaluationResponse>;
  private readonly metrics: PolicyMetrics;
  private readonly logger: Logger;
  private readonly clock: () => number;
  private readonly serial = ++engineSerial;
  private generation = 0;
  private reloading: Promise<ReloadResult> = Promise.resolve({
    ok: true,
    changed: false,
    policies: 0,
    entities: 0,
    durationMs: 0,
  });
  private readonly watchers = new Map<string, FSWatcher>();
  private debounceTimer: NodeJS.Timeout | undefined;
  private readonly rewatchTimers = new Set<NodeJS.Timeout>();
  private closed = false;
  /** Prometheus registry the metrics are in (the one given, or the engine's own). */
  readonly registry: Registry;

  private constructor(
    private readonly opts: PolicyEngineOptions,
    compiled: CompiledPolicySet,
    private readonly audit: AuditLog | undefined,
    metrics: PolicyMetrics,
    registry: Registry,
  ) {
    super();
    this.logger = opts.logger ?? silentLogger();
    this.clock = opts.clock ?? Date.now;
    this.registry = registry;
    this.metrics = metrics;
    this.cache = new DecisionCache(
      opts.cacheTtlMs ?? POLICY_ENGINE_DEFAULTS.cacheTtlMs,
      opts.cacheMaxEntries ?? POLICY_ENGINE_DEFAULTS.cacheMaxEntries,
      this.clock,
    );
    this.active = this.activate(compiled);
  }

  /**
   * Loads the policy set and starts the engine (and its watchers when `watch` is set). Rejects with
   * a {@link PolicyLoadError} whose message is one line naming the file (and line:column) of the
   * first problem when the initial set does not load, or an Error when the audit log cannot be opened.
   */
  static async open(opts: PolicyEngineOptions): Promise<PolicyEngine> {
    const cacheTtlMs = opts.cacheTtlMs ?? POLICY_ENGINE_DEFAULTS.cacheTtlMs;
    const cacheMaxEntries = opts.cacheMaxEntries ?? POLICY_ENGINE_DEFAULTS.cacheMaxEntries;
    if (!Number.isInteger(cacheTtlMs) || cacheTtlMs < 0)
      throw new RangeError(`cacheTtlMs must be an integer >= 0, got ${cacheTtlMs}`);
    if (!Number.isInteger(cacheMaxEntries) || cacheMaxEntries < 0)
      throw new RangeError(`cacheMaxEntries must be an integer >= 0, got ${cacheMaxEntries}`);
    const started = performance.now();
    const compiled = compilePolicySet(await readPolicyInputs(opts));
    const registry = opts.registry ?? new Registry();
    const metrics = new PolicyMetrics(registry, opts.metricsPrefix ?? POLICY_ENGINE_DEFAULTS.metricsPrefix);
    const audit =
      opts.auditLog === undefined
        ? undefined
        : await AuditLog.open({
            sink: opts.auditLog,
            logger: opts.logger ?? silentLogger(),
            maxBufferedBytes: opts.auditMaxBufferedBytes,
            onDrop: () => metrics.auditDropped.inc(),
          });
    const engine = new PolicyEngine(opts, compiled, audit, metrics, registry);
    engine.logLoaded(compiled, performance.now() - started, 'policies loaded');
    if (opts.watch) engine.startWatching();
    return engine;
  }

  /** Policies in the active set. */
  get policyCount(): number {
    return this.active.compiled.policies.length;
  }

  /** Entities in the active entity data. */
  get entityCount(): number {
    return this.active.compiled.entities.size;
  }

  /** The active policies, in load order (for admin pages and tools). */
  get policies(): readonly CompiledPolicy[] {
    return this.active.compiled.policies;
  }

  /**
   * One AuthZEN access evaluation. Returns `{decision, context: {reason, policies, explanation?}}`;
   * default deny. Throws {@link PolicyInputError} (INVALID_ARGUMENT) for a request that cannot be
   * evaluated: over the bounds of POLICY_INPUT_LIMITS (depth, values), missing subject/action/resource,
   * an invalid type name, a value Cedar cannot hold,
   * or (with a schema) a request the schema does not allow. Every call, cached or not, failed or
   * not, is one audit record. Synchronous; never waits for I/O.
   */
  evaluate(input: unknown, opts: EvaluateOptions = {}): EvaluationResponse {
    const startNs = process.hrtime.bigint();
    let request: NormalizedRequest;
    let key: string;
    try {
      checkInputBounds(input);
    } catch (err) {
      // Not canonicalized for the audit hash: that would cost what the bounds are there to avoid.
      this.finish(startNs, 'error', [], false, '<request over bounds>', opts, (err as Error).message);
      throw err;
    }
    try {
      request = normalizeRequest(input);
      key = canonicalJson(request);
    } catch (err) {
      this.finish(startNs, 'error', [], false, safeCanonical(input), opts, (err as Error).message);
      throw err;
    }
    const cached = this.cache.get(key);
    if (cached) {
      this.metrics.cacheHits.inc();
      this.finish(startNs, cached.decision ? 'allow' : 'deny', cached.context.policies ?? [], true, key, opts);
      return structuredClone(cached);
    }
    let response: EvaluationResponse;
    try {
      response = this.decide(request);
    } catch (err) {
      this.finish(startNs, 'error', [], false, key, opts, (err as Error).message);
      throw err;
    }
    this.cache.set(key, response);
    this.finish(startNs, response.decision ? 'allow' : 'deny', response.context.policies ?? [], false, key, opts);
    return this.cache.enabled ? structuredClone(response) : response;
  }

  /**
   * AuthZEN access evaluations: each item's present subject, action, resource and context replace
   * the top-level defaults; answers come in order. `options.evaluations_semantic`:
   * `execute_all` (default), `deny_on_first_deny` or `permit_on_first_permit` stop after the first
   * deny / permit and leave the later items out. An item that cannot be evaluated gets
   * `{decision: false, context: {error: {code: 'INVALID_ARGUMENT', message}}}` (a deny for the
   * semantics). Throws {@link PolicyInputError} only for a malformed batch or one over the bounds of
   * POLICY_INPUT_LIMITS.
   */
  evaluations(input: unknown, opts: EvaluateOptions = {}): EvaluationsResponse {
    checkInputBounds(input);
    const batch = expandEvaluations(input);
    const evaluations: EvaluationResponse[] = [];
    for (const item of batch.items) {
      let answer: EvaluationResponse;
      try {
        answer = this.evaluate(item, opts);
      } catch (err) {
        if (!(err instanceof PolicyInputError)) throw err;
        answer = { decision: false, context: { error: { code: 'INVALID_ARGUMENT', message: err.message } } };
      }
      evaluations.push(answer);
      if (batch.semantic === 'deny_on_first_deny' && !answer.decision) break;
      if (batch.semantic === 'permit_on_first_permit' && answer.decision) break;
    }
    return { evaluations };
  }

  /**
   * Reads and compiles the sources again and, when they load, makes them the active set and empties
   * the decision cache. A set that fails leaves the last good one active, logs every problem with
   * file:line:column, and counts a reload failure. Reloads run one at a time. Never rejects.
   */
  reload(): Promise<ReloadResult> {
    // Chained on the previous reload whatever its outcome, so one failure cannot stall the rest.
    const next = this.reloading.catch(() => undefined).then(() => this.reloadNow());
    this.reloading = next;
    return next;
  }

  /** Stops the watchers, waits for a reload in progress, flushes and closes the audit log. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.debounceTimer);
    for (const t of this.rewatchTimers) clearTimeout(t);
    this.rewatchTimers.clear();
    for (const w of this.watchers.values()) w.close();
    this.watchers.clear();
    await this.reloading.catch(() => undefined);
    // Cedar keeps preparsed sets in Wasm memory until replaced; replace ours with empty ones.
    for (const slot of [0, 1]) {
      cedar.preparsePolicySet(this.slotId(slot), { staticPolicies: {} });
      cedar.preparsePolicySet(`${this.slotId(slot)}-permits`, { staticPolicies: {} });
    }
    await this.audit?.close();
  }

  private slotId(slot: number): string {
    return `burrow-policy-${this.serial}-${slot}`;
  }

  /** Hands a compiled set to Cedar under the slot not in use, so the active one is never disturbed. */
  private activate(compiled: CompiledPolicySet): ActiveSet {
    const slot = this.generation++ % 2;
    const policySetId = this.slotId(slot);
    const all: Record<string, string> = {};
    const permits: Record<string, string> = {};
    for (const p of compiled.policies) {
      all[p.id] = p.text;
      if (p.effect === 'permit') permits[p.id] = p.text;
    }
    const parsed = cedar.preparsePolicySet(policySetId, { staticPolicies: all });
    if (parsed.type === 'failure')
      throw new PolicyLoadError(parsed.errors.map((e) => ({ file: this.opts.policiesDir, message: e.message })));
    cedar.preparsePolicySet(`${policySetId}-permits`, { staticPolicies: permits });
    let schemaName: string | undefined;
    if (compiled.schema !== undefined) {
      schemaName = `burrow-schema-${this.serial}-${slot}`;
      const s = cedar.preparseSchema(schemaName, compiled.schema);
      if (s.type === 'failure')
        throw new PolicyLoadError(s.errors.map((e) => ({ file: this.opts.schemaFile ?? '', message: e.message })));
    }
    const literalClosure = compiled.entities.closure(compiled.literalEntityKeys);
    this.metrics.policies.set(compiled.policies.length);
    this.metrics.entities.set(compiled.entities.size);
    this.metrics.lastReloadSuccess.set(1);
    this.metrics.lastReloadTimestamp.set(this.clock() / 1000);
    return {
      compiled,
      policySetId,
      permitsOnlyId: `${policySetId}-permits`,
      schemaName,
      literalClosure,
      loadedAtMs: this.clock(),
    };
  }

  private logLoaded(compiled: CompiledPolicySet, durationMs: number, message: string): void {
    this.logger.info(message, {
      policies: compiled.policies.length,
      entities: compiled.entities.size,
      durationMs: Math.round(durationMs * 10) / 10,
      policiesDir: this.opts.policiesDir,
    });
    for (const w of compiled.warnings) this.logger.warn('policy validation warning', { warning: w });
    if (compiled.policies.length === 0)
      this.logger.warn('the policy set is empty: every decision is a deny', { policiesDir: this.opts.policiesDir });
  }

  private async reloadNow(): Promise<ReloadResult> {
    const started = performance.now();
    const elapsed = (): number => Math.round((performance.now() - started) * 10) / 10;
    if (this.closed) return this.reloadResult(false, false, 0, { error: 'policy engine closed' });
    let result: ReloadResult;
    try {
      const inputs = await readPolicyInputs(this.opts);
      // Editors and ConfigMap updates touch files without changing them; nothing to do.
      if (inputs.fingerprint === this.active.compiled.fingerprint) return this.reloadResult(true, false, elapsed());
      result = this.activateReloaded(inputs, elapsed);
    } catch (err) {
      result = this.reloadFailed(err as Error, elapsed());
    }
    try {
      this.emit('reload', result);
    } catch (err) {
      this.logger.error('a reload listener threw', { error: (err as Error).message });
    }
    return result;
  }

  /** Compiles changed sources and makes them the active set, emptying the decision cache. */
  private activateReloaded(inputs: PolicyInputs, elapsed: () => number): ReloadResult {
    const compiled = compilePolicySet(inputs);
    if (this.closed) throw new Error('policy engine closed during reload');
    this.active = this.activate(compiled);
    this.cache.clear();
    const result = this.reloadResult(true, true, elapsed());
    this.logLoaded(compiled, result.durationMs, 'policies reloaded');
    return result;
  }

  /** A reload that failed: the last good set stays active; counted and logged with every issue. */
  private reloadFailed(err: Error, durationMs: number): ReloadResult {
    const issues =
      err instanceof PolicyLoadError ? err.issues : [{ file: this.opts.policiesDir, message: err.message }];
    const result = this.reloadResult(false, true, durationMs, { error: err.message, issues });
    this.metrics.reloadFailures.inc();
    this.metrics.lastReloadSuccess.set(0);
    this.logger.error('policy reload failed; the last good policy set stays active', {
      error: result.error,
      issues: issues.map(formatPolicyIssue),
      activePolicies: this.policyCount,
    });
    return result;
  }

  /** A ReloadResult with the counts of the set active now. */
  private reloadResult(
    ok: boolean,
    changed: boolean,
    durationMs: number,
    failure: Pick<ReloadResult, 'error' | 'issues'> = {},
  ): ReloadResult {
    return { ok, changed, policies: this.policyCount, entities: this.entityCount, durationMs, ...failure };
  }

  // ---- watching ----

  private startWatching(): void {
    const dirs = new Map<string, (name: string | null) => boolean>();
    const base = (file: string | undefined): string | undefined => (file ? path.basename(file) : undefined);
    // In the policy directory every event counts (new files, renames, Kubernetes' ..data swap);
    // the fingerprint check makes a reload for an unrelated file a no-op.
    dirs.set(path.resolve(this.opts.policiesDir), () => true);
    for (const file of [this.opts.entitiesFile, this.opts.schemaFile]) {
      if (!file) continue;
      const dir = path.dirname(path.resolve(file));
      if (dirs.has(dir)) continue;
      // Watch the directory, not the file: editors and atomic writers replace a file by rename,
      // and a watch on the old inode would go quiet.
      const names = new Set([base(this.opts.entitiesFile), base(this.opts.schemaFile)]);
      dirs.set(dir, (name) => name === null || names.has(name) || name.startsWith('..'));
    }
    for (const [dir, filter] of dirs) this.watchDir(dir, filter);
  }

  private watchDir(dir: string, filter: (name: string | null) => boolean): void {
    if (this.closed) return;
    try {
      // Not persistent: watching alone must not keep a process alive.
      const w = watch(dir, { persistent: false }, (_event, name) => {
        if (filter(name === null ? null : String(name))) this.scheduleReload();
        // A removed directory ends the watch without an error event: watch again once it is back.
        if (!existsSync(dir)) {
          w.close();
          this.watchers.delete(dir);
          this.scheduleReload();
          this.retryWatch(dir, filter);
        }
      });
      w.on('error', (err) => {
        this.logger.warn('policy watch failed; retrying', { dir, error: err.message });
        w.close();
        this.watchers.delete(dir);
        this.retryWatch(dir, filter);
      });
      this.watchers.set(dir, w);
    } catch (err) {
      this.logger.warn('cannot watch for policy changes; retrying', { dir, error: (err as Error).message });
      this.retryWatch(dir, filter);
    }
  }

  private retryWatch(dir: string, filter: (name: string | null) => boolean): void {
    if (this.closed) return;
    const timer = setTimeout(() => {
      this.rewatchTimers.delete(timer);
      this.watchDir(dir, filter);
      // Whatever changed while nobody watched is picked up now.
      if (this.watchers.has(dir)) this.scheduleReload();
    }, REWATCH_INTERVAL_MS);
    timer.unref();
    this.rewatchTimers.add(timer);
  }

  private scheduleReload(): void {
    if (this.closed) return;
    clearTimeout(this.debounceTimer);
    this.debounceTimer = setTimeout(() => {
      this.reload().catch((err: Error) =>
        this.logger.error('policy reload failed unexpectedly', { error: err.message }),
      );
    }, this.opts.watchDebounceMs ?? POLICY_ENGINE_DEFAULTS.watchDebounceMs);
    this.debounceTimer.unref();
  }

  // ---- deciding ----

  private finish(
    startNs: bigint,
    decision: DecisionOutcome,
    policies: string[],
    cached: boolean,
    key: string,
    who: EvaluateOptions,
    error?: string,
  ): void {
    const latencyNs = Number(process.hrtime.bigint() - startNs);
    this.metrics.decisions.inc({ decision });
    this.metrics.decisionDuration.observe(latencyNs / 1e9);
    if (!this.audit) return;
    const rec: AuditRecord = {
      time: new Date(this.clock()).toISOString(),
      input_sha256: sha256Hex(key),
      decision,
      policies,
      cached,
      latency_us: Math.round(latencyNs / 1000),
    };
    if (who.caller !== undefined) rec.caller = who.caller;
    if (who.forwardedBy !== undefined) rec.forwarded_by = who.forwardedBy;
    if (who.entryPolicies !== undefined) rec.entry_policies = who.entryPolicies;
    if (who.decisionId !== undefined) rec.decision_id = who.decisionId;
    if (error !== undefined) rec.error = error;
    this.audit.record(rec);
  }

  private decide(request: NormalizedRequest): EvaluationResponse {
    const active = this.active;
    const call = cedarCallOf(active, request);
    const answer = cedar.statefulIsAuthorized(call);
    if (answer.type === 'failure') {
      const first = answer.errors[0];
      throw new PolicyInputError(
        'request',
        `Cedar cannot evaluate this request: ${first ? first.message : 'unknown error'}`,
        answer.errors,
      );
    }
    const verdict = this.verdictOf(active, answer.response);
    const response: EvaluationResponse = {
      decision: verdict.allow,
      context: { reason: reasonOf(verdict), policies: verdict.policies },
    };
    annotate(response, active, verdict.policies);
    if (request.explain) response.context.explanation = this.explanationOf(active, call, verdict);
    return response;
  }

  /** Cedar's answer with the fail-closed rule applied, and the policies that decided. */
  private verdictOf(active: ActiveSet, response: CedarResponse): Verdict {
    const { decision, diagnostics } = response;
    if (diagnostics.errors.length > 0) this.metrics.evaluationErrors.inc(diagnostics.errors.length);
    const errors: ExplainedError[] = [...diagnostics.errors]
      .sort((a, b) => a.policyId.localeCompare(b.policyId))
      .map((e) => ({ policy: e.policyId, location: this.locate(e.policyId, e.error), message: e.error.message }));
    // Cedar skips a policy whose condition errors, so a forbid that cannot be evaluated (a context
    // value of the wrong type, a missing attribute) would let its permits through: fail closed.
    // An erroring permit needs nothing: skipped, it permits nothing, as in Cedar.
    const failedForbids = errors.filter((e) => active.compiled.byId.get(e.policy)?.effect === 'forbid');
    const allow = decision === 'allow' && failedForbids.length === 0;
    // Cedar returns them in hash order; sorted, equal decisions read the same.
    const satisfiedIds = [...diagnostics.reason].sort();
    const failedClosed = decision === 'allow' && !allow;
    // A deny by a failed forbid names that forbid as the deciding policy.
    const policies = failedClosed ? failedForbids.map((e) => e.policy) : satisfiedIds;
    return { cedarDecision: decision, allow, failedClosed, policies, satisfiedIds, errors, failedForbids };
  }

  /** `context.explanation`: the request's entities, the policies that applied, and the errors. */
  private explanationOf(active: ActiveSet, call: CedarCall, verdict: Verdict): Explanation {
    const satisfied: ExplainedPolicy[] = verdict.satisfiedIds.map((id) => this.explainPolicy(id));
    if (verdict.cedarDecision === 'deny' && verdict.policies.length > 0) {
      // Cedar names only the forbids of a deny; the permits they overrode come from the permit-only set.
      const permits = cedar.statefulIsAuthorized({ ...call, preparsedPolicySetId: active.permitsOnlyId });
      if (permits.type === 'success')
        for (const id of permits.response.diagnostics.reason) satisfied.push(this.explainPolicy(id));
    }
    const { principal, action, resource } = call;
    return {
      request: {
        principal: entityLiteral(principal.type, principal.id),
        action: entityLiteral(action.type, action.id),
        resource: entityLiteral(resource.type, resource.id),
      },
      satisfied,
      errors: verdict.errors,
    };
  }

  private explainPolicy(id: string): ExplainedPolicy {
    const p = this.active.compiled.byId.get(id);
    return p
      ? { id, effect: p.effect, location: `${p.file}:${p.line}` }
      : { id, effect: 'permit', location: 'unknown' };
  }

  /** file:line:column of a Cedar error inside a policy (its offsets are relative to the policy text). */
  private locate(policyId: string, err: DetailedError): string {
    const p = this.active.compiled.byId.get(policyId);
    if (!p) return 'unknown';
    const loc = err.sourceLocations?.[0];
    if (!loc) return `${p.file}:${p.line}:${p.column}`;
    const rel = lineColumnAt(p.text, loc.start);
    const line = p.line + rel.line - 1;
    const column = rel.line === 1 ? p.column + rel.column - 1 : rel.column;
    return `${p.file}:${line}:${column}`;
  }
}

/** Cedar's answer to one request, as interpreted by {@link PolicyEngine.decide}. */
interface Verdict {
  /** Cedar's own decision, before the fail-closed rule. */
  cedarDecision: CedarResponse['decision'];
  /** The decision answered: Cedar's allow, unless a forbid failed to evaluate. */
  allow: boolean;
  /** Cedar allowed, but a forbid that failed to evaluate turned it into a deny. */
  failedClosed: boolean;
  /** The deciding policies: the failed forbids when failed closed, else the satisfied ones. */
  policies: string[];
  /** Policies Cedar found satisfied, sorted. */
  satisfiedIds: string[];
  /** Every policy that failed to evaluate, sorted by id. */
  errors: ExplainedError[];
  /** The forbids among `errors`. */
  failedForbids: ExplainedError[];
}

/** The one-line `context.reason` of a decision. */
function reasonOf(verdict: Verdict): string {
  const { allow, failedClosed, policies, errors, failedForbids } = verdict;
  const failed = failedClosed ? describeErrors(failedForbids, 'forbid', 'failed to evaluate') : '';
  let reason: string;
  if (allow) reason = `permitted by ${policies.join(', ')}`;
  else if (failedClosed) reason = `denied: ${failed} (a forbid that cannot be evaluated denies)`;
  else if (policies.length > 0) reason = `forbidden by ${policies.join(', ')}`;
  else reason = 'no policy permits this request (default deny)';
  const unexplained = failedClosed ? errors.filter((e) => !failedForbids.includes(e)) : errors;
  if (unexplained.length > 0) {
    reason += `; ${describeErrors(unexplained, 'policy', 'failed to evaluate and did not apply')}`;
  }
  return reason;
}

/**
 * Adds the deciding policies' @advice (distinct) and @reason to the response context, in policy
 * order. The deciding policies are the permits of an allow and the forbids of a deny (those that
 * failed to evaluate when failed closed), so a permit's advice never rides on a deny.
 */
function annotate(response: EvaluationResponse, active: ActiveSet, deciding: readonly string[]): void {
  if (deciding.length === 0 || !active.compiled.annotated) return;
  const policies = deciding
    .map((id) => active.compiled.byId.get(id))
    .filter((p): p is CompiledPolicy => p !== undefined)
    .sort((a, b) => a.order - b.order);
  const advice: string[] = [];
  const reasons: string[] = [];
  for (const p of policies) {
    if (p.advice !== undefined && !advice.includes(p.advice)) advice.push(p.advice);
    if (p.reason !== undefined) reasons.push(p.reason);
  }
  if (advice.length > 0) response.context.advice = advice;
  if (reasons.length > 0) response.context.reasons = reasons;
}

/** The Cedar call for one request against the active set: uids, context and the entity slice. */
function cedarCallOf(active: ActiveSet, request: NormalizedRequest): CedarCall {
  const uids: RequestUids = {
    principal: { type: request.subject.type, id: request.subject.id },
    action: { type: 'Action', id: request.action.name },
    resource: { type: request.resource.type, id: request.resource.id },
  };
  const context = contextOf(request);
  const entities = entitySlice(active, request, uids, context);
  return {
    ...uids,
    context: context as never,
    entities: entities as never,
    preparsedPolicySetId: active.policySetId,
    preparsedSchemaName: active.schemaName,
    validateRequest: active.schemaName !== undefined,
  };
}

/** The request's context, with `action.properties` under {@link ACTION_PROPERTIES_CONTEXT_KEY}. */
function contextOf(request: NormalizedRequest): JsonObject {
  const context: JsonObject = { ...request.context };
  if (request.action.properties) {
    if (ACTION_PROPERTIES_CONTEXT_KEY in context) {
      throw new PolicyInputError(
        `context.${ACTION_PROPERTIES_CONTEXT_KEY}`,
        `context.${ACTION_PROPERTIES_CONTEXT_KEY} is reserved for action.properties; send one or the other`,
      );
    }
    context[ACTION_PROPERTIES_CONTEXT_KEY] = request.action.properties;
  }
  return context;
}

/**
 * The entities one decision needs: the principal and resource (with the request's properties),
 * everything reachable from them, from the action and the context, and the policies' literal closure.
 */
function entitySlice(
  active: ActiveSet,
  request: NormalizedRequest,
  uids: RequestUids,
  context: JsonObject,
): EntityRecord[] {
  const store = active.compiled.entities;
  const overrides = requestEntities(store, request, uids);
  const roots = new Set<string>([entityKey(uids.principal), entityKey(uids.resource), entityKey(uids.action)]);
  for (const e of overrides.values()) {
    for (const p of e.parents) roots.add(entityKey(p));
    collectEntityRefs(e.attrs, roots);
  }
  collectEntityRefs(context, roots);
  const keys = store.closure(roots, new Set(active.literalClosure));
  for (const k of overrides.keys()) keys.add(k);
  const entities: EntityRecord[] = [];
  for (const k of keys) {
    const e = overrides.get(k) ?? store.get(k);
    if (e) entities.push(e);
  }
  return entities;
}

/** The principal and resource as this request sees them: stored data with its properties merged in. */
function requestEntities(store: EntityStore, request: NormalizedRequest, uids: RequestUids): Map<string, EntityRecord> {
  const principalKey = entityKey(uids.principal);
  const resourceKey = entityKey(uids.resource);
  const overrides = new Map<string, EntityRecord>();
  const principalEntity = merged(store.get(principalKey), uids.principal, request.subject.properties);
  if (principalEntity) overrides.set(principalKey, principalEntity);
  const resourceBase = overrides.get(resourceKey) ?? store.get(resourceKey);
  const resourceEntity = merged(resourceBase, uids.resource, request.resource.properties);
  if (resourceEntity) overrides.set(resourceKey, resourceEntity);
  return overrides;
}

/** Entity data merged with request properties (the request wins, key by key). */
function merged(
  stored: EntityRecord | undefined,
  uid: EntityUid,
  properties: JsonObject | undefined,
): EntityRecord | undefined {
  if (!properties) return stored;
  if (!stored) return { uid, attrs: { ...properties }, parents: [] };
  return { ...stored, attrs: { ...stored.attrs, ...properties } };
}

/** `N policies <what>: id (message), ...`, at most three named. */
function describeErrors(errors: ExplainedError[], kind: 'forbid' | 'policy', what: string): string {
  const shown = errors
    .slice(0, 3)
    .map((e) => `${e.policy} (${e.message})`)
    .join(', ');
  const noun = `${kind === 'forbid' ? 'forbid ' : ''}${errors.length === 1 ? 'policy' : 'policies'}`;
  return `${errors.length} ${noun} ${what}: ${shown}${errors.length > 3 ? ', ...' : ''}`;
}

/** Canonical JSON of untrusted input for the audit hash; anything unserializable hashes as its type. */
function safeCanonical(input: unknown): string {
  try {
    return canonicalJson(input);
  } catch {
    return `<${typeof input}>`;
  }
}
