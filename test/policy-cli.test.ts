import { expect } from 'chai';
import { readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { AGENT_CLI, killAll, runCli } from './helpers/processes';
import { EXAMPLES_DIR, PolicyFixture } from './helpers/policy-fixture';

/**
 * `burrow-agent policy check|eval` as a site admin runs them: real processes on the example
 * site and on broken policy sets; output and exit codes (0 ok / allow / deny, 1 policy errors,
 * 2 invalid input or usage).
 */
describe('burrow-agent policy (CLI)', function () {
  // Each test starts up to three processes that each compile Cedar's Wasm module; slow on a busy machine.
  this.timeout(90_000);
  const policies = path.join(EXAMPLES_DIR, 'policies');
  const entities = path.join(EXAMPLES_DIR, 'entities.json');
  const schema = path.join(EXAMPLES_DIR, 'schema.cedarschema');
  const sample = (name: string): string => readFileSync(path.join(EXAMPLES_DIR, 'requests', name), 'utf8');
  const fixtures: PolicyFixture[] = [];

  afterEach(async () => {
    await killAll();
    for (const fx of fixtures.splice(0)) fx.cleanup();
  });

  const policy = (args: string[], stdin?: string, env: Record<string, string> = {}): ReturnType<typeof runCli> =>
    runCli(AGENT_CLI, ['policy', ...args], env, 30_000, stdin);

  describe('check', () => {
    it('prints "ok: N policies, M entities" and exits 0 for the example site (with its schema)', async () => {
      const { exit, stdout } = await policy([
        'check',
        '--policies',
        policies,
        '--entities',
        entities,
        '--policy-schema',
        schema,
      ]);
      expect(exit.code).to.equal(0);
      expect(stdout).to.equal('ok: 7 policies, 17 entities\n');
    });

    it('--gateway-mapping: validated too, ok with its routes, or FILE:LINE: problem and exit 1', async () => {
      const proxy = path.join(EXAMPLES_DIR, '..', 'package-proxy');
      const ok = await policy([
        'check',
        '--policies',
        path.join(proxy, 'policies'),
        '--gateway-mapping',
        path.join(proxy, 'gateway-mapping.conf'),
      ]);
      expect(ok.exit.code, ok.stderrLines.join('\n')).to.equal(0);
      expect(ok.stdout).to.equal('ok: 3 policies, 0 entities; gateway mapping: 1 route\n');
      const fx = new PolicyFixture({ 'a.cedar': 'permit (principal, action, resource);\n' });
      fixtures.push(fx);
      const bad = path.join(fx.root, 'gw.conf');
      writeFileSync(bad, 'token required\nsubject.type User\nsubject.id claim:sub\ndefault deny\ncontext.x cookie:y\n');
      const r = await policy(['check', '--policies', fx.policiesDir, '--gateway-mapping', bad]);
      expect(r.exit.code).to.equal(1);
      expect(r.stdout).to.equal('');
      expect(r.stderrLines).to.have.length(1);
      expect(r.stderrLines[0]).to.match(new RegExp(`^burrow-agent: policy: ${bad}:5: unknown source "cookie:y"`));
    });

    it('prints every error as file:line:column and exits 1', async () => {
      const fx = new PolicyFixture({
        'a.cedar':
          'permit (principal, action, resource);\npermit (principal, action, resource) when { principal.x > };\n',
        'b.cedar': '\nforbid (principal, acton, resource);\n',
      });
      fixtures.push(fx);
      const { exit, stdout, stderrLines } = await policy(['check', '--policies', fx.policiesDir]);
      expect(exit.code).to.equal(1);
      expect(stdout).to.equal('');
      expect(stderrLines).to.have.length(2);
      expect(stderrLines[0]).to.match(new RegExp(`^burrow-agent: policy: ${fx.policyPath('a.cedar')}:2:\\d+: `));
      expect(stderrLines[1]).to.match(new RegExp(`^burrow-agent: policy: ${fx.policyPath('b.cedar')}:2:\\d+: `));
    });

    it('reports schema violations with the policy line, and bad entity data by file', async () => {
      const fx = new PolicyFixture({
        'p.cedar':
          '@id("typo")\npermit (principal, action == Action::"read", resource is Document)\nwhen { ' +
          'resource.clasification == "public" };\n',
      });
      fixtures.push(fx);
      const bad = await policy(['check', '--policies', fx.policiesDir, '--policy-schema', schema]);
      expect(bad.exit.code).to.equal(1);
      expect(bad.stderrLines.join('\n')).to.match(
        new RegExp(`${fx.policyPath('p.cedar')}:3:\\d+: policy typo: .*clasification`),
      );
      writeFileSync(fx.entitiesFile, '{"not": "an array"}');
      const ents = await policy(['check', '--policies', policies, '--entities', fx.entitiesFile]);
      expect(ents.exit.code).to.equal(1);
      expect(ents.stderrLines).to.deep.equal([
        `burrow-agent: policy: ${fx.entitiesFile}: must be a JSON array of entities ({"uid": {"type", "id"}, ` +
          `"attrs", "parents"})`,
      ]);
    });

    it('takes its flags from BURROW_AGENT_* variables and from a YAML --config file', async () => {
      const fromEnv = await policy(['check'], undefined, {
        BURROW_AGENT_POLICIES: policies,
        BURROW_AGENT_ENTITIES: entities,
      });
      expect(fromEnv.exit.code).to.equal(0);
      expect(fromEnv.stdout).to.equal('ok: 7 policies, 17 entities\n');
      const fx = new PolicyFixture({});
      fixtures.push(fx);
      const config = path.join(fx.root, 'policy.yaml');
      writeFileSync(config, `policies: ${policies}\npolicy-schema: ${schema}\n`);
      const fromConfig = await policy(['check', '--config', config]);
      expect(fromConfig.exit.code).to.equal(0);
      expect(fromConfig.stdout).to.equal('ok: 7 policies, 0 entities\n');
    });

    it('without --policies: one line naming the flag, exit 2', async () => {
      const { exit, stderrLines } = await policy(['check']);
      expect(exit.code).to.equal(2);
      expect(stderrLines).to.have.length(1);
      expect(stderrLines[0]).to.match(/policies/);
    });
  });

  describe('eval', () => {
    const base = ['eval', '--policies', policies, '--entities', entities, '--policy-schema', schema];

    it('prints the AuthZEN response for a permitted and a denied request, exit 0 for both', async () => {
      const permit = await policy(base, sample('permit-owner-edits.json'));
      expect(permit.exit.code).to.equal(0);
      expect(JSON.parse(permit.stdout)).to.deep.equal({
        decision: true,
        context: {
          reason: 'permitted by owners-manage-own-documents, project-team-edits',
          policies: ['owners-manage-own-documents', 'project-team-edits'],
        },
      });
      const deny = await policy(base, sample('deny-contractor-deletes-own.json'));
      expect(deny.exit.code).to.equal(0);
      expect(JSON.parse(deny.stdout)).to.deep.equal({
        decision: false,
        context: { reason: 'forbidden by contractors-never-delete', policies: ['contractors-never-delete'] },
      });
    });

    it('--explain adds the satisfied policies with their file:line', async () => {
      const { exit, stdout } = await policy([...base, '--explain'], sample('deny-confidential-without-mfa.json'));
      expect(exit.code).to.equal(0);
      const res = JSON.parse(stdout) as { context: { explanation: { satisfied: { id: string; location: string }[] } } };
      expect(res.context.explanation.satisfied).to.deep.equal([
        { id: 'confidential-requires-mfa', effect: 'forbid', location: `${path.join(policies, 'guardrails.cedar')}:4` },
        { id: 'admins-full-access', effect: 'permit', location: `${path.join(policies, 'admins.cedar')}:2` },
      ]);
    });

    it('answers an evaluations batch (a request with an evaluations array) in order', async () => {
      const { exit, stdout } = await policy(base, sample('evaluations-batch.json'));
      expect(exit.code).to.equal(0);
      const res = JSON.parse(stdout) as { evaluations: { decision: boolean }[] };
      expect(res.evaluations.map((e) => e.decision)).to.deep.equal([true, true, false, true]);
      const stopped = JSON.parse(sample('evaluations-batch.json')) as Record<string, unknown>;
      stopped.options = { evaluations_semantic: 'deny_on_first_deny' };
      const short = await policy(base, JSON.stringify(stopped));
      expect((JSON.parse(short.stdout) as { evaluations: unknown[] }).evaluations).to.have.length(3);
    });

    it('invalid input: exit 2 with one line naming the problem', async () => {
      const badType = await policy(
        base,
        JSON.stringify({
          subject: { type: 'User Group', id: 'x' },
          action: { name: 'read' },
          resource: { type: 'Document', id: 'd' },
        }),
      );
      expect(badType.exit.code).to.equal(2);
      expect(badType.stdout).to.equal('');
      expect(badType.stderrLines).to.deep.equal([
        'burrow-agent: policy: invalid request: subject.type "User Group" is not a valid Cedar type name ' +
          '(identifiers joined by ::, such as User or Acme::Document)',
      ]);
      const notJson = await policy(base, '{"subject": ');
      expect(notJson.exit.code).to.equal(2);
      expect(notJson.stderrLines).to.have.length(1);
      expect(notJson.stderrLines[0]).to.match(/^burrow-agent: policy: input: not JSON: /);
      const badSemantic = await policy(
        base,
        JSON.stringify({ evaluations: [], options: { evaluations_semantic: 'random' } }),
      );
      expect(badSemantic.exit.code).to.equal(2);
      expect(badSemantic.stderrLines[0]).to.match(/evaluations_semantic "random"/);
    });

    it('a policy set that does not load: exit 1 naming the file', async () => {
      const fx = new PolicyFixture({ 'x.cedar': 'permit (principal, action, resource' });
      fixtures.push(fx);
      const { exit, stderrLines } = await policy(
        ['eval', '--policies', fx.policiesDir],
        sample('permit-owner-edits.json'),
      );
      expect(exit.code).to.equal(1);
      expect(stderrLines).to.have.length(1);
      expect(stderrLines[0]).to.match(new RegExp(`^burrow-agent: policy: ${fx.policyPath('x.cedar')}:1:\\d+: `));
    });
  });
});
