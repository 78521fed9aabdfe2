import { readFileSync } from 'node:fs';
import * as http2 from 'node:http2';
import * as tls from 'node:tls';
import { expect } from 'chai';
import { status as Status, type ServiceError } from '@grpc/grpc-js';
import type { Broker } from '@burrow/broker';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  GRPC_CONTENT_TYPE,
  TUNNEL_ALPN,
  encodeSessionFrame,
  frameMessage,
  statusOfHeaders,
  type SessionFrame,
} from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { RawAgent, type RawControl } from './helpers/raw-agent';
import { answerEcho, expectRefused, firstAnswer } from './helpers/raw-call';
import { collect } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';
import { pollUntil } from './helpers/wait';

/**
 * Component tests of the broker's side of tunnel.proto (version 4) against a hand-written agent
 * (RawAgent) that sends exactly the session frames and call-stream answers each test chooses, on
 * real sockets with real mTLS. A protocol error must end the agent's whole session (Refused
 * INTERNAL, connection closed) and nothing else; a stream error must end one call and leave the
 * tunnel carrying the next.
 */

/** Ends the agent's side of the control stream, as an agent does once it has read Refused. */
const endControl = (control: RawControl): void => {
  if (!control.stream.writableEnded) control.stream.end();
};

/** `promise`, or a rejection naming `what` if it has not settled within `ms`. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function counterValue(counter: Broker['metrics']['protocolErrors']): Promise<number> {
  return (await counter.get()).values.reduce((n, v) => n + v.value, 0);
}

/** The sessions the broker's agent listener holds (leak checks). */
const sessionCount = (broker: Broker): number => broker.agentSessions.sessionCount;

/** The error a call failed with; fails the test if it succeeded. */
const failure = (call: Promise<unknown>): Promise<ServiceError> =>
  call.then(
    () => {
      throw new Error('the call succeeded');
    },
    (e: ServiceError) => e,
  );

/** The next call stream the broker opens on `agent`, handed to `answer`. */
const nextCall = (
  agent: RawAgent,
  answer: (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => void,
): Promise<{ stream: http2.ServerHttp2Stream; headers: http2.IncomingHttpHeaders }> =>
  new Promise((resolve) =>
    agent.onCall((stream, headers) => {
      answer(stream, headers);
      resolve({ stream, headers });
    }),
  );

/** A 5-byte gRPC message prefix announcing `length` bytes (uncompressed). */
const prefix = (length: number): Buffer => {
  const b = Buffer.alloc(5);
  b.writeUInt32BE(length, 1);
  return b;
};

/** One HTTP/2 frame as bytes (RFC 9113 section 4.1). */
const h2Frame = (type: number, flags: number, streamId: number, payload: Buffer): Buffer => {
  const header = Buffer.alloc(9);
  header.writeUIntBE(payload.length, 0, 3);
  header.writeUInt8(type, 3);
  header.writeUInt8(flags, 4);
  header.writeUInt32BE(streamId, 5);
  return Buffer.concat([header, payload]);
};

/**
 * An agent that speaks HTTP/2 by hand (server side, RFC 9113) just far enough to say Hello on the
 * control stream: SETTINGS, SETTINGS and PING acknowledgements, the control stream's response
 * headers and one DATA frame with Hello. Whatever else the broker sends is ignored. The test then
 * writes the frames node:http2 would never send.
 */
class HandMadeAgent {
  readonly closed: Promise<void>;
  private buffered = Buffer.alloc(0);
  private prefaceSeen = false;

  private constructor(readonly socket: tls.TLSSocket) {
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.write(h2Frame(0x4, 0, 0, Buffer.alloc(0)));
  }

  static connect(address: string, cert: CertFiles): Promise<HandMadeAgent> {
    const i = address.lastIndexOf(':');
    return new Promise((resolve, reject) => {
      const socket = tls.connect({
        host: address.slice(0, i),
        port: Number(address.slice(i + 1)),
        ca: readFileSync(cert.ca),
        cert: readFileSync(cert.cert),
        key: readFileSync(cert.key),
        ALPNProtocols: [TUNNEL_ALPN],
        checkServerIdentity: () => undefined,
      });
      socket.once('error', reject);
      socket.once('secureConnect', () => {
        socket.off('error', reject);
        resolve(new HandMadeAgent(socket));
      });
    });
  }

  private receive(chunk: Buffer): void {
    this.buffered = Buffer.concat([this.buffered, chunk]);
    if (!this.prefaceSeen) {
      if (this.buffered.length < 24) return;
      this.prefaceSeen = true;
      this.buffered = this.buffered.subarray(24);
    }
    while (this.buffered.length >= 9) {
      const length = this.buffered.readUIntBE(0, 3);
      if (this.buffered.length < 9 + length) return;
      const type = this.buffered[3]!;
      const flags = this.buffered[4]!;
      const streamId = this.buffered.readUInt32BE(5) & 0x7fffffff;
      const payload = this.buffered.subarray(9, 9 + length);
      this.buffered = this.buffered.subarray(9 + length);
      if (type === 0x4 && !(flags & 0x1)) this.socket.write(h2Frame(0x4, 0x1, 0, Buffer.alloc(0)));
      else if (type === 0x6 && !(flags & 0x1)) this.socket.write(h2Frame(0x6, 0x1, 0, payload));
      else if (type === 0x1 && streamId === 1) this.answerControl();
    }
  }

  /** Response headers of the control stream (:status 200, content-type application/grpc), then Hello. */
  private answerControl(): void {
    const contentType = Buffer.from(GRPC_CONTENT_TYPE);
    // 0x88: indexed :status 200; 0x0f 0x10: literal without indexing, static name 31 (content-type).
    const block = Buffer.concat([Buffer.from([0x88, 0x0f, 0x10, contentType.length]), contentType]);
    this.socket.write(h2Frame(0x1, 0x4, 1, block));
    const hello = encodeSessionFrame({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'hand-made' } });
    this.socket.write(h2Frame(0x0, 0, 1, frameMessage(hello)));
  }
}

