import { expect } from 'chai';
import * as fc from 'fast-check';
import { CertificateRenewer, renewalRetryDelayMs, renewalTimeMs, type Clock } from '@burrow/agent';
import { NOT_BEFORE_BACKDATE_MS, issueCertificate } from '@burrow/pki';
import { silentLogger, type IssuedAgentCertificate } from '@burrow/tunnel';
import { PkiFixture } from './helpers/pki-fixture';

/** A clock that only moves when the test says so; timers fire in order as it passes them. */
class FakeClock implements Clock {
  private timers: { at: number; fn: () => void; cancelled: boolean }[] = [];
  constructor(public nowMs: number) {}
  now(): number {
    return this.nowMs;
  }
  setTimeout(fn: () => void, ms: number): { cancel(): void } {
    const t = { at: this.nowMs + ms, fn, cancelled: false };
    this.timers.push(t);
    return {
      cancel: () => {
        t.cancelled = true;
      },
    };
  }
  /** The time the next live timer fires, if any. */
  get nextAt(): number | undefined {
    return this.timers.filter((t) => !t.cancelled).sort((a, b) => a.at - b.at)[0]?.at;
  }
  /** Moves to the next timer and fires it. */
  fireNext(): void {
    const next = this.timers.filter((t) => !t.cancelled).sort((a, b) => a.at - b.at)[0];
    if (!next) throw new Error('no timer pending');
    next.cancelled = true;
    this.nowMs = next.at;
    next.fn();
  }
}

describe('certificate renewal timing', () => {
  it('renews at 2/3 of the lifetime minus at most 1/20 of it (property)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 2 ** 40 }),
        fc.integer({ min: 1_000, max: 10 * 365 * 86_400_000 }),
        fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }),
        (notBeforeMs, lifeMs, r) => {
          const at = renewalTimeMs(notBeforeMs, notBeforeMs + lifeMs, () => r);
          const twoThirds = notBeforeMs + (lifeMs * 2) / 3;
          return at <= twoThirds + 1e-6 && at >= twoThirds - lifeMs / 20 - 1e-6 && at > notBeforeMs;
        },
      ),
    );
  });

  it(
    'retries after a tenth of the time left, between 1 s and ' +
      '60 s, never past expiry for lives over 1 s (property)',
    () => {
      fc.assert(
        fc.property(fc.integer({ min: 0, max: 2 ** 40 }), fc.integer({ min: 1, max: 86_400_000 }), (now, leftMs) => {
          const d = renewalRetryDelayMs(now, now + leftMs);
          return d >= 1_000 && d <= 60_000 && (leftMs < 10_000 || d <= leftMs / 10 + 1);
        }),
      );
    },
  );

  describe('CertificateRenewer with an injected clock', () => {
    let pki: PkiFixture;
    before(async () => {
      pki = await PkiFixture.create();
    });
    after(() => pki.cleanup());

    const issue = async (ttlMs: number): Promise<string> =>
      (await issueCertificate({ dir: pki.pkiDir, role: 'agent', name: 'site-clock', ttlMs })).certPem;

    it('renews on schedule with a new key, and after a failure retries before expiry', async () => {
      const lifeMs = 90_000;
      let certPem = await issue(lifeMs);
      const issuedAt =
        Date.parse(new (await import('node:crypto')).X509Certificate(certPem).validFrom) + NOT_BEFORE_BACKDATE_MS;
      const clock = new FakeClock(issuedAt);
      const keys: string[] = [];
      let failNext = false;
      const results: string[] = [];
      const renewer = new CertificateRenewer(
        {
          clock,
          logger: silentLogger(),
          currentCertPem: () => certPem,
          bundleVersion: () => 1,
          renew: async (): Promise<IssuedAgentCertificate> => {
            if (failNext) {
              failNext = false;
              throw new Error('broker unreachable');
            }
            const next = await issue(lifeMs);
            return {
              certificateChainPem: next,
              trustBundlePem: '',
              bundleVersion: 1,
              agentId: 'site-clock',
              spiffeId: '',
            };
          },
          install: async (issued, keyPem) => {
            certPem = issued.certificateChainPem;
            keys.push(keyPem);
          },
          onResult: (r) => results.push(r),
        },
        () => 0.5,
      );
      renewer.start();
      // First renewal: at 2/3 of 90 s minus half of the 4.5 s jitter window = 57.75 s after issue.
      expect(clock.nextAt! - issuedAt).to.equal(60_000 - 2_250);
      clock.fireNext();
      await renewer.renewNow(); // joins the attempt the timer started
      expect(results).to.deep.equal(['ok']);
      // A failure: retried after a tenth of the time left, well before expiry.
      failNext = true;
      clock.fireNext();
      await renewer.renewNow();
      expect(results.slice(-1)).to.deep.equal(['failed']);
      const { X509Certificate } = await import('node:crypto');
      const notAfter = Date.parse(new X509Certificate(certPem).validTo);
      expect(clock.nextAt!).to.be.lessThan(notAfter);
      clock.fireNext();
      await renewer.renewNow();
      expect(results).to.deep.equal(['ok', 'failed', 'ok']);
      expect(new Set(keys).size).to.equal(2); // a new key every time
      renewer.stop();
      expect(clock.nextAt).to.equal(undefined);
    });
  });
});
