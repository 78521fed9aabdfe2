import { randomUUID } from 'node:crypto';
import type * as http2 from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError, type BrokerEndpoint, type CallCutter, type PeerIdentity } from '@burrow/tunnel';

/** What the registry and the broker need to talk back to an agent session; implemented by the agent listener. */
export interface SessionControl {
  /** Tells the agent to reconnect elsewhere; no call streams are opened on the session after it. */
  drain(reason: string): void;
  /** Sends a new trust bundle (CA rotation). */
  trustBundle(pem: string, version: number): void;
  /** Sends the broker replica set. */
  replicaSet(brokers: BrokerEndpoint[]): void;
  /** Ends the session and its connection; with `error`, calls in flight on it end with that status. */
  close(error?: BurrowError): void;
}

/**
 * One agent connection (tunnel.proto, "The connection of a tunnel"): the HTTP/2 client session the
 * broker holds on the socket the agent dialed, and the calls carried on it.
 */
export class AgentSession {
  readonly id = randomUUID();
  readonly connectedAtMs = Date.now();
  /** Calls carried on this session now; cut with the session's error when it is cut off. */
  readonly active = new Set<CallCutter>();
  draining = false;
  /** Resolved when the last call in flight ends (see {@link whenIdle}). */
  private idleWaiters: (() => void)[] = [];

  /**
   * When this session's credential expires (ms since epoch): the TLS certificate's expiry, moved
   * later by each renewed certificate the agent presents in a Credentials frame.
   */
  credentialExpiryMs: number;

  constructor(
    /** The agent's current certificate identity (replaced when it presents a renewed one). */
    public identity: PeerIdentity,
    readonly peerAddress: string,
    readonly protocolVersion: number,
    readonly agentVersion: string,
    /** The HTTP/2 session on which this broker opens the agent's call streams. */
    readonly h2: http2.ClientHttp2Session,
    readonly control: SessionControl,
  ) {
    this.credentialExpiryMs = identity.notAfterMs;
  }

  get agentId(): string {
    return this.identity.name;
  }

  /** A call now runs on this session; `cutter` ends it if the session is cut off. */
  callStarted(cutter: CallCutter): void {
    this.active.add(cutter);
  }

