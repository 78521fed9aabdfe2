import * as http2 from 'node:http2';
import type * as tls from 'node:tls';
import { H2_SESSION_OPTIONS, type CredentialStore } from '@burrow/tunnel';

/**
 * The broker's TLS listeners on raw node:http2 and node:tls: their TLS options follow the
 * credential store (renewals, CA rotation), and their sessions are tracked so a drain can send
 * GOAWAY to each and a cut can destroy what is left.
 */

/** TLS options of a broker listener from the store's current material. */
export function serverTlsOptions(store: CredentialStore, requireCert: boolean, alpn: string[]): tls.TlsOptions {
  return {
    key: store.keyPem,
    cert: store.certPem,
    ca: store.caPem,
    requestCert: true,
    rejectUnauthorized: requireCert,
    ALPNProtocols: alpn,
    minVersion: 'TLSv1.2',
  };
}

/** Every update of `store` rebuilds `server`'s context for new handshakes. */
export function followCredentialStore(server: tls.Server, store: CredentialStore, options: () => tls.TlsOptions): void {
  let current = `${store.certPem}${store.caPem}`;
  const refresh = (): void => {
    const next = `${store.certPem}${store.caPem}`;
    if (next === current) return;
    current = next;
    server.setSecureContext(options());
  };
  store.addCaCertificateListener(refresh);
  store.addIdentityCertificateListener(refresh);
  server.on('close', () => {
    store.removeCaCertificateListener(refresh);
    store.removeIdentityCertificateListener(refresh);
  });
}

/** The HTTP/2 sessions of a server, for drain (GOAWAY) and the final cut. */
export class SessionSet {
  private readonly sessions = new Set<http2.Http2Session>();
  /** Set by {@link closeGracefully}: a session that starts later (its handshake was running) gets GOAWAY at once. */
  private closing = false;

  track(server: { on(event: 'session', l: (s: http2.ServerHttp2Session) => void): unknown }): void {
    server.on('session', (s) => this.add(s));
  }

  add(session: http2.Http2Session): void {
    this.sessions.add(session);
    session.once('close', () => this.sessions.delete(session));
    if (this.closing) session.close();
  }

  get size(): number {
    return this.sessions.size;
  }

  /** GOAWAY to every session: calls in flight finish, new ones go elsewhere. Resolves when all closed. */
  closeGracefully(): Promise<void> {
    this.closing = true;
    const closing = [...this.sessions].map(
      (s) =>
        new Promise<void>((resolve) => {
          if (s.closed || s.destroyed) return resolve();
          s.once('close', () => resolve());
          s.close();
        }),
    );
    return Promise.all(closing).then(() => undefined);
  }

  /** Destroys every session now. */
  destroyAll(): void {
    for (const s of this.sessions) s.destroy();
    this.sessions.clear();
  }
}

/** A caller-facing HTTP/2 listener (API, peer): mTLS required, ALPN h2. */
export function createSecureH2Server(store: CredentialStore): http2.Http2SecureServer {
  const options = (): tls.TlsOptions => serverTlsOptions(store, true, ['h2']);
  const server = http2.createSecureServer({ ...H2_SESSION_OPTIONS, ...options() } as http2.SecureServerOptions);
  // Calls are small writes each way: Nagle would hold every other one for the peer's delayed ACK.
  server.on('secureConnection', (socket: tls.TLSSocket) => socket.setNoDelay(true));
  followCredentialStore(server, store, options);
  return server;
}
