import { expect } from 'chai';
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { TLSSocket } from 'node:tls';
import { status as Status } from '@grpc/grpc-js';
import { identityOfPeerCertificate } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';

/**
 * The broker reads each connection's peer certificate once (peerCertificateOf), not once per
 * call: Node builds a new certificate object on every getPeerCertificate() and grpc-js asks for it
 * on every call. Identity checks must still see each connection's own certificate.
 */
describe('peer certificates are read once per connection', () => {
  let stack: Stack;
  const reads = new Map<TLSSocket, number>();
  const original = TLSSocket.prototype.getPeerCertificate;

  before(async () => {
    // Counting wrapper on the prototype, installed before any connection exists: the broker's
    // per-connection cache captures it, so every real read is counted per socket.
    TLSSocket.prototype.getPeerCertificate = function (this: TLSSocket, detailed?: boolean) {
      reads.set(this, (reads.get(this) ?? 0) + 1);
      return original.call(this, detailed as true);
    } as typeof original;
    stack = await Stack.start();
  });
  after(async () => {
    TLSSocket.prototype.getPeerCertificate = original;
    await stack?.stop();
  });

  it(
    '30 calls on one caller connection read its certificate at most once, ' + 'and identities stay per connection',
    async () => {
      const before = new Map(reads);
      for (let i = 0; i < 30; i++) {
        const r = await stack.caller.unary(ECHO.unary, Buffer.from(`c${i}`), stack.md());
        expect(r.response.toString()).to.equal(`c${i}`);
      }
      // The broker's ends of the caller and agent connections (clients read the broker's
      // certificate when they verify it, which is not the broker's cost).
      const brokerPorts = [stack.apiAddress, stack.agentAddress].map((a) => Number(a.split(':')[1]));
      const grown = [...reads]
        .filter(([s]) => brokerPorts.includes(s.localPort ?? -1))
        .map(([s, n]) => n - (before.get(s) ?? 0));
      expect(grown.length, 'broker-side sockets seen').to.be.at.least(1);
      expect(Math.max(...grown)).to.be.at.most(1);

      // A second connection with an agent certificate is judged by its own certificate: refused.
      const wrongRole = new RawClient(stack.apiAddress, mtlsCredentials(stack.agentCert));
      try {
        const err = await wrongRole.unary(ECHO.unary, Buffer.from('x'), stack.md()).then(
          () => undefined,
          (e: { code: number; details: string }) => e,
        );
        expect(err?.code).to.equal(Status.PERMISSION_DENIED);
        expect(err?.details).to.contain('role "agent"');
        // ... while the first connection still works as a service.
        expect((await stack.caller.unary(ECHO.unary, Buffer.from('again'), stack.md())).response.toString()).to.equal(
          'again',
        );
      } finally {
        wrongRole.close();
      }
    },
  );

  it('identityOfPeerCertificate memoises per certificate object and reads each new object', () => {
    const x509 = new X509Certificate(readFileSync(stack.serviceCert.cert));
    const cert = { raw: x509.raw, fingerprint256: x509.fingerprint256 };
    const id = identityOfPeerCertificate(cert);
    expect(id).to.deep.include({ role: 'service', name: 'platform-svc' });
    expect(identityOfPeerCertificate(cert)).to.equal(id); // the memoised object
    const other = new X509Certificate(readFileSync(stack.agentCert.cert));
    expect(identityOfPeerCertificate({ raw: other.raw, fingerprint256: other.fingerprint256 })).to.deep.include({
      role: 'agent',
      name: 'site-a',
    });
    const garbage = { raw: Buffer.from('not a certificate'), fingerprint256: 'AA:BB' };
    expect(identityOfPeerCertificate(garbage)).to.equal(undefined);
    expect(identityOfPeerCertificate(garbage)).to.equal(undefined);
    expect(identityOfPeerCertificate({})).to.equal(undefined);
  });
});
