import { expect } from 'chai';
import { BuiltinServices, TelemetryUploader, telemetryConfigFromArgs } from '@burrow/agent';
import { BrokerTelemetry, TelemetryAllowance } from '@burrow/broker';
import {
  API_CODECS,
  POLICY_METHODS,
  ControlChannel,
  MAX_SESSION_FRAME_BYTES,
  MAX_TELEMETRY_BYTES,
  ProtocolError,
  SpanKind,
  decodeSessionFrame,
  encodeSessionFrame,
  endRpcSpan,
  endSpan,
  frameMessage,
  remoteParent,
  restampResource,
  silentLogger,
  startChildSpan,
  startRpcSpan,
  startTracing,
  traceparentOf,
  type OtlpChunk,
  type SessionFrame,
} from '@burrow/tunnel';
import { Registry } from 'prom-client';
import { metricSum, parseMetrics } from './helpers/cluster';
import { closeSession, connectH2, listenH2 } from './helpers/h2';
import { decodeSpans, SPAN_KIND } from './helpers/otlp-receiver';

/** A tracer whose encoded batches land in `chunks` (flush() to get them). */
function capture(maxRequestBytes?: number) {
  const chunks: OtlpChunk[] = [];
  const dropped: string[] = [];
  const runtime = startTracing({
    serviceName: 'burrow-test',
    serviceVersion: '9.9.9',
    resource: { 'burrow.agent_id': 'site-a' },
    sampleRatio: 1,
    sink: { accept: (c) => chunks.push(c), dropped: (n, reason) => dropped.push(`${n} ${reason}`) },
    maxRequestBytes,
  });
  return { chunks, dropped, runtime, tracing: runtime.tracing };
}

/**
 * The OTLP converter (SDK spans to ExportTraceServiceRequest bytes, decoded here with the vendored
 * protos by the test's own decoder), the Telemetry frame and its bounds, the broker's re-stamping
 * and budgets, and the agent's upload buffer.
 */
