import { X509Certificate } from 'node:crypto';
import { status as Status } from '@grpc/grpc-js';
import type { PeerCertificateLike } from '@burrow/tunnel';

/** What an Enrollment method reads of its call: the request, the peer's address and certificate. */
export interface EnrollmentCall<Request> {
  request: Request;
  /** HOST:PORT of the client. */
  peer: string;
  /** The client certificate, when the connection presented a valid one. */
  peerCertificate: PeerCertificateLike | undefined;
}

/** How an Enrollment method answers: an error (code, details) or the issued certificate. */
export type EnrollmentReply = (
  err: { code: Status; details?: string } | null,
  response?: IssuedAgentCertificate,
) => void;
import {
  EnrollmentError,
  PkiError,
  consumeJoinToken,
  csrPublicKeySha256,
  describeTightened,
  issueCertificate,
  loadPki,
  loadRevocations,
  recordAgentState,
  recordTokenCertificate,
  securePkiDir,
  signCsr,
  trustBundle,
  type RevocationList,
} from '@burrow/pki';
import {
  identityOfPeerCertificate,
  splitPemCertificates,
  type CredentialStore,
  type EnrollRequest,
  type IssuedAgentCertificate,
  type Logger,
  type PeerIdentity,
  type RenewRequest,
} from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';

/** The SPIFFE ID in the URI SAN of the first certificate of a chain (PEM). */
function spiffeIdOfCertificate(chainPem: string): string {
  const san = new X509Certificate(chainPem).subjectAltName ?? '';
  return /URI:(spiffe:\/\/[^,\s]+)/.exec(san)?.[1] ?? '';
}

/** How often the broker re-reads the PKI directory: revocations reach every tunnel within ~1 s. */
export const PKI_POLL_INTERVAL_MS = 500;

export interface BrokerPkiOptions {
  dir: string;
  logger: Logger;
  metrics: BrokerMetrics;
  /** Issue and renew the broker's own serving certificate from `dir` (no --tls-cert given). */
  issueOwnCertificate: boolean;
  /** Names for the self-issued serving certificate. */
  dns: string[];
  /** The broker's name (its id) in the self-issued certificate's SPIFFE id. */
  name: string;
  ip: string[];
  /** Lifetime of self-issued serving certificates and of agent certificates issued here. */
  leafTtlMs?: number;
  /** Enrollment attempts allowed per source address per minute. */
  enrollPerMinute: number;
  /** Injectable clock (tests). */
  now?: () => number;
}

/** What the broker's PKI tells the rest of the broker. */
export interface PkiEvents {
  /** The revocation list changed: close tunnels that are now revoked. */
  onRevocationsChanged(): void;
  /** The trust bundle changed (CA rotation): push it to agents. */
  onTrustBundleChanged(pem: string, version: number): void;
}

/** The `pki` part of the broker's `/status`. */
export interface BrokerPkiStatus {
  enabled: true;
  dir: string;
  trustDomain: string;
  /** 'standby' when no CA rotation is in progress. */
  rotationPhase: string;
  bundleVersion: number;
  revocationsVersion: number;
  selfIssuedServingCertificate: boolean;
  cas: {
    id: string;
    kind: string;
    notAfter: string;
    secondsLeft: number;
    signsClients: boolean;
    signsServers: boolean;
  }[];
}

/**
 * The name (broker id) of a broker that issues its own certificate and was given no --broker-id:
 * `<hostname>-<agent listener port>`, e.g. `node-7-7443`. Stable across restarts of one broker
 * (same host, same port) and distinct for two brokers on one host (two listeners cannot share a
 * port), so an agent that recognises brokers by id keeps a tunnel to each. With port 0 (tests)
 * the port is unknown before the certificate is issued: the process id stands in for it.
 * The hostname is folded into the id grammar (lower case; other characters become '-').
 */
