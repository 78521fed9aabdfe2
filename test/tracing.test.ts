import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { Metadata } from '@grpc/grpc-js';
import { loadJose } from '@burrow/agent';
import { BurrowClient } from '@burrow/client';
import { ClusterWorld, metricSum, parseMetrics } from './helpers/cluster';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { freePort } from './helpers/free-port';
import { OtlpReceiver, SPAN_KIND, type ReceivedSpan } from './helpers/otlp-receiver';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { EXAMPLES_DIR } from './helpers/policy-fixture';
import {
  type BurrowProcess,
  type BrokerPorts,
  httpGet,
  killAll,
  startAgent,
  startBroker,
  tlsArgs,
} from './helpers/processes';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { AUD, ISS, jwksOf, makeKey, signToken } from './helpers/token-fixture';
import { pollUntil } from './helpers/wait';

const AGENT = 'site-a';
const METHOD_NAME = 'burrow.test.Echo/Unary';

/** A fresh W3C trace context of a caller: its trace id, its span id and the header value. */
function callerContext(): { traceId: string; spanId: string; traceparent: string } {
  const traceId = randomBytes(16).toString('hex');
  const spanId = randomBytes(8).toString('hex');
  return { traceId, spanId, traceparent: `00-${traceId}-${spanId}-01` };
}

/** The one span of `spans` matching, or a failure that lists what there is. */
function one(spans: ReceivedSpan[], what: string, match: (s: ReceivedSpan) => boolean): ReceivedSpan {
  const found = spans.filter(match);
  const seen = spans.map((s) => `${s.name}/${s.kind}/${s.resource['service.name']}`).join(', ');
  expect(found, `${what} among: ${seen}`).to.have.length(1);
  return found[0]!;
}

const from = (service: string, kind: number, name: string) => (s: ReceivedSpan) =>
  s.resource['service.name'] === service && s.kind === kind && s.name === name;

/** `child` starts and ends within `parent`, and names it as its parent. */
function expectChild(child: ReceivedSpan, parent: ReceivedSpan): void {
  expect(child.parentSpanId, `${child.name} (${child.kind}) parent`).to.equal(parent.spanId);
  expect(child.traceId).to.equal(parent.traceId);
  expect(child.startNs >= parent.startNs, `${child.name} starts within its parent`).to.equal(true);
  expect(child.endNs <= parent.endNs, `${child.name} ends within its parent`).to.equal(true);
}

/**
 * Issue 18: one call's spans from the caller's traceparent to the site upstream, the agent's spans
 * carried up its tunnel (never over its own egress), the privacy rules, and the budgets. Real
 * broker and agent processes, a real OTLP/HTTP receiver decoding with the vendored protos.
 */
