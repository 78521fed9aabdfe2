import { once } from 'node:events';
import * as http2 from 'node:http2';
import { expect } from 'chai';
import { type ServiceError, status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  type CallOutcome,
  deadlineFromTimeout,
  frameMessage,
  type LocalCallContext,
  type LocalUnaryHandler,
  answerUnary,
  unaryCall,
} from '@burrow/tunnel';
import { ECHO, EchoUpstream } from './helpers/echo-upstream';
import { closeSession, connectH2, type LoopbackServer, listenH2, readReply } from './helpers/h2';
import { freePort } from './helpers/free-port';
import { expectNoLeaks, type ResourceSnapshot, snapshotResources } from './helpers/leaks';
import { collect, RawClient } from './helpers/raw-grpc';

const clientOptions = { 'grpc.use_local_subchannel_pool': 1 };

async function failure(p: Promise<unknown>): Promise<ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as ServiceError;
  }
  throw new Error('the call succeeded');
}

describe('unary-call', function () {
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

  describe('answerUnary on a raw HTTP/2 server, called by grpc-js', () => {
    interface Answered {
      outcome: Promise<CallOutcome>;
      ctx?: LocalCallContext;
    }
    /** A server answering every stream with `handler`; `answered` in arrival order. */
    async function serve(handler: LocalUnaryHandler): Promise<{ server: LoopbackServer; answered: Answered[] }> {
      const answered: Answered[] = [];
      const server = await listenH2((stream, headers) => {
        const a: Answered = { outcome: undefined as never };
        a.outcome = answerUnary(
          stream,
          (req, ctx) => {
            a.ctx = ctx;
            return handler(req, ctx);
          },
          {
            method: String(headers[':path']),
            maxMessageBytes: 1024,
            deadlineMs: deadlineFromTimeout(headers['grpc-timeout'], Date.now()) ?? 0,
            callId: `call-${answered.length}`,
            caller: 'spiffe://test/caller',
          },
        );
        answered.push(a);
      });
      cleanups.push(() => server.close());
      return { server, answered };
    }
    function client(server: LoopbackServer): RawClient {
      const c = new RawClient(server.address, undefined, clientOptions);
      cleanups.push(() => c.close());
      return c;
    }
    /** A handler that waits until its call is aborted and records that it was. */
    const waitForAbort: LocalUnaryHandler = (_req, ctx) =>
      new Promise((_resolve, reject) =>
        ctx.signal.addEventListener('abort', () => reject(new BurrowError(Status.CANCELLED, 'aborted'))),
      );

    it('answers one message with the handler result and OK', async () => {
      const { server, answered } = await serve(async (req) => Buffer.from(req.toString().toUpperCase()));
      const { response, status } = await client(server).unary('/pkg.Svc/Upper', Buffer.from('hello'));
      expect(response.toString()).to.equal('HELLO');
      expect(status.code).to.equal(Status.OK);
      const { settledAt, ...outcome } = await answered[0]!.outcome;
      expect(outcome).to.deep.equal({ code: Status.OK, details: '', requestBytes: 5, responseBytes: 5 });
      expect(settledAt, 'when the status was sent (performance.now())').to.be.within(0, performance.now());
      expect(answered[0]!.ctx?.caller).to.equal('spiffe://test/caller');
      expect(answered[0]!.ctx?.callId).to.equal('call-0');
      expect(answered[0]!.ctx?.signal.aborted).to.equal(false);
    });

    it("answers the handler's error status with its Unicode message", async () => {
      const { server, answered } = await serve(async () => {
        throw new BurrowError(Status.NOT_FOUND, 'kein Dienst „ü“ 🚫');
      });
      const err = await failure(client(server).unary('/pkg.Svc/Fail', Buffer.from('x')));
      expect(err.code).to.equal(Status.NOT_FOUND);
      expect(err.details).to.equal('kein Dienst „ü“ 🚫');
      expect((await answered[0]!.outcome).code).to.equal(Status.NOT_FOUND);
    });

    it('answers UNKNOWN for a plain Error thrown by the handler', async () => {
      const { server } = await serve(async () => {
        throw new Error('boom');
      });
      const err = await failure(client(server).unary('/pkg.Svc/Throw', Buffer.from('x')));
      expect(err.code).to.equal(Status.UNKNOWN);
      expect(err.details).to.contain('boom');
    });

    it('refuses two request messages with INTERNAL, without running the handler', async () => {
      let ran = false;
      const { server, answered } = await serve(async (req) => {
        ran = true;
        return req;
      });
      const call = client(server).bidi('/pkg.Svc/Two');
      const done = collect(call);
      call.write(Buffer.from('one'));
      call.end(Buffer.from('two'));
      const { status } = await done;
      expect(status.code).to.equal(Status.INTERNAL);
      expect(status.details).to.contain('two requests');
      expect((await answered[0]!.outcome).code).to.equal(Status.INTERNAL);
      expect(ran).to.equal(false);
    });

    it('refuses a request with no message with INTERNAL', async () => {
      const { server } = await serve(async (req) => req);
      const call = client(server).bidi('/pkg.Svc/None');
      const done = collect(call);
      call.end();
      expect((await done).status.code).to.equal(Status.INTERNAL);
    });

    it('refuses an oversized request with RESOURCE_EXHAUSTED from its prefix', async () => {
      const { server, answered } = await serve(async (req) => req);
      const caller = await connectH2(server.address);
      cleanups.push(() => closeSession(caller));
      const stream = caller.request({ ':method': 'POST', ':path': '/pkg.Svc/Big', 'content-type': 'application/grpc' });
      const reply = readReply(stream);
      // Only the prefix of a 10 MiB message, and the stream left open: the answer needs nothing more.
      const prefix = Buffer.from([0, 0, 0xa0, 0, 0]);
      stream.write(prefix);
      const r = await reply;
      expect(r.headers['grpc-status']).to.equal(String(Status.RESOURCE_EXHAUSTED));
      expect(String(r.headers['grpc-message'])).to.contain('10485760');
      expect((await answered[0]!.outcome).code).to.equal(Status.RESOURCE_EXHAUSTED);
    });

    it("aborts the handler's signal when the caller cancels", async () => {
      const { server, answered } = await serve(waitForAbort);
      const c = client(server);
      const call = c.bidi('/pkg.Svc/Slow');
      call.on('error', () => {});
      call.end(Buffer.from('x'));
      await new Promise<void>((resolve) => {
        const check = (): void => (answered[0]?.ctx ? resolve() : void setImmediate(check));
        check();
      });
      const aborted = once(answered[0]!.ctx!.signal, 'abort');
      call.cancel();
      await aborted;
      expect((await answered[0]!.outcome).code).to.equal(Status.CANCELLED);
    });

    it("ends with DEADLINE_EXCEEDED at the deadline and aborts the handler's signal", async () => {
      const { server, answered } = await serve(waitForAbort);
      const caller = await connectH2(server.address);
      cleanups.push(() => closeSession(caller));
      const stream = caller.request({
        ':method': 'POST',
        ':path': '/pkg.Svc/Slow',
        'content-type': 'application/grpc',
        'grpc-timeout': '200m',
      });
      const reply = readReply(stream);
      stream.end(frameMessage(Buffer.from('x')));
      const r = await reply;
      expect(r.headers['grpc-status']).to.equal(String(Status.DEADLINE_EXCEEDED));
      expect((await answered[0]!.outcome).code).to.equal(Status.DEADLINE_EXCEEDED);
      expect(answered[0]!.ctx?.signal.aborted).to.equal(true);
      expect(answered[0]!.ctx?.deadlineMs).to.be.a('number').and.to.be.finite;
    });
  });

  describe('unaryCall on a raw HTTP/2 session to a grpc-js server', () => {
    async function echo(): Promise<{ upstream: EchoUpstream; session: http2.ClientHttp2Session }> {
      const upstream = await new EchoUpstream().start();
      cleanups.push(() => upstream.stop());
      const session = await connectH2(upstream.address);
      cleanups.push(() => closeSession(session));
      return { upstream, session };
    }
    const opts = (extra: Partial<Parameters<typeof unaryCall>[3]> = {}) => ({
      authority: 'upstream',
      peerName: 'upstream u',
      deadlineMs: Number.POSITIVE_INFINITY,
      maxMessageBytes: 1024,
      ...extra,
    });

    it('gets the response and OK, with metadata sent', async () => {
      const { upstream, session } = await echo();
      const r = await unaryCall(session, ECHO.unary, Buffer.from('ping'), opts({ headers: { 'x-md': 'v1' } }));
      expect(r.code).to.equal(Status.OK);
      expect(r.response?.toString()).to.equal('ping');
      expect(r.requestBytes).to.equal(4);
      expect(r.responseBytes).to.equal(4);
      expect(upstream.calls[0]!.metadata.get('x-md')).to.deep.equal(['v1']);
    });

    it('does not reset a call the server answered (no CANCEL after OK)', async () => {
      const closed: Promise<number | undefined>[] = [];
      const server = await listenH2((stream) => {
        closed.push(new Promise((resolve) => stream.on('close', () => resolve(stream.rstCode))));
        stream.on('data', () => {});
        stream.on('end', () => {
          stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
          stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
          stream.end(frameMessage(Buffer.from('pong')));
        });
      });
      cleanups.push(() => server.close());
      const session = await connectH2(server.address);
      cleanups.push(() => closeSession(session));
      const r = await unaryCall(session, '/pkg.Svc/Ping', Buffer.from('ping'), opts());
      expect(r.code).to.equal(Status.OK);
      expect(r.response?.toString()).to.equal('pong');
      expect(await closed[0]).to.equal(http2.constants.NGHTTP2_NO_ERROR);
    });

    it('gets an error status with its message and details from a trailers-only answer', async () => {
      const { session } = await echo();
      const details = Buffer.from([1, 2, 3]);
      const req = { code: Status.FAILED_PRECONDITION, message: 'nicht bereit ✗', details: details.toString('base64') };
      const r = await unaryCall(session, ECHO.status, Buffer.from(JSON.stringify(req)), opts());
      expect(r.code).to.equal(Status.FAILED_PRECONDITION);
      expect(r.details).to.equal('nicht bereit ✗');
      expect(Buffer.from(String(r.trailers['grpc-status-details-bin']), 'base64')).to.deep.equal(details);
      expect(r.response).to.equal(undefined);
    });

    it('ends with DEADLINE_EXCEEDED at the deadline and cancels the upstream call', async () => {
      const { upstream, session } = await echo();
      const cancelled = once(upstream, 'cancelled');
      const r = await unaryCall(session, ECHO.hang, Buffer.from('x'), opts({ deadlineMs: Date.now() + 200 }));
      expect(r.code).to.equal(Status.DEADLINE_EXCEEDED);
      await cancelled;
    });

    it('sends the deadline as grpc-timeout', async () => {
      const { upstream, session } = await echo();
      const deadline = Date.now() + 5000;
      await unaryCall(session, ECHO.unary, Buffer.from('x'), opts({ deadlineMs: deadline }));
      expect(upstream.calls[0]!.deadline).to.be.within(deadline - 1000, deadline + 5);
    });

    it('ends with CANCELLED when its signal is aborted, and cancels the upstream call', async () => {
      const { upstream, session } = await echo();
      const ac = new AbortController();
      const cancelled = once(upstream, 'cancelled');
      const result = unaryCall(session, ECHO.hang, Buffer.from('x'), opts({ signal: ac.signal }));
      await once(upstream, 'call');
      ac.abort();
      expect((await result).code).to.equal(Status.CANCELLED);
      await cancelled;
    });

    it('ends with CANCELLED at once when its signal was aborted before the call', async () => {
      const { upstream, session } = await echo();
      const ac = new AbortController();
      ac.abort();
      const r = await unaryCall(
        session,
        ECHO.hang,
        Buffer.from('x'),
        opts({ signal: ac.signal, deadlineMs: Date.now() + 2000 }),
      );
      expect(r.code).to.equal(Status.CANCELLED);
      expect(upstream.active).to.equal(0);
    });

    it('refuses an oversized response with RESOURCE_EXHAUSTED', async () => {
      const { session } = await echo();
      const r = await unaryCall(session, ECHO.unary, Buffer.alloc(2000, 1), opts({ maxMessageBytes: 1500 }));
      expect(r.code).to.equal(Status.RESOURCE_EXHAUSTED);
      expect(r.details).to.contain('upstream u');
    });

    it('answers UNAVAILABLE on a closed session', async () => {
      const { session } = await echo();
      await closeSession(session);
      const r = await unaryCall(session, ECHO.unary, Buffer.from('x'), opts());
      expect(r.code).to.equal(Status.UNAVAILABLE);
      expect(r.details).to.contain('upstream u');
    });

    it('answers UNAVAILABLE when the session cannot connect', async () => {
      const port = await freePort();
      const session = http2.connect(`http://127.0.0.1:${port}`);
      session.on('error', () => {});
      // Not events.once: it would reject on the session's connection error.
      const closed = new Promise((resolve) => session.on('close', resolve));
      cleanups.push(async () => {
        session.destroy();
        await closed;
      });
      const r = await unaryCall(session, ECHO.unary, Buffer.from('x'), opts({ deadlineMs: Date.now() + 5000 }));
      expect(r.code).to.equal(Status.UNAVAILABLE);
    });

    it('answers UNAVAILABLE when the connection is lost during the call', async () => {
      const server = await listenH2(() => {
        for (const s of server.sockets) s.destroy();
      });
      cleanups.push(() => server.close());
      const session = await connectH2(server.address);
      cleanups.push(() => closeSession(session));
      const r = await unaryCall(session, '/pkg.Svc/Gone', Buffer.from('x'), opts());
      expect(r.code).to.equal(Status.UNAVAILABLE);
    });

    it('maps an upstream RST_STREAM CANCEL to CANCELLED', async () => {
      const server = await listenH2((stream) => stream.close(http2.constants.NGHTTP2_CANCEL));
      cleanups.push(() => server.close());
      const session = await connectH2(server.address);
      cleanups.push(() => closeSession(session));
      const r = await unaryCall(session, '/pkg.Svc/Reset', Buffer.from('x'), opts());
      expect(r.code).to.equal(Status.CANCELLED);
    });

    it('maps an HTTP 404 without grpc-status to UNIMPLEMENTED', async () => {
      const server = await listenH2((stream) => {
        stream.respond({ ':status': 404 });
        stream.end('not here');
      });
      cleanups.push(() => server.close());
      const session = await connectH2(server.address);
      cleanups.push(() => closeSession(session));
      const r = await unaryCall(session, '/pkg.Svc/Missing', Buffer.from('x'), opts());
      expect(r.code).to.equal(Status.UNIMPLEMENTED);
    });

    it('keeps metadata it was given and the grpc-js server reads it', async () => {
      const { session } = await echo();
      const r = await unaryCall(session, ECHO.metadata, Buffer.from('x'), opts({ headers: { 'x-a': ['1', '2'] } }));
      expect(r.code).to.equal(Status.OK);
      const seen = JSON.parse(r.response!.toString()) as Record<string, string[]>;
      expect(seen['x-a']).to.deep.equal(['1, 2']);
      expect(r.trailers['x-trailer']).to.equal('t-value');
    });
  });
});