export function defaultBrokerName(host: string, agentListen: string, pid: number = process.pid): string {
  const port = Number(agentListen.slice(agentListen.lastIndexOf(':') + 1));
  const suffix = port > 0 ? String(port) : `pid${pid}`;
  const base = host
    .toLowerCase()
    .replace(/[^a-z0-9._-]+/g, '-')
    .slice(0, 63 - suffix.length)
    .replace(/^[^a-z0-9]+/, '')
    .replace(/[^a-z0-9]+$/, '');
  return `${base || 'broker'}-${suffix}`;
}

/** Token bucket per source address, so a scanner cannot hammer enrollment. */
class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; updatedMs: number }>();
  constructor(
    private readonly perMinute: number,
    private readonly now: () => number,
  ) {}

  take(key: string): boolean {
    const now = this.now();
    const b = this.buckets.get(key) ?? { tokens: this.perMinute, updatedMs: now };
    b.tokens = Math.min(this.perMinute, b.tokens + ((now - b.updatedMs) / 60_000) * this.perMinute);
    b.updatedMs = now;
    this.buckets.set(key, b);
    if (this.buckets.size > 10_000) this.buckets.delete(this.buckets.keys().next().value as string);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }
}

/**
 * The broker's side of the PKI lifecycle, on a PKI directory shared with `burrow-pki`: serves
 * Enroll and Renew, keeps the trust bundle and revocation list current (polling the directory),
 * and issues and renews the broker's own serving certificate when asked to.
 */
export class BrokerPki {
  private revocations: RevocationList | undefined;
  private bundle = { pem: '', version: 0 };
  private timer: NodeJS.Timeout | undefined;
  private renewTimer: NodeJS.Timeout | undefined;
  private store: CredentialStore | undefined;
  private readonly limiter: RateLimiter;
  private readonly now: () => number;
  private polling = false;

  constructor(private readonly opts: BrokerPkiOptions) {
    this.now = opts.now ?? Date.now;
    this.limiter = new RateLimiter(opts.enrollPerMinute, this.now);
  }

  /** The trust bundle PEM agents and callers must chain to. */
  get trustBundlePem(): string {
    return this.bundle.pem;
  }
  get bundleVersion(): number {
    return this.bundle.version;
  }

  /**
   * Loads the directory; with `issueOwnCertificate`, issues the serving certificate. Returns the
   * TLS material for the broker's listeners.
   */
  async load(): Promise<{ caPem: string; certPem?: string; keyPem?: string }> {
    // The directory holds the CA keys: one left group/world accessible is made 0700 (or refused
    // when another user owns it) before anything is read from it.
    for (const outcome of await securePkiDir(this.opts.dir, 'pki-dir')) {
      this.opts.logger.warn(describeTightened(outcome)!, { dir: outcome.dir });
    }
    await loadPki(this.opts.dir); // fails early, naming the directory, when it is not a PKI
    this.bundle = await trustBundle(this.opts.dir);
    this.revocations = await loadRevocations(this.opts.dir);
    if (!this.opts.issueOwnCertificate) return { caPem: this.bundle.pem };
    const own = await this.issueOwn();
    return { caPem: this.bundle.pem, ...own };
  }

  /** Starts polling the directory and renewing the serving certificate; `store` gets the updates. */
  start(store: CredentialStore, events: PkiEvents): void {
    this.store = store;
    this.timer = setInterval(() => {
      void this.poll(events);
    }, PKI_POLL_INTERVAL_MS);
    this.timer.unref();
    if (this.opts.issueOwnCertificate) this.scheduleOwnRenewal();
  }

  stop(): void {
    clearInterval(this.timer);
    clearTimeout(this.renewTimer);
  }

  /** True when `id`'s certificate is revoked (by serial, or by agent id since before it was issued). */
  isRevoked(id: PeerIdentity): boolean {
    return (
      this.revocations?.isCertificateRevoked({
        role: id.role,
        name: id.name,
        serialHex: id.serialHex,
        notBeforeMs: id.notBeforeMs,
      }) ?? false
    );
  }

