import { expect } from 'chai';
import { Backoff } from '@burrow/agent';
import { mulberry32 } from './helpers/seeded-random';

/** The largest value below 1 that Math.random() may return. */
const ALMOST_ONE = 1 - Number.EPSILON / 2;

describe('Backoff (full jitter)', () => {
  it('with random() = 0 every delay is 0', () => {
    const b = new Backoff(100, 10_000, () => 0);
    for (let i = 0; i < 20; i++) expect(b.nextDelayMs()).to.equal(0);
  });

  it('with random() near 1 the delays follow min(max, base * 2^n) up to the max, then stay there', () => {
    const b = new Backoff(100, 5_000, () => ALMOST_ONE);
    const windows = [100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000, 5_000];
    const delays = windows.map(() => b.nextDelayMs());
    delays.forEach((d, n) => {
      expect(d, `attempt ${n}`).to.be.at.most(windows[n]!);
      // Full jitter at the top of the window: within 1 ms of the ceiling.
      expect(d, `attempt ${n}`).to.be.at.least(windows[n]! - 1);
    });
    for (let i = 1; i < delays.length; i++) expect(delays[i]!).to.be.at.least(delays[i - 1]!);
  });

  it('ceilingMs reports the current window, doubling from base up to max', () => {
    const b = new Backoff(50, 1_000, () => 0.5);
    const ceilings: number[] = [];
    for (let i = 0; i < 8; i++) {
      ceilings.push(b.ceilingMs);
      b.nextDelayMs();
    }
    expect(ceilings).to.deep.equal([50, 100, 200, 400, 800, 1_000, 1_000, 1_000]);
  });

  it('a delay is the given fraction of the window (injected random is used, not Math.random)', () => {
    const b = new Backoff(1_000, 60_000, () => 0.25);
    expect([b.nextDelayMs(), b.nextDelayMs(), b.nextDelayMs()]).to.deep.equal([250, 500, 1_000]);
  });

  it('reset() starts over at the base window', () => {
    const b = new Backoff(100, 10_000, () => ALMOST_ONE);
    for (let i = 0; i < 10; i++) b.nextDelayMs();
    expect(b.ceilingMs).to.equal(10_000);
    b.reset();
    expect(b.ceilingMs).to.equal(100);
    expect(b.nextDelayMs()).to.be.within(99, 100);
    expect(b.nextDelayMs()).to.be.within(199, 200);
  });

  it('never exceeds max or goes negative, however many attempts (no overflow)', () => {
    const b = new Backoff(1, 30_000, () => ALMOST_ONE);
    for (let i = 0; i < 10_000; i++) {
      const d = b.nextDelayMs();
      expect(Number.isInteger(d), `attempt ${i}: ${d}`).to.equal(true);
      expect(d, `attempt ${i}`).to.be.within(0, 30_000);
    }
  });

  it('property: for many seeded configurations and random draws, delay n is in [0, min(max, base * 2^n)]', () => {
    const configRnd = mulberry32(20240611);
    for (let c = 0; c < 200; c++) {
      const baseMs = 1 + Math.floor(configRnd() * 2_000);
      const maxMs = baseMs + Math.floor(configRnd() * 120_000);
      const seed = Math.floor(configRnd() * 2 ** 32);
      const rnd = mulberry32(seed);
      const b = new Backoff(baseMs, maxMs, rnd);
      const resetEvery = 5 + Math.floor(configRnd() * 40);
      let n = 0;
      for (let i = 0; i < 200; i++) {
        if (i > 0 && i % resetEvery === 0) {
          b.reset();
          n = 0;
        }
        const window = Math.min(maxMs, baseMs * 2 ** n);
        expect(b.ceilingMs, `config base=${baseMs} max=${maxMs} seed=${seed} attempt ${n}`).to.equal(window);
        const d = b.nextDelayMs();
        expect(d, `config base=${baseMs} max=${maxMs} seed=${seed} attempt ${n}`).to.be.within(0, window);
        n++;
      }
    }
  });

  it('property: delays are spread over the whole window (full jitter, not a fixed fraction)', () => {
    // With base = max the window is fixed, so 2,000 draws should cover every tenth of it.
    const rnd = mulberry32(7);
    const b = new Backoff(1_000, 1_000, rnd);
    const buckets = new Array<number>(10).fill(0);
    for (let i = 0; i < 2_000; i++) {
      const d = b.nextDelayMs();
      buckets[Math.min(9, Math.floor(d / 100))]!++;
    }
    for (const [i, count] of buckets.entries())
      expect(count, `delays in [${i * 100}, ${i * 100 + 100}) ms`).to.be.within(120, 280);
  });
});
