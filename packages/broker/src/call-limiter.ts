import type { BrokerMetrics } from './broker-metrics';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError } from '@burrow/tunnel';

/** Limits for one kind of key (callers or agents). 0 turns a limit off. */
export interface KeyLimits {
  /** Most calls in flight at once for one key. */
  maxConcurrent: number;
  /** Sustained calls per second for one key (token bucket; the burst is one second's worth). */
  ratePerSecond: number;
}

export interface CallLimits {
  caller: KeyLimits;
  agent: KeyLimits;
}

/** Which limit refused a call; the metric label and the first words of the status message. */
export type LimitName = 'caller_concurrency' | 'caller_rate' | 'agent_concurrency' | 'agent_rate';

export class LimitExceededError extends BurrowError {
  constructor(
    readonly limit: LimitName,
    message: string,
  ) {
    super(Status.RESOURCE_EXHAUSTED, message);
  }
}

interface KeyState {
  inFlight: number;
  tokens: number;
  refilledMs: number;
}

/**
 * Counts `err` in limited_calls_total when it is a {@link LimitExceededError}; anything else is
 * not a limit and is not counted. For the listeners that catch what {@link CallLimiter} throws.
 */
export function countIfLimited(err: unknown, metrics: Pick<BrokerMetrics, 'limitedCalls'>): void {
  if (err instanceof LimitExceededError) metrics.limitedCalls.inc({ limit: err.limit });
}

/**
 * Per-key concurrency and rate limits (one instance for callers, one for agents). State for a key
 * exists only while it has calls in flight or a bucket not yet full again, so a stream of
 * one-off callers cannot grow it without bound.
 */
class KeyedLimiter {
  private readonly keys = new Map<string, KeyState>();

  constructor(
    private readonly limits: KeyLimits,
    private readonly now: () => number,
  ) {}

  /** Takes a slot for `key`, or returns which limit is exhausted. */
  tryAcquire(key: string): 'concurrency' | 'rate' | undefined {
    const { maxConcurrent, ratePerSecond } = this.limits;
    if (maxConcurrent <= 0 && ratePerSecond <= 0) return undefined;
    const nowMs = this.now();
    let s = this.keys.get(key);
    if (!s) {
      s = { inFlight: 0, tokens: ratePerSecond, refilledMs: nowMs };
      this.keys.set(key, s);
    } else if (ratePerSecond > 0) {
      s.tokens = Math.min(ratePerSecond, s.tokens + ((nowMs - s.refilledMs) / 1000) * ratePerSecond);
      s.refilledMs = nowMs;
    }
    if (maxConcurrent > 0 && s.inFlight >= maxConcurrent) return 'concurrency';
    if (ratePerSecond > 0) {
      if (s.tokens < 1) return 'rate';
      s.tokens -= 1;
    }
    s.inFlight++;
    return undefined;
  }

  release(key: string): void {
    const s = this.keys.get(key);
    if (!s) return;
    s.inFlight--;
    this.forgetIfIdle(key, s);
  }

  /** Drops keys with nothing in flight whose bucket has refilled: they hold no information. */
  sweep(): void {
    for (const [key, s] of this.keys) this.forgetIfIdle(key, s);
  }

  private forgetIfIdle(key: string, s: KeyState): void {
    if (s.inFlight > 0) return;
    const { ratePerSecond } = this.limits;
    const refilled =
      ratePerSecond <= 0 || s.tokens + ((this.now() - s.refilledMs) / 1000) * ratePerSecond >= ratePerSecond;
    if (refilled) this.keys.delete(key);
  }

  get size(): number {
    return this.keys.size;
  }
}

/**
 * The broker's per-caller and per-agent limits on concurrent calls and call rate. A refused call
 * gets RESOURCE_EXHAUSTED naming the limit, so callers can tell their own excess from a busy site.
 */
export class CallLimiter {
  private readonly callers: KeyedLimiter;
  private readonly agents: KeyedLimiter;

  constructor(
    private readonly limits: CallLimits,
    now: () => number = Date.now,
  ) {
    this.callers = new KeyedLimiter(limits.caller, now);
    this.agents = new KeyedLimiter(limits.agent, now);
  }

  /**
   * Takes a slot of `caller`: the broker where a call enters checks its callers' limits. Returns
   * the release function to call exactly once when the call ends; throws
   * {@link LimitExceededError} when a limit is reached.
   */
  admitCaller(caller: string): () => void {
    return this.take(this.callers, 'caller', caller, `caller ${caller}`);
  }

  /**
   * Takes a slot of `agentId`: only the broker that carries the call down the agent's tunnel
   * calls it (the caller API for a local tunnel, the peer listener for a forwarded call), so the
   * agent's limits count every call that reaches it through this broker, wherever it entered.
   * Same contract as {@link admitCaller}.
   */
  admitAgent(agentId: string): () => void {
    return this.take(this.agents, 'agent', agentId, `agent "${agentId}"`);
  }

  /** Takes a slot of `key` from `limiter` (the limits of `kind`); `who` names the key in the refusal. */
  private take(limiter: KeyedLimiter, kind: 'caller' | 'agent', key: string, who: string): () => void {
    const hit = limiter.tryAcquire(key);
    if (hit) {
      const { maxConcurrent, ratePerSecond } = this.limits[kind];
      throw new LimitExceededError(
        `${kind}_${hit}`,
        hit === 'concurrency'
          ? `${who} has ${maxConcurrent} calls in flight, the most this broker allows`
          : `${who} exceeded ${ratePerSecond} calls per second`,
      );
    }
    return this.releaser(limiter, key);
  }

  /** Both slots at once, for a call that enters and reaches its agent here (see the two above). */
  admit(caller: string, agentId: string): () => void {
    const releaseCaller = this.admitCaller(caller);
    let releaseAgent: () => void;
    try {
      releaseAgent = this.admitAgent(agentId);
    } catch (err) {
      releaseCaller();
      throw err;
    }
    return () => {
      releaseCaller();
      releaseAgent();
    };
  }

  private releaser(limiter: KeyedLimiter, key: string): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      limiter.release(key);
    };
  }

  /** Forgets idle keys; the broker calls it periodically. */
  sweep(): void {
    this.callers.sweep();
    this.agents.sweep();
  }

  /** Keys currently tracked (tests and the leak check). */
  get trackedKeys(): number {
    return this.callers.size + this.agents.size;
  }
}