  /**
   * The PKI as this broker sees it, for `/status`: directory, rotation phase, trust bundle
   * version, revocation list version and every CA with its expiry. Rejects when the directory
   * cannot be read.
   */
  async status(): Promise<BrokerPkiStatus> {
    const pki = await loadPki(this.opts.dir);
    return {
      enabled: true,
      dir: pki.dir,
      trustDomain: pki.trustDomain,
      rotationPhase: pki.manifest.rotation?.phase ?? 'standby',
      bundleVersion: this.bundle.version,
      revocationsVersion: this.revocations?.version ?? 0,
      selfIssuedServingCertificate: this.opts.issueOwnCertificate,
      cas: pki.manifest.cas.map((c) => ({
        id: c.id,
        kind: c.kind,
        notAfter: new Date(String(c.notAfter)).toISOString(),
        secondsLeft: Math.round((Date.parse(String(c.notAfter)) - this.now()) / 1000),
        signsClients: c.id === pki.manifest.signingCaId,
        signsServers: c.id === (pki.manifest.serverSigningCaId ?? pki.manifest.signingCaId),
      })),
    };
  }

  /** Seconds until each CA expires, for metrics. */
  async caExpiries(): Promise<{ id: string; kind: string; seconds: number }[]> {
    const pki = await loadPki(this.opts.dir);
    return pki.manifest.cas.map((c) => ({
      id: c.id,
      kind: c.kind,
      seconds: (Date.parse(String(c.notAfter)) - this.now()) / 1000,
    }));
  }

  /**
   * The enrollment rate limit (`enrollPerMinute` per source address), asked when an Enroll call's
   * headers arrive, before its body is read (the agent listener asks it when the headers arrive): counts
   * the attempt, and returns the refusal to send when `address` is over its budget.
   */
  refuseEnrollment(address: string): { code: Status; details: string } | undefined {
    if (this.limiter.take(address)) return undefined;
    this.opts.metrics.enrollments.inc({ result: 'rate_limited' });
    this.opts.logger.warn('enrollment refused: rate limited', { source: address });
    const details = `too many enrollment attempts from ${address}; try again in a minute`;
    return { code: Status.RESOURCE_EXHAUSTED, details };
  }

  /**
   * Enrollment/Enroll: join token + CSR -> the agent's first certificate. No client cert needed.
   * The rate limit ran before the body was read ({@link refuseEnrollment}).
   */
  readonly enroll = (call: EnrollmentCall<EnrollRequest>, cb: EnrollmentReply): void => {
    const source = call.peer.replace(/:\d+$/, '');
    const { token, csrPem } = call.request;
    void (async () => {
      // The CSR is checked before the token is consumed: a bad request must not burn it, and the
      // key it carries is what lets the same enrollment, retried, get the same certificate.
      let publicKeySha256: string;
      try {
        publicKeySha256 = await csrPublicKeySha256(csrPem);
      } catch (err) {
        this.opts.metrics.enrollments.inc({ result: 'bad_csr' });
        this.opts.logger.warn('enrollment refused: bad CSR', { source, error: (err as Error).message });
        cb({ code: Status.INVALID_ARGUMENT, details: `enrollment refused: ${(err as Error).message}` });
        return;
      }
      let consumed: { agentId: string; certificatePem?: string };
      try {
        consumed = await consumeJoinToken({ dir: this.opts.dir, token, nowMs: this.now(), publicKeySha256 });
      } catch (err) {
        const reason = err instanceof EnrollmentError ? err.reason : 'error';
        this.opts.metrics.enrollments.inc({ result: reason });
        this.opts.logger.warn('enrollment refused', { source, reason, error: (err as Error).message });
        cb({
          code: err instanceof EnrollmentError ? Status.PERMISSION_DENIED : Status.INTERNAL,
          details: `enrollment refused: ${(err as Error).message}`,
        });
        return;
      }
      const { agentId, certificatePem } = consumed;
      if (certificatePem !== undefined) {
        this.opts.metrics.enrollments.inc({ result: 'repeated' });
        this.opts.logger.info('agent enrollment repeated: same token and key, same certificate', { agentId, source });
        cb(null, this.agentResponse(agentId, certificatePem));
        return;
      }
      try {
        const issued = await this.issueForAgent(agentId, csrPem, 0);
        await recordTokenCertificate({
          dir: this.opts.dir,
          token,
          certificatePem: issued.response.certificateChainPem,
        });
        this.opts.metrics.enrollments.inc({ result: 'ok' });
        this.opts.logger.info('agent enrolled', { agentId, source, serial: issued.serialHex });
        cb(null, issued.response);
      } catch (err) {
        const bad = err instanceof PkiError;
        this.opts.metrics.enrollments.inc({ result: bad ? 'bad_csr' : 'error' });
        this.opts.logger.warn('enrollment failed', { agentId, source, error: (err as Error).message });
        cb({
          code: bad ? Status.INVALID_ARGUMENT : Status.INTERNAL,
          details: `enrollment refused: ${(err as Error).message}`,
        });
      }
    })();
  };