  /** The call of `cutter` is over. */
  callEnded(cutter: CallCutter): void {
    this.active.delete(cutter);
    if (this.active.size === 0) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  /** Resolves once no call runs on this session (at once when none does). */
  whenIdle(): Promise<void> {
    if (this.active.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  get activeCalls(): number {
    return this.active.size;
  }
  /** True while new calls may go to this session. */
  get usable(): boolean {
    return !this.draining && !this.h2.closed && !this.h2.destroyed;
  }
}

/** Totals over the registry, for metrics and leak checks. */
export interface RegistryCounts {
  agents: number;
  sessions: number;
  activeCalls: number;
  /** Calls waiting for the agent to connect. */
  waiters: number;
}

/** One session of a connected agent, as /agents lists it. */
export interface SessionSummary {
  id: string;
  peer: string;
  protocolVersion: number;
  agentVersion: string;
  connectedAt: string;
  callsInFlight: number;
  draining: boolean;
}

/** A snapshot of one connected agent, for /agents and metrics. */
export interface AgentSummary {
  id: string;
  connections: number;
  connectedSince: string;
  callsInFlight: number;
  sessions: SessionSummary[];
}

/** Everything the broker knows about one connected agent, for `/agents/<id>`. */
export interface AgentDetail extends Omit<AgentSummary, 'sessions'> {
  sessions: (SessionSummary & {
    /** The certificate the session runs on now (renewals presented on the session replace it). */
    certificate: { spiffeId: string; serial: string; notAfter: string; secondsLeft: number };
  })[];
}

function agentTotals(sessions: AgentSession[]): { connections: number; connectedSince: string; callsInFlight: number } {
  return {
    connections: sessions.length,
    connectedSince: new Date(Math.min(...sessions.map((s) => s.connectedAtMs))).toISOString(),
    callsInFlight: sessions.reduce((n, s) => n + s.activeCalls, 0),
  };
}

function sessionSummary(s: AgentSession): SessionSummary {
  return {
    id: s.id,
    peer: s.peerAddress,
    protocolVersion: s.protocolVersion,
    agentVersion: s.agentVersion,
    connectedAt: new Date(s.connectedAtMs).toISOString(),
    callsInFlight: s.activeCalls,
    draining: s.draining,
  };
}

/**
 * Which agents hold tunnels to this broker. A call {@link acquire}s one of the agent's sessions
 * (the usable one with the fewest calls), waiting a bounded time for the agent to connect when it
 * has none. All state is in-process; nothing here blocks.
 */
export class TunnelRegistry {
  private readonly agents = new Map<string, Set<AgentSession>>();
  /** Waits of {@link whenConnected}, by agent id. */
  private readonly connectWaiters = new Map<string, Set<() => void>>();
  /** Calls in {@link acquire} waiting for their agent to connect. */
  private waiting = 0;
  /**
   * Hears an agent's first session arrive (`connected` true) and its last one go (false): the
   * cluster's agent directory claims and releases the agent with it.
   */
  onPresence: ((agentId: string, connected: boolean) => void) | undefined;

  /** Registers a session whose handshake completed; calls waiting for the agent go to it. */
  addSession(session: AgentSession): void {
    let sessions = this.agents.get(session.agentId);
    if (!sessions) {
      sessions = new Set();
      this.agents.set(session.agentId, sessions);
    }
    sessions.add(session);
    if (sessions.size === 1) this.onPresence?.(session.agentId, true);
    for (const wake of this.connectWaiters.get(session.agentId) ?? []) wake();
  }

  /** Forgets a session. Calls in flight on it keep running until its connection closes. */
  removeSession(session: AgentSession): void {
    const sessions = this.agents.get(session.agentId);
    if (!sessions?.delete(session)) return;
    if (sessions.size === 0) {
      this.agents.delete(session.agentId);
      this.onPresence?.(session.agentId, false);
    }
  }

  /** True when `agentId` has a session here that takes calls (not draining). */
  canServe(agentId: string): boolean {
    for (const s of this.agents.get(agentId) ?? []) if (s.usable) return true;
    return false;
  }

  /** The usable session of `agentId` with the fewest calls, if it has one now. */
  pick(agentId: string): AgentSession | undefined {
    let best: AgentSession | undefined;
    for (const s of this.agents.get(agentId) ?? []) {
      if (!s.usable) continue;
      if (!best || s.activeCalls < best.activeCalls) best = s;
    }
    return best;
  }

  /**
   * A session of `agentId`, waiting up to `waitMs` for the agent to connect. Rejects with
   * UNAVAILABLE naming the agent when it did not, also when the caller's deadline (`deadlineMs`)
   * comes first: the wait then ends {@link answerMarginMs} before it, so the caller learns the agent
   * is offline rather than a bare DEADLINE_EXCEEDED. Rejects with CANCELLED when `signal` aborts.
   */
  async acquire(agentId: string, waitMs: number, deadlineMs: number, signal: AbortSignal): Promise<AgentSession> {
    const startedMs = Date.now();
    const untilMs = giveUpAtMs(startedMs, waitMs, deadlineMs);
    for (;;) {
      const session = this.pick(agentId);
      if (session) return session;
      if (signal.aborted) throw new BurrowError(Status.CANCELLED, 'cancelled while waiting for the agent');
      const leftMs = untilMs - Date.now();
      if (leftMs <= 0) throw notConnected(agentId, Date.now() - startedMs, startedMs + waitMs > untilMs);
      this.waiting++;
      try {
        await this.whenConnected(agentId, leftMs, signal);
      } finally {
        this.waiting--;
      }
    }
  }

  /**
   * Resolves when a session of `agentId` registers here, after `timeoutMs`, or when `signal`
   * aborts, whichever comes first. Never rejects.
   */
  whenConnected(agentId: string, timeoutMs: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      let waiters = this.connectWaiters.get(agentId);
      if (!waiters) {
        waiters = new Set();
        this.connectWaiters.set(agentId, waiters);
      }
      const set = waiters;
      const wake = (): void => {
        clearTimeout(timer);
        signal.removeEventListener('abort', wake);
        set.delete(wake);
        if (set.size === 0 && this.connectWaiters.get(agentId) === set) this.connectWaiters.delete(agentId);
        resolve();
      };
      const timer = setTimeout(wake, Math.max(0, timeoutMs));
      set.add(wake);
      if (signal.aborted) wake();
      else signal.addEventListener('abort', wake, { once: true });
    });
  }

  /** Sessions of every agent, for drain and shutdown. */
  allSessions(): AgentSession[] {
    return [...this.agents.values()].flatMap((s) => [...s]);
  }

  /** Sessions of one agent (empty when it is not connected). */
  sessionsOf(agentId: string): AgentSession[] {
    return [...(this.agents.get(agentId) ?? [])];
  }

  /** Connected agents with their sessions. */
  summaries(): AgentSummary[] {
    return [...this.agents].map(([id, set]) => {
      const sessions = [...set];
      return { id, ...agentTotals(sessions), sessions: sessions.map(sessionSummary) };
    });
  }

  /** Details of one connected agent; undefined when it has no session here. */
  detail(agentId: string, nowMs = Date.now()): AgentDetail | undefined {
    const set = this.agents.get(agentId);
    if (!set || set.size === 0) return undefined;
    const sessions = [...set];
    return {
      id: agentId,
      ...agentTotals(sessions),
      sessions: sessions.map((s) => ({
        ...sessionSummary(s),
        certificate: {
          spiffeId: s.identity.spiffeId,
          serial: s.identity.serialHex,
          notAfter: new Date(s.credentialExpiryMs).toISOString(),
          secondsLeft: Math.round((s.credentialExpiryMs - nowMs) / 1000),
        },
      })),
    };
  }

  /** Counts for metrics and leak checks. */
  counts(): RegistryCounts {
    let sessions = 0;
    let activeCalls = 0;
    for (const set of this.agents.values())
      for (const s of set) {
        sessions++;
        activeCalls += s.activeCalls;
      }
    return { agents: this.agents.size, sessions, activeCalls, waiters: this.waiting };
  }

  /** Number of agent entries held, including ones kept only by waiting calls (leak checks). */
  get entryCount(): number {
    return this.agents.size + this.connectWaiters.size;
  }

  /** Ids of the agents with at least one session here. */
  *connectedAgentIds(): IterableIterator<string> {
    yield* this.agents.keys();
  }
}

/**
 * How long before the caller's deadline a call waiting for its agent gives up, so that the answer
 * (UNAVAILABLE naming the agent) reaches the caller before its own timer fires: 10% of the time the
 * caller gave, at most 1 s (the answer's way back is one hop, not a tenth of a long deadline).
 */
export function answerMarginMs(budgetMs: number): number {
  return Math.min(Math.max(0, budgetMs) / 10, 1_000);
}

/**
 * When a call that started waiting at `nowMs` stops waiting for its agent: after `waitMs` (the
 * broker's --agent-wait) or {@link answerMarginMs} before `deadlineMs`, whichever comes first.
 */
export function giveUpAtMs(nowMs: number, waitMs: number, deadlineMs: number): number {
  const beforeDeadlineMs = deadlineMs - answerMarginMs(deadlineMs - nowMs);
  return Math.min(nowMs + waitMs, beforeDeadlineMs);
}

/** UNAVAILABLE for an agent with no tunnel here after `waitedMs`; `forDeadline`: the caller's deadline cut the wait. */
export function notConnected(agentId: string, waitedMs: number, forDeadline: boolean): BurrowError {
  const why = forDeadline ? ", answering before the caller's deadline" : '';
  return new BurrowError(Status.UNAVAILABLE, `agent "${agentId}" is not connected (waited ${waitedMs} ms${why})`);
}