describe('OTLP encoding and the Telemetry frame', () => {
  it('encodes spans with ids, parents, kinds, nanosecond times, attributes, status and resource', async () => {
    const { chunks, runtime, tracing } = capture();
    const parent = remoteParent('00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01');
    const server = startRpcSpan(tracing, SpanKind.SERVER, '/pkg.Service/Method', parent, { 'burrow.call_id': 'c-1' });
    const child = startChildSpan(tracing, 'cedar evaluation', server, SpanKind.INTERNAL, {
      'burrow.policies': ['p1', 'p2'],
      ratio: 0.5,
      ok: true,
    });
    endSpan(child);
    endRpcSpan(server, 7, 'no');
    await runtime.flush();
    expect(chunks).to.have.length(1);
    const spans = decodeSpans(chunks[0]!.bytes);
    expect(chunks[0]!.spans).to.equal(2);
    const s = spans.find((x) => x.kind === SPAN_KIND.SERVER)!;
    const c = spans.find((x) => x.kind === SPAN_KIND.INTERNAL)!;
    expect(s.traceId).to.equal('0af7651916cd43dd8448eb211c80319c');
    expect(s.parentSpanId).to.equal('b7ad6b7169203331');
    expect(s.name).to.equal('pkg.Service/Method');
    expect(s.attributes).to.include({
      'rpc.system': 'grpc',
      'rpc.service': 'pkg.Service',
      'rpc.method': 'Method',
      'rpc.grpc.status_code': 7,
      'burrow.call_id': 'c-1',
    });
    expect(s.status).to.deep.equal({ code: 2, message: 'PERMISSION_DENIED: no' });
    expect(s.resource).to.include({ 'service.name': 'burrow-test', 'burrow.agent_id': 'site-a' });
    expect(c.parentSpanId).to.equal(s.spanId);
    expect(c.attributes).to.deep.equal({ 'burrow.policies': ['p1', 'p2'], ratio: 0.5, ok: true });
    // Nanoseconds since the epoch, not truncated to milliseconds, and nested.
    expect(s.startNs % 1_000_000n).to.not.equal(0n);
    expect(c.startNs >= s.startNs && c.endNs <= s.endNs).to.equal(true);
    expect(Number(s.startNs / 1_000_000n)).to.be.closeTo(Date.now(), 60_000);
    expect(traceparentOf(server)).to.equal(`00-0af7651916cd43dd8448eb211c80319c-${s.spanId}-01`);
    await runtime.shutdown();
  });

  it('a malformed or absent traceparent starts a new trace; an unsampled one is continued unsampled', async () => {
    const { chunks, runtime, tracing } = capture();
    for (const bad of [undefined, 'garbage', '00-00000000000000000000000000000000-b7ad6b7169203331-01', 'ff-x'])
      expect(startRpcSpan(tracing, SpanKind.SERVER, '/a.B/C', remoteParent(bad)).spanContext().traceId).to.match(
        /^[0-9a-f]{32}$/,
      );
    const unsampled = startRpcSpan(
      tracing,
      SpanKind.SERVER,
      '/a.B/C',
      remoteParent('00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00'),
    );
    expect(unsampled.isRecording()).to.equal(false);
    expect(traceparentOf(unsampled)).to.match(/^00-0af7651916cd43dd8448eb211c80319c-[0-9a-f]{16}-00$/);
    unsampled.end();
    await runtime.flush();
    expect(chunks.flatMap((c) => decodeSpans(c.bytes)).map((s) => s.traceId)).to.not.include(
      '0af7651916cd43dd8448eb211c80319c',
    );
    await runtime.shutdown();
  });

  it('splits a batch into requests that each fit one Telemetry frame; counts a span too large for any', async () => {
    const { chunks, dropped, runtime, tracing } = capture(MAX_TELEMETRY_BYTES);
    for (let i = 0; i < 300; i++) {
      const span = startRpcSpan(tracing, SpanKind.SERVER, `/svc.S/M${i}`, remoteParent(undefined));
      span.setAttribute('filler', 'x'.repeat(400));
      span.end();
    }
    const huge = startRpcSpan(tracing, SpanKind.SERVER, '/svc.S/Huge', remoteParent(undefined));
    huge.setAttribute('filler', 'y'.repeat(MAX_TELEMETRY_BYTES));
    huge.end();
    await runtime.flush();
    expect(chunks.length).to.be.greaterThan(1);
    let total = 0;
    for (const chunk of chunks) {
      const frame = encodeSessionFrame({ kind: 'telemetry', otlpTraces: chunk.bytes });
      expect(frame.length).to.be.at.most(MAX_SESSION_FRAME_BYTES);
      total += decodeSpans(chunk.bytes).length;
    }
    expect(total).to.equal(300);
    expect(dropped).to.deep.equal(['1 too_large']);
    await runtime.shutdown();
  });

  it('the Telemetry frame round-trips; one over 64 KiB is a protocol error before it is decoded', () => {
    const frame: SessionFrame = { kind: 'telemetry', otlpTraces: Buffer.from([1, 2, 3]) };
    expect(decodeSessionFrame(encodeSessionFrame(frame))).to.deep.equal(frame);
    const big = encodeSessionFrame({ kind: 'telemetry', otlpTraces: Buffer.alloc(MAX_SESSION_FRAME_BYTES) });
    expect(() => decodeSessionFrame(big)).to.throw(ProtocolError, String(big.length));
    // A Welcome that says nothing about telemetry (an older broker) reads as "takes none".
    const welcome = { protocolVersion: 4, sessionId: 's', maxMessageBytes: 1, brokerId: 'b' };
    const decoded = decodeSessionFrame(encodeSessionFrame({ kind: 'welcome', welcome }));
    expect(decoded).to.deep.equal({ kind: 'welcome', welcome });
    const says = decodeSessionFrame(
      encodeSessionFrame({ kind: 'welcome', welcome: { ...welcome, acceptsTelemetry: true } }),
    );
    expect(says.kind === 'welcome' && says.welcome.acceptsTelemetry).to.equal(true);
  });

  it('an oversized Telemetry frame on a real control stream ends the session with a protocol error', async () => {
    const errors: ProtocolError[] = [];
    let reported!: () => void;
    const done = new Promise<void>((resolve) => {
      reported = resolve;
    });
    const server = await listenH2((stream) => {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' });
      new ControlChannel(stream, {
        onFrame: () => {},
        onProtocolError: (e) => {
          errors.push(e);
          reported();
        },
        onClosed: () => {},
      });
    });
    const session = await connectH2(server.address);
    const client = session.request({ ':method': 'POST', ':path': '/burrow.tunnel.v1.Tunnel/Control' });
    client.on('error', () => {});
    const payload = Buffer.alloc(MAX_SESSION_FRAME_BYTES);
    client.write(frameMessage(encodeSessionFrame({ kind: 'telemetry', otlpTraces: payload })));
    await done;
    expect(errors[0]!.message).to.match(/session frame of \d+ bytes; at most 65536 allowed/);
    await closeSession(session);
    await server.close();
  });

  describe("the broker's side", () => {
    const config = { sampleRatio: 1, otlp: { endpoint: 'http://127.0.0.1:9', headers: {}, timeoutMs: 1000 } };

    async function telemetry(maxBytesPerAgentPerSecond: number) {
      const registry = new Registry();
      const t = new BrokerTelemetry(
        config,
        { maxBytesPerAgentPerSecond, queueBytes: 1024 * 1024 },
        registry,
        silentLogger(),
        { brokerId: 'b1', version: '0' },
      );
      return { t, metrics: async () => parseMetrics(await registry.metrics()) };
    }

    it("re-stamps every resource with the session's agent id, whatever the agent wrote", async () => {
      const { chunks, runtime, tracing } = capture();
      startRpcSpan(tracing, SpanKind.SERVER, '/a.B/C', remoteParent(undefined)).end();
      await runtime.flush();
      // The agent's resource claims to be site-a; the session's certificate says site-b.
      const out = restampResource(chunks[0]!.bytes, 'site-b');
      expect(out.spans).to.equal(1);
      const [span] = decodeSpans(out.bytes);
      expect(span!.resource['burrow.agent_id']).to.equal('site-b');
      expect(span!.resource['service.name']).to.equal('burrow-test');
      await runtime.shutdown();
    });

    it('drops and counts a malformed payload, and frames past the per-agent byte rate', async () => {
      const { t, metrics } = await telemetry(4096);
      let nowMs = 0;
      const allowance = new TelemetryAllowance(4096, () => nowMs);
      t.acceptAgentBatch('site-a', allowance, Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]));
      const { chunks, runtime, tracing } = capture();
      startRpcSpan(tracing, SpanKind.SERVER, '/a.B/C', remoteParent(undefined)).end();
      await runtime.flush();
      const good = chunks[0]!.bytes;
      const fits = Math.floor(4096 / good.length);
      for (let i = 0; i < fits + 3; i++) t.acceptAgentBatch('site-a', allowance, good);
      let m = await metrics();
      expect(metricSum(m, 'burrow_broker_telemetry_dropped_bytes_total', 'malformed')).to.equal(5);
      expect(metricSum(m, 'burrow_broker_telemetry_dropped_bytes_total', 'agent_budget')).to.equal(3 * good.length);
      expect(metricSum(m, 'burrow_broker_telemetry_frames_total', 'accepted')).to.equal(fits);
      // A second later the allowance is back.
      nowMs += 1000;
      t.acceptAgentBatch('site-a', allowance, good);
      m = await metrics();
      expect(metricSum(m, 'burrow_broker_telemetry_frames_total', 'accepted')).to.equal(fits + 1);
      t.acceptAgentBatch('site-a', undefined, good);
      m = await metrics();
      expect(metricSum(m, 'burrow_broker_telemetry_dropped_bytes_total', 'not_accepted')).to.equal(good.length);
      await runtime.shutdown();
      await t.stop();
    });
  });

  it("the agent's upload buffer holds chunks while no tunnel takes them, dropping the oldest past its budget", () => {
    const sent: number[] = [];
    let open = false;
    const drops: string[] = [];
    const uploader = new TelemetryUploader(
      { send: (bytes) => open && sent.push(bytes[0]!) > 0 },
      3000,
      (spans, reason) => drops.push(`${spans} ${reason}`),
      () => {},
    );
    for (let i = 0; i < 5; i++) uploader.accept({ bytes: Buffer.alloc(1000, i), spans: 2 });
    expect(uploader.bufferedBytes).to.equal(3000);
    expect(drops).to.deep.equal(['2 buffer_full', '2 buffer_full']);
    open = true;
    uploader.pump();
    expect(sent).to.deep.equal([2, 3, 4]);
    expect(uploader.bufferedBytes).to.equal(0);
  });
});

