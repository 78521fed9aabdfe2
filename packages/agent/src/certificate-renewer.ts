import { X509Certificate } from 'node:crypto';
import { NOT_BEFORE_BACKDATE_MS, createCsr } from '@burrow/pki';
import type { IssuedAgentCertificate, Logger } from '@burrow/tunnel';

/** Time source and timers, injectable so tests can drive renewal without waiting. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): { cancel(): void };
}

export const SYSTEM_CLOCK: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref();
    return { cancel: () => clearTimeout(t) };
  },
};

/**
 * When to renew a certificate valid from `notBeforeMs` to `notAfterMs`: at two thirds of its
 * lifetime, minus a random jitter of up to one twentieth of it (step-ca's schedule), so a fleet
 * issued at the same moment does not renew in lockstep. `random` returns [0, 1).
 */
export function renewalTimeMs(notBeforeMs: number, notAfterMs: number, random: () => number = Math.random): number {
  const lifeMs = notAfterMs - notBeforeMs;
  return notBeforeMs + (lifeMs * 2) / 3 - random() * (lifeMs / 20);
}

/**
 * How long to wait before retrying a failed renewal: a tenth of the time left, between 1 s and
 * 60 s, so retries get more frequent as expiry nears and never wait past it.
 */
export function renewalRetryDelayMs(nowMs: number, notAfterMs: number): number {
  return Math.min(60_000, Math.max(1_000, (notAfterMs - nowMs) / 10));
}

export interface RenewerDeps {
  clock: Clock;
  logger: Logger;
  /** The certificate currently in use (PEM, leaf first). */
  currentCertPem(): string;
  /** The trust-bundle version held, reported to the broker. */
  bundleVersion(): number;
  /** Sends Renew over a live broker connection; rejects when none is usable or the broker refuses. */
  renew(csrPem: string, bundleVersion: number): Promise<IssuedAgentCertificate>;
  /** Installs the new certificate, key and bundle (files, TLS credentials, sessions). */
  install(issued: IssuedAgentCertificate, keyPem: string): Promise<void>;
  /** Counts results for metrics. */
  onResult?(result: 'ok' | 'failed'): void;
}

/**
 * Renews the agent's certificate before it expires, with a new key each time, over the agent's
 * own mTLS connection. Failures retry with a shrinking delay until the certificate has expired;
 * an expired certificate cannot renew (the broker no longer trusts it), and the agent logs how to
 * recover: enroll again with a new join token.
 */
export class CertificateRenewer {
  private timer: { cancel(): void } | undefined;
  private stopped = false;
  private inFlight: Promise<void> | undefined;

  constructor(
    private readonly deps: RenewerDeps,
    private readonly random: () => number = Math.random,
  ) {}

  /** Schedules the next renewal from the current certificate. */
  start(): void {
    this.stopped = false;
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    this.timer?.cancel();
  }

  /** Renews now (tests, and after a certificate was replaced by hand). */
  renewNow(): Promise<void> {
    this.inFlight ??= this.attempt().finally(() => {
      this.inFlight = undefined;
    });
    return this.inFlight;
  }

  /** Re-plans from the current certificate (after it was replaced by re-enrollment). */
  reschedule(): void {
    this.timer?.cancel();
    if (!this.stopped) this.schedule();
  }

  /**
   * The certificate's validity, measured from when it was issued: Burrow backdates notBefore by
   * NOT_BEFORE_BACKDATE_MS for clock skew, and counting that as lifetime would renew a
   * short-lived certificate at once, over and over.
   */
  private validity(): { notBeforeMs: number; notAfterMs: number } {
    const cert = new X509Certificate(this.deps.currentCertPem());
    const notBeforeMs = Date.parse(cert.validFrom);
    const notAfterMs = Date.parse(cert.validTo);
    const issuedMs = notBeforeMs + NOT_BEFORE_BACKDATE_MS;
    return { notBeforeMs: issuedMs < notAfterMs ? issuedMs : notBeforeMs, notAfterMs };
  }

  private schedule(atMs?: number): void {
    const { notBeforeMs, notAfterMs } = this.validity();
    const now = this.deps.clock.now();
    if (notAfterMs <= now) {
      this.deps.logger.error(
        `agent certificate expired at ${new Date(notAfterMs).toISOString()} and can no longer renew; enroll ` +
          `again with a new join token: burrow-agent enroll --broker HOST:PORT --token TOKEN --state-dir DIR (the ` +
          `running agent picks the new certificate up)`,
      );
      return;
    }
    const when = atMs ?? renewalTimeMs(notBeforeMs, notAfterMs, this.random);
    this.timer = this.deps.clock.setTimeout(
      () => {
        void this.renewNow();
      },
      Math.max(0, when - now),
    );
  }

  private async attempt(): Promise<void> {
    if (this.stopped) return;
    const { notAfterMs } = this.validity();
    try {
      const { csrPem, keyPem } = await createCsr();
      const issued = await this.deps.renew(csrPem, this.deps.bundleVersion());
      await this.deps.install(issued, keyPem);
      this.deps.onResult?.('ok');
      const next = this.validity();
      this.deps.logger.info('agent certificate renewed', { notAfter: new Date(next.notAfterMs).toISOString() });
      if (!this.stopped) {
        this.timer?.cancel();
        this.schedule();
      }
    } catch (err) {
      this.deps.onResult?.('failed');
      const now = this.deps.clock.now();
      const retryMs = renewalRetryDelayMs(now, notAfterMs);
      this.deps.logger.warn('certificate renewal failed; retrying', {
        error: (err as Error).message,
        retryInMs: Math.round(retryMs),
        expiresAt: new Date(notAfterMs).toISOString(),
      });
      if (!this.stopped) {
        this.timer?.cancel();
        this.schedule(now + retryMs);
      }
    }
  }
}
