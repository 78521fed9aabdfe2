import { expect } from 'chai';
import * as http2 from 'node:http2';
import { readFileSync } from 'node:fs';
import {
  Metadata,
  Server,
  ServerCredentials,
  status as Status,
  type ServerDuplexStream,
  type ServiceError,
} from '@grpc/grpc-js';
import {
  installCatchAll,
  receiveLimitInterceptor,
  refuseCallsEarly,
  shutdownGracefully,
  type OversizedMessage,
} from '@burrow/tunnel';
import { callOverStalledConnection, stalledConnection } from './helpers/late-connection';
import { expectNoLeaks, snapshotResources } from './helpers/leaks';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';

describe('grpc-js server hooks', () => {
  let pki: PkiFixture;
  let serverCert: CertFiles;
  let clientCert: CertFiles;

  before(async () => {
    pki = await PkiFixture.create();
    [serverCert, clientCert] = await Promise.all([pki.issue('broker', 'b'), pki.issue('service', 'platform-svc')]);
  });
  after(() => pki?.cleanup());

  /** An mTLS server whose every call (any path) lands in the catch-all, which echoes `path:message`. */
  async function serve(server = new Server()): Promise<{ server: Server; port: number; served: string[] }> {
    const served: string[] = [];
    installCatchAll(server, (call: ServerDuplexStream<Buffer, Buffer>) => {
      const path = call.getPath();
      call.once('data', (m: Buffer) => {
        served.push(m.toString());
        call.write(Buffer.from(`${path}:${m.toString()}`));
        call.end();
      });
    });
    const creds = ServerCredentials.createSsl(
      readFileSync(serverCert.ca),
      [{ private_key: readFileSync(serverCert.key), cert_chain: readFileSync(serverCert.cert) }],
      true,
    );
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', creds, (err, p) => (err ? reject(err) : resolve(p))),
    );
    return { server, port, served };
  }

  it('installCatchAll: a call to a method the server does not register reaches the handler as raw bytes', async () => {
    const { server, port } = await serve();
    const client = new RawClient(`127.0.0.1:${port}`, mtlsCredentials(clientCert));
    try {
      const r = await client.unary('/some.unknown.Service/Method', Buffer.from('hello'), new Metadata());
      expect(r.response.toString()).to.equal('/some.unknown.Service/Method:hello');
    } finally {
      client.close();
      server.forceShutdown();
    }
  });

  it(
    'refuseCallsEarly: a refused call gets its status before its body is read, the handler sees no message, other ' +
      'calls are served',
    async () => {
      const { server, port, served } = await serve();
      const peers: string[] = [];
      refuseCallsEarly(server, (path, address) => {
        peers.push(address);
        return path === '/refused.Service/Method'
          ? { code: Status.RESOURCE_EXHAUSTED, details: 'refused at the headers' }
          : undefined;
      });
      const client = new RawClient(`127.0.0.1:${port}`, mtlsCredentials(clientCert));
      try {
        // 8 MiB that the server never needs to read: the status comes first.
        const err = await client.unary('/refused.Service/Method', Buffer.alloc(8 * 1024 * 1024), new Metadata()).then(
          () => undefined,
          (e: ServiceError) => e,
        );
        expect(err?.code).to.equal(Status.RESOURCE_EXHAUSTED);
        expect(err?.details).to.equal('refused at the headers');
        const r = await client.unary('/served.Service/Method', Buffer.from('hello'), new Metadata());
        expect(r.response.toString()).to.equal('/served.Service/Method:hello');
        expect(served).to.deep.equal(['hello']);
        expect(peers).to.deep.equal(['127.0.0.1', '127.0.0.1']);
      } finally {
        client.close();
        server.forceShutdown();
      }
    },
  );

  it(
    "receiveLimitInterceptor: a message past its method's limit is refused from its length prefix with the status " +
      'given; other methods keep the server limit',
    async () => {
      const baseline = snapshotResources();
      const oversized: Omit<OversizedMessage, 'call'>[] = [];
      const server = new Server({
        'grpc.max_receive_message_length': 4 * 1024 * 1024,
        interceptors: [
          receiveLimitInterceptor({ '/x.Small/Call': 1024 }, ({ call, ...m }) => {
            oversized.push(m);
            return {
              code: Status.INTERNAL,
              details: `too big: ${m.bytes} > ${m.limitBytes} (peer ${call.getPeer() ? 'known' : 'unknown'})`,
            };
          }),
        ],
      });
      const { port, served } = await serve(server);
      const client = new RawClient(`127.0.0.1:${port}`, mtlsCredentials(clientCert));
      try {
        // At the limit: served.
        expect((await client.unary('/x.Small/Call', Buffer.alloc(1024, 0x61))).response.length).to.equal(
          '/x.Small/Call:'.length + 1024,
        );
        // Past it: refused, with the hook's status, and the handler never sees the message.
        const err = await client.unary('/x.Small/Call', Buffer.alloc(3 * 1024 * 1024, 0x62)).then(
          () => undefined,
          (e: ServiceError) => e,
        );
        expect(err?.code).to.equal(Status.INTERNAL);
        expect(err?.details).to.equal(`too big: ${3 * 1024 * 1024} > 1024 (peer known)`);
        expect(oversized).to.deep.equal([{ path: '/x.Small/Call', bytes: 3 * 1024 * 1024, limitBytes: 1024 }]);
        expect(served.some((m) => m.startsWith('b'))).to.equal(false);
        // Another method: the server-wide limit.
        expect((await client.unary('/x.Big/Call', Buffer.alloc(3 * 1024 * 1024, 0x63))).response.length).to.equal(
          '/x.Big/Call:'.length + 3 * 1024 * 1024,
        );
      } finally {
        client.close();
        server.forceShutdown();
      }
      await expectNoLeaks(baseline);
    },
  );

  it(
    'shutdownGracefully: a connection still in its TLS handshake when the shutdown began gets GOAWAY, and its ' +
      'call is not served',
    async () => {
      const baseline = snapshotResources();
      const { server, port, served } = await serve();
      // A connection that is a session already (tryShutdown itself closes it) ...
      const early = new RawClient(`127.0.0.1:${port}`, mtlsCredentials(clientCert));
      expect((await early.unary('/x.Y/Z', Buffer.from('early'))).response.toString()).to.equal('/x.Y/Z:early');
      // ... and one accepted but not yet secure: it becomes a session only after the shutdown began.
      const raw = await stalledConnection(port);
      let shutDown = false;
      const done = shutdownGracefully(server).then(() => {
        shutDown = true;
      });
      try {
        const late = callOverStalledConnection(raw, clientCert, '/x.Y/Z');
        expect(await late.first, 'what the late connection saw first').to.equal(
          `GOAWAY ${http2.constants.NGHTTP2_NO_ERROR}`,
        );
        expect(await late.streamClosed).to.equal(
          `stream closed (answered: false, rstCode ${http2.constants.NGHTTP2_REFUSED_STREAM})`,
        );
        // The late session closes by itself: nothing had to be cut for the shutdown to finish.
        await done;
        expect(served, 'calls the server handled').to.deep.equal(['early']);
        late.close();
      } finally {
        early.close();
        raw.destroy();
        if (!shutDown) server.forceShutdown();
      }
      await expectNoLeaks(baseline);
    },
  );
});
