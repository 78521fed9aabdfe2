/**
 * Exponential backoff with full jitter: attempt n waits a uniformly random time in
 * [0, min(maxMs, baseMs * 2^n)]. Full jitter spreads a fleet that lost the same broker over the
 * whole window, so it does not come back in lockstep. `reset()` after a healthy session.
 */
export class Backoff {
  private attempt = 0;

  constructor(
    readonly baseMs: number,
    readonly maxMs: number,
    private readonly random: () => number = Math.random,
  ) {}

  /** The wait before the next attempt, in ms; each call widens the window up to `maxMs`. */
  nextDelayMs(): number {
    const ceilingMs = Math.min(this.maxMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
    this.attempt++;
    return Math.floor(this.random() * ceilingMs);
  }

  /** The current window's upper bound, in ms (for logs). */
  get ceilingMs(): number {
    return Math.min(this.maxMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
  }

  reset(): void {
    this.attempt = 0;
  }
}
