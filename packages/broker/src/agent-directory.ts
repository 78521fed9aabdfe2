import { Redis } from 'ioredis';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError, type Logger } from '@burrow/tunnel';
import type { BrokerMetrics } from './broker-metrics';

/** One broker of a cluster as the directory records it. */
export interface BrokerRecord {
  brokerId: string;
  /** HOST:PORT of its peer listener, where other brokers forward calls (`--advertise`). */
  peer: string;
  /** HOST:PORT of its agent listener as agents should dial it (`--agent-advertise`). */
  agent: string;
}

export interface AgentDirectoryOptions {
  redisUrl: string;
  /** Prefix of every key and channel, so that several clusters can share one Redis. */
  keyPrefix: string;
  /** This broker; its agent address is known once the agent listener is bound ({@link start}). */
  self: Omit<BrokerRecord, 'agent'>;
  /**
   * How long an entry lives without a refresh. Entries are refreshed every third of it, so the
   * entries of a broker that crashed disappear after at most this long.
   */
  entryTtlMs: number;
  /** How long a lookup answer is reused, so that calls for one agent do not each ask Redis. */
  lookupCacheMs: number;
  /** Agents with a tunnel to this broker now (refreshed and re-registered after an outage). */
  localAgents(): Iterable<string>;
  /** The live brokers changed (joined, drained, left); also called once they are first known. */
  onReplicaSet(brokers: BrokerRecord[]): void;
  metrics: BrokerMetrics;
  logger: Logger;
}

/** How long "no broker holds this agent" is reused (see {@link AgentDirectory.lookup}). */
const ABSENT_CACHE_MS = 250;

interface CachedLookup {
  owners: string[];
  fetchedAtMs: number;
}

/** What /status says about the cluster. */
export interface DirectoryStatus {
  redis: 'up' | 'down';
  /** Since when Redis has been unreachable (ISO time), while it is. */
  downSince?: string;
  brokers: BrokerRecord[];
  lastError?: string;
}

/**
 * Which broker holds a tunnel to which agent, in Redis, shared by every broker of a cluster.
 *
 * Layout (all keys under `keyPrefix`):
 * - `agent:<id>`: sorted set, member = peer address of a broker holding a tunnel to the agent,
 *   score = when that claim expires (ms since epoch). Several brokers may hold one agent (an
 *   agent keeps tunnels to several), so each claims its own member; a crashed broker's member is
 *   ignored once its score passes and removed by the next refresh of any holder.
 * - `brokers`: sorted set of live brokers, member = JSON {@link BrokerRecord}, score = expiry.
 * - channel `brokers`: a message whenever a broker joins or leaves, so replicas learn it at once
 *   rather than at their next refresh.
 *
 * The directory is a hint: the broker that owns a tunnel confirms it can serve each call (the
 * peer API's ready signal), so a stale entry costs one refused attempt, never a wrong answer.
 * Redis being down costs only calls for agents connected elsewhere: the last answers seen are
 * used while it is, and when it returns every broker re-registers its agents.
 */
export class AgentDirectory {
  private readonly redis: Redis;
  private readonly subscriber: Redis;
  private readonly cache = new Map<string, CachedLookup>();
  private readonly inFlight = new Map<string, Promise<string[]>>();
  private refreshTimer: NodeJS.Timeout | undefined;
  private brokers: BrokerRecord[] = [];
  private brokersKey = '';
  private up = false;
  private downSinceMs: number | undefined = Date.now();
  private lastError: string | undefined;
  private draining = false;
  private stopped = false;
  private self: BrokerRecord;

