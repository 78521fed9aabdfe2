import { once } from 'node:events';
import * as http2 from 'node:http2';
import { expect } from 'chai';
import { Metadata, type ServiceError, type StatusObject, status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  type CallCutter,
  type CallOutcome,
  deadlineFromTimeout,
  endWithStatus,
  frameMessage,
  nextHopHeaders,
  openStream,
  relayCall,
  statusTrailers,
} from '@burrow/tunnel';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { closeSession, connectH2, type LoopbackServer, listenH2, readReply } from './helpers/h2';
import { expectNoLeaks, type ResourceSnapshot, snapshotResources } from './helpers/leaks';
import { collect, RawClient } from './helpers/raw-grpc';

const MAX = 64 * 1024;
const CALLER_ID = 'spiffe://test/caller';

/** One call as the relay carried it. */
interface RelayedCall {
  inbound: http2.ServerHttp2Stream;
  outbound?: http2.ClientHttp2Stream;
  cutter: CallCutter;
  outcome: Promise<CallOutcome>;
}

/**
 * The relay under test: an h2c server whose every stream is relayed with relayCall onto one client
 * session to the upstream, as a hop of the tunnel does (deadline from grpc-timeout, owned caller key).
 */
class Relay {
  readonly calls: RelayedCall[] = [];
  private waiters: ((c: RelayedCall) => void)[] = [];
  server!: LoopbackServer;
  session!: http2.ClientHttp2Session;

  static async start(upstreamAddress: string, maxMessageBytes = MAX): Promise<Relay> {
    const r = new Relay();
    r.session = await connectH2(upstreamAddress);
    r.server = await listenH2((inbound, headers, rawHeaders) => {
      const cutter: CallCutter = {};
      const deadlineMs = deadlineFromTimeout(headers['grpc-timeout'], Date.now()) ?? 0;
      let call: RelayedCall;
      try {
        const outbound = openStream(
          r.session,
          nextHopHeaders(
            String(headers[':path']),
            upstreamAddress,
            rawHeaders,
            deadlineMs,
            { 'burrow-caller-id': CALLER_ID },
            headers['content-type'],
          ),
          'upstream u',
        );
        const outcome = relayCall(inbound, outbound, { peerName: 'upstream u', maxMessageBytes, deadlineMs, cutter });
        call = { inbound, outbound, cutter, outcome };
      } catch (err) {
        const e = err as BurrowError;
        endWithStatus(inbound, e.code, e.message);
        call = {
          inbound,
          cutter,
          outcome: Promise.resolve({ code: e.code, details: e.message, requestBytes: 0, responseBytes: 0 }),
        };
      }
      r.calls.push(call);
      for (const w of r.waiters.splice(0)) w(call);
    });
    return r;
  }

  get address(): string {
    return this.server.address;
  }

  /** The `n`th call (0-based), once it has arrived. */
  call(n: number): Promise<RelayedCall> {
    const have = this.calls[n];
    if (have) return Promise.resolve(have);
    return new Promise((resolve) => {
      const check = (): void => {
        const c = this.calls[n];
        if (c) resolve(c);
        else this.waiters.push(check);
      };
      this.waiters.push(check);
    });
  }

  async stop(): Promise<void> {
    await Promise.all([closeSession(this.session), this.server.close()]);
  }
}

/** A raw h2 upstream: each test says how it answers; it records what it received. */
interface RawUpstream {
  server: LoopbackServer;
  streams: { stream: http2.ServerHttp2Stream; headers: http2.IncomingHttpHeaders; rawHeaders: string[] }[];
  received: Buffer[];
}

async function rawUpstream(answer: (stream: http2.ServerHttp2Stream) => void): Promise<RawUpstream> {
  const up: RawUpstream = { server: undefined as never, streams: [], received: [] };
  up.server = await listenH2((stream, headers, rawHeaders) => {
    up.streams.push({ stream, headers, rawHeaders });
    stream.on('data', (c: Buffer) => up.received.push(c));
    answer(stream);
  });
  return up;
}

/** The values of `key` in a raw header list, in order. */
function rawValues(rawHeaders: string[], key: string): string[] {
  const out: string[] = [];
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) if (rawHeaders[i] === key) out.push(rawHeaders[i + 1]!);
  return out;
}