  /**
   * Enrollment/Renew: the agent's valid client certificate + a CSR for a new key -> a new
   * certificate for the same identity. `authenticate` is the agent listener's identity check.
   */
  readonly renew = (call: EnrollmentCall<RenewRequest>, cb: EnrollmentReply, trustDomain: string): void => {
    const id = identityOfPeerCertificate(call.peerCertificate);
    let problem: string | undefined;
    let result = 'denied';
    if (!id)
      problem =
        'renewal needs a valid client certificate; an agent whose certificate expired must enroll again with a ' +
        'new join token';
    else if (id.role !== 'agent' || id.trustDomain !== trustDomain)
      problem = `certificate ${id.spiffeId} may not renew an agent certificate`;
    else if (this.isRevoked(id)) {
      problem = `certificate of agent "${id.name}" is revoked`;
      result = 'revoked';
    }
    if (problem || !id) {
      this.opts.metrics.renewals.inc({ result });
      this.opts.logger.warn('renewal refused', { agentId: id?.name, reason: problem });
      cb({ code: Status.PERMISSION_DENIED, details: problem });
      return;
    }
    void this.issueForAgent(id.name, call.request.csrPem, call.request.bundleVersion).then(
      (issued) => {
        this.opts.metrics.renewals.inc({ result: 'ok' });
        this.opts.logger.info('agent certificate renewed', {
          agentId: id.name,
          serial: issued.serialHex,
          notAfter: issued.notAfter.toISOString(),
        });
        cb(null, issued.response);
      },
      (err: Error) => {
        const bad = err instanceof PkiError;
        this.opts.metrics.renewals.inc({ result: bad ? 'bad_csr' : 'error' });
        cb({ code: bad ? Status.INVALID_ARGUMENT : Status.INTERNAL, details: `renewal refused: ${err.message}` });
      },
    );
  };

  /** The answer to an agent: its certificate chain with the current trust bundle. */
  private agentResponse(agentId: string, certificateChainPem: string): IssuedAgentCertificate {
    return {
      certificateChainPem,
      trustBundlePem: this.bundle.pem,
      bundleVersion: this.bundle.version,
      agentId,
      spiffeId: spiffeIdOfCertificate(certificateChainPem),
    };
  }

  private async issueForAgent(
    agentId: string,
    csrPem: string,
    bundleVersion: number,
  ): Promise<{ response: IssuedAgentCertificate; serialHex: string; notAfter: Date }> {
    const issued = await signCsr({
      dir: this.opts.dir,
      csrPem,
      role: 'agent',
      name: agentId,
      ttlMs: this.opts.leafTtlMs,
    });
    await recordAgentState({
      dir: this.opts.dir,
      agentId,
      bundleVersion: bundleVersion || this.bundle.version,
      issuerCaId: issued.issuerCaId,
      serialHex: issued.serialHex,
      notAfter: issued.notAfter,
    }).catch((err: Error) => this.opts.logger.warn('cannot record agent state', { agentId, error: err.message }));
    return {
      response: this.agentResponse(agentId, issued.certPem),
      serialHex: issued.serialHex,
      notAfter: issued.notAfter,
    };
  }