  constructor(private readonly opts: AgentDirectoryOptions) {
    const options = {
      lazyConnect: true,
      // A command while Redis is away fails at once: callers must not wait on a reconnect loop.
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      connectTimeout: 2_000,
      retryStrategy: (attempt: number) => Math.min(100 * 2 ** Math.min(attempt, 5), 2_000),
    };
    this.self = { ...opts.self, agent: '' };
    this.redis = new Redis(opts.redisUrl, options);
    this.subscriber = new Redis(opts.redisUrl, { ...options, enableOfflineQueue: true });
    this.redis.on('ready', () => {
      void this.onReady();
    });
    this.redis.on('error', (err: Error) => this.onError(err));
    this.redis.on('close', () => this.onError(new Error('connection closed')));
    this.subscriber.on('error', () => {}); // the main connection reports outages
    this.subscriber.on('message', () => {
      void this.readBrokers();
    });
    opts.metrics.redisUp.set(0);
  }

  private key(name: string): string {
    return `${this.opts.keyPrefix}${name}`;
  }
  private get selfMember(): string {
    return JSON.stringify(this.self);
  }

  /**
   * Connects and registers this broker. Resolves once Redis answered or the first attempt failed:
   * a broker starts, and serves its own agents, without Redis (it retries in the background).
   */
  async start(agentAddress: string): Promise<void> {
    this.self = { ...this.self, agent: agentAddress };
    void this.subscriber
      .connect()
      .then(() => this.subscriber.subscribe(this.key('brokers')))
      .catch(() => {});
    await this.redis.connect().catch(() => {});
    this.refreshTimer = setInterval(
      () => {
        void this.refresh();
      },
      Math.max(100, Math.floor(this.opts.entryTtlMs / 3)),
    );
    this.refreshTimer.unref();
  }

  /** The live brokers as last read (this one included while it is not draining). */
  get replicaSet(): BrokerRecord[] {
    return this.brokers;
  }

  status(): DirectoryStatus {
    return {
      redis: this.up ? 'up' : 'down',
      ...(this.downSinceMs !== undefined && !this.up ? { downSince: new Date(this.downSinceMs).toISOString() } : {}),
      brokers: this.brokers,
      ...(this.lastError ? { lastError: this.lastError } : {}),
    };
  }

  /** The agent's first tunnel to this broker is up: claim it. Never rejects. */
  agentConnected(agentId: string): void {
    if (!this.up || this.stopped) return; // re-registered with all others when Redis is back
    const k = this.key(`agent:${agentId}`);
    this.send(
      'claim',
      this.redis
        .multi()
        .zadd(k, Date.now() + this.opts.entryTtlMs, this.self.peer)
        .pexpire(k, this.opts.entryTtlMs),
      2,
    );
  }

  /** The agent's last tunnel to this broker is gone: drop the claim. Never rejects. */
  agentDisconnected(agentId: string): void {
    if (!this.up) return; // expires by itself
    this.send('release', this.redis.zrem(this.key(`agent:${agentId}`), this.self.peer), 1);
  }

  /**
   * Peer addresses of the other brokers that hold a tunnel to `agentId`, freshest claims first.
   * Lookups for one agent are merged and their answer reused for `lookupCacheMs`; while Redis is
   * down the last answer is reused however old. Rejects with UNAVAILABLE when Redis is down and
   * nothing is known.
   */
  lookup(agentId: string): Promise<string[]> {
    const cached = this.cache.get(agentId);
    // An absent agent is asked about again sooner: it may be connecting right now.
    const ttlMs = cached?.owners.length ? this.opts.lookupCacheMs : Math.min(this.opts.lookupCacheMs, ABSENT_CACHE_MS);
    if (cached && (Date.now() - cached.fetchedAtMs < ttlMs || !this.up)) {
      this.opts.metrics.directoryLookups.inc({ result: 'cached' });
      return Promise.resolve(cached.owners);
    }
    let pending = this.inFlight.get(agentId);
    if (!pending) {
      pending = this.fetchOwners(agentId).finally(() => this.inFlight.delete(agentId));
      this.inFlight.set(agentId, pending);
    } else {
      this.opts.metrics.directoryLookups.inc({ result: 'merged' });
    }
    return pending;
  }

