import { randomUUID } from 'node:crypto';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError, type BrokerEndpoint, type CallStream, type PeerIdentity } from '@burrow/tunnel';

/** An idle Offer stream waiting for a call. */
export interface IdleOffer {
  readonly stream: CallStream;
  readonly session: AgentSession;
  /** When the offer became idle (ms since epoch), for retiring old ones. */
  readonly idleSinceMs: number;
  /** `stream.callsEnded` when the offer became idle: the next call on it is call number this + 1. */
  readonly callsEndedBefore: number;
}

/** How long the broker waits for an agent's Trailers after its Cancel before giving up on a reusable offer. */
export const DEFAULT_CANCEL_TRAILERS_TIMEOUT_MS = 30_000;

/** What the registry needs to talk back to an agent session; implemented by the agent listener. */
export interface SessionControl {
  /** Asks the agent to open `offers` more Offer streams. */
  demand(offers: number): void;
  /** Tells the agent to reconnect elsewhere. */
  drain(reason: string): void;
  /** Sends a new trust bundle (CA rotation). */
  trustBundle(pem: string, version: number): void;
  /** Sends the broker replica set; a no-op on sessions older than protocol version 3. */
  replicaSet(brokers: BrokerEndpoint[]): void;
  /** Ends the session stream (and with it every idle offer). */
  close(error?: BurrowError): void;
}

/** One agent connection (one Session stream) and the offers it opened. */
export class AgentSession {
  readonly id = randomUUID();
  readonly connectedAtMs = Date.now();
  /** Idle offers, most recently added last; calls take from the end so old ones age out. */
  readonly idle: IdleOffer[] = [];
  /** Offers this session was asked for with Demand and has not opened yet. */
  owedOffers = 0;
  /** Offers carrying a call right now; aborted when the session is cut off (revoked, expired). */
  readonly active = new Set<CallStream>();
  draining = false;

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
    readonly minIdleOffers: number,
    readonly control: SessionControl,
  ) {
    this.credentialExpiryMs = identity.notAfterMs;
  }

  get agentId(): string {
    return this.identity.name;
  }
  get activeCalls(): number {
    return this.active.size;
  }
}

interface Waiter {
  resolve(offer: IdleOffer): void;
  reject(err: BurrowError): void;
}

interface AgentEntry {
  readonly sessions: Set<AgentSession>;
  /** Calls waiting for an offer, oldest first. */
  readonly waiters: Waiter[];
}

/** Offers asked for with Demand and not yet arrived, over all of an agent's sessions. */
function owedOffers(entry: AgentEntry): number {
  let n = 0;
  for (const s of entry.sessions) n += s.owedOffers;
  return n;
}

/** What /agents and /agents/<id> say about an agent as a whole. */
function agentTotals(sessions: AgentSession[]): {
  connections: number;
  connectedSince: string;
  callsInFlight: number;
  idleOffers: number;
} {
  return {
    connections: sessions.length,
    connectedSince: new Date(Math.min(...sessions.map((s) => s.connectedAtMs))).toISOString(),
    callsInFlight: sessions.reduce((n, s) => n + s.activeCalls, 0),
    idleOffers: sessions.reduce((n, s) => n + s.idle.length, 0),
  };
}

/** Totals over the registry, for metrics and leak checks. */
export interface RegistryCounts {
  agents: number;
  sessions: number;
  idleOffers: number;
  activeCalls: number;
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
  idleOffers: number;
  draining: boolean;
}

/** A snapshot of one connected agent, for /agents and metrics. */
export interface AgentSummary {
  id: string;
  connections: number;
  connectedSince: string;
  callsInFlight: number;
  idleOffers: number;
  sessions: SessionSummary[];
}

/** Everything the broker knows about one connected agent, for `/agents/<id>`. */
export interface AgentDetail extends Omit<AgentSummary, 'sessions'> {
  /** Calls waiting for a tunnel stream of this agent. */
  callsWaiting: number;
  /** Tunnel streams asked for with Demand and not opened yet. */
  owedOffers: number;
  sessions: (SessionSummary & {
    owedOffers: number;
    /** The certificate the session runs on now (renewals presented on the session replace it). */
    certificate: { spiffeId: string; serial: string; notAfter: string; secondsLeft: number };
  })[];
}

