import { randomBytes } from 'node:crypto';
import { expect } from 'chai';
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import { ECHO, metadataJson } from './helpers/echo-upstream';
import { RawClient, collect } from './helpers/raw-grpc';
import { AGENT_ID, Stack } from './helpers/stack';

/**
 * Transparency: every call kind, in both directions, byte-exact, with metadata, headers, trailers
 * and statuses as a direct call would give them.
 */
describe('forwarding', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start();
  });
  after(async () => {
    await stack?.stop();
  });

  // Both directions run the same cases: caller -> broker -> agent -> site upstream, and
  // site client -> agent -> broker -> platform upstream.
  const directions: { name: string; client(): RawClient; md(extra?: Record<string, string | Buffer>): Metadata }[] = [
    { name: 'caller -> agent', client: () => stack.caller, md: (extra) => stack.md(extra) },
    {
      name: 'site -> platform',
      client: () => stack.siteClient,
      md: (extra = {}) => {
        const md = new Metadata();
        for (const [k, v] of Object.entries(extra)) md.add(k, v);
        return md;
      },
    },
  ];

  for (const dir of directions) {
    describe(dir.name, () => {
      it('unary: random bytes come back byte-exact', async () => {
        for (const size of [0, 1, 100, 70_000, 1024 * 1024]) {
          const payload = randomBytes(size);
          const res = await dir.client().unary(ECHO.unary, payload, dir.md());
          expect(res.status.code).to.equal(Status.OK);
          expect(Buffer.compare(res.response, payload), `size ${size}`).to.equal(0);
        }
      });

      it('client streaming: many messages in, their concatenation out', async () => {
        const parts = Array.from({ length: 50 }, (_, i) => randomBytes(100 + i * 37));
        const call = dir.client().bidi(ECHO.clientStream, dir.md());
        for (const p of parts) call.write(p);
        call.end();
        const r = await collect(call);
        expect(r.status.code).to.equal(Status.OK);
        expect(r.messages).to.have.length(1);
        expect(Buffer.compare(r.messages[0]!, Buffer.concat(parts))).to.equal(0);
      });

      it('server streaming: 200 messages of 10 KiB arrive in order, byte-exact', async () => {
        const call = dir.client().bidi(ECHO.serverStream, dir.md());
        call.write(Buffer.from(JSON.stringify({ count: 200, size: 10_240 })));
        call.end();
        const r = await collect(call);
        expect(r.status.code).to.equal(Status.OK);
        expect(r.messages).to.have.length(200);
        r.messages.forEach((m, i) => {
          expect(m.equals(Buffer.alloc(10_240, i % 251)), `message ${i}`).to.equal(true);
        });
      });

      it('bidi: interleaved messages echo one by one', async () => {
        const call = dir.client().bidi(ECHO.bidi, dir.md());
        const got: Buffer[] = [];
        const sent: Buffer[] = [];
        await new Promise<void>((resolve, reject) => {
          call.on('data', (m: Buffer) => {
            got.push(m);
            if (got.length < 20) {
              const next = randomBytes(got.length * 11);
              sent.push(next);
              call.write(next);
            } else {
              call.end();
            }
          });
          call.on('error', reject);
          call.on('status', (s) => (s.code === Status.OK ? resolve() : reject(new Error(s.details))));
          const first = randomBytes(5);
          sent.push(first);
          call.write(first);
        });
        expect(got.map((b) => b.toString('hex'))).to.deep.equal(sent.map((b) => b.toString('hex')));
      });

      it('half-close: the client ends its side while the server keeps sending', async () => {
        const call = dir.client().bidi(ECHO.serverStream, dir.md());
        call.write(Buffer.from(JSON.stringify({ count: 30, size: 64 * 1024 })));
        call.end(); // half-close before any response arrives
        const r = await collect(call);
        expect(r.status.code).to.equal(Status.OK);
        expect(r.messages).to.have.length(30);
      });

      it('request metadata crosses; hop metadata does not', async () => {
        const binary = Buffer.from([0, 1, 2, 0xfe, 0xff]);
        const md = dir.md({
          'x-custom': 'value one',
          'x-bin-bin': binary,
          authorization: 'Bearer caller-secret',
          'burrow-forged': 'x',
        });
        md.add('x-repeated', 'a');
        md.add('x-repeated', 'b');
        const res = await dir.client().unary(ECHO.metadata, Buffer.from('q'), md);
        const seen = JSON.parse(res.response.toString()) as Record<string, string[]>;
        expect(seen['x-custom']).to.deep.equal(['value one']);
        expect(seen['x-bin-bin']).to.deep.equal([`b64:${binary.toString('base64')}`]);
        // Repeated keys arrive exactly as on a direct call to the same upstream.
        const direct = new RawClient(
          dir.name === 'caller -> agent' ? stack.siteUpstream.address : stack.platformUpstream.address,
        );
        const directSeen = JSON.parse(
          (await direct.unary(ECHO.metadata, Buffer.from('q'), md)).response.toString(),
        ) as Record<string, string[]>;
        direct.close();
        expect(seen['x-repeated']).to.deep.equal(directSeen['x-repeated']);
        expect(seen).to.not.have.property('authorization');
        expect(seen).to.not.have.property('burrow-forged');
        // Response headers and trailers, text and binary, come back.
        expect(metadataJson(res.headers)).to.include.keys('x-header', 'x-header-bin');
        expect(res.headers.get('x-header-bin')[0]).to.deep.equal(Buffer.from([0, 1, 2, 255]));
        expect(res.status.metadata.get('x-trailer')).to.deep.equal(['t-value']);
        expect(res.status.metadata.get('x-trailer-bin')[0]).to.deep.equal(Buffer.from([255, 254, 0]));
      });

      it('status code, message (whitespace, non-BMP unicode) and details survive', async () => {
        const message = '  leading and trailing spaces\ttab\nnewline 😀 𝄞 ü % %20 ';
        const details = randomBytes(48);
        for (const code of [
          Status.NOT_FOUND,
          Status.PERMISSION_DENIED,
          Status.FAILED_PRECONDITION,
          Status.INTERNAL,
          Status.UNAUTHENTICATED,
        ]) {
          const req = Buffer.from(JSON.stringify({ code, message, details: details.toString('base64') }));
          const err = await dir
            .client()
            .unary(ECHO.status, req, dir.md())
            .then(
              () => undefined,
              (e: ServiceError) => e,
            );
          expect(err, `code ${code}`).to.not.equal(undefined);
          expect(err!.code).to.equal(code);
          expect(err!.details).to.equal(message);
          expect(err!.metadata.get('grpc-status-details-bin')[0]).to.deep.equal(details);
          expect(err!.metadata.get('x-trailer')).to.deep.equal(['kept']);
        }
      });

      it('trailers arrive on a server-streaming call that fails after sending messages', async () => {
        // The status path of a streaming call: messages, then a non-OK status with details.
        const call = dir.client().bidi(ECHO.status, dir.md());
        call.write(
          Buffer.from(JSON.stringify({ code: Status.ABORTED, message: 'abort after stream', details: 'AQID' })),
        );
        call.end();
        const r = await collect(call);
        expect(r.status.code).to.equal(Status.ABORTED);
        expect(r.status.metadata.get('grpc-status-details-bin')[0]).to.deep.equal(Buffer.from([1, 2, 3]));
      });
    });
  }

  it('the platform service sees the calling agent id set by the broker, which a site client cannot forge', async () => {
    const md = new Metadata();
    md.set('burrow-agent-id', 'someone-else');
    const res = await stack.siteClient.unary(ECHO.metadata, Buffer.from('q'), md);
    const seen = JSON.parse(res.response.toString()) as Record<string, string[]>;
    expect(seen['burrow-agent-id']).to.deep.equal([AGENT_ID]);
  });

  it(
    'the site upstream never sees the routing key or the caller authorization, only the caller identity the ' +
      'broker verified',
    async () => {
      const res = await stack.caller.unary(
        ECHO.metadata,
        Buffer.from('q'),
        stack.md({ authorization: 'Bearer platform-token', 'burrow-caller-id': 'spiffe://forged/service/x' }),
      );
      const seen = JSON.parse(res.response.toString()) as Record<string, string[]>;
      expect(Object.keys(seen).filter((k) => k.startsWith('burrow-') || k === 'authorization')).to.deep.equal([
        'burrow-caller-id',
      ]);
      expect(seen['burrow-caller-id']).to.have.length(1);
      expect(seen['burrow-caller-id']?.[0]).to.match(/^spiffe:\/\/[^/]+\/service\/platform-svc$/);
    },
  );

  it('an unknown method reaches the upstream, which answers UNIMPLEMENTED, and the tunnel lives on', async () => {
    const err = await stack.caller.unary('/no.Such/Method', Buffer.from('x'), stack.md()).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(err?.code).to.equal(Status.UNIMPLEMENTED);
    expect(stack.siteUpstream.calls.length).to.be.greaterThan(0);
    const ok = await stack.caller.unary(ECHO.unary, Buffer.from('still here'), stack.md());
    expect(ok.response.toString()).to.equal('still here');
  });

  it('leaves no active call or waiting caller behind', () => {
    const c = stack.broker.registry.counts();
    expect(c.activeCalls).to.equal(0);
    expect(c.waiters).to.equal(0);
    expect(stack.siteUpstream.active).to.equal(0);
    expect(stack.platformUpstream.active).to.equal(0);
  });
});
