import { expect } from 'chai';
import { once } from 'node:events';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { Client, Metadata, credentials } from '@grpc/grpc-js';
import { abortConnectsOnChannelClose, identity } from '@burrow/tunnel';

/**
 * A channel closed while its TLS handshake is still running must drop the connection at once
 * (abortConnectsOnChannelClose). grpc-js leaves it open until the handshake ends; an agent whose
 * broker stalls handshakes gave up on each attempt after the Welcome timeout and left one socket
 * behind per attempt (found by the bench's 10,000-agent reconnect storm). The server here accepts
 * TCP and never answers TLS, as a broker too busy to get to the handshake does.
 */
describe('a grpc-js channel closed mid-handshake drops its connection', function () {
  this.timeout(10_000);
  let server: Server;
  const accepted: Socket[] = [];
  let address: string;

  before(async () => {
    abortConnectsOnChannelClose();
    server = createServer((socket) => {
      accepted.push(socket);
      socket.resume(); // read, so the client's FIN is seen
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    for (const s of accepted) s.destroy();
    server.close();
    await once(server, 'close');
  });

  for (const attempt of [1, 2, 3]) {
    it(`attempt ${attempt}: the server sees the connection close as soon as the channel is closed`, async () => {
      const client = new Client(address, credentials.createSsl(), {
        'grpc.use_local_subchannel_pool': 1,
        'grpc.enable_retries': 0,
      });
      const connected = once(server, 'connection') as Promise<[Socket]>;
      const failed = new Promise<Error | null>((resolve) => {
        client.makeUnaryRequest(
          '/x.Y/Z',
          identity,
          identity,
          Buffer.alloc(0),
          new Metadata(),
          { deadline: Date.now() + 30_000 },
          (err) => resolve(err),
        );
      });
      const [socket] = await connected;
      const closed = once(socket, 'close');
      client.close();
      await closed; // without the hook this waits for the handshake timeout that never comes
      expect((await failed)?.message).to.match(/UNAVAILABLE|closed/i);
      expect(accepted.filter((s) => !s.destroyed)).to.have.length(0);
    });
  }

  it('installing twice is harmless', () => {
    abortConnectsOnChannelClose();
    abortConnectsOnChannelClose();
  });
});
