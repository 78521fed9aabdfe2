/**
 * A bounded TTL cache of decisions, least recently used out first. Keys are canonical JSON of the
 * whole request, so two requests share an entry only when they are the same request. Not shared
 * between policy sets: the engine clears it on every successful reload.
 */
export class DecisionCache<V> {
  // Map iteration order is insertion order; a hit re-inserts its key, so the first key is the least recently used.
  private readonly entries = new Map<string, { value: V; expiresAtMs: number }>();

  /**
   * @param ttlMs how long an entry is served; 0 turns the cache off
   * @param maxEntries most entries kept
   * @param clock milliseconds now (tests pass a fake)
   */
  constructor(
    private readonly ttlMs: number,
    private readonly maxEntries: number,
    private readonly clock: () => number,
  ) {}

  get enabled(): boolean {
    return this.ttlMs > 0 && this.maxEntries > 0;
  }

  get size(): number {
    return this.entries.size;
  }

  get(key: string): V | undefined {
    const entry = this.entries.get(key);
    if (!entry) return undefined;
    this.entries.delete(key);
    if (entry.expiresAtMs <= this.clock()) return undefined;
    this.entries.set(key, entry);
    return entry.value;
  }

  set(key: string, value: V): void {
    if (!this.enabled) return;
    this.entries.delete(key);
    while (this.entries.size >= this.maxEntries) this.entries.delete(this.entries.keys().next().value as string);
    this.entries.set(key, { value, expiresAtMs: this.clock() + this.ttlMs });
  }

  clear(): void {
    this.entries.clear();
  }
}