/** What /agents says of one session (and /agents/<id>, which adds to it). */
function sessionSummary(s: AgentSession): SessionSummary {
  return {
    id: s.id,
    peer: s.peerAddress,
    protocolVersion: s.protocolVersion,
    agentVersion: s.agentVersion,
    connectedAt: new Date(s.connectedAtMs).toISOString(),
    callsInFlight: s.activeCalls,
    idleOffers: s.idle.length,
    draining: s.draining,
  };
}

/**
 * Which agents hold tunnels to this broker, and their idle offers. Callers {@link acquire} an
 * offer for an agent; when none is idle they queue (FIFO) and the registry sends Demand to the agent
 * for exactly the number of offers missing. All state is in-process; nothing here blocks.
 */
export class TunnelRegistry {
  private readonly agents = new Map<string, AgentEntry>();
  /** Waits of {@link whenConnected}, by agent id. */
  private readonly connectWaiters = new Map<string, Set<() => void>>();
  /** See {@link DEFAULT_CANCEL_TRAILERS_TIMEOUT_MS}; settable for tests. */
  cancelTrailersTimeoutMs = DEFAULT_CANCEL_TRAILERS_TIMEOUT_MS;
  /**
   * Hears an agent's first session arrive (`connected` true) and its last one go (false): the
   * cluster's agent directory claims and releases the agent with it.
   */
  onPresence: ((agentId: string, connected: boolean) => void) | undefined;

  /** Registers a session whose handshake completed; waiting calls get offers from it. */
  addSession(session: AgentSession): void {
    const entry = this.entry(session.agentId);
    entry.sessions.add(session);
    if (entry.sessions.size === 1) this.onPresence?.(session.agentId, true);
    for (const wake of this.connectWaiters.get(session.agentId) ?? []) wake();
    this.demandFor(entry);
  }

