import { EventEmitter } from 'node:events';
import type { Logger } from '@burrow/tunnel';
import type { AuthnMetrics } from './authn-metrics';
import type { JoseModule } from './jose-loader';
import { JwksKeySet } from './jwks-key-set';

/** Where a JWKS document comes from: a file or a URL. */
export interface JwksLoader {
  /** Names the source in logs and errors, e.g. `jwks-url https://idp.site/jwks`. */
  readonly description: string;
  /** Reads the whole document. Rejects with an Error saying why it could not. */
  load(): Promise<Buffer>;
  /** Calls `changed` when the source may have changed (a file watcher); returns the stop function. */
  watch?(changed: () => void): () => void;
  close?(): void;
}

/** Timing of a {@link JwksSource}. */
export interface JwksSourceOptions {
  /** Fewest milliseconds between two loads caused by tokens naming unknown keys. */
  refreshMinIntervalMs: number;
  /** Background reload period: keys removed from the source stop verifying within this time. */
  maxAgeMs: number;
  /** Milliseconds since the epoch; the rate limit is measured with it so tests can move time. */
  clock: () => number;
}

/**
 * The current key set of one JWKS source, kept fresh. Loads when started, when the loader says the
 * source changed, every `maxAgeMs` in the background, and when a token names a key the set does not
 * hold (at most once per `refreshMinIntervalMs`, however many such tokens arrive, so that a flood of
 * made-up `kid`s cannot turn the agent into a load generator against the site's identity
 * provider). A failed load keeps the last good set. Emits `keys` (JwksKeySet) after each load that
 * changed the set, `unchanged` after one that did not, and `failed` (Error) after a failure.
 */
export class JwksSource extends EventEmitter {
  private current: JwksKeySet | undefined;
  /** Time (clock) of the last load that tokens asked for; -Infinity before any. */
  private lastDemandLoadAt = Number.NEGATIVE_INFINITY;
  /** The one load in flight; every caller in the meantime shares it. */
  private inFlight: Promise<boolean> | undefined;
  /** A change was reported while a load was in flight. */
  private loadAgain = false;
  private timer: NodeJS.Timeout | undefined;
  private stopWatching: (() => void) | undefined;
  private closed = false;
  /** Why the last load failed, until one succeeds. */
  lastError: string | undefined;

  constructor(
    private readonly jose: JoseModule,
    private readonly loader: JwksLoader,
    private readonly options: JwksSourceOptions,
    private readonly metrics: AuthnMetrics,
    private readonly logger: Logger,
  ) {
    super();
  }

  get description(): string {
    return this.loader.description;
  }

  /** The current set, or undefined while no load has succeeded. */
  keys(): JwksKeySet | undefined {
    return this.current;
  }

  /** First load, then the watcher and the background timer. Resolves true when keys were loaded. */
  async start(): Promise<boolean> {
    this.lastDemandLoadAt = this.options.clock();
    // Watch first, so that a change made while the first load reads the source is not missed.
    if (this.loader.watch) this.stopWatching = this.loader.watch(() => void this.load('changed'));
    return this.load('start');
  }

  /**
   * Loads again because a token named a key that is not in the set (or no set is loaded yet).
   * Joins a load already in flight; otherwise loads only if the last such load was at least
   * `refreshMinIntervalMs` ago. Resolves true when a new set was swapped in.
   */
  refreshForUnknownKey(): Promise<boolean> {
    if (this.inFlight) return this.inFlight;
    const now = this.options.clock();
    if (now - this.lastDemandLoadAt < this.options.refreshMinIntervalMs) return Promise.resolve(false);
    this.lastDemandLoadAt = now;
    return this.load('unknown key');
  }

  /** True while a load is in flight (a call that waits for it waits for a key fetch). */
  get loading(): boolean {
    return this.inFlight !== undefined;
  }

  /** Stops the watcher and the timer; a load in flight finishes but changes nothing. */
  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.stopWatching?.();
    this.loader.close?.();
  }

  private load(why: string): Promise<boolean> {
    if (this.closed) return Promise.resolve(false);
    if (this.inFlight) {
      // The load in flight may have read the source before this change: read it once more after.
      if (why === 'changed') this.loadAgain = true;
      return this.inFlight;
    }
    this.inFlight = this.loadOnce(why).finally(() => {
      this.inFlight = undefined;
      if (this.loadAgain) {
        this.loadAgain = false;
        void this.load('changed');
      }
    });
    return this.inFlight;
  }

  private async loadOnce(why: string): Promise<boolean> {
    let next: JwksKeySet;
    try {
      next = JwksKeySet.parse(this.jose, await this.loader.load());
    } catch (err) {
      if (this.closed) return false;
      this.lastError = (err as Error).message;
      this.metrics.jwksRefreshes.inc({ result: 'failed' });
      this.logger.warn('cannot load the token signing keys; keeping the last good ones', {
        source: this.loader.description,
        why,
        error: this.lastError,
        keys: this.current?.count ?? 0,
      });
      // Without any keys every token fails, so try again soon rather than after maxAgeMs.
      this.schedule(
        this.current ? this.options.maxAgeMs : Math.min(this.options.refreshMinIntervalMs, this.options.maxAgeMs),
      );
      this.emit('failed', err);
      return false;
    }
    if (this.closed) return false;
    this.lastError = undefined;
    this.metrics.jwksRefreshes.inc({ result: 'ok' });
    this.schedule(this.options.maxAgeMs);
    if (this.current?.digest === next.digest) {
      this.emit('unchanged', next);
      return false;
    }
    this.current = next;
    this.metrics.jwksKeys.set(next.count);
    this.logger.info('token signing keys loaded', {
      source: this.loader.description,
      why,
      keys: next.count,
      skipped: next.skipped.length ? next.skipped : undefined,
    });
    if (next.count === 0)
      this.logger.warn('the JWKS holds no usable key; every token will be refused', {
        source: this.loader.description,
      });
    this.emit('keys', next);
    return true;
  }

  private schedule(delayMs: number): void {
    clearTimeout(this.timer);
    if (this.closed) return;
    // Kept referenced: an owner that forgets close() shows up in leak checks instead of hiding.
    this.timer = setTimeout(() => void this.load('background'), delayMs);
  }
}