describe('tracing across the tunnel (OpenTelemetry, OTLP)', function () {
  this.timeout(60_000);
  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let agentCert: CertFiles;
  let serviceCert: CertFiles;
  let echo: EchoUpstream;
  let receiver: OtlpReceiver;
  const clients: { close(): void }[] = [];

  before(async () => {
    pki = await PkiFixture.create();
    brokerCert = await pki.issue('broker', 'b1');
    agentCert = await pki.issue('agent', AGENT);
    serviceCert = await pki.issue('service', 'platform-svc');
    echo = await new EchoUpstream().start();
    receiver = await new OtlpReceiver().start();
  });
  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
  });
  after(async () => {
    await killAll();
    await receiver?.stop();
    await echo?.stop();
    pki?.cleanup();
  });

  const brokerArgs = (extra: string[] = []): string[] => [
    '--agent-listen',
    '127.0.0.1:0',
    '--api-listen',
    '127.0.0.1:0',
    '--admin-listen',
    '127.0.0.1:0',
    ...tlsArgs(brokerCert),
    '--log-level',
    'debug',
    ...extra,
  ];
  const agentArgs = (brokerPort: number, extra: string[] = []): string[] => [
    '--broker',
    `127.0.0.1:${brokerPort}`,
    ...tlsArgs(agentCert),
    '--upstream',
    `*=${echo.address}`,
    '--admin-listen',
    '127.0.0.1:0',
    '--log-level',
    'debug',
    ...extra,
  ];

  /** A broker and an agent process, connected; the agent is given no OTLP endpoint. */
  async function startPair(brokerExtra: string[], agentExtra: string[] = []) {
    const b = await startBroker(brokerArgs(brokerExtra));
    const a = await startAgent(agentArgs(b.ports.agentPort, agentExtra));
    await a.proc.waitForLog('tunnel session established');
    return { broker: b.proc, bports: b.ports, agent: a.proc, aports: a.ports };
  }

  function rawCaller(ports: BrokerPorts): RawClient {
    const c = new RawClient(`127.0.0.1:${ports.apiPort}`, mtlsCredentials(serviceCert));
    clients.push(c);
    return c;
  }

  async function tracedEcho(ports: BrokerPorts, traceparent: string, payload = 'traced'): Promise<string> {
    const md = new Metadata();
    md.set('burrow-agent-id', AGENT);
    md.set('traceparent', traceparent);
    const res = await rawCaller(ports).unary(ECHO.unary, Buffer.from(payload), md);
    return res.response.toString();
  }

  const metrics = async (port: number | undefined) =>
    parseMetrics((await httpGet(`http://127.0.0.1:${port}/metrics`)).body);

  describe('a broker exporting to the receiver, an agent with no endpoint', () => {
    let broker: BurrowProcess;
    let agent: BurrowProcess;
    let bports: BrokerPorts;
    let aports: { localPort?: number };
    let jwksFile: string;
    const jose = loadJose();
    let key: Awaited<ReturnType<typeof makeKey>>;

    before(async () => {
      key = await makeKey(await jose, 'ES256', 'trace-key');
      jwksFile = path.join(pki.root, 'jwks.json');
      writeFileSync(jwksFile, jwksOf(key));
      const policy = ['--policies', path.join(EXAMPLES_DIR, 'policies')];
      policy.push('--entities', path.join(EXAMPLES_DIR, 'entities.json'), '--audit-log', path.join(pki.root, 'a.log'));
      const authn = ['--jwks', jwksFile, '--token-issuer', ISS, '--token-audience', AUD];
      // A caller policy: admission then decides something, and gets its own span.
      const callers = path.join(pki.root, 'callers');
      mkdirSync(callers, { recursive: true });
      writeFileSync(path.join(callers, 'all.cedar'), '@id("everyone") permit(principal, action, resource);\n');
      // The echo upstream doubles as the platform upstream for site -> platform calls.
      const brokerExtra = [
        '--otlp-endpoint',
        receiver.endpoint,
        '--caller-policies',
        callers,
        '--upstream',
        `*=${echo.address}`,
      ];
      const local = ['--local-listen', '127.0.0.1:0'];
      ({ broker, bports, agent, aports } = await startPair(brokerExtra, [...policy, ...authn, ...local]));
      receiver.watchPids = [broker.pid, agent.pid];
    });
    after(async () => {
      agent?.signal('SIGKILL');
      broker?.signal('SIGKILL');
      await Promise.all([agent?.exited, broker?.exited]);
    });

    it(
      'one call with a caller traceparent is one trace: caller -> broker SERVER -> broker CLIENT -> ' +
        'agent SERVER -> agent CLIENT -> upstream, nested, with trace ids in the log lines',
      async () => {
        const caller = callerContext();
        const seenByUpstream = new Promise<Metadata>((resolve) =>
          echo.once('call', (c: { metadata: Metadata }) => resolve(c.metadata)),
        );
        expect(await tracedEcho(bports, caller.traceparent)).to.equal('traced');
        const upstreamMetadata = await seenByUpstream;
        const spans = await receiver.waitFor('the four RPC spans of the call', (all) => {
          const t = all.filter((s) => s.traceId === caller.traceId);
          return t.filter((s) => s.kind !== SPAN_KIND.INTERNAL).length >= 4;
        });
        const trace = spans.filter((s) => s.traceId === caller.traceId);
        const brokerServer = one(trace, 'broker SERVER', from('burrow-broker', SPAN_KIND.SERVER, METHOD_NAME));
        const brokerClient = one(trace, 'broker CLIENT', from('burrow-broker', SPAN_KIND.CLIENT, METHOD_NAME));
        const agentServer = one(trace, 'agent SERVER', from('burrow-agent', SPAN_KIND.SERVER, METHOD_NAME));
        const agentClient = one(trace, 'agent CLIENT', from('burrow-agent', SPAN_KIND.CLIENT, METHOD_NAME));
        const admission = one(trace, 'admission', (s) => s.name === 'burrow.admission');
        expect(brokerServer.parentSpanId, "the caller's span is the broker's parent").to.equal(caller.spanId);
        expectChild(admission, brokerServer);
        expectChild(brokerClient, brokerServer);
        expectChild(agentServer, brokerClient);
        expectChild(agentClient, agentServer);
        // The upstream continues the trace under the agent's CLIENT span.
        expect(upstreamMetadata.get('traceparent')).to.deep.equal([`00-${caller.traceId}-${agentClient.spanId}-01`]);
        for (const s of [brokerServer, brokerClient, agentServer, agentClient]) {
          expect(s.attributes['rpc.system']).to.equal('grpc');
          expect(s.attributes['rpc.service']).to.equal('burrow.test.Echo');
          expect(s.attributes['rpc.method']).to.equal('Unary');
          expect(s.attributes['rpc.grpc.status_code']).to.equal(0);
        }
        // The spans name the agent, the call (its id in both sides' logs) and the broker: on the
        // span, or on the resource of every span of that process.
        for (const s of [brokerServer, brokerClient, agentServer]) {
          expect(s.attributes['burrow.agent_id'] ?? s.resource['burrow.agent_id']).to.equal(AGENT);
          expect(s.attributes['burrow.call_id']).to.be.a('string').and.not.equal('');
          expect(s.attributes['burrow.broker_id'] ?? s.resource['burrow.broker_id']).to.equal('b1');
        }
        expect(agentServer.attributes['burrow.call_id']).to.equal(brokerClient.attributes['burrow.call_id']);
        // The agent's batch was re-stamped by the broker with the agent's certificate identity.
        expect(agentServer.resource['burrow.agent_id']).to.equal(AGENT);
        // A log search for the trace id finds each side's call line.
        const brokerLine = await broker.waitForLog('call finished', (l) => l.trace_id === caller.traceId);
        expect(brokerLine.span_id).to.equal(brokerServer.spanId);
        const agentLine = await agent.waitForLog('call finished', (l) => l.trace_id === caller.traceId);
        expect(agentLine.span_id).to.equal(agentServer.spanId);
        // Every connection to the receiver came from the broker: the agent used no egress of its own.
        expect(receiver.connectionsFrom).to.include(broker.pid);
        expect(receiver.connectionsFrom).to.not.include(agent.pid);
        expect(receiver.requests.every((r) => r.contentType === 'application/x-protobuf')).to.equal(true);
        const m = await metrics(Number((await broker.waitForLog('broker started')).adminPort));
        expect(metricSum(m, 'burrow_broker_telemetry_frames_total', 'result="accepted"')).to.be.greaterThan(0);
      },
    );

    it("a site client's call to the platform: agent SERVER, agent CLIENT, broker SERVER, broker CLIENT", async () => {
      const caller = callerContext();
      const seenByUpstream = new Promise<Metadata>((resolve) =>
        echo.once('call', (c: { metadata: Metadata }) => resolve(c.metadata)),
      );
      const site = new RawClient(`127.0.0.1:${aports.localPort}`);
      clients.push(site);
      const md = new Metadata();
      md.set('traceparent', caller.traceparent);
      expect((await site.unary(ECHO.unary, Buffer.from('up'), md)).response.toString()).to.equal('up');
      const spans = await receiver.waitFor('the four spans of the site call', (all) => {
        return all.filter((s) => s.traceId === caller.traceId).length >= 4;
      });
      const trace = spans.filter((s) => s.traceId === caller.traceId);
      const agentServer = one(trace, 'agent SERVER', from('burrow-agent', SPAN_KIND.SERVER, METHOD_NAME));
      const agentClient = one(trace, 'agent CLIENT', from('burrow-agent', SPAN_KIND.CLIENT, METHOD_NAME));
      const brokerServer = one(trace, 'broker SERVER', from('burrow-broker', SPAN_KIND.SERVER, METHOD_NAME));
      const brokerClient = one(trace, 'broker CLIENT', from('burrow-broker', SPAN_KIND.CLIENT, METHOD_NAME));
      expect(agentServer.parentSpanId).to.equal(caller.spanId);
      expectChild(agentClient, agentServer);
      expectChild(brokerServer, agentClient);
      expectChild(brokerClient, brokerServer);
      expect(brokerServer.attributes['burrow.agent_id']).to.equal(AGENT);
      expect((await seenByUpstream).get('traceparent')).to.deep.equal([
        `00-${caller.traceId}-${brokerClient.spanId}-01`,
      ]);
    });

    it('Evaluate and Authenticate spans carry the decision, never the token or the request context', async () => {
      const token = await signToken(await jose, key, { sub: 'alice' });
      const secret = `ctx-secret-${randomBytes(6).toString('hex')}`;
      const client = new BurrowClient({
        broker: `127.0.0.1:${bports.apiPort}`,
        tls: { certFile: serviceCert.cert, keyFile: serviceCert.key, caFile: serviceCert.ca },
        serverName: 'localhost',
      });
      clients.push(client);
      const verdict = await client.authenticate(AGENT, token);
      expect(verdict.authenticated).to.equal(true);
      const decision = await client.evaluate(AGENT, {
        subject: { type: 'User', id: 'carol' },
        action: { name: 'edit' },
        resource: { type: 'Document', id: 'atlas-design' },
        context: { note: secret },
      });
      expect(decision.decision).to.equal(true);
      const spans = await receiver.waitFor('the Cedar evaluation and Authenticate spans', (all) =>
        Boolean(
          all.some((s) => s.name === 'cedar evaluation') &&
            all.some((s) => s.name.endsWith('/Authenticate') && s.resource['service.name'] === 'burrow-agent'),
        ),
      );
      const cedar = one(spans, 'cedar evaluation', (s) => s.name === 'cedar evaluation');
      expect(cedar.attributes['burrow.decision']).to.equal('allow');
      expect(cedar.attributes['burrow.policies']).to.be.an('array').that.is.not.empty;
      const evaluate = one(
        spans,
        'agent Evaluate',
        from('burrow-agent', SPAN_KIND.SERVER, cedarParentName(spans, cedar)),
      );
      expectChild(cedar, evaluate);
      // Not in any attribute, resource attribute, name or status message of any span.
      const everything = JSON.stringify(
        receiver.spans.map((s) => [s.name, s.status.message, s.attributes, s.resource]),
      );
      expect(everything).to.not.include(token);
      expect(everything).to.not.include(token.split('.')[2]!);
      expect(everything).to.not.include(secret);
      expect(everything).to.not.include('carol');
    });
  });

  it('a cluster-forwarded call includes the forwarding broker: its SERVER and peer CLIENT spans', async () => {
    const world = await ClusterWorld.create(['a', 'b'], { pki, brokerCert, serviceCert, echo });
    try {
      for (const name of ['a', 'b']) await world.startBroker(name, ['--otlp-endpoint', receiver.endpoint]);
      await world.startAgent('site-x', ['b']);
      await world.waitListed('b', 'site-x');
      const caller = callerContext();
      const md = new Metadata();
      md.set('burrow-agent-id', 'site-x');
      md.set('traceparent', caller.traceparent);
      const res = await world.client('a').unary(ECHO.unary, Buffer.from('forwarded'), md, {
        deadline: Date.now() + 10_000,
      });
      expect(res.response.toString()).to.equal('forwarded');
      const spans = await receiver.waitFor('the six spans of the forwarded call', (all) => {
        const t = all.filter((s) => s.traceId === caller.traceId && s.kind !== SPAN_KIND.INTERNAL);
        return t.length >= 6;
      });
      const trace = spans.filter((s) => s.traceId === caller.traceId);
      const byBroker = (id: string, kind: number) => (s: ReceivedSpan) =>
        from('burrow-broker', kind, METHOD_NAME)(s) && s.resource['burrow.broker_id'] === id;
      const entryServer = one(trace, 'broker a SERVER', byBroker('broker-a', SPAN_KIND.SERVER));
      const peerClient = one(trace, 'broker a peer CLIENT', byBroker('broker-a', SPAN_KIND.CLIENT));
      const ownerServer = one(trace, 'broker b SERVER', byBroker('broker-b', SPAN_KIND.SERVER));
      const ownerClient = one(trace, 'broker b CLIENT', byBroker('broker-b', SPAN_KIND.CLIENT));
      const agentServer = one(trace, 'agent SERVER', from('burrow-agent', SPAN_KIND.SERVER, METHOD_NAME));
      const agentClient = one(trace, 'agent CLIENT', from('burrow-agent', SPAN_KIND.CLIENT, METHOD_NAME));
      expect(entryServer.parentSpanId).to.equal(caller.spanId);
      expectChild(peerClient, entryServer);
      expectChild(ownerServer, peerClient);
      expect(ownerServer.attributes['burrow.forwarded_by']).to.equal('broker-a');
      expectChild(ownerClient, ownerServer);
      expectChild(agentServer, ownerClient);
      expectChild(agentClient, agentServer);
    } finally {
      await world.close(true);
    }
  });

  it('an agent with --no-telemetry-upload sends no Telemetry frames; the trace still crosses it', async () => {
    const { broker, bports } = await startPair(['--otlp-endpoint', receiver.endpoint], ['--no-telemetry-upload']);
    const caller = callerContext();
    const seenByUpstream = new Promise<Metadata>((resolve) =>
      echo.once('call', (c: { metadata: Metadata }) => resolve(c.metadata)),
    );
    expect(await tracedEcho(bports, caller.traceparent)).to.equal('traced');
    const spans = await receiver.waitFor('the broker spans of the call', (all) =>
      all.some((s) => s.traceId === caller.traceId && s.kind === SPAN_KIND.CLIENT),
    );
    const brokerClient = one(
      spans.filter((s) => s.traceId === caller.traceId),
      'broker CLIENT',
      from('burrow-broker', SPAN_KIND.CLIENT, METHOD_NAME),
    );
    // The agent passes the broker's context on unchanged to the upstream.
    expect((await seenByUpstream).get('traceparent')).to.deep.equal([`00-${caller.traceId}-${brokerClient.spanId}-01`]);
    const m = await metrics(Number((await broker.waitForLog('broker started')).adminPort));
    expect(metricSum(m, 'burrow_broker_telemetry_frames_total')).to.equal(0);
    expect(receiver.trace(caller.traceId).filter((s) => s.resource['service.name'] === 'burrow-agent')).to.be.empty;
  });

  it('with the endpoint down, drops are counted and calls stay quick', async () => {
    const deadPort = await freePort();
    const { broker, bports, aports } = await startPair([
      '--otlp-endpoint',
      `http://127.0.0.1:${deadPort}`,
      '--otlp-timeout',
      '1s',
    ]);
    const slowestMs = { value: 0 };
    for (let i = 0; i < 40; i++) {
      const startedMs = Date.now();
      expect(await tracedEcho(bports, callerContext().traceparent, `call ${i}`)).to.equal(`call ${i}`);
      slowestMs.value = Math.max(slowestMs.value, Date.now() - startedMs);
    }
    expect(slowestMs.value, 'slowest call, ms').to.be.below(1000);
    const adminPort = Number((await broker.waitForLog('broker started')).adminPort);
    await pollUntil(
      'export failures counted',
      async () =>
        metricSum(await metrics(adminPort), 'burrow_broker_telemetry_dropped_bytes_total', 'export_failed') > 0,
      15_000,
      200,
    );
    // The agent's frames still reached the broker (and were dropped there, counted).
    const agentMetrics = await metrics(aports.adminPort);
    expect(metricSum(agentMetrics, 'burrow_agent_telemetry_frames_total')).to.be.greaterThan(0);
  });
});

/** The name of the span `cedar` hangs under (its parent's). */
function cedarParentName(spans: ReceivedSpan[], cedar: ReceivedSpan): string {
  return spans.find((s) => s.spanId === cedar.parentSpanId)?.name ?? '(no parent)';
}