  /** True when `agentId` has a session here that takes calls (not draining). */
  canServe(agentId: string): boolean {
    for (const s of this.agents.get(agentId)?.sessions ?? []) if (!s.draining) return true;
    return false;
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

  /** Forgets a session; its idle offers are finished. Calls in flight on it keep running. */
  removeSession(session: AgentSession): void {
    const entry = this.agents.get(session.agentId);
    if (!entry?.sessions.delete(session)) return;
    for (const offer of session.idle.splice(0)) offer.stream.finish();
    if (entry.sessions.size === 0) this.onPresence?.(session.agentId, false);
    // Offers owed by a session that is gone will never come: ask another session for them.
    session.owedOffers = 0;
    this.demandFor(entry);
    this.maybeForget(session.agentId, entry);
  }

  /** An agent opened an Offer stream: hand it to the oldest waiting call or keep it idle. */
  addOffer(session: AgentSession, stream: CallStream): void {
    if (session.owedOffers > 0) session.owedOffers--;
    this.pool(session, stream);
  }

  /**
   * A reusable offer's call ended (protocol version 2) and the stream is idle again: it goes to the
   * oldest waiting call or back to the idle list, like a new offer.
   */
  releaseOffer(session: AgentSession, stream: CallStream): void {
    session.active.delete(stream);
    this.pool(session, stream);
  }

  /**
   * The caller's side of a call on `offer` is over. A single-call offer stops counting as active
   * now; a reusable one counts until its call has ended on the stream too ({@link releaseOffer}).
   */
  callFinished(offer: IdleOffer): void {
    const { stream, session } = offer;
    if (!stream.reusable) {
      session.active.delete(stream);
      return;
    }
    // The caller has its status but the call has not ended on the stream (a Cancel waiting for the
    // agent's Trailers). An agent that never answers would hold the stream forever: end it.
    if (stream.isClosed || stream.callsEnded !== offer.callsEndedBefore) return;
    const timer = setTimeout(() => {
      if (stream.callsEnded === offer.callsEndedBefore)
        stream.abort(
          new BurrowError(
            Status.UNAVAILABLE,
            `agent sent no trailers within ${this.cancelTrailersTimeoutMs} ms of the call's end`,
          ),
        );
    }, this.cancelTrailersTimeoutMs);
    void stream.whenCallEnded().then(() => clearTimeout(timer));
  }

  /** Removes an offer whose stream closed under it (agent gone, connection lost, retired). */
  dropOffer(session: AgentSession, stream: CallStream): void {
    const i = session.idle.findIndex((o) => o.stream === stream);
    if (i >= 0) session.idle.splice(i, 1);
    if (stream.reusable) session.active.delete(stream);
  }

  /** Takes an idle offer of `agentId` if one is free now; undefined when the call would have to wait. */
  tryAcquire(agentId: string): IdleOffer | undefined {
    const entry = this.agents.get(agentId);
    const offer = entry && this.takeIdle(entry);
    if (offer) offer.session.active.add(offer.stream);
    return offer;
  }

  /**
   * Takes an idle offer of `agentId`, waiting up to `waitMs` for one. Rejects with UNAVAILABLE naming
   * the agent when it is not connected or no offer came in time, and with DEADLINE_EXCEEDED when
   * `deadlineMs` (the caller's deadline) comes first. `signal` aborts the wait (caller cancelled).
   */
  acquire(agentId: string, waitMs: number, deadlineMs: number, signal: AbortSignal): Promise<IdleOffer> {
    const offer = this.tryAcquire(agentId);
    if (offer) return Promise.resolve(offer);
    const entry = this.entry(agentId);
    return new Promise<IdleOffer>((resolve, reject) => {
      const callerDeadlineFirst = deadlineMs - Date.now() < waitMs;
      const timer = setTimeout(
        () => {
          remove();
          if (callerDeadlineFirst)
            reject(new BurrowError(Status.DEADLINE_EXCEEDED, `deadline exceeded while waiting for agent "${agentId}"`));
          else if (entry.sessions.size === 0)
            reject(new BurrowError(Status.UNAVAILABLE, `agent "${agentId}" is not connected (waited ${waitMs} ms)`));
          else
            reject(
              new BurrowError(Status.UNAVAILABLE, `agent "${agentId}" opened no tunnel stream within ${waitMs} ms`),
            );
        },
        Math.max(0, Math.min(waitMs, deadlineMs - Date.now())),
      );
      const onAbort = (): void => {
        remove();
        reject(new BurrowError(Status.CANCELLED, 'cancelled while waiting for the agent'));
      };
      const waiter: Waiter = {
        resolve: (o) => {
          clearTimeout(timer);
          signal.removeEventListener('abort', onAbort);
          o.session.active.add(o.stream);
          resolve(o);
        },
        reject,
      };
      const remove = (): void => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        const i = entry.waiters.indexOf(waiter);
        if (i >= 0) entry.waiters.splice(i, 1);
        // Demand beyond the calls still waiting is moot; forget it so that the next waiting call
        // asks again instead of counting on offers an agent may never open.
        this.forgetDemandBeyond(entry, entry.waiters.length);
        this.maybeForget(agentId, entry);
      };
      signal.addEventListener('abort', onAbort, { once: true });
      entry.waiters.push(waiter);
      this.demandFor(entry);
    });
  }

  /**
   * Finishes idle offers that have been idle longer than `maxIdleMs`, keeping at least each
   * session's `minIdleOffers`. Only the broker retires offers, so no call can land on an offer that
   * is going away.
   */
  retireIdle(maxIdleMs: number, nowMs = Date.now()): number {
    let retired = 0;
    for (const entry of this.agents.values()) {
      for (const session of entry.sessions) {
        while (session.idle.length > session.minIdleOffers && nowMs - session.idle[0]!.idleSinceMs > maxIdleMs) {
          session.idle.shift()!.stream.finish();
          retired++;
        }
      }
    }
    return retired;
  }

  /** Sessions of every agent, for drain and shutdown. */
  allSessions(): AgentSession[] {
    return [...this.agents.values()].flatMap((e) => [...e.sessions]);
  }

