import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import { Metadata, status as Status, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js';
import { decodeCallFrame, encodeCallFrame } from '@burrow/tunnel';
import { ClusterWorld } from './helpers/cluster';
import { ECHO } from './helpers/echo-upstream';
import { makeTempDir } from './helpers/pki-fixture';
import { RawClient, collect, mtlsCredentials } from './helpers/raw-grpc';
import { pollUntil } from './helpers/wait';

const PEER_FORWARD = '/burrow.tunnel.v1.BrokerPeer/Forward';

/**
 * Issue 13, item 14: in a cluster the broker holding the agent's tunnel enforces the agent's
 * limits (so brokers do not each allow the limit), and it does not take the forwarding broker's
 * word for the caller: the caller's identity and the decision travel in hop metadata, the owner
 * audits them and applies its own caller policy. Real broker and agent processes, real Redis.
 */
describe('cluster: which broker decides what', function () {
  this.timeout(120_000);

  let world: ClusterWorld;
  const root = makeTempDir('burrow-cluster-decisions-');
  const auditFile = path.join(root, 'owner-audit.jsonl');
  /** A client of b's peer listener with the cluster's broker certificate, as a forwarding broker. */
  const peerClient = (): RawClient =>
    new RawClient(world.peerAddress('b'), mtlsCredentials(world.brokerCert), {
      'grpc.ssl_target_name_override': 'localhost',
    });
  const md = (): Metadata => {
    const m = new Metadata();
    m.set('burrow-agent-id', 'site-lim');
    return m;
  };

  before(async () => {
    // Broker a (where calls enter) lets platform-svc call anything; broker b (holding the agent)
    // allows it too but forbids one method.
    const entryPolicies = path.join(root, 'entry');
    const ownerPolicies = path.join(root, 'owner');
    mkdirSync(entryPolicies);
    mkdirSync(ownerPolicies);
    const permit = '@id("platform-svc-may-call")\npermit(principal == Service::"platform-svc", action, resource);\n';
    const entryPermit = permit.replace('platform-svc-may-call', 'entry-permits-platform-svc');
    const forbid =
      // biome-ignore lint/style/useTemplate: split in two to stay within 120 columns (make lint)
      `@id("owner-forbids-metadata")\nforbid(principal, ` + `action == Action::"${ECHO.metadata}", resource);\n`;
    writeFileSync(path.join(entryPolicies, 'callers.cedar'), entryPermit);
    writeFileSync(path.join(ownerPolicies, 'callers.cedar'), `${permit}${forbid}`);
    world = await ClusterWorld.create(['a', 'b']);
    await world.startBroker('a', ['--agent-max-concurrent', '2', '--caller-policies', entryPolicies]);
    await world.startBroker('b', [
      '--agent-max-concurrent',
      '2',
      '--caller-policies',
      ownerPolicies,
      '--caller-audit-log',
      auditFile,
    ]);
    await world.startAgent('site-lim', ['b']);
    await world.waitListed('b', 'site-lim');
  });

  after(async () => {
    await world?.close();
  });

  it(
    '--agent-max-concurrent 2: calls entering through a and b together never exceed 2 at the agent; ' +
      'the third gets RESOURCE_EXHAUSTED',
    async () => {
      const held: ClientDuplexStream<Buffer, Buffer>[] = [];
      let most = 0;
      const onCall = (): void => {
        most = Math.max(most, world.echo.active);
      };
      world.echo.on('call', onCall);
      try {
        const activeBefore = world.echo.active;
        for (const name of ['a', 'b']) {
          const call = world.client(name).bidi(ECHO.hang, md(), { deadline: Date.now() + 60_000 });
          call.on('error', () => {});
          held.push(call);
        }
        await pollUntil('two held calls at the agent', () => world.echo.active === activeBefore + 2, 10_000);
        const viaA = await world.call('a', 'site-lim', 3_000);
        const viaB = await world.call('b', 'site-lim', 3_000);
        console.log(
          `      (third call via a: ${Status[viaA.code]} "${viaA.details}" in ${viaA.ms} ms; ` +
            `via b: ${Status[viaB.code]} in ${viaB.ms} ms; most at the agent: ${most - activeBefore})`,
        );
        for (const r of [viaA, viaB]) {
          expect(r.code, r.details).to.equal(Status.RESOURCE_EXHAUSTED);
          expect(r.details).to.match(/agent "site-lim" has 2 calls in flight/);
        }
        expect(most - activeBefore).to.equal(2);
      } finally {
        world.echo.off('call', onCall);
        for (const c of held) c.cancel();
      }
      // The slots come back once the held calls end.
      const passes = async (): Promise<boolean> => (await world.call('a', 'site-lim', 3_000)).code === Status.OK;
      await pollUntil('a call through a after the held ones ended', passes, 10_000);
    },
  );

  it(
    "the owner's caller audit log records the forwarded caller, the broker it entered at and the policies " +
      'that let it in',
    async () => {
      const r = await world.call('a', 'site-lim', 5_000, 'audited');
      expect(r.code, r.details).to.equal(Status.OK);
      interface Record {
        caller?: string;
        forwarded_by?: string;
        entry_policies?: string[];
        decision: string;
        policies: string[];
      }
      const rec = await pollUntil(
        "a forwarded decision in the owner's audit log",
        () => {
          let text = '';
          try {
            text = readFileSync(auditFile, 'utf8');
          } catch {
            return undefined;
          }
          const records = text
            .split('\n')
            .filter(Boolean)
            .map((l) => JSON.parse(l) as Record);
          return records.find((x) => x.forwarded_by !== undefined);
        },
        5_000,
      );
      console.log(`      (owner audit record: ${JSON.stringify(rec)})`);
      expect(rec.caller).to.match(/^spiffe:\/\/[^/]+\/service\/platform-svc$/);
      expect(rec.forwarded_by).to.equal(world.slot('a').brokerId);
      expect(rec.entry_policies).to.deep.equal(['entry-permits-platform-svc']);
      expect(rec.decision).to.equal('allow');
      expect(rec.policies).to.include('platform-svc-may-call');
    },
  );

  it(
    'an owner whose caller policy forbids the method refuses ' + 'a call the entry broker permitted, naming the policy',
    async () => {
      const started = Date.now();
      const res = await world
        .client('a')
        .unary(ECHO.metadata, Buffer.from('x'), md(), { deadline: Date.now() + 5_000 })
        .then(
          () => ({ code: Status.OK, details: '' }),
          (e: { code: number; details: string }) => e,
        );
      console.log(`      (forbidden by the owner: ${Status[res.code]} "${res.details}" in ${Date.now() - started} ms)`);
      expect(res.code).to.equal(Status.PERMISSION_DENIED);
      expect(res.details).to.include('owner-forbids-metadata');
      expect(res.details).to.include('broker-a');
    },
  );

  it('the owner refuses hop metadata that is not well formed, naming the key', async () => {
    // A broker certificate of the trust domain, as a forwarding broker would present.
    const peer = peerClient();
    const forward = async (hop: Record<string, string>): Promise<ServiceError | undefined> => {
      const m = md();
      m.set('burrow-forwarded-by', 'broker-x');
      for (const [k, v] of Object.entries(hop)) m.set(k, v);
      return peer.unary(PEER_FORWARD, Buffer.alloc(0), m, { deadline: Date.now() + 5_000 }).then(
        () => undefined,
        (e: ServiceError) => e,
      );
    };
    const good = {
      'burrow-hop-caller': 'spiffe://burrow.local/service/platform-svc',
      'burrow-hop-method': ECHO.unary,
      'burrow-hop-decision': 'allow',
    };
    try {
      const cases: [string, Record<string, string>, RegExp][] = [
        [
          'an agent as the caller',
          { ...good, 'burrow-hop-caller': 'spiffe://burrow.local/agent/site-lim' },
          /burrow-hop-caller .* is not a service SPIFFE id/,
        ],
        [
          'a foreign trust domain',
          { ...good, 'burrow-hop-caller': 'spiffe://evil.example/service/platform-svc' },
          /burrow-hop-caller .* trust domain burrow.local/,
        ],
        [
          'a method that is no path',
          { ...good, 'burrow-hop-method': 'Unary' },
          /burrow-hop-method "Unary" is not a gRPC method path/,
        ],
        [
          'a decision that is not allow',
          { ...good, 'burrow-hop-decision': 'deny' },
          /burrow-hop-decision "deny" is not "allow"/,
        ],
        ['a caller with no method', { 'burrow-hop-caller': good['burrow-hop-caller'] }, /go together/],
      ];
      for (const [what, hop, message] of cases) {
        const err = await forward(hop);
        expect(err?.code, what).to.equal(Status.INVALID_ARGUMENT);
        expect(err?.details, what).to.match(message);
      }
      // Without hop metadata (a broker of an older version) an owner with a caller policy cannot judge the caller.
      const none = await forward({});
      expect(none?.code).to.equal(Status.PERMISSION_DENIED);
      expect(none?.details).to.match(/without burrow-hop-caller/);
    } finally {
      peer.close();
    }
  });

  it(
    'the owner refuses a forwarded call whose Start names another method than the one admitted, ' +
      'before the agent sees it',
    async () => {
      const peer = peerClient();
      try {
        const m = md();
        m.set('burrow-forwarded-by', 'broker-x');
        m.set('burrow-hop-caller', 'spiffe://burrow.local/service/platform-svc');
        m.set('burrow-hop-method', ECHO.unary);
        m.set('burrow-hop-decision', 'allow policies=entry-permits-platform-svc');
        const callsBefore = world.echo.calls.length;
        const call = peer.bidi(PEER_FORWARD, m, { deadline: Date.now() + 5_000 });
        const done = collect(call);
        // Admitted for Unary; the Start asks for the method the owner's policy forbids.
        const start = { method: ECHO.metadata, metadata: [], timeoutMs: 0, callId: 'swap' };
        call.write(encodeCallFrame({ kind: 'start', start }));
        call.end();
        const { messages, headers } = await done;
        expect(headers?.get('burrow-peer-ready')[0]).to.equal('1');
        const frames = messages.map(decodeCallFrame);
        const trailers = frames.find((f) => f.kind === 'trailers');
        console.log(`      (method swap: ${JSON.stringify(trailers)})`);
        expect(trailers?.kind === 'trailers' && trailers.trailers.code).to.equal(Status.PERMISSION_DENIED);
        expect(trailers?.kind === 'trailers' && trailers.trailers.message).to.match(
          /method \/burrow.test.Echo\/Metadata is not \/burrow.test.Echo\/Unary/,
        );
        expect(world.echo.calls.length).to.equal(callsBefore);
      } finally {
        peer.close();
      }
    },
  );
});