  /** `peer` turned out not to serve `agentId`: do not offer it again until the next lookup. */
  forgetOwner(agentId: string, peer: string): void {
    const cached = this.cache.get(agentId);
    if (cached) cached.owners = cached.owners.filter((p) => p !== peer);
  }

  /** The broker stops taking calls: leave the replica set so that agents and peers move on. */
  async drain(): Promise<void> {
    this.draining = true;
    if (!this.up) return;
    await this.leaveReplicaSet();
  }

  /** Drops every claim of this broker and disconnects. Never rejects. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.refreshTimer);
    if (this.up) {
      const agents = [...this.opts.localAgents()];
      const m = this.redis.multi();
      for (const id of agents) m.zrem(this.key(`agent:${id}`), this.self.peer);
      await m.exec().catch(() => undefined);
      this.opts.metrics.redisCommands.inc({ command: 'release' }, agents.length);
      await this.leaveReplicaSet();
    }
    this.redis.disconnect();
    this.subscriber.disconnect();
  }

  private async leaveReplicaSet(): Promise<void> {
    try {
      await this.redis.multi().zrem(this.key('brokers'), this.selfMember).publish(this.key('brokers'), 'left').exec();
      this.opts.metrics.redisCommands.inc({ command: 'leave' }, 2);
    } catch (err) {
      this.onError(err as Error);
    }
  }

  private async fetchOwners(agentId: string): Promise<string[]> {
    const nowMs = Date.now();
    try {
      this.opts.metrics.redisCommands.inc({ command: 'lookup' });
      const members = await this.redis.zrangebyscore(this.key(`agent:${agentId}`), `(${nowMs}`, '+inf');
      // Newest claims have the highest scores; try those first.
      const owners = members.reverse().filter((p) => p !== this.self.peer);
      this.cache.set(agentId, { owners, fetchedAtMs: nowMs });
      this.opts.metrics.directoryLookups.inc({ result: owners.length ? 'found' : 'absent' });
      return owners;
    } catch (err) {
      this.onError(err as Error);
      this.opts.metrics.directoryLookups.inc({ result: 'error' });
      const stale = this.cache.get(agentId);
      if (stale) return stale.owners;
      throw new BurrowError(
        Status.UNAVAILABLE,
        `the agent directory (Redis) is unavailable: ${(err as Error).message}`,
        err,
      );
    }
  }

  /** (Re)connected: claim every local agent and rejoin the replica set. */
  private async onReady(): Promise<void> {
    if (!this.up && this.downSinceMs !== undefined) {
      const downMs = Date.now() - this.downSinceMs;
      this.opts.logger.info("agent directory (Redis) reachable; registering this broker's agents", {
        redisDownMs: this.lastError ? downMs : undefined,
      });
    }
    this.up = true;
    this.downSinceMs = undefined;
    this.lastError = undefined;
    this.opts.metrics.redisUp.set(1);
    await this.refresh();
    if (!this.draining) await this.send('join', this.redis.publish(this.key('brokers'), 'joined'), 1);
  }

  private onError(err: Error): void {
    this.opts.metrics.redisErrors.inc();
    if (!this.up && this.lastError) return; // one log line per outage, not per retry
    this.up = false;
    this.downSinceMs ??= Date.now();
    this.lastError = err.message;
    this.opts.metrics.redisUp.set(0);
    if (!this.stopped)
      this.opts.logger.error(
        'agent directory (Redis) unreachable; serving only agents connected to this broker until it returns',
        { redis: redactUrl(this.opts.redisUrl), error: err.message },
      );
  }

