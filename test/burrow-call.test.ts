import { expect } from 'chai';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { ServerCredentials, status as Status } from '@grpc/grpc-js';
import { loadJose } from '@burrow/agent';
import { BurrowCallError, BurrowClient } from '@burrow/client';
import { ECHO } from './helpers/echo-upstream';
import { PkiFixture, makeTempDir } from './helpers/pki-fixture';
import { startRawServer } from './helpers/raw-grpc';
import { EXAMPLES_DIR } from './helpers/policy-fixture';
import { CALL_CLI, killAll, runCli } from './helpers/processes';
import { AGENT_ID, Stack } from './helpers/stack';
import { AUD, ISS, jwksOf, makeKey, signToken, type TestKey } from './helpers/token-fixture';

const REQUESTS_DIR = path.join(EXAMPLES_DIR, 'requests');

// The echo upstream answers Unary with the request's own bytes, so one message type serves both ways.
const ECHO_PROTO = `syntax = "proto3";
package burrow.test;
message Item { string name = 1; int32 count = 2; }
message Note {
  string text = 1;
  int64 big_number = 2;
  repeated Item items = 3;
  map<string, Item> by_name = 4;
  enum Kind { KIND_UNSPECIFIED = 0; KIND_URGENT = 1; }
  Kind kind = 5;
}
service Echo {
  rpc Unary(Note) returns (Note);
  rpc Bidi(stream Note) returns (stream Note);
}
`;

/**
 * Issue 16 section 2: burrow-call, run as the built process a user runs, against a real broker and
 * agent (mTLS, the agent's JWKS and the example Cedar policies, the echo upstream as the site).
 */
