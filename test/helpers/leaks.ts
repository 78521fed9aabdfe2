/**
 * Leak checks: counts of live sockets, servers and timers, as Node reports them. A test takes a
 * snapshot before it starts anything and asserts, after stopping everything, that the counts are
 * back (waiting briefly, since sockets finish closing on a later tick).
 */
const WATCHED = ['TCPSocketWrap', 'TCPServerWrap', 'TLSWrap', 'Timeout', 'ProcessWrap', 'Http2Session'];

export type ResourceSnapshot = Record<string, number>;

export function snapshotResources(): ResourceSnapshot {
  const counts: ResourceSnapshot = {};
  for (const r of process.getActiveResourcesInfo()) if (WATCHED.includes(r)) counts[r] = (counts[r] ?? 0) + 1;
  return counts;
}

// Mocha arms the timeout timer of an async hook after the hook function starts, so an `after` hook
// runs with one more timer than the `before` hook saw when it took the baseline.
const ALLOWANCE: ResourceSnapshot = { Timeout: 1 };

function excess(baseline: ResourceSnapshot): string[] {
  const now = snapshotResources();
  return Object.entries(now)
    .filter(([k, n]) => n > (baseline[k] ?? 0) + (ALLOWANCE[k] ?? 0))
    .map(([k, n]) => `${k}: ${n} (baseline ${baseline[k] ?? 0})`);
}

/** Resolves once nothing beyond `baseline` is open; rejects naming what is left after `timeoutMs`. */
export async function expectNoLeaks(baseline: ResourceSnapshot, timeoutMs = 3000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const left = excess(baseline);
    if (left.length === 0) return;
    if (Date.now() > end) throw new Error(`resources left open: ${left.join(', ')}`);
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setTimeout(r, 10).unref());
  }
}
