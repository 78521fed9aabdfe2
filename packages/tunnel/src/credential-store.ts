import type { experimental } from '@grpc/grpc-js';

type CertificateProvider = experimental.CertificateProvider;
type CaListener = Parameters<CertificateProvider['addCaCertificateListener']>[0];
type IdentityListener = Parameters<CertificateProvider['addIdentityCertificateListener']>[0];

/** PEM material of one TLS identity and the CAs it trusts. */
export interface TlsMaterial {
  caPem: string | Buffer;
  certPem: string | Buffer;
  keyPem: string | Buffer;
}

/**
 * The TLS identity and trust bundle of a broker or agent, swappable at run time. It implements
 * grpc-js's CertificateProvider, so credentials built on it pick up a renewed certificate or a
 * rotated trust bundle for every new connection, while connections already open carry on.
 */
export class CredentialStore implements CertificateProvider {
  private ca: Buffer;
  private cert: Buffer;
  private key: Buffer;
  private readonly caListeners = new Set<CaListener>();
  private readonly identityListeners = new Set<IdentityListener>();

  constructor(material: TlsMaterial) {
    this.ca = Buffer.from(material.caPem);
    this.cert = Buffer.from(material.certPem);
    this.key = Buffer.from(material.keyPem);
  }

  get caPem(): string {
    return this.ca.toString();
  }
  get certPem(): string {
    return this.cert.toString();
  }
  get keyPem(): string {
    return this.key.toString();
  }

  /** Replaces any part; listeners (grpc-js servers and channels) see it at once. */
  update(material: Partial<TlsMaterial>): void {
    if (material.caPem !== undefined) {
      this.ca = Buffer.from(material.caPem);
      for (const l of this.caListeners) l({ caCertificate: this.ca });
    }
    if (material.certPem !== undefined || material.keyPem !== undefined) {
      if (material.certPem !== undefined) this.cert = Buffer.from(material.certPem);
      if (material.keyPem !== undefined) this.key = Buffer.from(material.keyPem);
      for (const l of this.identityListeners) l({ certificate: this.cert, privateKey: this.key });
    }
  }

  // The first update is delivered on a microtask, not synchronously: grpc-js subscribes to its
  // providers before it registers the watcher that applies their updates, so a synchronous answer
  // would be lost and the server would drop every connection as "credentials not loaded".
  addCaCertificateListener(listener: CaListener): void {
    this.caListeners.add(listener);
    queueMicrotask(() => {
      if (this.caListeners.has(listener)) listener({ caCertificate: this.ca });
    });
  }
  removeCaCertificateListener(listener: CaListener): void {
    this.caListeners.delete(listener);
  }
  addIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.add(listener);
    queueMicrotask(() => {
      if (this.identityListeners.has(listener)) listener({ certificate: this.cert, privateKey: this.key });
    });
  }
  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.delete(listener);
  }
}