  // The served chain ends with the trust bundle's roots, so a new agent can find the CA its join
  // token pins in the handshake itself.
  private async issueOwn(): Promise<{ certPem: string; keyPem: string }> {
    const issued = await issueCertificate({
      dir: this.opts.dir,
      role: 'broker',
      name: this.opts.name,
      dns: this.opts.dns,
      ip: this.opts.ip,
      ttlMs: this.opts.leafTtlMs,
    });
    this.ownNotAfterMs = issued.notAfter.getTime();
    this.ownNotBeforeMs = this.now();
    this.opts.metrics.servingCertificatesIssued.inc();
    this.opts.metrics.certificateExpiry.set({ role: 'broker' }, (this.ownNotAfterMs - this.now()) / 1000);
    this.opts.logger.info('issued the broker serving certificate', {
      serial: issued.serialHex,
      notAfter: issued.notAfter.toISOString(),
    });
    return { certPem: `${issued.certPem.trimEnd()}\n${this.bundle.pem}`, keyPem: issued.keyPem };
  }

  private ownNotAfterMs = 0;
  private ownNotBeforeMs = 0;

  /** Renews at about 2/3 of the lifetime, minus up to 1/20 of it in jitter; retries with backoff. */
  private scheduleOwnRenewal(retryMs?: number): void {
    const lifeMs = this.ownNotAfterMs - this.ownNotBeforeMs;
    const atMs =
      retryMs !== undefined
        ? this.now() + retryMs
        : this.ownNotBeforeMs + (lifeMs * 2) / 3 - Math.random() * (lifeMs / 20);
    this.renewTimer = setTimeout(
      () => {
        this.issueOwn().then(
          (own) => {
            this.store?.update(own);
            this.scheduleOwnRenewal();
          },
          (err: Error) => {
            const nextMs = Math.min(60_000, Math.max(1_000, (this.ownNotAfterMs - this.now()) / 10));
            this.opts.logger.error('cannot renew the broker serving certificate; retrying', {
              error: err.message,
              retryInMs: nextMs,
            });
            this.scheduleOwnRenewal(nextMs);
          },
        );
      },
      Math.max(0, atMs - this.now()),
    );
    this.renewTimer.unref();
  }

  private async poll(events: PkiEvents): Promise<void> {
    if (this.polling) return;
    this.polling = true;
    try {
      const revocations = await loadRevocations(this.opts.dir);
      if (revocations.version !== this.revocations?.version) {
        this.revocations = revocations;
        this.opts.metrics.revocationsApplied.inc();
        events.onRevocationsChanged();
      }
      const bundle = await trustBundle(this.opts.dir);
      if (bundle.version !== this.bundle.version || bundle.pem !== this.bundle.pem) {
        this.bundle = bundle;
        this.opts.logger.info('trust bundle changed', {
          version: bundle.version,
          cas: splitPemCertificates(bundle.pem).length,
        });
        this.store?.update({ caPem: bundle.pem });
        events.onTrustBundleChanged(bundle.pem, bundle.version);
        // A rotation that moves brokers to the new CA: reissue our certificate now.
        if (this.opts.issueOwnCertificate) {
          const own = await this.issueOwn();
          this.store?.update(own);
        }
      }
      if (this.ownNotAfterMs)
        this.opts.metrics.certificateExpiry.set({ role: 'broker' }, (this.ownNotAfterMs - this.now()) / 1000);
      for (const ca of await this.caExpiries())
        this.opts.metrics.caExpiry.set({ ca: ca.id, kind: ca.kind }, ca.seconds);
    } catch (err) {
      this.opts.logger.warn('cannot read the PKI directory; keeping the last good state', {
        dir: this.opts.dir,
        error: (err as Error).message,
      });
    } finally {
      this.polling = false;
    }
  }
}
