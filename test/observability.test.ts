import { expect } from 'chai';
import { EventEmitter } from 'node:events';
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Writable } from 'node:stream';
import * as winston from 'winston';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import { Broker } from '@burrow/broker';
import { PROTOCOL_VERSION, createLogger, type Logger } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { getJson, httpGet, type AgentListing } from './helpers/processes';
import { RawClient, collect, mtlsCredentials } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';

const HEALTH_CHECK = '/grpc.health.v1.Health/Check';

/** One sample of the Prometheus text format. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Parses the Prometheus text exposition format (enough of it for these tests). */
function parseMetrics(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) throw new Error(`unparsable metrics line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
    out.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

/** Samples named `name` whose labels include `labels`. */
function samples(all: Sample[], name: string, labels: Record<string, string> = {}): Sample[] {
  return all.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
}

/** The value of exactly one sample. */
function value(all: Sample[], name: string, labels: Record<string, string> = {}): number {
  const found = samples(all, name, labels);
  if (found.length !== 1) throw new Error(`${found.length} samples of ${name}${JSON.stringify(labels)}`);
  return found[0]!.value;
}

/** A logger made by createLogger (JSON format) whose output lines are captured and parsed. */
class CapturedLog extends EventEmitter {
  readonly lines: Record<string, unknown>[] = [];
  readonly logger: Logger;

  constructor(component: string) {
    super();
    this.logger = createLogger({ level: 'debug', format: 'json', component });
    const sink = new Writable({
      write: (chunk: Buffer, _enc, cb) => {
        for (const text of chunk.toString('utf8').split('\n')) {
          if (!text) continue;
          const line = JSON.parse(text) as Record<string, unknown>;
          this.lines.push(line);
          this.emit('line', line);
        }
        cb();
      },
    });
    this.logger.clear();
    this.logger.add(new winston.transports.Stream({ stream: sink }));
  }

  /** Resolves with the first line (seen or to come) that `where` accepts; rejects after `timeoutMs`. */
  waitFor(where: (l: Record<string, unknown>) => boolean, timeoutMs = 5_000): Promise<Record<string, unknown>> {
    const seen = this.lines.find(where);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off('line', on);
        reject(
          new Error(
            `no matching log line within ${timeoutMs} ms; got:\n${this.lines.map((l) => JSON.stringify(l)).join('\n')}`,
          ),
        );
      }, timeoutMs);
      const on = (l: Record<string, unknown>): void => {
        if (where(l)) {
          clearTimeout(timer);
          this.off('line', on);
          resolve(l);
        }
      };
      this.on('line', on);
    });
  }
}

describe('observability', function () {
  this.timeout(20_000);

  describe('admin listener and health', () => {
    let stack: Stack;
    let agentClient: RawClient;

    before(async () => {
      stack = await Stack.start();
      for (const m of ['one', 'two', 'three']) await stack.caller.unary(ECHO.unary, Buffer.from(m), stack.md());
      const call = stack.caller.bidi(ECHO.bidi, stack.md());
      call.write(Buffer.from('ab'));
      call.end();
      expect((await collect(call)).status.code).to.equal(Status.OK);
      // One refused call so the rejection counter has a sample.
      agentClient = new RawClient(stack.apiAddress, mtlsCredentials(stack.agentCert));
      await agentClient.unary(ECHO.unary, Buffer.from('no'), stack.md()).then(
        () => {
          throw new Error('agent certificate was allowed to call');
        },
        () => {},
      );
    });
    after(async () => {
      agentClient?.close();
      await stack?.stop();
    });

    it('/metrics carries the broker metrics with the values these calls produced', async () => {
      const res = await httpGet(`${stack.adminUrl}/metrics`);
      expect(res.status).to.equal(200);
      const m = parseMetrics(res.body);
      expect(value(m, 'burrow_broker_connected_agents')).to.equal(1);
      expect(value(m, 'burrow_broker_calls_total', { direction: 'to_agent', method: ECHO.unary, code: 'OK' })).to.equal(
        3,
      );
      expect(value(m, 'burrow_broker_calls_total', { direction: 'to_agent', method: ECHO.bidi, code: 'OK' })).to.equal(
        1,
      );
      expect(
        value(m, 'burrow_broker_calls_total', { direction: 'to_agent', method: ECHO.unary, code: 'PERMISSION_DENIED' }),
      ).to.equal(1);
      const buckets = samples(m, 'burrow_broker_call_duration_seconds_bucket', { direction: 'to_agent' });
      expect(buckets.length).to.be.greaterThan(1);
      expect(value(m, 'burrow_broker_call_duration_seconds_bucket', { direction: 'to_agent', le: '+Inf' })).to.equal(5);
      expect(value(m, 'burrow_broker_call_duration_seconds_count', { direction: 'to_agent' })).to.equal(5);
      // one + two + three + ab = 13 bytes each way.
      expect(value(m, 'burrow_broker_message_bytes_total', { direction: 'to_agent', flow: 'request' })).to.equal(13);
      expect(value(m, 'burrow_broker_message_bytes_total', { direction: 'to_agent', flow: 'response' })).to.equal(13);
      expect(value(m, 'burrow_broker_agent_connects_total')).to.equal(1);
      expect(value(m, 'burrow_broker_rejected_handshakes_total', { listener: 'api', reason: 'wrong_role' })).to.equal(
        1,
      );
      expect(value(m, 'burrow_broker_tunnel_streams', { state: 'active' })).to.equal(0);
      expect(res.body).to.match(/^# TYPE burrow_broker_calls_total counter$/m);
    });

    it('/healthz answers 200 and /readyz answers 200 while serving', async () => {
      expect((await httpGet(`${stack.adminUrl}/healthz`)).status).to.equal(200);
      expect((await httpGet(`${stack.adminUrl}/readyz`)).status).to.equal(200);
    });

    it('/agents lists the connected agent', async () => {
      const agents = await getJson<AgentListing[]>(`${stack.adminUrl}/agents`);
      expect(agents).to.have.length(1);
      expect(agents[0]).to.include({ id: 'site-a', connections: 1, callsInFlight: 0 });
      expect(Date.parse(agents[0]!.connectedSince)).to.be.within(Date.now() - 60_000, Date.now());
    });

    // HealthCheckRequest{service: ""} is zero bytes on the wire, exactly what grpc_health_probe and
    // Kubernetes gRPC probes send; HealthCheckResponse{status: SERVING} is 08 01.
    it('grpc.health.v1.Health/Check on the API answers SERVING', async () => {
      const res = await stack.caller.unary(HEALTH_CHECK, Buffer.alloc(0), new Metadata());
      expect([...res.response]).to.deep.equal([0x08, 0x01]);
    });

    it('Health/Check naming an agent is a ping through the tunnel: the agent answers, or UNAVAILABLE', async () => {
      // The site's upstream serves no health service: SERVING here comes from the agent itself.
      const res = await stack.caller.unary(HEALTH_CHECK, Buffer.alloc(0), stack.md());
      expect([...res.response]).to.deep.equal([0x08, 0x01]);
      const md = new Metadata();
      md.set('burrow-agent-id', 'nowhere');
      const err = await stack.caller.unary(HEALTH_CHECK, Buffer.alloc(0), md, { deadline: Date.now() + 5_000 }).then(
        () => undefined,
        (e: ServiceError) => e,
      );
      expect(err?.code, err?.details).to.be.oneOf([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED]);
    });

    it('grpc.health.v1.Health/Watch on the API streams SERVING first', async () => {
      const call = stack.caller.bidi('/grpc.health.v1.Health/Watch', new Metadata());
      const first = new Promise<Buffer>((resolve, reject) => {
        call.once('data', resolve);
        call.on('error', (e: ServiceError) => {
          if (e.code !== Status.CANCELLED) reject(e);
        });
      });
      call.write(Buffer.alloc(0));
      call.end();
      try {
        expect([...(await first)]).to.deep.equal([0x08, 0x01]);
      } finally {
        call.cancel();
      }
    });

    it('a call to an unknown method naming no agent gets INVALID_ARGUMENT', async () => {
      const err = await stack.caller.unary('/no.such.Service/Method', Buffer.from('x'), new Metadata()).then(
        () => {
          throw new Error('call succeeded');
        },
        (e: ServiceError) => e,
      );
      expect(err.code, err.details).to.equal(Status.INVALID_ARGUMENT);
      expect(err.details).to.include('burrow-agent-id');
    });
  });

  describe('readiness while stopping', () => {
    let stack: Stack;
    before(async () => {
      stack = await Stack.start();
    });
    after(async () => {
      await stack?.stop();
    });

    it('/readyz turns 503 as soon as broker.stop() begins (a call in flight keeps the drain open)', async () => {
      const arrived = new Promise((resolve) => stack.siteUpstream.once('call', resolve));
      const call = stack.caller.bidi(ECHO.hang, stack.md());
      const done = collect(call);
      call.write(Buffer.from('hold'));
      await arrived;
      expect((await httpGet(`${stack.adminUrl}/readyz`)).status).to.equal(200);

      const stopping = stack.broker.stop();
      expect((await httpGet(`${stack.adminUrl}/readyz`)).status).to.equal(503);
      expect((await httpGet(`${stack.adminUrl}/healthz`)).status, 'alive while draining').to.equal(200);

      call.cancel();
      expect((await done).status.code).to.equal(Status.CANCELLED);
      await stopping;
    });
  });

  describe('logs', () => {
    let stack: Stack;
    let broker: Broker | undefined;
    let agent: Agent | undefined;
    let client: RawClient | undefined;
    let expiredClient: RawClient | undefined;
    const brokerLog = new CapturedLog('broker');
    const agentLog = new CapturedLog('agent');

    before(async () => {
      stack = await Stack.start({ startAgent: false });
      broker = new Broker({ ...stack.brokerConfig, brokerId: 'broker-logs' }, brokerLog.logger);
      const ports = await broker.start();
      agent = new Agent(
        {
          ...AGENT_DEFAULTS,
          brokers: [`127.0.0.1:${ports.agentPort}`],
          tlsCertFile: stack.agentCert.cert,
          tlsKeyFile: stack.agentCert.key,
          caFile: stack.agentCert.ca,
          upstreams: [{ service: '*', address: stack.siteUpstream.address }],
          reconnectBaseMs: 50,
          reconnectMaxMs: 500,
          drainTimeoutMs: 5_000,
        },
        agentLog.logger,
      );
      await agent.start();
      await agent.waitConnected();
      client = new RawClient(`127.0.0.1:${ports.apiPort}`, mtlsCredentials(stack.serviceCert));
    });
    after(async () => {
      client?.close();
      expiredClient?.close();
      await agent?.stop();
      await broker?.stop();
      await stack?.stop();
    });

    it('the log is JSON lines: "broker started" names its ports and "agent connected" its agent', async () => {
      const started = await brokerLog.waitFor((l) => l.message === 'broker started');
      expect(started).to.include({ level: 'info', component: 'broker', brokerId: 'broker-logs' });
      expect(started.agentPort).to.be.a('number');
      expect(started.timestamp).to.be.a('string');
      const connected = await brokerLog.waitFor((l) => l.message === 'agent connected');
      expect(connected).to.include({ agentId: 'site-a', protocolVersion: PROTOCOL_VERSION });
    });

    it(
      'a successful call logs "call finished" with agentId, ' + 'callId, method, status and durationMs on both sides',
      async () => {
        const md = new Metadata();
        md.set('burrow-agent-id', 'site-a');
        await client!.unary(ECHO.unary, Buffer.from('logged'), md);
        const line = await brokerLog.waitFor((l) => l.message === 'call finished' && l.method === ECHO.unary);
        expect(line).to.include({
          level: 'debug',
          direction: 'to_agent',
          agentId: 'site-a',
          method: ECHO.unary,
          status: 'OK',
        });
        expect(line.callId).to.be.a('string').and.not.equal('');
        expect(line.durationMs).to.be.a('number').and.at.least(0);
        // The agent logs the same call under the same id, so one grep finds both halves.
        const agentLine = await agentLog.waitFor((l) => l.message === 'call finished' && l.callId === line.callId);
        expect(agentLine).to.include({ direction: 'from_broker', method: ECHO.unary, status: 'OK' });
        expect(agentLine.durationMs).to.be.a('number');
      },
    );

    it('a failed call logs "call finished" at info with its status and details', async () => {
      const md = new Metadata();
      md.set('burrow-agent-id', 'site-a');
      await client!
        .unary(ECHO.status, Buffer.from(JSON.stringify({ code: Status.NOT_FOUND, message: 'no such thing' })), md)
        .catch(() => {});
      const line = await brokerLog.waitFor((l) => l.message === 'call finished' && l.method === ECHO.status);
      expect(line).to.include({ level: 'info', agentId: 'site-a', status: 'NOT_FOUND', details: 'no such thing' });
      expect(line.callId).to.be.a('string');
      expect(line.durationMs).to.be.a('number');
    });

    it(
      'a refused TLS handshake is logged with the certificate problem (expired), ' + 'not a bare socket error',
      async () => {
        const expired = await stack.pki.issue('service', 'expired-svc', { ttlMs: 1 });
        const notAfter = Date.parse(new X509Certificate(readFileSync(expired.cert)).validTo);
        if (Date.now() <= notAfter) await new Promise((resolve) => setTimeout(resolve, notAfter - Date.now() + 1));
        const started = await brokerLog.waitFor((l) => l.message === 'broker started');
        const apiAddress = `127.0.0.1:${started.apiPort as number}`;
        expiredClient = new RawClient(apiAddress, mtlsCredentials(expired));
        const md = new Metadata();
        md.set('burrow-agent-id', 'site-a');
        await expiredClient.unary(ECHO.unary, Buffer.from('x'), md, { deadline: Date.now() + 5_000 }).catch(() => {});
        const line = await brokerLog.waitFor((l) => l.message === 'TLS handshake refused');
        expect(line).to.include({ level: 'warn', listener: 'api' });
        expect(String(line.error)).to.match(/EXPIRED/i);
      },
    );
  });
});