describe('privacy of policy spans and the tracing flags', () => {
  const request = {
    subject: { type: 'User', id: 'subject-secret' },
    action: { name: 'edit' },
    resource: { type: 'Document', id: 'resource-secret' },
    context: { ip: 'context-secret' },
  };

  async function evaluated(includeContext: boolean): Promise<Record<string, unknown>> {
    const chunks: OtlpChunk[] = [];
    const runtime = startTracing({
      serviceName: 'burrow-agent',
      serviceVersion: '0',
      sampleRatio: 1,
      sink: { accept: (c) => chunks.push(c) },
      includeContext,
    });
    const services = new BuiltinServices({
      tracing: runtime.tracing,
      policy: {
        evaluate: () => ({ decision: false, context: { policies: ['forbid-edit'], reason: 'forbidden' } }),
        evaluations: () => ({ evaluations: [] }),
      },
    });
    const span = startRpcSpan(runtime.tracing, SpanKind.SERVER, POLICY_METHODS.evaluate, remoteParent(undefined));
    const handler = services.handlerFor(POLICY_METHODS.evaluate)!;
    const ctx = { deadlineMs: Number.POSITIVE_INFINITY, signal: new AbortController().signal, callId: 'c', span };
    await handler(API_CODECS.evaluationRequest.encode(request), ctx);
    endSpan(span);
    await runtime.shutdown();
    const spans = chunks.flatMap((c) => decodeSpans(c.bytes));
    const cedar = spans.find((s) => s.name === 'cedar evaluation')!;
    expect(cedar.parentSpanId).to.equal(span.spanContext().spanId);
    expect(cedar.attributes['burrow.decision']).to.equal('deny');
    expect(cedar.attributes['burrow.policies']).to.deep.equal(['forbid-edit']);
    const everything = JSON.stringify(spans.map((s) => [s.name, s.attributes, s.resource, s.status]));
    for (const secret of ['subject-secret', 'resource-secret']) expect(everything).to.not.include(secret);
    return cedar.attributes;
  }

  it('a Cedar evaluation span has the decision and policies, never the request; context only if allowed', async () => {
    expect(JSON.stringify(await evaluated(false))).to.not.include('context-secret');
    expect((await evaluated(true))['burrow.request.context']).to.equal('{"ip":"context-secret"}');
  });

  it('bad tracing flags are one-line errors naming the flag', () => {
    const fails = (args: Record<string, unknown>, pattern: RegExp): void => {
      expect(() => telemetryConfigOf(args)).to.throw(pattern);
    };
    fails({ 'trace-sample-ratio': 2 }, /trace-sample-ratio: "2" is not a number from 0 to 1/);
    fails({ 'otlp-endpoint': 'collector:4318', 'telemetry-upload': false }, /otlp-endpoint: .* is not http/);
    fails({ 'otlp-endpoint': 'http://c:4318' }, /otlp-endpoint: needs --no-telemetry-upload/);
    fails({ 'otlp-ca': '/x' }, /otlp-ca: needs --otlp-endpoint/);
    fails({ 'otlp-endpoint': 'http://c:4318', 'telemetry-upload': false, 'otlp-header': ['x'] }, /otlp-header/);
    fails({ 'telemetry-buffer-bytes': '1KiB' }, /telemetry-buffer-bytes: must be at least 65536 bytes/);
    const ok = telemetryConfigOf({ 'otlp-endpoint': 'https://c:4318/otel', 'telemetry-upload': false });
    expect(ok.upload).to.equal(false);
    expect(ok.tracing.otlp?.endpoint).to.equal('https://c:4318/otel');
  });
});

/** The agent's telemetry settings from flags as yargs hands them over (defaults filled in). */
function telemetryConfigOf(args: Record<string, unknown>) {
  return telemetryConfigFromArgs({
    'trace-sample-ratio': 1,
    'telemetry-upload': true,
    'telemetry-buffer-bytes': '1MiB',
    'otlp-timeout': '10s',
    ...args,
  });
}
