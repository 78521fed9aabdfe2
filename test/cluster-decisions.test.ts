import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as http2 from 'node:http2';
import * as path from 'node:path';
import { expect } from 'chai';
import { Metadata, status as Status, type ClientDuplexStream } from '@grpc/grpc-js';
import { GRPC_CONTENT_TYPE, frameMessage, statusOfHeaders } from '@burrow/tunnel';
import { ClusterWorld } from './helpers/cluster';
import { ECHO } from './helpers/echo-upstream';
import { readReply } from './helpers/h2';
import { makeTempDir } from './helpers/pki-fixture';
import { pollUntil } from './helpers/wait';

/** What the owning broker answered a hand-made forwarded call. */
interface PeerAnswer {
  /** Whether it confirmed the call (100 Continue) before answering. */
  continued: boolean;
  code: number | undefined;
  details: string;
  refused: string | undefined;
}

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
  /**
   * A forwarded call made by hand (tunnel.proto, "A forwarded call, with a ready handshake"): one
   * HTTP/2 stream to b's peer listener with the cluster's broker certificate, as a forwarding broker
   * would open it, `expect: 100-continue` and the hop headers given. The call's message is sent only
   * after a 100, as the forwarder does.
   */
  const forwardByHand = async (method: string, hop: Record<string, string>): Promise<PeerAnswer> => {
    const session = http2.connect(`https://${world.peerAddress('b')}`, {
      ca: readFileSync(world.brokerCert.ca),
      cert: readFileSync(world.brokerCert.cert),
      key: readFileSync(world.brokerCert.key),
      ALPNProtocols: ['h2'],
      checkServerIdentity: () => undefined,
    });
    session.on('error', () => {});
    try {
      const stream = session.request({
        ':method': 'POST',
        ':path': method,
        'content-type': GRPC_CONTENT_TYPE,
        te: 'trailers',
        'grpc-timeout': '5S',
        expect: '100-continue',
        'burrow-agent-id': 'site-lim',
        'burrow-forwarded-by': 'broker-x',
        ...hop,
      });
      let continued = false;
      stream.on('continue', () => {
        continued = true;
        stream.end(frameMessage(Buffer.from('x')));
      });
      const reply = await readReply(stream);
      const status = statusOfHeaders(reply.trailers) ?? statusOfHeaders(reply.headers);
      const refused = reply.trailers?.['burrow-peer-refused'] ?? reply.headers['burrow-peer-refused'];
      return {
        continued,
        code: status?.code,
        details: status?.details ?? `no status (reset ${reply.rstCode})`,
        refused: typeof refused === 'string' ? refused : undefined,
      };
    } finally {
      session.destroy();
    }
  };
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

  it('the owner refuses hop metadata that is not well formed, naming the key, before confirming the call', async () => {
    const good = {
      'burrow-hop-caller': 'spiffe://burrow.local/service/platform-svc',
      'burrow-hop-method': ECHO.unary,
      'burrow-hop-decision': 'allow',
    };
    const callsBefore = world.echo.calls.length;
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
      const r = await forwardByHand(ECHO.unary, hop);
      expect(r.code, `${what}: ${r.details}`).to.equal(Status.INVALID_ARGUMENT);
      expect(r.details, what).to.match(message);
      // A decision on the call: the forwarding broker passes it to the caller instead of trying another.
      expect(r.refused, what).to.equal('decision');
      expect(r.continued, `${what}: confirmed before refusing`).to.equal(false);
    }
    // Without hop metadata (a broker of an older version) an owner with a caller policy cannot judge the caller.
    const none = await forwardByHand(ECHO.unary, {});
    expect(none.code, none.details).to.equal(Status.PERMISSION_DENIED);
    expect(none.details).to.match(/without burrow-hop-caller/);
    expect(none.continued).to.equal(false);
    // The well-formed hop is served: the control.
    const ok = await forwardByHand(ECHO.unary, good);
    expect(ok.code, ok.details).to.equal(Status.OK);
    expect(ok.continued).to.equal(true);
    expect(world.echo.calls.length).to.equal(callsBefore + 1);
  });

  it(
    "the owner refuses a forwarded call whose :path is another method than the hop's, " +
      'before confirming it and before the agent sees it',
    async () => {
      const callsBefore = world.echo.calls.length;
      // Admitted at the entry broker for Unary; the stream asks for the method the owner's policy forbids.
      const r = await forwardByHand(ECHO.metadata, {
        'burrow-hop-caller': 'spiffe://burrow.local/service/platform-svc',
        'burrow-hop-method': ECHO.unary,
        'burrow-hop-decision': 'allow policies=entry-permits-platform-svc',
      });
      console.log(`      (method swap: ${Status[r.code ?? -1]} "${r.details}")`);
      expect(r.code).to.equal(Status.PERMISSION_DENIED);
      expect(r.details).to.match(/method \/burrow.test.Echo\/Metadata is not \/burrow.test.Echo\/Unary/);
      expect(r.refused).to.equal('decision');
      expect(r.continued).to.equal(false);
      expect(world.echo.calls.length).to.equal(callsBefore);
    },
  );

  it('a client with a service certificate gets PERMISSION_DENIED from the peer listener', async () => {
    const session = http2.connect(`https://${world.peerAddress('b')}`, {
      ca: readFileSync(world.serviceCert.ca),
      cert: readFileSync(world.serviceCert.cert),
      key: readFileSync(world.serviceCert.key),
      ALPNProtocols: ['h2'],
      checkServerIdentity: () => undefined,
    });
    session.on('error', () => {});
    try {
      const callsBefore = world.echo.calls.length;
      const stream = session.request({
        ':method': 'POST',
        ':path': ECHO.unary,
        'content-type': GRPC_CONTENT_TYPE,
        te: 'trailers',
        expect: '100-continue',
        'burrow-agent-id': 'site-lim',
        'burrow-forwarded-by': 'broker-x',
      });
      let continued = false;
      stream.on('continue', () => {
        continued = true;
      });
      const reply = await readReply(stream);
      const status = statusOfHeaders(reply.trailers) ?? statusOfHeaders(reply.headers);
      expect(status?.code, status?.details).to.equal(Status.PERMISSION_DENIED);
      expect(status?.details).to.match(/certificate role "service" may not use the peer API/);
      expect(continued).to.equal(false);
      expect(world.echo.calls.length).to.equal(callsBefore);
    } finally {
      session.destroy();
    }
  });
});