  /**
   * Renews this broker's claims and its replica-set entry, sweeps expired claims, and rereads the
   * replica set. Pipelined: one round trip whatever the number of agents.
   */
  private async refresh(): Promise<void> {
    if (!this.up || this.stopped) return;
    const nowMs = Date.now();
    const expiresMs = nowMs + this.opts.entryTtlMs;
    const m = this.redis.multi();
    let commands = 0;
    for (const id of this.opts.localAgents()) {
      const k = this.key(`agent:${id}`);
      m.zadd(k, expiresMs, this.self.peer).pexpire(k, this.opts.entryTtlMs).zremrangebyscore(k, '-inf', nowMs);
      commands += 3;
    }
    const brokers = this.key('brokers');
    if (!this.draining) m.zadd(brokers, expiresMs, this.selfMember);
    m.zremrangebyscore(brokers, '-inf', nowMs);
    await this.send('refresh', m, commands + 2);
    await this.readBrokers();
  }

  private async readBrokers(): Promise<void> {
    if (!this.up || this.stopped) return;
    let members: string[];
    try {
      this.opts.metrics.redisCommands.inc({ command: 'brokers' });
      members = await this.redis.zrangebyscore(this.key('brokers'), `(${Date.now()}`, '+inf');
    } catch (err) {
      this.onError(err as Error);
      return;
    }
    const brokers = members
      .map(parseBrokerRecord)
      .filter((b): b is BrokerRecord => b !== undefined)
      .sort((a, b) => a.brokerId.localeCompare(b.brokerId));
    const key = JSON.stringify(brokers);
    if (key === this.brokersKey) return;
    this.brokersKey = key;
    this.brokers = brokers;
    this.opts.logger.info('broker replica set changed', { brokers: brokers.map((b) => b.brokerId) });
    try {
      this.opts.onReplicaSet(brokers);
    } catch (err) {
      this.opts.logger.error('cannot pass the broker replica set on', { error: (err as Error).message });
    }
  }

  /** Runs one command or transaction, counting it; a failure is an outage, not an exception. */
  private async send(
    kind: string,
    command: Promise<unknown> | { exec(): Promise<unknown> },
    count: number,
  ): Promise<void> {
    this.opts.metrics.redisCommands.inc({ command: kind }, count);
    try {
      await ('exec' in command ? command.exec() : command);
    } catch (err) {
      this.onError(err as Error);
    }
  }
}

/**
 * The live broker of the cluster directory that already has `brokerId` at another peer address
 * than `peer`, or undefined (none, or the entry is this broker's own from before a restart).
 * Reads once over its own short-lived connection; Redis unreachable counts as no clash, since a
 * broker starts without Redis (two brokers starting at the same moment can both pass).
 */
export async function findBrokerIdClash(opts: {
  redisUrl: string;
  keyPrefix: string;
  brokerId: string;
  peer: string;
}): Promise<BrokerRecord | undefined> {
  const redis = new Redis(opts.redisUrl, {
    lazyConnect: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    connectTimeout: 2_000,
    retryStrategy: () => null,
  });
  redis.on('error', () => {}); // unreachable: no clash can be seen; the directory logs the outage
  try {
    await redis.connect();
    const members = await redis.zrangebyscore(`${opts.keyPrefix}brokers`, `(${Date.now()}`, '+inf');
    const live = members.map(parseBrokerRecord);
    return live.find((b) => b !== undefined && b.brokerId === opts.brokerId && b.peer !== opts.peer);
  } catch {
    return undefined;
  } finally {
    redis.disconnect();
  }
}

function parseBrokerRecord(member: string): BrokerRecord | undefined {
  try {
    const v = JSON.parse(member) as Partial<BrokerRecord>;
    if (typeof v.brokerId === 'string' && typeof v.peer === 'string' && typeof v.agent === 'string')
      return { brokerId: v.brokerId, peer: v.peer, agent: v.agent };
  } catch {
    // another program's member under our prefix: not a broker
  }
  return undefined;
}

/** The Redis URL without its password, for logs. */
export function redactUrl(url: string): string {
  return url.replace(/\/\/([^:@/]*):[^@/]*@/, '//$1:***@');
}