/** A gRPC status the call failed with (rejection of RawClient.unary). */
async function failure(p: Promise<unknown>): Promise<ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as ServiceError;
  }
  throw new Error('the call succeeded');
}

/** The status event of a grpc-js streaming call. */
function statusOf(call: { on(e: 'status', l: (s: StatusObject) => void): unknown }): Promise<StatusObject> {
  return new Promise((resolve) => call.on('status', resolve));
}

const clientOptions = { 'grpc.use_local_subchannel_pool': 1 };

describe('stream-relay: relayCall between a grpc-js client and an upstream over real HTTP/2', function () {
  this.timeout(20_000);
  let baseline: ResourceSnapshot;
  const cleanups: (() => Promise<void> | void)[] = [];

  beforeEach(() => {
    baseline = snapshotResources();
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
    await expectNoLeaks(baseline);
  });

  /** EchoUpstream <- relay <- grpc-js client. */
  async function echoSetup(
    maxMessageBytes = MAX,
  ): Promise<{ upstream: EchoUpstream; relay: Relay; client: RawClient }> {
    const upstream = await new EchoUpstream().start();
    cleanups.push(() => upstream.stop());
    const relay = await Relay.start(upstream.address, maxMessageBytes);
    cleanups.push(() => relay.stop());
    const client = new RawClient(relay.address, undefined, clientOptions);
    cleanups.push(() => client.close());
    return { upstream, relay, client };
  }

  /** A raw upstream <- relay <- grpc-js client. */
  async function rawSetup(
    answer: (stream: http2.ServerHttp2Stream) => void,
    maxMessageBytes = MAX,
  ): Promise<{ upstream: RawUpstream; relay: Relay; client: RawClient }> {
    const upstream = await rawUpstream(answer);
    cleanups.push(() => upstream.server.close());
    const relay = await Relay.start(upstream.server.address, maxMessageBytes);
    cleanups.push(() => relay.stop());
    const client = new RawClient(relay.address, undefined, clientOptions);
    cleanups.push(() => client.close());
    return { upstream, relay, client };
  }

  it('relays a unary call; the outcome counts message bytes without prefixes', async () => {
    const { relay, client } = await echoSetup();
    const req = Buffer.from('hello through the relay');
    const { response, status } = await client.unary(ECHO.unary, req);
    expect(response.toString()).to.equal(req.toString());
    expect(status.code).to.equal(Status.OK);
    const outcome = await (await relay.call(0)).outcome;
    expect(outcome).to.deep.include({ code: Status.OK, requestBytes: req.length, responseBytes: req.length });
  });

  it('carries request metadata by the crossing rules: hop keys dropped, owned key set, repeats in order', async () => {
    const { upstream, relay, client } = await rawSetup((stream) => {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
      stream.on('end', () => stream.end(frameMessage(Buffer.from('ok'))));
    });
    const md = new Metadata();
    md.add('x-rep', 'first');
    md.add('x-rep', 'second');
    md.add('x-rep', 'third');
    md.add('authorization', 'Bearer broker-credential');
    md.add('burrow-caller-id', 'spiffe://forged');
    md.add('burrow-agent-id', 'forged-agent');
    md.add('x-data-bin', Buffer.from([0, 1, 255]));
    await client.unary('/pkg.Svc/Method', Buffer.from('m'), md);
    const raw = upstream.streams[0]!.rawHeaders;
    expect(rawValues(raw, 'x-rep')).to.deep.equal(['first', 'second', 'third']);
    expect(rawValues(raw, 'authorization')).to.deep.equal([]);
    expect(rawValues(raw, 'user-agent')).to.deep.equal([]);
    expect(rawValues(raw, 'burrow-agent-id')).to.deep.equal([]);
    expect(rawValues(raw, 'burrow-caller-id')).to.deep.equal([CALLER_ID]);
    expect(rawValues(raw, 'x-data-bin').map((v) => Buffer.from(v, 'base64').toString('hex'))).to.deep.equal(['0001ff']);
    expect(rawValues(raw, ':path')).to.deep.equal(['/pkg.Svc/Method']);
    expect(rawValues(raw, 'te')).to.deep.equal(['trailers']);
    expect((await (await relay.call(0)).outcome).code).to.equal(Status.OK);
  });

  it('carries response headers and trailers (with grpc-status-details-bin), not hop keys', async () => {
    const details = Buffer.from('0a0568656c6c6f', 'hex');
    const { client } = await rawSetup((stream) => {
      stream.respond(
        {
          ':status': 200,
          'content-type': 'application/grpc',
          'x-header': ['h1', 'h2'],
          'x-header-bin': Buffer.from([0, 1, 2, 255]).toString('base64'),
          'burrow-agent-id': 'leaked',
        },
        { waitForTrailers: true },
      );
      stream.on('wantTrailers', () =>
        stream.sendTrailers({
          ...statusTrailers(Status.FAILED_PRECONDITION, 'échec: 100%'),
          'grpc-status-details-bin': details.toString('base64'),
          'x-trailer': ['t1', 't2'],
          'burrow-caller-id': 'leaked',
        }),
      );
      stream.on('end', () => stream.end(frameMessage(Buffer.from('partial answer'))));
    });
    const call = client.bidi('/pkg.Svc/Method');
    const done = collect(call);
    call.end(Buffer.from('x'));
    const { messages, headers, status } = await done;
    expect(messages.map(String)).to.deep.equal(['partial answer']);
    expect(headers?.get('x-header')).to.deep.equal(['h1, h2']);
    expect(headers?.get('x-header-bin')).to.deep.equal([Buffer.from([0, 1, 2, 255])]);
    expect(headers?.get('burrow-agent-id')).to.deep.equal([]);
    expect(status.code).to.equal(Status.FAILED_PRECONDITION);
    expect(status.details).to.equal('échec: 100%');
    expect(status.metadata.get('grpc-status-details-bin')).to.deep.equal([details]);
    expect(status.metadata.get('x-trailer')).to.deep.equal(['t1, t2']);
    expect(status.metadata.get('burrow-caller-id')).to.deep.equal([]);
  });

  it('passes a trailers-only error with its code, Unicode message and details to the caller', async () => {
    const { relay, client } = await echoSetup();
    const details = Buffer.from([8, 1, 18, 3, 0xe2, 0x9c, 0x93]);
    const req = {
      code: Status.NOT_FOUND,
      message: 'Kein Eintrag für „ü“ 🚫\nzweite Zeile',
      details: details.toString('base64'),
    };
    const err = await failure(client.unary(ECHO.status, Buffer.from(JSON.stringify(req))));
    expect(err.code).to.equal(Status.NOT_FOUND);
    expect(err.details).to.equal(req.message);
    expect(err.metadata.get('grpc-status-details-bin')).to.deep.equal([details]);
    expect(err.metadata.get('x-trailer')).to.deep.equal(['kept']);
    const outcome = await (await relay.call(0)).outcome;
    expect(outcome.code).to.equal(Status.NOT_FOUND);
    expect(outcome.details).to.equal(req.message);
    expect(outcome.responseBytes).to.equal(0);
  });

  it('relays a bidi stream of many messages both ways, in order', async () => {
    const { relay, client } = await echoSetup();
    const call = client.bidi(ECHO.bidi);
    const done = collect(call);
    const sent: Buffer[] = [];
    for (let i = 0; i < 200; i++) {
      const m = Buffer.alloc(1000 + i, i);
      sent.push(m);
      if (!call.write(m)) await once(call, 'drain');
    }
    call.end();
    const { messages, status } = await done;
    expect(status.code).to.equal(Status.OK);
    expect(messages.length).to.equal(sent.length);
    for (const [i, m] of messages.entries()) expect(m.equals(sent[i]!), `message ${i}`).to.equal(true);
    const total = sent.reduce((n, m) => n + m.length, 0);
    expect(await (await relay.call(0)).outcome).to.deep.include({
      code: Status.OK,
      requestBytes: total,
      responseBytes: total,
    });
  });

  it('stalls only the call whose caller stops reading, holding a bounded number of bytes', async () => {
    const { upstream, relay } = await echoSetup();
    // A raw client that reads a little of a large server stream, then stops reading.
    const caller = await connectH2(relay.address);
    cleanups.push(() => closeSession(caller));
    const stream = caller.request({
      ':method': 'POST',
      ':path': ECHO.serverStream,
      'content-type': 'application/grpc',
      te: 'trailers',
    });
    stream.on('error', () => {});
    const count = 400;
    const size = 32 * 1024;
    stream.end(frameMessage(Buffer.from(JSON.stringify({ count, size }))));
    let readBytes = 0;
    stream.on('data', (c: Buffer) => {
      readBytes += c.length;
      if (readBytes > 100_000) stream.pause();
    });
    // Count what the relay takes from the upstream, beside its own listener (pausing stops both).
    const relayed = await relay.call(0);
    let relayReceived = 0;
    relayed.outbound!.on('data', (c: Buffer) => {
      relayReceived += c.length;
    });
    await new Promise<void>((resolve) => {
      const check = (): void => (stream.isPaused() ? resolve() : void setImmediate(check));
      check();
    });
    // A sibling call on the same relay and the same upstream session completes meanwhile.
    const sibling = new RawClient(relay.address, undefined, clientOptions);
    cleanups.push(() => sibling.close());
    const { response } = await sibling.unary(ECHO.unary, Buffer.from('sibling'));
    expect(response.toString()).to.equal('sibling');
    // Nothing signals "the stall is complete": wait until the upstream stops producing.
    let last = -1;
    for (let i = 0; i < 100 && upstream.streamedBytes !== last; i++) {
      last = upstream.streamedBytes;
      await new Promise((r) => setTimeout(r, 50));
    }
    const total = count * size;
    expect(upstream.streamedBytes, 'the upstream was held back').to.be.below(total / 4);
    const heldAtRelay = relayReceived - readBytes;
    if (process.env.SHOW_STALL) console.log({ streamed: upstream.streamedBytes, relayReceived, readBytes });
    expect(heldAtRelay, 'bytes between the upstream stream and the caller').to.be.below(400 * 1024);
    expect(upstream.streamedBytes - readBytes, 'bytes anywhere on the path').to.be.below(1024 * 1024);
    // Reading again, the caller gets the whole stream and OK.
    const reply = readReply(stream);
    stream.removeAllListeners('data');
    let rest = 0;
    stream.on('data', (c: Buffer) => {
      rest += c.length;
    });
    stream.resume();
    const r = await reply;
    expect(readBytes + rest).to.equal(count * (size + 5));
    expect(r.trailers?.['grpc-status']).to.equal('0');
    expect((await relayed.outcome).code).to.equal(Status.OK);
  });

  it('refuses a request message over the limit from its prefix: the upstream never gets it', async () => {
    const { upstream, relay, client } = await rawSetup(() => {}, 1024);
    const err = await failure(client.unary('/pkg.Svc/Big', Buffer.alloc(200_000, 1)));
    expect(err.code).to.equal(Status.RESOURCE_EXHAUSTED);
    expect(err.details).to.contain('request message of 200000 bytes');
    const outcome = await (await relay.call(0)).outcome;
    expect(outcome.code).to.equal(Status.RESOURCE_EXHAUSTED);
    const upstreamGot = upstream.received.reduce((n, c) => n + c.length, 0);
    expect(upstreamGot, 'bytes the upstream received').to.be.below(5);
    // The relay may cancel its stream before its HEADERS go out: then the upstream sees no call at all.
    for (const { stream } of upstream.streams) {
      if (!stream.closed) await once(stream, 'close');
      expect(stream.rstCode).to.equal(http2.constants.NGHTTP2_CANCEL);
    }
  });

  it('refuses a response message over the limit from its prefix: the caller gets no part of it', async () => {
    const { relay, client } = await echoSetup(1024);
    const call = client.bidi(ECHO.serverStream);
    const done = collect(call);
    call.end(Buffer.from(JSON.stringify({ count: 3, size: 2000 })));
    const { messages, status } = await done;
    expect(status.code).to.equal(Status.RESOURCE_EXHAUSTED);
    expect(status.details).to.contain('response message of 2000 bytes');
    expect(messages).to.have.length(0);
    expect((await (await relay.call(0)).outcome).code).to.equal(Status.RESOURCE_EXHAUSTED);
  });

  it('passes the deadline on re-based: the upstream sees no more than what is left', async () => {
    const { upstream, client } = await echoSetup();
    const before = Date.now();
    await client.unary(ECHO.unary, Buffer.from('x'), new Metadata(), { deadline: before + 5000 });
    const seen = upstream.calls[0]!;
    expect(seen.deadline).to.be.at.most(before + 5000 + 5);
    expect(seen.deadline).to.be.above(before + 3000);
  });

  it('ends a call with DEADLINE_EXCEEDED when the upstream hangs, and cancels the upstream', async () => {
    const { upstream, relay } = await echoSetup();
    // A raw caller that does not enforce the deadline itself, so the relay's timer is what ends it.
    const caller = await connectH2(relay.address);
    cleanups.push(() => closeSession(caller));
    const cancelled = once(upstream, 'cancelled');
    const stream = caller.request({
      ':method': 'POST',
      ':path': ECHO.hang,
      'content-type': 'application/grpc',
      te: 'trailers',
      'grpc-timeout': '300m',
    });
    stream.end(frameMessage(Buffer.from('x')));
    const started = Date.now();
    const reply = await readReply(stream);
    expect(Date.now() - started).to.be.within(250, 5000);
    expect(reply.headers['grpc-status']).to.equal(String(Status.DEADLINE_EXCEEDED));
    const outcome = await (await relay.call(0)).outcome;
    expect(outcome.code).to.equal(Status.DEADLINE_EXCEEDED);
    await cancelled;
  });

  it('keeps a call whose deadline is past what setTimeout can hold (1000 hours)', async () => {
    // A raw upstream: grpc-js servers themselves end such a call at once (their timer overflows too).
    const { upstream, relay } = await rawSetup((stream) => {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
      stream.on('data', (c: Buffer) => stream.write(c));
      stream.on('end', () => stream.end());
    });
    const caller = await connectH2(relay.address);
    cleanups.push(() => closeSession(caller));
    const stream = caller.request({
      ':method': 'POST',
      ':path': '/pkg.Svc/Long',
      'content-type': 'application/grpc',
      te: 'trailers',
      'grpc-timeout': '1000H',
    });
    const reply = readReply(stream);
    const relayed = await relay.call(0);
    // Past the first turn of the event loop, where an overflowed timer fires.
    await new Promise((r) => setTimeout(r, 20));
    expect(relayed.inbound.closed, 'the relay ended the call').to.equal(false);
    stream.end(frameMessage(Buffer.from('still alive')));
    const r = await reply;
    expect(r.trailers?.['grpc-status']).to.equal('0');
    expect(r.data.subarray(5).toString()).to.equal('still alive');
    expect((await relayed.outcome).code).to.equal(Status.OK);
    const timeout = String(upstream.streams[0]!.headers['grpc-timeout']);
    expect(timeout).to.match(/^\d{1,8}S$/);
    expect(Number(timeout.slice(0, -1))).to.be.within(3_599_990, 3_600_000);
  });

  it('cancels the upstream call when the caller cancels', async () => {
    const { upstream, relay, client } = await echoSetup();
    const call = client.bidi(ECHO.hang);
    call.on('error', () => {});
    call.write(Buffer.from('x'));
    await once(upstream, 'call');
    const cancelled = once(upstream, 'cancelled');
    call.cancel();
    await cancelled;
    const outcome = await (await relay.call(0)).outcome;
    expect(outcome.code).to.equal(Status.CANCELLED);
  });

  it('maps an upstream RST_STREAM CANCEL to CANCELLED', async () => {
    const { relay, client } = await rawSetup((stream) => {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.write(frameMessage(Buffer.from('one')));
      stream.once('data', () => stream.close(http2.constants.NGHTTP2_CANCEL));
    });
    const call = client.bidi('/pkg.Svc/Reset');
    const done = collect(call);
    call.write(Buffer.from('go'));
    const { status } = await done;
    call.end();
    expect(status.code, status.details).to.equal(Status.CANCELLED);
    expect((await (await relay.call(0)).outcome).code).to.equal(Status.CANCELLED);
  });

  it('maps a lost upstream connection to UNAVAILABLE', async () => {
    const { relay, client, upstream } = await rawSetup((stream) => {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.write(frameMessage(Buffer.from('one')));
      stream.once('data', () => {
        for (const socket of upstream.server.sockets) socket.destroy();
      });
    });
    const call = client.bidi('/pkg.Svc/Gone');
    const done = collect(call);
    call.write(Buffer.from('go'));
    const { status } = await done;
    call.end();
    expect(status.code).to.equal(Status.UNAVAILABLE);
    expect((await (await relay.call(0)).outcome).code).to.equal(Status.UNAVAILABLE);
    expect(upstream.streams).to.have.length(1);
  });

  it('maps an HTTP 404 without grpc-status to UNIMPLEMENTED', async () => {
    const { relay, client } = await rawSetup((stream) => {
      stream.respond({ ':status': 404, 'content-type': 'text/plain' });
      stream.end('no such path');
    });
    const err = await failure(client.unary('/pkg.Svc/Missing', Buffer.from('x')));
    expect(err.code).to.equal(Status.UNIMPLEMENTED);
    expect(err.details).to.contain('404');
    expect((await (await relay.call(0)).outcome).code).to.equal(Status.UNIMPLEMENTED);
  });

  it('ends a live stream with the status given to cutter.cut', async () => {
    const { upstream, relay, client } = await echoSetup();
    const call = client.bidi(ECHO.bidi);
    const got: Buffer[] = [];
    call.on('data', (m: Buffer) => got.push(m));
    call.on('error', () => {});
    const status = statusOf(call);
    call.write(Buffer.from('first'));
    await once(call, 'data');
    const cancelled = once(upstream, 'cancelled');
    (await relay.call(0)).cutter.cut!(new BurrowError(Status.PERMISSION_DENIED, 'credential revoked'));
    const s = await status;
    expect(s.code).to.equal(Status.PERMISSION_DENIED);
    expect(s.details).to.equal('credential revoked');
    expect(got.map(String)).to.deep.equal(['first']);
    await cancelled;
    expect((await (await relay.call(0)).outcome).code).to.equal(Status.PERMISSION_DENIED);
  });

  it('gives the status when the upstream ends before the caller half-closes; both streams close', async () => {
    const { upstream, relay, client } = await echoSetup();
    const call = client.bidi(ECHO.status);
    call.on('error', () => {});
    const status = statusOf(call);
    call.write(Buffer.from(JSON.stringify({ code: Status.ABORTED, message: 'early end' })));
    const s = await status;
    expect(s.code).to.equal(Status.ABORTED);
    const relayed = await relay.call(0);
    const outcome = await relayed.outcome;
    expect(outcome.code).to.equal(Status.ABORTED);
    expect(relayed.inbound.closed).to.equal(true);
    expect(relayed.outbound!.closed).to.equal(true);
    expect(upstream.active).to.equal(0);
  });

  it('closes both streams when the upstream ends before a raw caller that never half-closes', async () => {
    const { relay } = await echoSetup();
    const caller = await connectH2(relay.address);
    cleanups.push(() => closeSession(caller));
    const stream = caller.request({
      ':method': 'POST',
      ':path': ECHO.status,
      'content-type': 'application/grpc',
      te: 'trailers',
    });
    const reply = readReply(stream);
    // Written but never ended: the caller keeps its half of the stream open.
    stream.write(frameMessage(Buffer.from(JSON.stringify({ code: Status.ABORTED, message: 'early end' }))));
    const relayed = await relay.call(0);
    const outcome = await relayed.outcome;
    expect(outcome.code).to.equal(Status.ABORTED);
    const r = await reply;
    expect(r.headers['grpc-status'] ?? r.trailers?.['grpc-status']).to.equal(String(Status.ABORTED));
  });

  it('answers UNAVAILABLE when the upstream session is closing', async () => {
    const { relay, client } = await echoSetup();
    await closeSession(relay.session);
    const err = await failure(client.unary(ECHO.unary, Buffer.from('x')));
    expect(err.code).to.equal(Status.UNAVAILABLE);
    expect(err.details).to.contain('upstream u');
  });
});