  /** Sessions of one agent (empty when it is not connected). */
  sessionsOf(agentId: string): AgentSession[] {
    return [...(this.agents.get(agentId)?.sessions ?? [])];
  }

  /** Connected agents with their sessions. */
  summaries(): AgentSummary[] {
    const out: AgentSummary[] = [];
    for (const [id, entry] of this.agents) {
      if (entry.sessions.size === 0) continue;
      const sessions = [...entry.sessions];
      out.push({
        id,
        ...agentTotals(sessions),
        sessions: sessions.map(sessionSummary),
      });
    }
    return out;
  }

  /** Details of one connected agent; undefined when it has no session here. */
  detail(agentId: string, nowMs = Date.now()): AgentDetail | undefined {
    const entry = this.agents.get(agentId);
    if (!entry || entry.sessions.size === 0) return undefined;
    const sessions = [...entry.sessions];
    return {
      id: agentId,
      ...agentTotals(sessions),
      callsWaiting: entry.waiters.length,
      owedOffers: owedOffers(entry),
      sessions: sessions.map((s) => ({
        ...sessionSummary(s),
        owedOffers: s.owedOffers,
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
    let agents = 0,
      sessions = 0,
      idleOffers = 0,
      activeCalls = 0,
      waiters = 0;
    for (const e of this.agents.values()) {
      if (e.sessions.size > 0) agents++;
      waiters += e.waiters.length;
      for (const s of e.sessions) {
        sessions++;
        idleOffers += s.idle.length;
        activeCalls += s.activeCalls;
      }
    }
    return { agents, sessions, idleOffers, activeCalls, waiters };
  }

  /** Number of agent entries held, including ones kept only by waiting calls (leak checks). */
  get entryCount(): number {
    return this.agents.size + this.connectWaiters.size;
  }

  /** Ids of the agents with at least one session here. */
  *connectedAgentIds(): IterableIterator<string> {
    for (const [id, e] of this.agents) if (e.sessions.size > 0) yield id;
  }

  private entry(agentId: string): AgentEntry {
    let e = this.agents.get(agentId);
    if (!e) {
      e = { sessions: new Set(), waiters: [] };
      this.agents.set(agentId, e);
    }
    return e;
  }

  private pool(session: AgentSession, stream: CallStream): void {
    const entry = this.agents.get(session.agentId);
    if (!entry?.sessions.has(session) || session.draining) {
      stream.finish();
      return;
    }
    const offer: IdleOffer = { stream, session, idleSinceMs: Date.now(), callsEndedBefore: stream.callsEnded };
    const waiter = entry.waiters.shift();
    if (waiter) waiter.resolve(offer);
    else session.idle.push(offer);
  }

  private maybeForget(agentId: string, entry: AgentEntry): void {
    if (entry.sessions.size === 0 && entry.waiters.length === 0 && this.agents.get(agentId) === entry)
      this.agents.delete(agentId);
  }

  // Spreads calls over an agent's connections: the session with an idle offer and the fewest calls.
  private takeIdle(entry: AgentEntry): IdleOffer | undefined {
    let best: AgentSession | undefined;
    for (const s of entry.sessions) {
      if (s.draining || s.idle.length === 0) continue;
      if (!best || s.activeCalls < best.activeCalls) best = s;
    }
    return best?.idle.pop();
  }

  private demandFor(entry: AgentEntry): void {
    const missing = entry.waiters.length - owedOffers(entry);
    if (missing <= 0) return;
    let target: AgentSession | undefined;
    for (const s of entry.sessions) {
      if (s.draining) continue;
      if (!target || s.activeCalls < target.activeCalls) target = s;
    }
    if (!target) return; // not connected: addSession asks when it connects
    target.owedOffers += missing;
    target.control.demand(missing);
  }

  private forgetDemandBeyond(entry: AgentEntry, limit: number): void {
    let excess = owedOffers(entry) - limit;
    if (excess <= 0) return;
    for (const s of entry.sessions) {
      const n = Math.min(excess, s.owedOffers);
      s.owedOffers -= n;
      excess -= n;
      if (excess === 0) break;
    }
  }
}
