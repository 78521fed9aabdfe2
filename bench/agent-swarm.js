#!/usr/bin/env node
'use strict';
// Many idle agents in one process for the scale case: each is the agent library's own
// BrokerConnection (protocol v4: one mTLS connection on which the agent is the HTTP/2 server, the
// control stream the broker opens with Hello/Welcome, and nothing else while idle; each call the
// broker opens is answered with the echo upstream) with its own certificate, issued here by
// @burrow/pki at bench time.
//
// Why not N instances of the Agent class: each Agent builds an AgentMetrics registry, whose
// prom-client default metrics start an event-loop-delay monitor (a 10 ms timer) per instance;
// thousands of them in one process would spend the CPU the broker is being measured with. The
// reconnect loop below is Agent.connectLoop's (packages/agent/src/agent.ts): full-jitter backoff
// (burrow-agent's --reconnect-base/--reconnect-max defaults unless the orchestrator says
// otherwise), reset after a healthy session, immediate reconnect on Drain.
//
// First connects arrive the way a fleet does, spread out at a given rate (`start`'s
// arrivalPerS), not all in one instant; after a broker restart every agent is cut off at the
// same moment and comes back on its own backoff: that storm is not paced.
const { issueCertificate } = require('@burrow/pki');
const { AGENT_DEFAULTS, AgentMetrics, Backoff, BrokerConnection } = require('@burrow/agent');
const { BuiltinServices } = require('@burrow/agent/dist/builtin-services');
const {
  CredentialStore,
  UpstreamTable,
  HealthService,
  createLogger,
  identityOfCertificate,
  parseUpstreamRoute,
  silenceIpServerNameWarning,
} = require('@burrow/tunnel');
const { serveIpc } = require('./ipc');

/** Agent.connectLoop's threshold: a session that lasted this long resets the backoff. */
const HEALTHY_SESSION_MS = 10_000;

// As burrow-agent does: the broker is dialled by IP (the site -> platform `h2` session would warn).
silenceIpServerNameWarning();
const logger = createLogger({ level: 'error', component: 'agent-swarm' });
const metrics = new AgentMetrics();
const builtins = new BuiltinServices({});
// One health service for the whole swarm: a ping through a tunnel is answered by its agent.
const health = new HealthService();
const agents = [];
let stopped = false;
let upstreams;

/** Failed connection attempts of the whole swarm by cause (what a reconnect storm costs the agents). */
const failures = {};

function countFailure(err) {
  const text = String(err?.message ?? err);
  let cause = 'other';
  if (/no welcome/.test(text)) cause = 'no_welcome_in_time';
  else if (/ECONNREFUSED/.test(text)) cause = 'refused';
  else if (/ECONNRESET|socket hang up|disconnected before secure TLS|Connection dropped/i.test(text)) cause = 'reset';
  else if (/draining/.test(text)) cause = 'draining';
  failures[cause] = (failures[cause] ?? 0) + 1;
  if (cause === 'other') failures.lastOther = text.slice(0, 200);
}

class SwarmAgent {
  constructor(id, issued) {
    this.id = id;
    this.issued = issued;
    this.conn = undefined;
    this.wake = undefined;
    this.sessions = 0;
    this.failedAttempts = 0;
  }

  get connected() {
    return Boolean(this.conn?.usable);
  }

  async run(broker, caPem, { startDelayMs, reconnectBaseMs, reconnectMaxMs, maxConcurrentCalls }) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, startDelayMs);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    // As burrow-agent: the certificate and trust bundle in a store read at each dial, the trust
    // domain (which broker certificates to accept) from the agent's own certificate.
    const tls = new CredentialStore({ caPem, certPem: this.issued.certPem, keyPem: this.issued.keyPem });
    const trustDomain = identityOfCertificate(Buffer.from(this.issued.certPem)).trustDomain;
    const backoff = new Backoff(reconnectBaseMs, reconnectMaxMs);
    while (!stopped) {
      const conn = new BrokerConnection({
        address: broker,
        tls,
        trustDomain,
        agentId: this.id,
        agentVersion: 'bench',
        maxConcurrentCalls,
        maxMessageBytes: AGENT_DEFAULTS.maxMessageBytes,
        drainTimeoutMs: 1_000,
        keepalive: AGENT_DEFAULTS.keepalive,
        upstreams,
        builtins,
        health,
        metrics,
        logger,
      });
      this.conn = conn;
      const ended = new Promise((resolve) => {
        conn.once('closed', () => resolve('closed'));
        conn.once('drain', () => resolve('drain'));
      });
      let sessionStartMs;
      try {
        await conn.open();
        sessionStartMs = Date.now();
        this.sessions++;
      } catch (err) {
        this.failedAttempts++;
        countFailure(err);
      }
      const why = await ended;
      if (stopped) break;
      if (why === 'drain') {
        backoff.reset();
        continue;
      }
      if (sessionStartMs !== undefined && Date.now() - sessionStartMs >= HEALTHY_SESSION_MS) backoff.reset();
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, backoff.nextDelayMs());
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }
}

serveIpc({
  /** Issues one agent certificate per id (kept in memory: nothing else needs the files). */
  async issue({ pkiDir, ids }) {
    for (const id of ids)
      agents.push(new SwarmAgent(id, await issueCertificate({ dir: pkiDir, role: 'agent', name: id })));
    return { issued: ids.length };
  },
  /**
   * Starts every agent's connection loop, the first connects `arrivalPerS` a second (this
   * process's share of the fleet's rate; 0: all at once); resolves at once with when the last
   * agent's first attempt is due. Options default to burrow-agent's.
   */
  start({
    broker,
    caPem,
    upstream,
    arrivalPerS = 0,
    reconnectBaseMs = AGENT_DEFAULTS.reconnectBaseMs,
    reconnectMaxMs = AGENT_DEFAULTS.reconnectMaxMs,
    maxConcurrentCalls = AGENT_DEFAULTS.maxConcurrentCalls,
  }) {
    stopped = false;
    upstreams = new UpstreamTable([parseUpstreamRoute(upstream)]);
    const gapMs = arrivalPerS > 0 ? 1000 / arrivalPerS : 0;
    for (const k of Object.keys(failures)) delete failures[k];
    agents.forEach((a, i) => {
      a.sessions = 0;
      a.failedAttempts = 0;
      a.loop = a.run(broker, Buffer.from(caPem), {
        startDelayMs: i * gapMs,
        reconnectBaseMs,
        reconnectMaxMs,
        maxConcurrentCalls,
      });
    });
    return {
      started: agents.length,
      rampMs: Math.round((agents.length - 1) * gapMs),
      reconnectBaseMs,
      reconnectMaxMs,
      maxConcurrentCalls,
    };
  },
  status() {
    return {
      connected: agents.filter((a) => a.connected).length,
      neverConnected: agents.filter((a) => a.sessions === 0).length,
      sessions: agents.reduce((n, a) => n + a.sessions, 0),
      failedAttempts: agents.reduce((n, a) => n + a.failedAttempts, 0),
      failuresByCause: { ...failures },
      rssKiB: Math.round(process.memoryUsage().rss / 1024),
    };
  },
  /** Closes every agent's connection and ends its loop; `start` may run them again. */
  async stop() {
    stopped = true;
    for (const a of agents) {
      a.wake?.();
      a.conn?.close();
    }
    await Promise.all(agents.map((a) => a.loop));
    for (const a of agents) a.conn = undefined;
    upstreams?.close();
    return { stopped: agents.length };
  },
});