describe('burrow-call (the caller CLI)', function () {
  this.timeout(60_000);
  let stack: Stack;
  let tmp: string;
  let key: TestKey;
  let target: string[];
  const call = (args: string[], stdin?: string, env: Record<string, string> = {}) =>
    runCli(CALL_CLI, args, env, 30_000, stdin);

  before(async () => {
    tmp = makeTempDir('burrow-call-');
    const jose = await loadJose();
    key = await makeKey(jose, 'ES256', 'site-key-1');
    writeFileSync(path.join(tmp, 'jwks.json'), jwksOf(key));
    writeFileSync(path.join(tmp, 'echo.proto'), ECHO_PROTO);
    stack = await Stack.start({
      agent: {
        authn: { jwksFile: path.join(tmp, 'jwks.json'), issuers: [ISS], audiences: [AUD] },
        policy: {
          policiesDir: path.join(EXAMPLES_DIR, 'policies'),
          entitiesFile: path.join(EXAMPLES_DIR, 'entities.json'),
          schemaFile: path.join(EXAMPLES_DIR, 'schema.cedarschema'),
          cacheTtlMs: 0,
          auditLog: path.join(tmp, 'audit.jsonl'),
        },
      },
    });
    target = ['--broker', stack.apiAddress, '--cert-dir', path.dirname(stack.serviceCert.cert), '--agent', AGENT_ID];
  });
  after(async () => {
    await killAll();
    await stack?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  describe('ping', () => {
    it('says which agent answered through which broker, SERVING, with the round trip; exit 0', async () => {
      const r = await call(['ping', ...target]);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      expect(r.stdout).to.match(new RegExp(`^${AGENT_ID} via ${stack.apiAddress}: SERVING in \\d+(\\.\\d)? ms\\n$`));
    });

    it('--json: one object with agent, broker, status and rtt_ms', async () => {
      const r = await call(['ping', ...target, '--json']);
      expect(r.exit.code).to.equal(0);
      const j = JSON.parse(r.stdout);
      expect(j).to.include({ agent: AGENT_ID, broker: stack.apiAddress, status: 'SERVING' });
      expect(j.rtt_ms).to.be.a('number').and.at.least(0);
    });

    it('an agent that is not connected: exit 14 and one line naming UNAVAILABLE and the agent', async () => {
      // The broker waits 2 s for the agent (the stack's --agent-wait); the retry then runs into the
      // 3 s deadline: the caller still learns that the agent is not connected, not a bare deadline.
      const r = await call(['ping', ...target.slice(0, 4), '--agent', 'no-such-site', '--timeout', '3s']);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(14);
      expect(r.stderrLines).to.have.length(1);
      // The last attempt may be answered early, before the caller's deadline (the broker says so).
      const notConnected = /^burrow-call: UNAVAILABLE: agent "no-such-site" is not connected \(waited \d+ ms/;
      expect(r.stderrLines[0]).to.match(notConnected);
      expect(r.stderrLines[0]).to.match(/ms(, answering before the caller's deadline)?\)$/);
      expect(r.stdout).to.equal('');
    });

    it('the flags also come from BURROW_CALL_* variables and a --config YAML file', async () => {
      const env = { BURROW_CALL_BROKER: stack.apiAddress, BURROW_CALL_AGENT: AGENT_ID };
      const config = path.join(tmp, 'call.yaml');
      writeFileSync(config, `cert-dir: ${path.dirname(stack.serviceCert.cert)}\njson: true\n`);
      const r = await call(['ping', '--config', config], undefined, env);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      expect(JSON.parse(r.stdout).status).to.equal('SERVING');
    });
  });

  describe('bad command lines: exit 2 and one line, nothing sent', () => {
    const cases: [string, () => string[], RegExp][] = [
      ['an unknown flag', () => ['ping', ...target, '--bogus'], /^burrow-call: unknown argument: --bogus$/],
      ['no --agent', () => ['ping', ...target.slice(0, 4)], /^burrow-call: agent: is required .*BURROW_CALL_AGENT/],
      [
        'a missing cert dir',
        () => ['ping', ...target.slice(0, 2), '--cert-dir', path.join(tmp, 'nope'), '--agent', 'x'],
        /^burrow-call: cert-dir: cannot read .*tls\.crt: ENOENT$/,
      ],
      [
        'a duration without unit',
        () => ['ping', ...target, '--timeout', '10'],
        /^burrow-call: timeout: "10" has no unit/,
      ],
      [
        'invoke without --proto or --raw',
        () => ['invoke', ECHO.unary, ...target, '--data', '{}'],
        /^burrow-call: proto: is required/,
      ],
      [
        'a config key that is no flag',
        () => ['ping', ...target, '--config', writeConfig('colour: red\n')],
        /^burrow-call: .*colour/,
      ],
    ];
    for (const [what, args, message] of cases)
      it(what, async () => {
        const before = stack.siteUpstream.calls.length;
        const r = await call(args());
        expect(r.exit.code, r.stderrLines.join('\n')).to.equal(2);
        expect(r.stderrLines).to.have.length(1);
        expect(r.stderrLines[0]).to.match(message);
        expect(stack.siteUpstream.calls.length).to.equal(before);
      });
  });

  it("every flag of every command has a row in the README's burrow-call table with its variable", async () => {
    const readme = readFileSync(path.join(__dirname, '..', '..', 'README.md'), 'utf8');
    const section = readme.slice(readme.indexOf('### `burrow-call`'), readme.indexOf('## Error codes'));
    for (const cmd of ['ping', 'authenticate', 'evaluate', 'evaluations', 'check', 'invoke']) {
      const help = await call([cmd, '--help']);
      const flags = [...help.stdout.matchAll(/^ {2}--([a-z-]+)/gm)].map((m) => m[1]!);
      expect(flags, cmd).to.include.members(['broker', 'cert-dir', 'agent', 'timeout', 'json', 'config']);
      for (const flag of flags.filter((f) => f !== 'help' && f !== 'version')) {
        const env = `BURROW_CALL_${flag.toUpperCase().replace(/-/g, '_')}`;
        expect(section, `${cmd} --${flag}`).to.match(new RegExp(`^\\| \`--${flag}\`.*\\| \`${env}\` \\|`, 'm'));
      }
    }
  });

  function writeConfig(text: string): string {
    const file = path.join(tmp, `config-${Math.random().toString(36).slice(2)}.yaml`);
    writeFileSync(file, text);
    return file;
  }

  describe('authenticate', () => {
    it("prints the subject, groups and claims of a token the site's keys verify", async () => {
      const token = await signToken(await loadJose(), key);
      const r = await call(['authenticate', ...target, '--token', token, '--audience', AUD]);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      expect(r.stdout).to.match(/^authenticated: alice\n {2}groups: ops, dev\n/);
      expect(r.stdout).to.include(`"iss":"${ISS}"`);
    });

    it('--json: the result as one object', async () => {
      const token = await signToken(await loadJose(), key);
      const r = await call(['authenticate', ...target, '--token', token, '--json']);
      const j = JSON.parse(r.stdout);
      expect(j).to.include({ authenticated: true, subject: 'alice' });
      expect(j.groups).to.deep.equal(['ops', 'dev']);
      expect(j.claims.iss).to.equal(ISS);
      expect(Date.parse(j.expires_at)).to.be.greaterThan(Date.now());
    });

    it('a refused token: the reason (the call itself succeeded: exit 0)', async () => {
      const token = await signToken(await loadJose(), key, { exp: Math.floor(Date.now() / 1000) - 3600 });
      const r = await call(['authenticate', ...target, '--token', token]);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      expect(r.stdout).to.match(/^not authenticated: expired\b/);
    });
  });

  describe('evaluate and evaluations', () => {
    it('evaluate --request FILE: the decision and the reason', async () => {
      const permit = await call([
        'evaluate',
        ...target,
        '--request',
        path.join(REQUESTS_DIR, 'permit-owner-edits.json'),
      ]);
      expect(permit.exit.code, permit.stderrLines.join('\n')).to.equal(0);
      expect(permit.stdout).to.match(/^permit\n {2}reason: .+\n {2}policies: .+/);
      const deny = await call([
        'evaluate',
        ...target,
        '--request',
        path.join(REQUESTS_DIR, 'deny-confidential-without-mfa.json'),
      ]);
      expect(deny.stdout).to.match(/^deny\n {2}reason: /);
    });

    it('evaluate --request - reads stdin; --json prints the AuthZEN response', async () => {
      const body = readFileSync(path.join(REQUESTS_DIR, 'permit-owner-edits.json'), 'utf8');
      const r = await call(['evaluate', ...target, '--request', '-', '--json'], body);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      const j = JSON.parse(r.stdout);
      expect(j.decision).to.equal(true);
      expect(j.context.policies).to.be.an('array').that.is.not.empty;
    });

    it('evaluations from a file and from stdin: one decision per item, in order', async () => {
      const file = path.join(REQUESTS_DIR, 'evaluations-batch.json');
      const batch = JSON.parse(readFileSync(file, 'utf8'));
      const fromFile = await call(['evaluations', ...target, '--request', file, '--json']);
      expect(fromFile.exit.code, fromFile.stderrLines.join('\n')).to.equal(0);
      const j = JSON.parse(fromFile.stdout);
      expect(j.evaluations).to.have.length(batch.evaluations.length);
      const human = await call(['evaluations', ...target, '--request', '-'], readFileSync(file, 'utf8'));
      expect(human.exit.code).to.equal(0);
      const lines = human.stdout.split('\n').filter((l) => /^\d+: /.test(l));
      expect(lines.map((l) => l.replace(/^\d+: /, ''))).to.deep.equal(
        j.evaluations.map((e: { decision: boolean }) => (e.decision ? 'permit' : 'deny')),
      );
    });

    it('a request that is not JSON: exit 2; one of the wrong shape: INVALID_ARGUMENT (3) naming it', async () => {
      const bad = await call(['evaluate', ...target, '--request', '-'], '{"subject": ');
      expect(bad.exit.code).to.equal(2);
      expect(bad.stderrLines).to.have.length(1);
      expect(bad.stderrLines[0]).to.match(/^burrow-call: request: stdin is not JSON/);
      const shape = await call(['evaluate', ...target, '--request', '-'], '{"subject": "alice"}');
      expect(shape.exit.code, shape.stderrLines.join('\n')).to.equal(3);
      expect(shape.stderrLines).to.have.length(1);
      expect(shape.stderrLines[0]).to.match(/^burrow-call: INVALID_ARGUMENT: subject/);
    });
  });

  describe('invoke', () => {
    it('--proto and --data: JSON in, the site answers, JSON out (proto or JSON field names)', async () => {
      const data = {
        text: 'hello site',
        bigNumber: '9007199254740993',
        items: [{ name: 'a', count: 2 }],
        by_name: { b: { name: 'b', count: 3 } },
        kind: 'KIND_URGENT',
      };
      const r = await call([
        'invoke',
        ECHO.unary,
        ...target,
        '--proto',
        path.join(tmp, 'echo.proto'),
        '--data',
        JSON.stringify(data),
        '--json',
      ]);
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      expect(JSON.parse(r.stdout)).to.deep.equal({
        text: 'hello site',
        big_number: '9007199254740993',
        items: [{ name: 'a', count: 2 }],
        by_name: { b: { name: 'b', count: 3 } },
        kind: 'KIND_URGENT',
      });
      expect(stack.siteUpstream.calls.at(-1)?.method).to.equal(ECHO.unary);
    });

    it('a --data key that names no field, a streaming method, a method not in the file: exit 2', async () => {
      const proto = ['--proto', path.join(tmp, 'echo.proto')];
      const typo = await call(['invoke', ECHO.unary, ...target, ...proto, '--data', '{"txt": "x"}']);
      expect(typo.exit.code).to.equal(2);
      expect(typo.stderrLines).to.deep.equal(['burrow-call: data: Note: burrow.test.Note has no field "txt"']);
      const wrongType = await call([
        'invoke',
        ECHO.unary,
        ...target,
        ...proto,
        '--data',
        '{"items": [{"count": "2"}]}',
      ]);
      expect(wrongType.exit.code).to.equal(2);
      expect(wrongType.stderrLines).to.deep.equal(['burrow-call: data: Note.items[0].count: "2" is not of type int32']);
      const stream = await call(['invoke', ECHO.bidi, ...target, ...proto, '--data', '{}']);
      expect(stream.exit.code).to.equal(2);
      expect(stream.stderrLines[0]).to.match(/streaming method/);
      const missing = await call(['invoke', '/burrow.test.Echo/Nope', ...target, ...proto, '--data', '{}']);
      expect(missing.stderrLines).to.deep.equal([
        `burrow-call: proto: service burrow.test.Echo in ${path.join(tmp, 'echo.proto')} has no method Nope`,
      ]);
    });

    it('--raw: stdin bytes as the request, the response bytes on stdout', async () => {
      const r = await call(['invoke', ECHO.unary, ...target, '--raw'], 'raw bytes, echoed');
      expect(r.exit.code, r.stderrLines.join('\n')).to.equal(0);
      expect(r.stdout).to.equal('raw bytes, echoed');
      const j = await call(['invoke', ECHO.unary, ...target, '--raw', '--json'], 'abc');
      expect(JSON.parse(j.stdout)).to.deep.equal({ method: ECHO.unary, bytes: 3, base64: 'YWJj' });
    });

    it("the site's error status is the exit code, with its details on one line", async () => {
      const r = await call(
        ['invoke', ECHO.status, ...target, '--raw'],
        JSON.stringify({ code: 7, message: 'no\nway' }),
      );
      expect(r.exit.code).to.equal(7);
      expect(r.stderrLines).to.deep.equal(['burrow-call: PERMISSION_DENIED: no; way']);
    });
  });
});

describe('BurrowClient retries (under burrow-call)', () => {
  it('a retry of UNAVAILABLE that runs out the deadline reports the UNAVAILABLE, not a bare deadline', async () => {
    const pki = await PkiFixture.create();
    let calls = 0;
    // A broker that says the agent is not connected, then (like a broker waiting for an absent
    // agent up to the caller's deadline) never answers the retry.
    const broker = await startRawServer(
      {
        '/grpc.health.v1.Health/Check': (call) => {
          if (++calls === 1) call.emit('error', { code: Status.UNAVAILABLE, details: 'agent "x" is not connected' });
        },
      },
      await pki
        .issue('broker', 'b')
        .then((c) =>
          ServerCredentials.createSsl(readFileSync(c.ca), [
            { cert_chain: readFileSync(c.cert), private_key: readFileSync(c.key) },
          ]),
        ),
    );
    const svc = await pki.issue('service', 'caller');
    const client = new BurrowClient({
      broker: broker.address,
      tls: { certFile: svc.cert, keyFile: svc.key, caFile: svc.ca },
      retryBaseMs: 1,
    });
    try {
      const err = await client.ping('x', { timeoutMs: 1_000 }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(BurrowCallError);
      expect(err).to.include({ code: Status.UNAVAILABLE, details: 'agent "x" is not connected', attempts: 2 });
      expect(calls).to.equal(2);
    } finally {
      client.close();
      await broker.stop();
      pki.cleanup();
    }
  });
});
