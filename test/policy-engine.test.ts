import { expect } from 'chai';
import { mkdirSync, readFileSync, readdirSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { PassThrough } from 'node:stream';
import { Registry } from 'prom-client';
import cedar = require('@cedar-policy/cedar-wasm/nodejs');
import { status as Status } from '@grpc/grpc-js';
import {
  PolicyEngine,
  PolicyInputError,
  PolicyLoadError,
  canonicalJson,
  sha256Hex,
  splitPolicyStatements,
  type EvaluationResponse,
  type PolicyEngineOptions,
  type ReloadResult,
} from '@burrow/policy';
import { EXAMPLES_DIR, PolicyFixture, capturingLogger, entity, request } from './helpers/policy-fixture';

/**
 * The Cedar policy engine shared by agent and broker: the AuthZEN -> Cedar mapping, decisions
 * (permit, forbid, default deny, groups, properties, context, errors), input checks, evaluations
 * batches, hot reload that keeps the last good set, the cache, the audit log and explanations.
 * Policies and entities are real files in a temp directory; reloads are real fs.watch events.
 */

const BASE = `
@id("admins-all")
permit (principal in Group::"admins", action, resource);

@id("owner-reads")
permit (principal, action == Action::"read", resource)
when { resource has owner && resource.owner == principal };

@id("public-read")
permit (principal, action == Action::"read", resource is Doc)
when { resource.public };

@id("no-delete-locked")
forbid (principal, action == Action::"delete", resource)
when { resource.locked };

@id("office-hours")
permit (principal is User, action == Action::"print", resource)
when { context.hour >= 9 && context.hour < 17 };

@id("clearance")
permit (principal, action == Action::"view_secret", resource)
when { principal.clearance >= resource.level };

@id("staff-lunch")
permit (principal in Group::"staff", action == Action::"lunch", resource);

@id("team-writes")
permit (principal, action == Action::"write", resource is Doc)
when { principal in resource.team };

@id("config-open")
permit (principal, action == Action::"configure", resource)
when { Settings::"global".open_config };

@id("everyone-breathes")
permit (principal in Group::"everyone", action == Action::"breathe", resource);

@id("small-transfers")
permit (principal, action == Action::"transfer", resource)
when { context.action_properties.amount < 100 };
`;

// Unannotated policies: their ids are <file>#<index>.
const MISC = `// a comment with a ; in it
permit (principal == User::"carol", action == Action::"wave", resource);
forbid (principal, action == Action::"wave", resource == Doc::"d1");
`;

const ENTITIES = [
  entity('Group', 'admins'),
  entity('Group', 'everyone'),
  entity('Group', 'staff', {}, [['Group', 'everyone']]),
  entity('Group', 'eng', {}, [['Group', 'staff']]),
  entity('User', 'alice', { clearance: 1 }, [['Group', 'admins']]),
  entity('User', 'bob', { clearance: 1 }, [['Group', 'eng']]),
  entity('User', 'carol', { clearance: 2 }),
  entity('Doc', 'd1', {
    owner: { __entity: { type: 'User', id: 'bob' } },
    public: false,
    locked: true,
    level: 3,
    team: { __entity: { type: 'Group', id: 'eng' } },
  }),
  entity('Doc', 'd2', {
    owner: { __entity: { type: 'User', id: 'carol' } },
    public: true,
    locked: false,
    level: 1,
    team: { __entity: { type: 'Group', id: 'admins' } },
  }),
  entity('Doc', 'd3', {}),
  entity('Settings', 'global', { open_config: true }),
];

function metric(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = registry.getSingleMetric(name);
  if (!m) throw new Error(`no metric ${name}`);
  return Promise.resolve(m.get()).then((v) => {
    const hit = v.values.find((x) => Object.entries(labels).every(([k, l]) => x.labels[k] === l));
    return hit ? hit.value : 0;
  });
}

/** Resolves with the first reload result `accept` takes (registered before the change is made). */
function nextReload(
  engine: PolicyEngine,
  accept: (r: ReloadResult) => boolean = () => true,
  timeoutMs = 10_000,
): Promise<ReloadResult> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      engine.off('reload', on);
      reject(new Error(`no matching reload within ${timeoutMs} ms`));
    }, timeoutMs);
    const on = (r: ReloadResult): void => {
      if (!accept(r)) return;
      clearTimeout(timer);
      engine.off('reload', on);
      resolve(r);
    };
    engine.on('reload', on);
  });
}