describe('protocol peer: a raw agent against a real broker (protocol version 4)', function () {
  this.timeout(30_000);
  let stack: Stack;
  let siteB: CertFiles;
  let otherPki: PkiFixture;
  let foreignAgent: CertFiles;
  const agents: RawAgent[] = [];
  let protocolErrorsBefore = 0;

  const protocolErrorsInThisTest = async (): Promise<number> =>
    (await counterValue(stack.broker.metrics.protocolErrors)) - protocolErrorsBefore;

  /** A raw agent whose TLS is up; its control stream is the broker's first stream. */
  const rawAgent = async (cert: CertFiles = stack.agentCert): Promise<{ agent: RawAgent; control: RawControl }> => {
    const agent = await RawAgent.connect(stack.agentAddress, cert);
    agents.push(agent);
    return { agent, control: await agent.control() };
  };

  /** A raw agent whose session was welcomed and registered. */
  const connected = async (
    cert: CertFiles = stack.agentCert,
  ): Promise<{ agent: RawAgent; control: RawControl; sessionId: string }> => {
    const agent = await RawAgent.connect(stack.agentAddress, cert);
    agents.push(agent);
    const { control, welcome } = await agent.welcome();
    return { agent, control, sessionId: welcome.sessionId };
  };

  /** A call to `agentId` through the caller API, with a 5 s deadline. */
  const call = (payload: string, agentId = 'site-a', extra: Record<string, string | Buffer> = {}) =>
    stack.caller.unary(ECHO.unary, Buffer.from(payload), stack.md(extra, agentId), { deadline: Date.now() + 5_000 });

  /** The tunnel of `agent` still carries a call: answered by echo, the caller gets its bytes back. */
  const stillServes = async (agent: RawAgent, agentId = 'site-a'): Promise<void> => {
    const answered = nextCall(agent, (s, h) => void answerEcho(s, h));
    const res = await call(`still ${agentId}`, agentId);
    expect(res.response.toString()).to.equal(`still ${agentId}`);
    await answered;
  };

  /**
   * What a protocol error must do: Refused INTERNAL naming it, the connection closed, the session
   * (if any) forgotten, one protocol error counted.
   */
  const expectProtocolError = async (
    agent: RawAgent,
    control: RawControl,
    details: RegExp | string,
    opts: { agentEndsControl?: boolean } = {},
  ) => {
    const refused = await expectRefused(control);
    expect(refused.code, refused.message).to.equal(Status.INTERNAL);
    expect(refused.message).to.contain('tunnel protocol error');
    if (typeof details === 'string') expect(refused.message).to.contain(details);
    else expect(refused.message).to.match(details);
    // An agent told Refused ends its side as a real one does; one that does not is cut by the
    // broker after its grace period (2 s), which one case below shows.
    if (opts.agentEndsControl !== false) endControl(control);
    await within(agent.closed, 3_000, 'close of the connection');
    expect(await protocolErrorsInThisTest(), 'protocolErrors').to.equal(1);
    await pollUntil('the session to be forgotten', () => stack.broker.registry.sessionsOf('site-a').length === 0);
  };

  before(async () => {
    stack = await Stack.start({ startAgent: false });
    siteB = await stack.pki.issue('agent', 'site-b');
    otherPki = await PkiFixture.create();
    foreignAgent = await otherPki.issue('agent', 'site-a');
  });
  after(async () => {
    otherPki?.cleanup();
    await stack?.stop();
  });

  beforeEach(async () => {
    protocolErrorsBefore = await counterValue(stack.broker.metrics.protocolErrors);
  });

  afterEach(async () => {
    for (const a of agents.splice(0)) a.close();
    // Leak check: every session, call, waiter and agent entry is gone once the agents are.
    await pollUntil(
      `an empty registry (now ${JSON.stringify(stack.broker.registry.counts())}, listener ` +
        `sessions ${sessionCount(stack.broker)})`,
      () => {
        const c = stack.broker.registry.counts();
        return (
          c.agents === 0 &&
          c.sessions === 0 &&
          c.activeCalls === 0 &&
          c.waiters === 0 &&
          stack.broker.registry.entryCount === 0 &&
          sessionCount(stack.broker) === 0
        );
      },
      3_000,
    );
  });

  describe('(a) version negotiation', () => {
    it(
      'a newer agent ([4, 5, 99]) gets Welcome with version 4 and is registered; ' +
        'ending its control stream ends it',
      async () => {
        const { agent, control } = await rawAgent();
        control.send({ kind: 'hello', hello: { protocolVersions: [4, 5, 99], agentVersion: 'raw-agent/5.0' } });
        const welcome = await control.welcome();
        expect(welcome.protocolVersion).to.equal(4);
        expect(welcome.sessionId).to.be.a('string').and.not.equal('');
        expect(welcome.brokerId).to.equal('broker-test');
        expect(welcome.maxMessageBytes).to.equal(DEFAULT_MAX_MESSAGE_BYTES);
        expect(stack.broker.registry.counts()).to.deep.include({ agents: 1, sessions: 1 });
        const [summary] = stack.broker.registry.summaries();
        expect(summary!.id).to.equal('site-a');
        expect(summary!.sessions[0]).to.deep.include({
          id: welcome.sessionId,
          protocolVersion: 4,
          agentVersion: 'raw-agent/5.0',
        });
        // The agent ending its side of the control stream ends the session, with no protocol error.
        control.stream.end();
        await within(agent.closed, 3_000, 'close of the connection');
        await pollUntil('the session to be forgotten', () => stack.broker.registry.counts().sessions === 0);
        expect(await protocolErrorsInThisTest()).to.equal(0);
      },
    );

    it('an agent with no common version ([99]) gets Refused FAILED_PRECONDITION naming both lists', async () => {
      const { agent, control } = await rawAgent();
      control.send({ kind: 'hello', hello: { protocolVersions: [99], agentVersion: 'raw' } });
      const refused = await expectRefused(control);
      expect(refused.code).to.equal(Status.FAILED_PRECONDITION);
      expect(refused.message).to.contain('[99]');
      expect(refused.message).to.contain('[4]');
      endControl(control);
      await within(agent.closed, 3_000, 'close of the connection');
      expect(stack.broker.registry.counts().sessions).to.equal(0);
    });

    it('a service certificate may not open a session: Refused PERMISSION_DENIED naming the role', async () => {
      const { agent, control } = await rawAgent(stack.serviceCert);
      control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw' } });
      const refused = await expectRefused(control);
      expect(refused.code).to.equal(Status.PERMISSION_DENIED);
      expect(refused.message).to.contain('agent certificate is required');
      endControl(control);
      await within(agent.closed, 3_000, 'close of the connection');
      expect(stack.broker.registry.counts().sessions).to.equal(0);
    });
  });

  describe('(b) a broken control stream before Hello', () => {
    const frame = (f: SessionFrame) => (c: RawControl) => c.send(f);
    const cases: [string, (c: RawControl) => void, RegExp | string][] = [
      ['a Drain frame', frame({ kind: 'drain', reason: 'x' }), 'session opened with drain, not hello'],
      [
        'a Welcome frame (sent by the agent)',
        frame({ kind: 'welcome', welcome: { protocolVersion: 4, sessionId: 'x', maxMessageBytes: 1, brokerId: 'b' } }),
        'session opened with welcome, not hello',
      ],
      [
        'a Refused frame (sent by the agent)',
        frame({ kind: 'refused', code: Status.INTERNAL, message: 'no' }),
        'session opened with refused, not hello',
      ],
      [
        'a Brokers frame (sent by the agent)',
        frame({ kind: 'brokers', brokers: [] }),
        'session opened with brokers, not hello',
      ],
      ['undecodable bytes', (c) => c.sendRaw(frameMessage(Buffer.from([0x0a, 0x7f, 0x01, 0x02]))), 'undecodable'],
      ['an empty frame (no kind)', (c) => c.sendRaw(frameMessage(Buffer.alloc(0))), 'session frame with no kind'],
      ['a frame over 64 KiB (its length prefix alone)', (c) => c.sendRaw(prefix(64 * 1024 + 1)), /65537 bytes/],
    ];
    for (const [name, send, details] of cases) {
      it(`${name}: Refused INTERNAL, the connection closed, one protocol error, nothing registered`, async () => {
        const other = await connected(siteB);
        const { agent, control } = await rawAgent();
        send(control);
        await expectProtocolError(agent, control, details);
        expect(stack.broker.registry.sessionsOf('site-a')).to.have.length(0);
        await stillServes(other.agent, 'site-b');
      });
    }
  });

  describe('(c) a broken control stream after Welcome', () => {
    const cases: [string, (c: RawControl) => void, string][] = [
      [
        'Hello twice',
        (c) => c.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw' } }),
        'hello frame from an agent after hello',
      ],
      [
        'a Welcome frame sent by the agent',
        (c) =>
          c.send({
            kind: 'welcome',
            welcome: { protocolVersion: 4, sessionId: 'x', maxMessageBytes: 1, brokerId: 'b' },
          }),
        'welcome frame from an agent after hello',
      ],
      [
        'a Refused frame sent by the agent',
        (c) => c.send({ kind: 'refused', code: Status.INTERNAL, message: 'no' }),
        'refused frame from an agent after hello',
      ],
      [
        'a TrustBundle frame sent by the agent',
        (c) => c.send({ kind: 'trustBundle', pem: 'x', version: 1 }),
        'trustBundle frame from an agent after hello',
      ],
      ['undecodable bytes', (c) => c.sendRaw(frameMessage(Buffer.from([0x0a, 0x7f, 0x01, 0x02]))), 'undecodable'],
      ['an empty frame (no kind)', (c) => c.sendRaw(frameMessage(Buffer.alloc(0))), 'session frame with no kind'],
    ];
    for (const [name, send, details] of cases) {
      it(`${name}: the session is closed with Refused INTERNAL; another agent's session is untouched`, async () => {
        const other = await connected(siteB);
        const { agent, control } = await connected();
        expect(stack.broker.registry.counts().sessions).to.equal(2);
        send(control);
        await expectProtocolError(agent, control, details);
        expect(stack.broker.registry.sessionsOf('site-b')).to.have.length(1);
        await stillServes(other.agent, 'site-b');
      });
    }

    it('Hello twice from an agent that then keeps its side open: the broker cuts the connection itself', async () => {
      const { agent, control } = await connected();
      control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw' } });
      await expectProtocolError(agent, control, 'after hello', { agentEndsControl: false });
    });

    it('Credentials that do not verify (another CA) are a protocol error', async () => {
      const other = await connected(siteB);
      const { agent, control } = await connected();
      control.send({ kind: 'credentials', certificateChainPem: readFileSync(foreignAgent.cert, 'utf8') });
      await expectProtocolError(agent, control, 'renewed certificate refused');
      await stillServes(other.agent, 'site-b');
    });

    it('Credentials that are not a certificate at all are a protocol error', async () => {
      const { agent, control } = await connected();
      control.send({ kind: 'credentials', certificateChainPem: 'not a certificate' });
      await expectProtocolError(agent, control, 'renewed certificate refused');
    });

    it(
      "Credentials naming another agent (site-b's valid chain) are a protocol error; " + 'site-b is untouched',
      async () => {
        const other = await connected(siteB);
        const { agent, control } = await connected();
        control.send({ kind: 'credentials', certificateChainPem: readFileSync(siteB.cert, 'utf8') });
        await expectProtocolError(agent, control, /names spiffe:\/\/[^ ]+\/agent\/site-b/);
        expect(stack.broker.registry.sessionsOf('site-b')).to.have.length(1);
        await stillServes(other.agent, 'site-b');
      },
    );

    it("Credentials with the same agent's renewed certificate are taken, and the session carries calls", async () => {
      const { agent, control } = await connected();
      const renewed = await stack.pki.issue('agent', 'site-a');
      control.send({ kind: 'credentials', certificateChainPem: readFileSync(renewed.cert, 'utf8') });
      await stillServes(agent);
      expect(await protocolErrorsInThisTest()).to.equal(0);
      expect(stack.broker.registry.sessionsOf('site-a')).to.have.length(1);
    });
  });

  describe('(d) call streams: what the broker sends the agent', () => {
    it(
      'the crossing rules: no authorization, no burrow-* of the caller; one burrow-caller-id (the verified id), ' +
        'a burrow-call-id, the deadline re-based',
      async () => {
        const { agent } = await connected();
        const answered = nextCall(agent, (s, h) => void answerEcho(s, h));
        const sentAt = Date.now();
        const res = await stack.caller.unary(
          ECHO.unary,
          Buffer.from('ping'),
          stack.md({
            authorization: 'Bearer caller-secret',
            'burrow-foo': 'spoofed',
            'burrow-caller-id': 'spiffe://burrow.local/service/someone-else',
            'burrow-call-id': 'spoofed-call-id',
            'x-foo': 'bar',
            'x-blob-bin': Buffer.from([0, 255, 1]),
          }),
          { deadline: sentAt + 5_000 },
        );
        expect(res.response.toString()).to.equal('ping');
        const { headers } = await answered;
        expect(headers[':path']).to.equal(ECHO.unary);
        const keys = Object.keys(headers);
        expect(keys).to.not.include('authorization');
        expect(keys.filter((k) => k.startsWith('burrow-')).sort()).to.deep.equal([
          'burrow-call-id',
          'burrow-caller-id',
        ]);
        // Node joins repeated fields with ", ": one value that is exactly the id means one field.
        expect(headers['burrow-caller-id']).to.equal(`spiffe://${stack.pki.trustDomain}/service/platform-svc`);
        expect(headers['burrow-call-id']).to.be.a('string').and.not.equal('').and.not.equal('spoofed-call-id');
        expect(keys.filter((k) => k === 'user-agent' || k.startsWith('grpc-')).sort()).to.deep.equal(
          keys.filter((k) => ['grpc-timeout', 'grpc-accept-encoding', 'grpc-encoding'].includes(k)).sort(),
        );
        expect(headers['x-foo']).to.equal('bar');
        expect(Buffer.from(String(headers['x-blob-bin']), 'base64').toString('hex')).to.equal('00ff01');
        // The broker re-based the deadline when it opened the stream: a little under 5 s, never more.
        const timeout = String(headers['grpc-timeout']);
        const m = /^(\d+)([HMSmun])$/.exec(timeout);
        expect(m, `grpc-timeout "${timeout}"`).to.not.equal(null);
        const unitMs = { H: 3_600_000, M: 60_000, S: 1_000, m: 1, u: 1e-3, n: 1e-6 }[m![2] as 'H'];
        const timeoutMs = Number(m![1]) * unitMs;
        expect(timeoutMs).to.be.at.most(5_000);
        expect(timeoutMs).to.be.greaterThan(5_000 - (Date.now() - sentAt) - 50);
      },
    );

    it("a site call's spoofed burrow-agent-id is replaced by the agent's verified id", async () => {
      const session = http2.connect(`https://${stack.agentAddress}`, {
        ca: readFileSync(stack.agentCert.ca),
        cert: readFileSync(stack.agentCert.cert),
        key: readFileSync(stack.agentCert.key),
        ALPNProtocols: ['h2'],
        checkServerIdentity: () => undefined,
      } as http2.SecureClientSessionOptions);
      session.on('error', () => {});
      try {
        const { status, body } = await new Promise<{ status: ReturnType<typeof statusOfHeaders>; body: Buffer }>(
          (resolve, reject) => {
            const stream = session.request({
              ':method': 'POST',
              ':path': ECHO.unary,
              'content-type': GRPC_CONTENT_TYPE,
              te: 'trailers',
              'grpc-timeout': '5S',
              'burrow-agent-id': ['spoofed', 'site-b'],
            });
            let st: ReturnType<typeof statusOfHeaders>;
            const chunks: Buffer[] = [];
            stream.on('response', (h) => (st ??= statusOfHeaders(h)));
            stream.on('trailers', (h) => (st ??= statusOfHeaders(h)));
            stream.on('data', (c: Buffer) => chunks.push(c));
            stream.on('error', reject);
            stream.on('close', () => resolve({ status: st, body: Buffer.concat(chunks) }));
            stream.end(frameMessage(Buffer.from('up')));
          },
        );
        expect(status?.code, status?.details).to.equal(Status.OK);
        expect(body.subarray(5).toString()).to.equal('up');
        const seen = stack.platformUpstream.calls[stack.platformUpstream.calls.length - 1]!;
        expect(seen.metadata.get('burrow-agent-id')).to.deep.equal(['site-a']);
      } finally {
        session.destroy();
      }
    });
  });

  describe('(e) call streams: stream errors fail one call and leave the tunnel carrying the next', () => {
    /** Runs one call the agent answers with `answer`; returns its error once the stream is closed on both sides. */
    const failedCall = async (
      agent: RawAgent,
      answer: (stream: http2.ServerHttp2Stream) => void,
    ): Promise<{ err: ServiceError; stream: http2.ServerHttp2Stream }> => {
      const answered = nextCall(agent, (s) => answer(s));
      const err = await failure(call('x'));
      const { stream } = await answered;
      if (!stream.closed) await new Promise((r) => stream.once('close', r));
      return { err, stream };
    };

    const grpcHeaders = { ':status': 200, 'content-type': GRPC_CONTENT_TYPE };
    const badStatus: [string, (s: http2.ServerHttp2Stream) => void, number, RegExp][] = [
      [
        'trailers-only with grpc-status "abc"',
        (s) => s.respond({ ...grpcHeaders, 'grpc-status': 'abc' }, { endStream: true }),
        Status.UNKNOWN,
        /invalid grpc-status "abc"/,
      ],
      [
        'a message, then trailers with grpc-status "17"',
        (s) => {
          s.respond(grpcHeaders, { waitForTrailers: true });
          s.on('wantTrailers', () => s.sendTrailers({ 'grpc-status': '17' }));
          s.end(frameMessage(Buffer.from('m')));
        },
        Status.UNKNOWN,
        /invalid grpc-status "17"/,
      ],
      [
        'trailers with no grpc-status',
        (s) => {
          s.respond(grpcHeaders, { waitForTrailers: true });
          s.on('wantTrailers', () => s.sendTrailers({ 'x-other': '1' }));
          s.end();
        },
        Status.INTERNAL,
        /without a status/,
      ],
      [
        'HTTP 503 without a gRPC status',
        (s) => s.respond({ ':status': 503 }, { endStream: true }),
        Status.UNAVAILABLE,
        /HTTP 503/,
      ],
    ];
    for (const [name, answer, code, details] of badStatus) {
      it(`an agent answering with ${name}: the caller gets ${Status[code]}`, async () => {
        const { agent, sessionId } = await connected();
        const { err } = await failedCall(agent, answer);
        expect(err.code, err.details).to.equal(code);
        expect(err.details).to.match(details);
        await stillServes(agent);
        expect(stack.broker.registry.sessionsOf('site-a').map((s) => s.id)).to.deep.equal([sessionId]);
        expect(await protocolErrorsInThisTest()).to.equal(0);
      });
    }

    const { NGHTTP2_CANCEL, NGHTTP2_INTERNAL_ERROR, NGHTTP2_REFUSED_STREAM } = http2.constants;
    const resets: [string, number, number][] = [
      ['CANCEL', NGHTTP2_CANCEL, Status.CANCELLED],
      ['INTERNAL_ERROR', NGHTTP2_INTERNAL_ERROR, Status.INTERNAL],
      ['REFUSED_STREAM', NGHTTP2_REFUSED_STREAM, Status.UNAVAILABLE],
    ];
    for (const [name, rst, code] of resets) {
      it(`RST_STREAM ${name} before the response: the caller gets ${Status[code]}`, async () => {
        const { agent, sessionId } = await connected();
        const { err } = await failedCall(agent, (s) => s.close(rst));
        expect(err.code, err.details).to.equal(code);
        await stillServes(agent);
        expect(stack.broker.registry.sessionsOf('site-a').map((s) => s.id)).to.deep.equal([sessionId]);
        expect(await protocolErrorsInThisTest()).to.equal(0);
      });
    }

    // A bidi call whose request is still open: node:http2's server turns close(code) on a stream the
    // client has half-closed into END_STREAM (the RST behind it is then ignored), so a unary call
    // cannot show a reset after the response from a node agent.
    for (const [name, rst, code] of resets.slice(0, 2)) {
      it(`RST_STREAM ${name} after the response headers and a message: the caller gets ${Status[code]}`, async () => {
        const { agent, sessionId } = await connected();
        const answered = nextCall(agent, (s) => {
          s.respond(grpcHeaders);
          s.write(frameMessage(Buffer.from('partial')), () => s.close(rst));
        });
        const bidi = stack.caller.bidi(ECHO.bidi, stack.md(), { deadline: Date.now() + 5_000 });
        const result = collect(bidi);
        bidi.write(Buffer.from('open'));
        const r = await result;
        expect(r.status.code, r.status.details).to.equal(code);
        expect(Buffer.concat(r.messages).toString()).to.equal('partial');
        const { stream } = await answered;
        expect(stream.rstCode).to.equal(rst);
        await stillServes(agent);
        expect(stack.broker.registry.sessionsOf('site-a').map((s) => s.id)).to.deep.equal([sessionId]);
        expect(await protocolErrorsInThisTest()).to.equal(0);
      });
    }

    it(
      'a response message over the limit: RESOURCE_EXHAUSTED from its length prefix, ' + 'the agent stream reset',
      async () => {
        const { agent, sessionId } = await connected();
        const { err, stream } = await failedCall(agent, (s) => {
          s.respond(grpcHeaders);
          // Only the prefix: the broker must decide from it, without waiting for the 16 MiB body.
          s.write(prefix(DEFAULT_MAX_MESSAGE_BYTES + 1));
        });
        expect(err.code, err.details).to.equal(Status.RESOURCE_EXHAUSTED);
        expect(err.details).to.contain(String(DEFAULT_MAX_MESSAGE_BYTES + 1));
        expect(stream.rstCode, 'the reset the agent got').to.equal(NGHTTP2_CANCEL);
        await stillServes(agent);
        expect(stack.broker.registry.sessionsOf('site-a').map((s) => s.id)).to.deep.equal([sessionId]);
        expect(await protocolErrorsInThisTest()).to.equal(0);
      },
    );
  });

  describe('(f) the agent, as the HTTP/2 server, tries to start a stream of its own', () => {
    // node:http2 sends neither frame (push is disabled by the broker's SETTINGS, and a server does
    // not open requests), and bytes written under its session on the same socket crash the
    // process (an assertion in node_http2.cc), so this agent speaks HTTP/2 by hand.
    /** Header block of static-table entries only (no HPACK state): :method GET, :scheme https, :path /. */
    const REQUEST_BLOCK = Buffer.from([0x82, 0x87, 0x84]);
    const cases: [string, Buffer][] = [
      [
        'PUSH_PROMISE on the control stream',
        h2Frame(0x5, 0x4, 1, Buffer.concat([Buffer.from([0, 0, 0, 2]), REQUEST_BLOCK])),
      ],
      ['HEADERS opening stream 2 (a server-initiated request)', h2Frame(0x1, 0x4 | 0x1, 2, REQUEST_BLOCK)],
      ["HEADERS opening stream 3 (in the broker's own stream ids)", h2Frame(0x1, 0x4 | 0x1, 3, REQUEST_BLOCK)],
    ];
    for (const [name, rogue] of cases) {
      it(`${name}: the broker closes that tunnel and nothing else, and keeps working`, async () => {
        const other = await connected(siteB);
        const agent = await HandMadeAgent.connect(stack.agentAddress, stack.agentCert);
        try {
          await pollUntil('the session to be welcomed', () => stack.broker.registry.sessionsOf('site-a').length === 1);
          agent.socket.write(rogue);
          await within(agent.closed, 5_000, 'close of the connection');
        } finally {
          agent.socket.destroy();
        }
        await pollUntil('the session to be forgotten', () => stack.broker.registry.sessionsOf('site-a').length === 0);
        expect(await protocolErrorsInThisTest(), 'protocolErrors').to.equal(1);
        await stillServes(other.agent, 'site-b');
        // The broker still takes new tunnels of the same agent.
        const again = await connected();
        await stillServes(again.agent);
      });
    }
  });

  describe('(g) a tunnel that never sends Hello', () => {
    let capped: Stack;
    before(async () => {
      capped = await Stack.start({ startAgent: false, broker: { maxSessionsPerAgent: 1 } });
    });
    after(async () => {
      await capped?.stop();
    });

    it('is not registered, and its going away frees its place under --max-sessions-per-agent', async () => {
      const silent = await RawAgent.connect(capped.agentAddress, capped.agentCert);
      try {
        await silent.control();
        expect(capped.broker.registry.counts()).to.deep.include({ agents: 0, sessions: 0 });
        // While it waits for Hello it holds the agent's one place.
        const second = await RawAgent.connect(capped.agentAddress, capped.agentCert);
        try {
          const control = await second.control();
          control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw' } });
          expect((await expectRefused(control)).code).to.equal(Status.RESOURCE_EXHAUSTED);
        } finally {
          second.close();
        }
      } finally {
        silent.close();
      }
      await silent.closed;
      expect(await counterValue(capped.broker.metrics.protocolErrors)).to.equal(0);
      // Its place is free again: the next tunnel is welcomed (the broker may see the close a moment late).
      await pollUntil('a tunnel to be welcomed', async () => {
        const next = await RawAgent.connect(capped.agentAddress, capped.agentCert);
        try {
          const control = await next.control();
          control.send({ kind: 'hello', hello: { protocolVersions: [4], agentVersion: 'raw' } });
          return (await firstAnswer(control)).kind === 'welcome';
        } finally {
          next.close();
        }
      });
      await pollUntil('no session', () => capped.broker.registry.counts().sessions === 0);
    });
  });
});