describe('policy engine', function () {
  this.timeout(30_000);
  const fixtures: PolicyFixture[] = [];
  const engines: PolicyEngine[] = [];

  async function open(
    policies: Record<string, string>,
    entities: unknown[] | undefined = ENTITIES,
    extra: Partial<PolicyEngineOptions> = {},
  ): Promise<{ engine: PolicyEngine; fx: PolicyFixture; registry: Registry }> {
    const fx = new PolicyFixture(policies, entities);
    fixtures.push(fx);
    const registry = new Registry();
    const engine = await PolicyEngine.open({
      policiesDir: fx.policiesDir,
      entitiesFile: entities ? fx.entitiesFile : undefined,
      registry,
      metricsPrefix: 'test_policy',
      ...extra,
    });
    engines.push(engine);
    return { engine, fx, registry };
  }

  afterEach(async () => {
    await Promise.all(engines.splice(0).map((e) => e.close()));
    for (const fx of fixtures.splice(0)) fx.cleanup();
  });

  describe('decisions', () => {
    let engine: PolicyEngine;
    beforeEach(async () => {
      ({ engine } = await open({ 'base.cedar': BASE, 'misc.cedar': MISC }));
    });

    const cases: {
      name: string;
      req: Record<string, unknown>;
      decision: boolean;
      policies: string[];
      reason?: RegExp;
    }[] = [
      {
        name: 'permit through a group (parents)',
        req: request('User:alice', 'delete', 'Doc:d2'),
        decision: true,
        policies: ['admins-all'],
      },
      {
        name: 'forbid wins over permit',
        req: request('User:alice', 'delete', 'Doc:d1'),
        decision: false,
        policies: ['no-delete-locked'],
        reason: /^forbidden by no-delete-locked/,
      },
      {
        name: 'default deny: no policy applies',
        req: request('User:carol', 'delete', 'Doc:d2'),
        decision: false,
        policies: [],
        reason: /no policy permits this request \(default deny\)$/,
      },
      {
        name: 'permit comparing an entity-valued attribute to the principal',
        req: request('User:bob', 'read', 'Doc:d1'),
        decision: true,
        policies: ['owner-reads'],
      },
      {
        name: 'a subject absent from the entity data can still be permitted',
        req: request('User:erin', 'read', 'Doc:d2'),
        decision: true,
        policies: ['public-read'],
      },
      {
        name: 'group membership is transitive (bob in eng in staff)',
        req: request('User:bob', 'lunch', 'Doc:d1'),
        decision: true,
        policies: ['staff-lunch'],
      },
      { name: 'not in the group: deny', req: request('User:carol', 'lunch', 'Doc:d1'), decision: false, policies: [] },
      {
        name: 'three levels up (bob in eng in staff in everyone)',
        req: request('User:bob', 'breathe', 'Doc:d1'),
        decision: true,
        policies: ['everyone-breathes'],
      },
      {
        name: 'entity data alone: clearance 2 < level 3',
        req: request('User:carol', 'view_secret', 'Doc:d1'),
        decision: false,
        policies: [],
      },
      {
        name: 'subject properties override entity attributes',
        req: request('User:carol', 'view_secret', 'Doc:d1', {
          subject: { type: 'User', id: 'carol', properties: { clearance: 5 } },
        }),
        decision: true,
        policies: ['clearance'],
      },
      {
        name: 'resource properties override entity attributes',
        req: request('User:carol', 'view_secret', 'Doc:d1', {
          resource: { type: 'Doc', id: 'd1', properties: { level: 2 } },
        }),
        decision: true,
        policies: ['clearance'],
      },
      {
        name: 'an absent subject is made from its properties',
        req: request('User:zed', 'view_secret', 'Doc:d1', {
          subject: { type: 'User', id: 'zed', properties: { clearance: 9 } },
        }),
        decision: true,
        policies: ['clearance'],
      },
      {
        name: 'properties override only the keys they name',
        req: request('User:bob', 'write', 'Doc:d1', { resource: { type: 'Doc', id: 'd1', properties: { level: 0 } } }),
        decision: true,
        policies: ['team-writes'],
      },
      {
        name: 'a resource property can point at another entity',
        req: request('User:alice', 'write', 'Doc:d3', {
          resource: { type: 'Doc', id: 'd3', properties: { team: { __entity: { type: 'Group', id: 'admins' } } } },
        }),
        decision: true,
        policies: ['admins-all', 'team-writes'],
      },
      {
        name: 'context condition met',
        req: request('User:carol', 'print', 'Doc:d2', { context: { hour: 10 } }),
        decision: true,
        policies: ['office-hours'],
      },
      {
        name: 'context condition not met',
        req: request('User:carol', 'print', 'Doc:d2', { context: { hour: 20 } }),
        decision: false,
        policies: [],
      },
      {
        name: 'an error in `when` (missing context key) is not an allow',
        req: request('User:carol', 'print', 'Doc:d2'),
        decision: false,
        policies: [],
        reason: /default deny\); 1 policy failed to evaluate and did not apply: office-hours \(.*hour/,
      },
      {
        name: 'an error in `when` (missing attribute) is not an allow',
        req: request('User:carol', 'read', 'Doc:d3'),
        decision: false,
        policies: [],
        reason: /public-read \(.*public/,
      },
      {
        name: 'an absent subject without properties has no attributes: error, deny',
        req: request('User:zed', 'view_secret', 'Doc:d1'),
        decision: false,
        policies: [],
        reason: /clearance \(/,
      },
      {
        name: 'attributes of an entity named in a policy are available',
        req: request('User:carol', 'configure', 'Doc:d3'),
        decision: true,
        policies: ['config-open'],
      },
      {
        name: 'action properties reach the context (small)',
        req: request('User:carol', 'transfer', 'Doc:d3', { action: { name: 'transfer', properties: { amount: 50 } } }),
        decision: true,
        policies: ['small-transfers'],
      },
      {
        name: 'action properties reach the context (large)',
        req: request('User:carol', 'transfer', 'Doc:d3', { action: { name: 'transfer', properties: { amount: 500 } } }),
        decision: false,
        policies: [],
      },
      {
        name: 'an unannotated policy is <file>#<index>',
        req: request('User:carol', 'wave', 'Doc:d2'),
        decision: true,
        policies: ['misc.cedar#0'],
      },
      {
        name: 'an unannotated forbid is <file>#<index>',
        req: request('User:carol', 'wave', 'Doc:d1'),
        decision: false,
        policies: ['misc.cedar#1'],
      },
    ];
    for (const c of cases) {
      it(c.name, () => {
        const res = engine.evaluate(c.req);
        expect(res.decision, res.context.reason).to.equal(c.decision);
        expect(res.context.policies).to.deep.equal(c.policies);
        if (c.reason) expect(res.context.reason).to.match(c.reason);
        expect(res.context).to.not.have.property('explanation');
      });
    }

    it('a forbid that fails to evaluate denies (fail closed), though Cedar skips it and permits', () => {
      const res = engine.evaluate(request('User:alice', 'delete', 'Doc:d3'));
      expect(res.decision).to.equal(false);
      expect(res.context.policies).to.deep.equal(['no-delete-locked']);
      expect(res.context.reason)
        .to.match(/^denied: 1 forbid policy failed to evaluate: no-delete-locked \(.+\) /)
        .and.match(/\(a forbid that cannot be evaluated denies\)$/);
    });

    it(
      'explain lists the satisfied policies with file:line, overridden permits included, and errors with ' +
        'file:line:column',
      () => {
        const base = path.join(fixtures[0]!.policiesDir, 'base.cedar');
        const denied = engine.evaluate({ ...request('User:alice', 'delete', 'Doc:d1'), explain: true });
        expect(denied.context.explanation).to.deep.equal({
          request: { principal: 'User::"alice"', action: 'Action::"delete"', resource: 'Doc::"d1"' },
          satisfied: [
            { id: 'no-delete-locked', effect: 'forbid', location: `${base}:13` },
            { id: 'admins-all', effect: 'permit', location: `${base}:2` },
          ],
          errors: [],
        });
        const errored = engine.evaluate({ ...request('User:carol', 'print', 'Doc:d2'), explain: true });
        expect(errored.context.explanation!.satisfied).to.deep.equal([]);
        expect(errored.context.explanation!.errors).to.have.length(1);
        const err = errored.context.explanation!.errors[0]!;
        expect(err.policy).to.equal('office-hours');
        // `context.hour` is on line 19 of BASE (the `when` of office-hours).
        expect(err.location).to.match(new RegExp(`^${base.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:19:\\d+$`));
        expect(err.message).to.match(/hour/);
      },
    );
  });

  describe('entity slicing gives the same answers as passing every entity', () => {
    // The engine passes Cedar only the entities a decision can reach; raw Cedar with the whole
    // entity data and the same policies must agree on every request, errors included.
    const sets = [
      {
        name: 'example site',
        actions: ['read', 'edit', 'delete', 'share'],
        policiesDir: path.join(EXAMPLES_DIR, 'policies'),
        entities: JSON.parse(readFileSync(path.join(EXAMPLES_DIR, 'entities.json'), 'utf8')) as unknown[],
      },
      {
        name: 'test set (with an entity read through a policy literal)',
        actions: ['read', 'delete', 'print', 'write', 'configure', 'lunch', 'breathe', 'wave', 'view_secret'],
        policies: { 'base.cedar': BASE, 'misc.cedar': MISC },
        entities: ENTITIES,
      },
    ];
    for (const set of sets) {
      it(set.name, async () => {
        let engine: PolicyEngine;
        if ('policiesDir' in set) {
          engine = await PolicyEngine.open({
            policiesDir: set.policiesDir!,
            entitiesFile: path.join(EXAMPLES_DIR, 'entities.json'),
            cacheTtlMs: 0,
          });
          engines.push(engine);
        } else {
          ({ engine } = await open(set.policies!, set.entities, { cacheTtlMs: 0 }));
        }
        const staticPolicies: Record<string, string> = {};
        for (const p of engine.policies) staticPolicies[p.id] = p.text;
        const forbids = new Set(engine.policies.filter((p) => p.effect === 'forbid').map((p) => p.id));
        const uids = (set.entities as { uid: { type: string; id: string } }[]).map((e) => e.uid);
        const principals = [...uids, { type: 'User', id: 'nobody' }];
        const resources = [...uids, { type: 'Document', id: 'missing' }];
        const actions = set.actions;
        let allowed = 0;
        let errored = 0;
        // Every principal x action x resource, with contexts taking turns: exhaustive, so a missed
        // grandparent or a missed literal shows up as a different answer.
        const contexts = [{}, { mfa: true, hour: 10 }, { incident_id: 'INC-1', hour: 20 }, { mfa: false }];
        let i = 0;
        for (const subject of principals)
          for (const action of actions)
            for (const resource of resources) {
              const ctx = contexts[i++ % contexts.length];
              const res = engine.evaluate({ subject, action: { name: action }, resource, context: ctx, explain: true });
              const raw = cedar.isAuthorized({
                principal: subject,
                action: { type: 'Action', id: action },
                resource,
                context: ctx as never,
                policies: { staticPolicies },
                entities: set.entities as never,
              });
              if (raw.type !== 'success') throw new Error(JSON.stringify(raw.errors));
              const what = `${JSON.stringify(subject)} ${action} ${JSON.stringify(resource)} ${JSON.stringify(ctx)}`;
              // Cedar's answer, but failing closed: an allow with an erroring forbid is a deny by that forbid.
              const rawErrorIds = raw.response.diagnostics.errors.map((e) => e.policyId);
              const failedForbids = rawErrorIds.filter((id) => forbids.has(id)).sort();
              const failedClosed = raw.response.decision === 'allow' && failedForbids.length > 0;
              expect(res.decision, what).to.equal(raw.response.decision === 'allow' && !failedClosed);
              const deciding = failedClosed ? failedForbids : [...raw.response.diagnostics.reason].sort();
              expect(res.context.policies, what).to.deep.equal(deciding);
              const rawErrors = raw.response.diagnostics.errors.map((e) => e.policyId).sort();
              expect(
                res.context.explanation!.errors.map((e) => e.policy),
                what,
              ).to.deep.equal(rawErrors);
              if (rawErrors.length > 0) errored++;
              if (res.decision) allowed++;
            }
        // The requests must have covered allows and evaluation errors, or the comparison proves little.
        expect(allowed).to.be.greaterThan(10);
        expect(errored).to.be.greaterThan(10);
      });
    }
  });

  describe('invalid input is INVALID_ARGUMENT naming the field and the value', () => {
    let engine: PolicyEngine;
    let registry: Registry;
    beforeEach(async () => {
      ({ engine, registry } = await open({ 'base.cedar': BASE }));
    });

    const bad: { name: string; req: unknown; field: string; message: RegExp }[] = [
      {
        name: 'type with a space',
        req: request('User Group:x', 'read', 'Doc:d1'),
        field: 'subject.type',
        message: /subject\.type "User Group" is not a valid Cedar type name/,
      },
      {
        name: 'type starting with a digit',
        req: request('1User:x', 'read', 'Doc:d1'),
        field: 'subject.type',
        message: /"1User"/,
      },
      {
        name: 'empty resource type',
        req: { ...request('User:x', 'read', 'Doc:d1'), resource: { type: '', id: 'd1' } },
        field: 'resource.type',
        message: /resource\.type "" is not/,
      },
      {
        name: 'reserved word as type',
        req: request('User:x', 'read', 'if:d1'),
        field: 'resource.type',
        message: /"if"/,
      },
      {
        name: 'dangling ::',
        req: { ...request('User:x', 'read', 'Doc:d1'), subject: { type: 'Acme::', id: 'x' } },
        field: 'subject.type',
        message: /is not a valid Cedar type name/,
      },
      {
        name: 'missing subject',
        req: { action: { name: 'read' }, resource: { type: 'Doc', id: 'd1' } },
        field: 'subject',
        message: /^subject is required$/,
      },
      {
        name: 'missing action',
        req: { subject: { type: 'User', id: 'x' }, resource: { type: 'Doc', id: 'd1' } },
        field: 'action',
        message: /^action is required$/,
      },
      {
        name: 'missing resource',
        req: { subject: { type: 'User', id: 'x' }, action: { name: 'read' } },
        field: 'resource',
        message: /^resource is required$/,
      },
      {
        name: 'empty action name',
        req: request('User:x', '', 'Doc:d1'),
        field: 'action.name',
        message: /action\.name must be a non-empty string, got ""/,
      },
      {
        name: 'numeric id',
        req: { ...request('User:x', 'read', 'Doc:d1'), subject: { type: 'User', id: 7 } },
        field: 'subject.id',
        message: /got 7/,
      },
      {
        name: 'a float in properties',
        req: { ...request('User:x', 'read', 'Doc:d1'), subject: { type: 'User', id: 'x', properties: { score: 1.5 } } },
        field: 'subject.properties.score',
        message: /subject\.properties\.score is 1\.5/,
      },
      {
        name: 'a null deep in the context',
        req: request('User:x', 'read', 'Doc:d1', { context: { a: { b: [1, null] } } }),
        field: 'context.a.b[1]',
        message: /context\.a\.b\[1\] is null/,
      },
      {
        name: 'properties that are not an object',
        req: { ...request('User:x', 'read', 'Doc:d1'), resource: { type: 'Doc', id: 'd1', properties: [1] } },
        field: 'resource.properties',
        message: /must be an object/,
      },
      { name: 'not an object at all', req: 'hello', field: 'request', message: /must be a JSON object/ },
      {
        name: 'action properties and context.action_properties together',
        req: request('User:x', 'read', 'Doc:d1', {
          action: { name: 'read', properties: { a: 1 } },
          context: { action_properties: {} },
        }),
        field: 'context.action_properties',
        message: /reserved/,
      },
    ];
    for (const b of bad) {
      it(b.name, () => {
        let thrown: unknown;
        try {
          engine.evaluate(b.req);
        } catch (err) {
          thrown = err;
        }
        expect(thrown).to.be.instanceOf(PolicyInputError);
        const e = thrown as PolicyInputError;
        expect(e.code).to.equal(Status.INVALID_ARGUMENT);
        expect(e.field).to.equal(b.field);
        expect(e.message).to.match(b.message);
      });
    }

    it('counts invalid requests as decision="error"', async () => {
      expect(() => engine.evaluate(request('User Group:x', 'read', 'Doc:d1'))).to.throw(PolicyInputError);
      expect(await metric(registry, 'test_policy_decisions_total', { decision: 'error' })).to.equal(1);
    });
  });

  describe('evaluations', () => {
    let engine: PolicyEngine;
    beforeEach(async () => {
      ({ engine } = await open({ 'base.cedar': BASE, 'misc.cedar': MISC }));
    });

    const items = [
      { resource: { type: 'Doc', id: 'd2' } }, // alice delete d2: allow
      { resource: { type: 'Doc', id: 'd1' } }, // alice delete d1: forbid
      { subject: { type: 'User', id: 'carol' } }, // carol delete (default resource d2): deny
      { action: { name: 'print' }, subject: { type: 'User', id: 'carol' } }, // context default hour 10: allow
      // item context replaces the default: error, deny
      { action: { name: 'print' }, subject: { type: 'User', id: 'carol' }, context: { other: true } },
    ];
    const batch = (semantic?: string): Record<string, unknown> => ({
      subject: { type: 'User', id: 'alice' },
      action: { name: 'delete' },
      resource: { type: 'Doc', id: 'd2' },
      context: { hour: 10 },
      evaluations: items,
      ...(semantic ? { options: { evaluations_semantic: semantic } } : {}),
    });

    it(
      'execute_all (the default) answers every item in order, ' +
        'each field taken from the item or the defaults as a whole',
      () => {
        const res = engine.evaluations(batch());
        expect(res.evaluations.map((e) => e.decision)).to.deep.equal([true, false, false, true, false]);
        expect(res.evaluations[1]!.context.policies).to.deep.equal(['no-delete-locked']);
        expect(res.evaluations[4]!.context.reason).to.match(/office-hours \(.*hour/);
        expect(engine.evaluations(batch('execute_all'))).to.deep.equal(res);
      },
    );

    it('deny_on_first_deny stops after the first deny', () => {
      const res = engine.evaluations(batch('deny_on_first_deny'));
      expect(res.evaluations.map((e) => e.decision)).to.deep.equal([true, false]);
    });

    it('permit_on_first_permit stops after the first permit', () => {
      const res = engine.evaluations({
        ...batch('permit_on_first_permit'),
        evaluations: [items[1], items[2], items[3], items[0]],
      });
      expect(res.evaluations.map((e) => e.decision)).to.deep.equal([false, false, true]);
    });

    it('an unknown semantic is INVALID_ARGUMENT for the whole batch', () => {
      expect(() => engine.evaluations(batch('first_come'))).to.throw(
        PolicyInputError,
        new RegExp(
          String.raw`options\.evaluations_semantic "first_come" is not one of ` +
            'execute_all, deny_on_first_deny, permit_on_first_permit',
        ),
      );
      expect(() => engine.evaluations({ evaluations: 'x' })).to.throw(PolicyInputError, /evaluations must be an array/);
    });

    it('an invalid item fails alone, in its place, and counts as a deny for the semantics', () => {
      const bad = { subject: { type: 'User Group', id: 'x' } };
      const res = engine.evaluations({ ...batch(), evaluations: [items[0], bad, items[3]] });
      expect(res.evaluations).to.have.length(3);
      expect(res.evaluations[1]).to.deep.equal({
        decision: false,
        context: {
          error: {
            code: 'INVALID_ARGUMENT',
            message:
              'subject.type "User Group" is not a valid Cedar type name (identifiers joined by ::, such as User ' +
              'or Acme::Document)',
          },
        },
      });
      expect(res.evaluations[2]!.decision).to.equal(true);
      const stopped = engine.evaluations({ ...batch('deny_on_first_deny'), evaluations: [items[0], bad, items[3]] });
      expect(stopped.evaluations).to.have.length(2);
    });

    it('no evaluations array: the top-level request is the one evaluation; options.explain explains every item', () => {
      const res = engine.evaluations({ ...batch(), evaluations: undefined, options: { explain: true } });
      expect(res.evaluations).to.have.length(1);
      expect(res.evaluations[0]!.decision).to.equal(true);
      expect(res.evaluations[0]!.context.explanation!.satisfied.map((p) => p.id)).to.deep.equal(['admins-all']);
    });
  });

  describe('advice and reasons from @advice and @reason annotations', () => {
    const ANNOTATED = `
@id("b-pull")
@reason("trusted registry")
permit (principal, action == Action::"pull", resource);

@id("a-young")
@advice("quarantine")
@reason("younger than 7 days")
permit (principal, action == Action::"pull", resource) when { context.age < 7 };

@id("c-young-too")
@advice("quarantine")
permit (principal, action == Action::"pull", resource) when { context.age < 3 };

@id("z-malicious")
@advice("alert")
@reason("known-malicious package")
forbid (principal, action == Action::"pull", resource) when { context has bad && context.bad };

@id("y-fragile")
@reason("the age check failed")
forbid (principal, action == Action::"pull", resource) when { context.age < 0 };
`;
    const pull = (context: Record<string, unknown>): Record<string, unknown> =>
      request('User:alice', 'pull', 'Package:npm/x', { context });

    it("an allow carries the permits' advice (distinct, in policy order) and reasons", async () => {
      const { engine } = await open({ 'p.cedar': ANNOTATED });
      const old = engine.evaluate(pull({ age: 30 }));
      expect(old.decision).to.equal(true);
      expect(old.context.advice, 'no advice when no deciding policy carries one').to.equal(undefined);
      expect(old.context.reasons).to.deep.equal(['trusted registry']);
      expect(old.context.reason, 'the sentence stays').to.equal('permitted by b-pull');
      const young = engine.evaluate(pull({ age: 1 }));
      expect(young.context.policies).to.deep.equal(['a-young', 'b-pull', 'c-young-too']);
      // Policy order is file order (b-pull is first in the file), not id order; advice is distinct.
      expect(young.context.advice).to.deep.equal(['quarantine']);
      expect(young.context.reasons).to.deep.equal(['trusted registry', 'younger than 7 days']);
    });

    it("a deny carries the forbids' advice and reasons, never the overridden permits'", async () => {
      const { engine } = await open({ 'p.cedar': ANNOTATED });
      const bad = engine.evaluate(pull({ age: 1, bad: true }));
      expect(bad.decision).to.equal(false);
      expect(bad.context.advice).to.deep.equal(['alert']);
      expect(bad.context.reasons).to.deep.equal(['known-malicious package']);
      const failed = engine.evaluate(pull({ age: 'old' }));
      expect(failed.decision, 'a forbid that cannot be evaluated denies').to.equal(false);
      expect(failed.context.reasons).to.deep.equal(['the age check failed']);
      const none = engine.evaluate(request('User:alice', 'push', 'Package:npm/x'));
      expect(none.context.advice).to.equal(undefined);
      expect(none.context.reasons).to.equal(undefined);
    });

    it('evaluations and cached answers carry them too', async () => {
      const { engine } = await open({ 'p.cedar': ANNOTATED });
      const batch = engine.evaluations({
        subject: { type: 'User', id: 'alice' },
        action: { name: 'pull' },
        resource: { type: 'Package', id: 'npm/x' },
        evaluations: [{ context: { age: 1 } }, { context: { age: 1, bad: true } }],
      });
      expect(batch.evaluations.map((e) => e.context.advice)).to.deep.equal([['quarantine'], ['alert']]);
      expect(engine.evaluate(pull({ age: 1 })).context.advice).to.deep.equal(['quarantine']);
      expect(engine.evaluate(pull({ age: 1 })).context.advice, 'from the cache').to.deep.equal(['quarantine']);
    });

    it('the package-proxy example: every request gets the decision and advice its file name promises', async () => {
      const dir = path.join(EXAMPLES_DIR, '..', 'package-proxy');
      const engine = await PolicyEngine.open({
        policiesDir: path.join(dir, 'policies'),
        entitiesFile: path.join(dir, 'entities.json'),
        schemaFile: path.join(dir, 'schema.cedarschema'),
      });
      engines.push(engine);
      const files = readdirSync(path.join(dir, 'requests')).filter((f) => f.endsWith('.json'));
      expect(files.length).to.be.at.least(4);
      for (const f of files) {
        const answer = engine.evaluate(JSON.parse(readFileSync(path.join(dir, 'requests', f), 'utf8')));
        expect(answer.decision, f).to.equal(f.startsWith('permit-'));
        expect(answer.context.advice, f).to.deep.equal(f.includes('quarantine') ? ['quarantine'] : undefined);
        expect(answer.context.reasons ?? [], f).to.have.length(f.includes('untrusted') ? 0 : 1);
      }
    });

    it('an @advice that is not one word is a load error naming file:line', async () => {
      const fx = new PolicyFixture({ 'a.cedar': '\n@advice("hold, review")\npermit (principal, action, resource);\n' });
      fixtures.push(fx);
      const err = await PolicyEngine.open({ policiesDir: fx.policiesDir }).then(
        () => undefined,
        (e: unknown) => e as Error,
      );
      expect(err).to.be.instanceOf(PolicyLoadError);
      expect(err!.message).to.match(
        new RegExp(`^${fx.policyPath('a.cedar')}:2:1: @advice\\("hold, review"\\) must be one word`),
      );
    });
  });

  describe('loading', () => {
    it('a parse error is a startup error naming file:line:column', async () => {
      const fx = new PolicyFixture({
        'good.cedar': BASE,
        'bad.cedar':
          'permit (principal, action, resource);\n\npermit (principal, action, resource) when { principal.x > };\n',
      });
      fixtures.push(fx);
      const err = await PolicyEngine.open({ policiesDir: fx.policiesDir }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(PolicyLoadError);
      expect((err as Error).message).to.match(new RegExp(`^${fx.policyPath('bad.cedar')}:3:\\d+: .*unexpected token`));
      expect((err as Error).message).to.not.include('\n');
    });

    it('duplicate ids are an error naming both files', async () => {
      const fx = new PolicyFixture({
        'a.cedar': '@id("same")\npermit (principal, action, resource);\n',
        'b.cedar': '\n\n@id("same")\nforbid (principal, action, resource);\n',
      });
      fixtures.push(fx);
      const err = (await PolicyEngine.open({ policiesDir: fx.policiesDir }).then(
        () => undefined,
        (e: unknown) => e,
      )) as PolicyLoadError;
      expect(err.message).to.equal(
        `${fx.policyPath('b.cedar')}:3:1: policy id "same" is already used at ${fx.policyPath('a.cedar')}:1`,
      );
    });

    it('a schema validates the policies (error with file:line) and the requests', async () => {
      const schema =
        'entity User { clearance: Long }; entity Doc { level: Long }; action read appliesTo { principal: User, ' +
        'resource: Doc };';
      const fx = new PolicyFixture({
        'p.cedar':
          'permit (principal, action == Action::"read", resource)\nwhen {\n  principal.clearence >= ' +
          'resource.level\n};\n',
      });
      fixtures.push(fx);
      fx.writeSchema(schema);
      const err = (await PolicyEngine.open({ policiesDir: fx.policiesDir, schemaFile: fx.schemaFile }).then(
        () => undefined,
        (e: unknown) => e,
      )) as PolicyLoadError;
      expect(err).to.be.instanceOf(PolicyLoadError);
      expect(err.message).to.match(new RegExp(`^${fx.policyPath('p.cedar')}:3:3: policy p\\.cedar#0: .*clearence`));

      fx.replacePolicy(
        'p.cedar',
        'permit (principal, action == Action::"read", resource) when { principal.clearance >= resource.level };\n',
      );
      const engine = await PolicyEngine.open({ policiesDir: fx.policiesDir, schemaFile: fx.schemaFile });
      engines.push(engine);
      const props = (c: unknown): Record<string, unknown> => ({
        ...request('User:u', 'read', 'Doc:d'),
        subject: { type: 'User', id: 'u', properties: { clearance: c } },
        resource: { type: 'Doc', id: 'd', properties: { level: 1 } },
      });
      expect(engine.evaluate(props(2)).decision).to.equal(true);
      expect(() => engine.evaluate(props('high'))).to.throw(PolicyInputError, /Cedar cannot evaluate this request/);
      expect(() => engine.evaluate({ ...props(2), action: { name: 'write' } })).to.throw(PolicyInputError, /write/);
    });

    it(
      'the example site loads with and without its schema, ' + 'and its sample requests decide as their names say',
      async () => {
        const requestsDir = path.join(EXAMPLES_DIR, 'requests');
        for (const schemaFile of [undefined, path.join(EXAMPLES_DIR, 'schema.cedarschema')]) {
          const engine = await PolicyEngine.open({
            policiesDir: path.join(EXAMPLES_DIR, 'policies'),
            entitiesFile: path.join(EXAMPLES_DIR, 'entities.json'),
            schemaFile,
          });
          engines.push(engine);
          const files = readdirSync(requestsDir).filter((f) => /^(permit|deny)-/.test(f));
          expect(files.filter((f) => f.startsWith('permit-'))).to.not.be.empty;
          expect(files.filter((f) => f.startsWith('deny-'))).to.not.be.empty;
          for (const f of files) {
            const res = engine.evaluate(JSON.parse(readFileSync(path.join(requestsDir, f), 'utf8')));
            expect(res.decision, `${f}: ${res.context.reason}`).to.equal(f.startsWith('permit-'));
            if (f.startsWith('deny-')) expect(res.context.reason, f).to.not.match(/failed to evaluate/);
          }
          const batch = engine.evaluations(
            JSON.parse(readFileSync(path.join(requestsDir, 'evaluations-batch.json'), 'utf8')),
          );
          expect(batch.evaluations.map((e) => e.decision)).to.deep.equal([true, true, false, true]);
        }
      },
    );

    it('splits policy text at top-level semicolons only', () => {
      const text =
        '// x; y\n@id("a;b")\npermit (principal, action, resource) when { context.s == "q;\\";" };\n forbid ' +
        '(principal, action, resource);';
      expect(splitPolicyStatements(text).map((s) => s.offset)).to.deep.equal([8, 88]);
      expect(splitPolicyStatements(text)[1]!.text).to.equal('forbid (principal, action, resource);');
    });
  });

  describe('hot reload', () => {
    const V1 = '@id("v")\npermit (principal, action == Action::"read", resource);\n';
    const V2 =
      '@id("v")\nforbid (principal, action == Action::"read", resource);\npermit (principal, action == ' +
      'Action::"read", resource);\n';

    it('a replaced file (rename over) is picked up and the new decision applies', async () => {
      const { engine, fx, registry } = await open({ 'p.cedar': V1 }, undefined, { watch: true, watchDebounceMs: 20 });
      expect(engine.evaluate(request('User:a', 'read', 'Doc:x')).decision).to.equal(true);
      const reloaded = nextReload(engine);
      fx.replacePolicy('p.cedar', V2);
      const r = await reloaded;
      expect(r).to.include({ ok: true, changed: true, policies: 2 });
      expect(engine.evaluate(request('User:a', 'read', 'Doc:x')).decision).to.equal(false);
      expect(await metric(registry, 'test_policy_policies')).to.equal(2);
      expect(await metric(registry, 'test_policy_last_reload_success')).to.equal(1);
    });

    it('an in-place edit, a new file, a removed file and an entities change are all picked up', async () => {
      const { engine, fx } = await open({ 'p.cedar': V1 }, [entity('User', 'a', { ok: false })], {
        watch: true,
        watchDebounceMs: 20,
      });
      let r = nextReload(engine, (x) => x.ok && x.policies === 2);
      fx.editPolicyInPlace('p.cedar', V2);
      await r;
      r = nextReload(engine, (x) => x.ok && x.policies === 3);
      fx.replacePolicy('q.cedar', 'permit (principal, action == Action::"go", resource) when { principal.ok };');
      await r;
      expect(engine.evaluate(request('User:a', 'go', 'Doc:x')).decision).to.equal(false);
      r = nextReload(engine, (x) => x.ok && x.entities === 1);
      fx.writeEntities([entity('User', 'a', { ok: true })]);
      await r;
      expect(engine.evaluate(request('User:a', 'go', 'Doc:x')).decision).to.equal(true);
      r = nextReload(engine, (x) => x.ok && x.policies === 2);
      unlinkSync(fx.policyPath('q.cedar'));
      await r;
      expect(engine.evaluate(request('User:a', 'go', 'Doc:x')).decision).to.equal(false);
    });

    it('a broken file keeps the last good set, counts a failure, logs file:line, and a fix recovers', async () => {
      const { logger, records } = capturingLogger();
      const { engine, fx, registry } = await open({ 'p.cedar': V1 }, undefined, {
        watch: true,
        watchDebounceMs: 20,
        logger,
      });
      const failed = nextReload(engine, (x) => !x.ok);
      fx.replacePolicy(
        'p.cedar',
        '@id("v")\npermit (principal, action == Action::"read", resource)\nwhen { resource.x == };\n',
      );
      const r = await failed;
      expect(r.error).to.match(new RegExp(`^${fx.policyPath('p.cedar')}:3:\\d+: `));
      expect(r.policies).to.equal(1);
      expect(engine.evaluate(request('User:a', 'read', 'Doc:x')).decision).to.equal(true);
      expect(await metric(registry, 'test_policy_reload_failures_total')).to.be.at.least(1);
      expect(await metric(registry, 'test_policy_last_reload_success')).to.equal(0);
      const logged = records.find((l) => l.message === 'policy reload failed; the last good policy set stays active');
      expect(logged, JSON.stringify(records)).to.exist;
      expect(logged!.level).to.equal('error');
      expect(String((logged!.issues as string[])[0])).to.match(/p\.cedar:3:\d+: .*unexpected token/);

      const fixed = nextReload(engine, (x) => x.ok);
      fx.replacePolicy('p.cedar', V2);
      await fixed;
      expect(await metric(registry, 'test_policy_last_reload_success')).to.equal(1);
      expect(engine.evaluate(request('User:a', 'read', 'Doc:x')).decision).to.equal(false);
    });

    it(
      'a removed policy directory keeps the last good set; ' + 'once it is back, it is watched and loaded again',
      async () => {
        const { engine, fx } = await open({ 'p.cedar': V1 }, undefined, { watch: true, watchDebounceMs: 20 });
        const moved = `${fx.policiesDir}.old`;
        const failed = nextReload(engine, (x) => !x.ok);
        renameSync(fx.policiesDir, moved);
        expect((await failed).error).to.match(/cannot read policy directory: ENOENT/);
        expect(engine.evaluate(request('User:a', 'read', 'Doc:x')).decision).to.equal(true);
        const back = nextReload(engine, (x) => x.ok && x.policies === 2);
        mkdirSync(fx.policiesDir);
        writeFileSync(fx.policyPath('p.cedar'), V2);
        await back;
        expect(engine.evaluate(request('User:a', 'read', 'Doc:x')).decision).to.equal(false);
        rmSync(moved, { recursive: true });
      },
    );

    it('reload() without watching: unchanged sources are a no-op, a broken entities file is refused', async () => {
      const { engine, fx, registry } = await open({ 'p.cedar': V1 }, [entity('User', 'a')]);
      expect(await engine.reload()).to.include({ ok: true, changed: false });
      writeFileSync(fx.entitiesFile, '[{"uid": {"type": "User", "id": "a"}, "attrs": {}, "parents": []},\n {"uid": ');
      const r = await engine.reload();
      expect(r.ok).to.equal(false);
      expect(r.error).to.match(new RegExp(`^${fx.entitiesFile}:2:\\d+: invalid JSON`));
      expect(await metric(registry, 'test_policy_reload_failures_total')).to.equal(1);
      fx.writeEntities([entity('User', 'a'), entity('User', 'a')]);
      expect((await engine.reload()).error).to.match(/entity User::"a" appears twice/);
      expect(engine.entityCount).to.equal(1);
    });
  });

  describe('decision cache', () => {
    it('serves repeated requests from the cache until the TTL passes, and whatever the key order', async () => {
      let now = 1_000_000;
      const { engine, registry } = await open({ 'base.cedar': BASE }, ENTITIES, { cacheTtlMs: 1000, clock: () => now });
      const a = engine.evaluate(request('User:alice', 'delete', 'Doc:d2', { context: { x: 1, y: 2 } }));
      const b = engine.evaluate({
        context: { y: 2, x: 1 },
        resource: { id: 'd2', type: 'Doc' },
        action: { name: 'delete' },
        subject: { id: 'alice', type: 'User' },
      });
      expect(b).to.deep.equal(a);
      expect(await metric(registry, 'test_policy_cache_hits_total')).to.equal(1);
      b.context.policies!.push('tampered');
      expect(
        engine.evaluate(request('User:alice', 'delete', 'Doc:d2', { context: { x: 1, y: 2 } })).context.policies,
      ).to.deep.equal(['admins-all']);
      expect(await metric(registry, 'test_policy_cache_hits_total')).to.equal(2);
      now += 1001;
      engine.evaluate(request('User:alice', 'delete', 'Doc:d2', { context: { x: 1, y: 2 } }));
      expect(await metric(registry, 'test_policy_cache_hits_total')).to.equal(2);
      expect(await metric(registry, 'test_policy_decisions_total', { decision: 'allow' })).to.equal(4);
    });

    it('a successful reload drops the cache: the new policy applies at once', async () => {
      const { engine, fx, registry } = await open({ 'p.cedar': 'permit (principal, action, resource);' }, undefined, {
        cacheTtlMs: 3_600_000,
      });
      const req = request('User:a', 'read', 'Doc:x');
      expect(engine.evaluate(req).decision).to.equal(true);
      expect(engine.evaluate(req).decision).to.equal(true);
      expect(await metric(registry, 'test_policy_cache_hits_total')).to.equal(1);
      fx.replacePolicy('p.cedar', 'forbid (principal, action, resource);');
      expect((await engine.reload()).ok).to.equal(true);
      expect(engine.evaluate(req).decision).to.equal(false);
      expect(await metric(registry, 'test_policy_cache_hits_total')).to.equal(1);
    });

    it('keeps at most cacheMaxEntries, least recently used out first; TTL 0 turns it off', async () => {
      const { engine, registry } = await open({ 'p.cedar': 'permit (principal, action, resource);' }, undefined, {
        cacheMaxEntries: 2,
      });
      const r = (id: string): Record<string, unknown> => request(`User:${id}`, 'read', 'Doc:x');
      engine.evaluate(r('1'));
      engine.evaluate(r('2'));
      engine.evaluate(r('1')); // hit; 2 is now the least recently used
      engine.evaluate(r('3')); // evicts 2
      engine.evaluate(r('1')); // hit
      engine.evaluate(r('2')); // miss
      expect(await metric(registry, 'test_policy_cache_hits_total')).to.equal(2);
      const off = await open({ 'p.cedar': 'permit (principal, action, resource);' }, undefined, { cacheTtlMs: 0 });
      off.engine.evaluate(r('1'));
      off.engine.evaluate(r('1'));
      expect(await metric(off.registry, 'test_policy_cache_hits_total')).to.equal(0);
    });
  });

  describe('audit log', () => {
    it(
      'writes one JSON line per decision (cached, ' + 'denied and invalid ones too) and close() flushes the file',
      async () => {
        const fx0 = new PolicyFixture({});
        fixtures.push(fx0);
        const auditFile = path.join(fx0.root, 'audit.jsonl');
        let now = Date.parse('2026-01-02T03:04:05.000Z');
        const { engine } = await open({ 'base.cedar': BASE }, ENTITIES, { auditLog: auditFile, clock: () => now });
        const req = request('User:alice', 'delete', 'Doc:d2');
        engine.evaluate(req, { caller: 'spiffe://burrow.local/service/billing' });
        now += 1;
        engine.evaluate(req);
        engine.evaluate(request('User:alice', 'delete', 'Doc:d1'));
        expect(() => engine.evaluate(request('User Group:x', 'read', 'Doc:d1'))).to.throw(PolicyInputError);
        await engine.close();
        const lines = readFileSync(auditFile, 'utf8')
          .trim()
          .split('\n')
          .map((l) => JSON.parse(l) as Record<string, unknown>);
        expect(lines).to.have.length(4);
        const expectedHash = sha256Hex(canonicalJson({ ...req, context: {}, explain: false }));
        expect(lines[0]).to.include({
          time: '2026-01-02T03:04:05.000Z',
          input_sha256: expectedHash,
          decision: 'allow',
          cached: false,
          caller: 'spiffe://burrow.local/service/billing',
        });
        expect(lines[0]!.policies).to.deep.equal(['admins-all']);
        expect(lines[0]!.latency_us).to.be.a('number').and.at.least(0);
        expect(lines[1]).to.include({
          time: '2026-01-02T03:04:05.001Z',
          input_sha256: expectedHash,
          decision: 'allow',
          cached: true,
        });
        expect(lines[1]).to.not.have.property('caller');
        expect(lines[2]).to.include({ decision: 'deny', cached: false });
        expect(lines[2]!.policies).to.deep.equal(['no-delete-locked']);
        expect(lines[3]).to.include({ decision: 'error', cached: false });
        expect(String(lines[3]!.error)).to.match(/subject\.type "User Group"/);
      },
    );

    it('a stream sink gets the lines, is not ended by close(), and an unwritable path is a startup error', async () => {
      const sink = new PassThrough();
      const chunks: string[] = [];
      sink.on('data', (c: Buffer) => chunks.push(c.toString()));
      const { engine } = await open({ 'p.cedar': 'permit (principal, action, resource);' }, undefined, {
        auditLog: sink,
      });
      engine.evaluations({
        subject: { type: 'User', id: 'a' },
        action: { name: 'r' },
        evaluations: [{ resource: { type: 'D', id: '1' } }, { resource: { type: 'D', id: '2' } }],
      });
      await engine.close();
      expect(chunks.join('').trim().split('\n')).to.have.length(2);
      expect(sink.writableEnded).to.equal(false);
      sink.destroy();
      const fx = new PolicyFixture({ 'p.cedar': 'permit (principal, action, resource);' });
      fixtures.push(fx);
      const err = await PolicyEngine.open({
        policiesDir: fx.policiesDir,
        auditLog: path.join(fx.root, 'missing', 'audit.jsonl'),
      }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect((err as Error).message).to.match(/audit log .*missing\/audit\.jsonl: cannot open: ENOENT/);
    });
  });

  it('metrics: decisions by outcome and a duration histogram', async () => {
    const { engine, registry } = await open({ 'base.cedar': BASE });
    engine.evaluate(request('User:alice', 'delete', 'Doc:d2'));
    engine.evaluate(request('User:carol', 'delete', 'Doc:d2'));
    expect(await metric(registry, 'test_policy_decisions_total', { decision: 'allow' })).to.equal(1);
    expect(await metric(registry, 'test_policy_decisions_total', { decision: 'deny' })).to.equal(1);
    const text = await registry.metrics();
    expect(text).to.match(/test_policy_decision_duration_seconds_count 2/);
    expect(text).to.match(/test_policy_last_reload_timestamp_seconds \d+/);
    expect(text).to.match(/test_policy_entities 11/);
    const res: EvaluationResponse = engine.evaluate(request('User:carol', 'read', 'Doc:d3'));
    expect(res.decision).to.equal(false);
    expect(await metric(registry, 'test_policy_evaluation_errors_total')).to.be.at.least(1);
  });

  it('close() is idempotent and a reload after it reports the engine closed', async () => {
    const { engine } = await open({ 'p.cedar': 'permit (principal, action, resource);' }, undefined, {
      watch: true,
      watchDebounceMs: 10,
    });
    await engine.close();
    await engine.close();
    expect((await engine.reload()).error).to.equal('policy engine closed');
  });
});
