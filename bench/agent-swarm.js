#!/usr/bin/env node
'use strict';
// Many idle agents in one process for the scale case: each is the agent library's own
// BrokerConnection (session, Hello/Welcome, its pool of idle offer streams, answering calls with
// the echo upstream) on its own mTLS connection with its own certificate, issued here by
// @burrow/pki at bench time.
//
// Why not N instances of the Agent class: each Agent builds an AgentMetrics registry, whose
// prom-client default metrics start an event-loop-delay monitor (a 10 ms timer) per instance;
// thousands of them in one process would spend the CPU the broker is being measured with. The
// reconnect loop below is Agent.connectLoop's (packages/agent/src/agent.ts): full-jitter backoff
// from the same defaults, reset after a healthy session, immediate reconnect on Drain.
const { credentials } = require('@grpc/grpc-js');
const { issueCertificate } = require('@burrow/pki');
const { AGENT_DEFAULTS, AgentMetrics, Backoff, BrokerConnection } = require('@burrow/agent');
const { BuiltinServices } = require('@burrow/agent/dist/builtin-services');
const { UpstreamTable, createLogger, parseUpstreamRoute, silenceIpServerNameWarning, upstreamChannelOptions } = require('@burrow/tunnel');
const { serveIpc } = require('./ipc');

/** Agent.connectLoop's threshold: a session that lasted this long resets the backoff. */
const HEALTHY_SESSION_MS = 10_000;

// As burrow-agent does: the broker is dialled by IP, which grpc-js also sets as the TLS server name.
silenceIpServerNameWarning();
const logger = createLogger({ level: 'error', component: 'agent-swarm' });
const metrics = new AgentMetrics();
const builtins = new BuiltinServices({});
const agents = [];
let stopped = false;
let upstreams;

class SwarmAgent {
  constructor(id, issued) {
    this.id = id;
    this.issued = issued;
    this.conn = undefined;
    this.wake = undefined;
    this.sessions = 0;
    this.failedAttempts = 0;
  }

  get connected() { return Boolean(this.conn?.usable); }

  async run(broker, caPem) {
    const creds = credentials.createSsl(caPem, Buffer.from(this.issued.keyPem), Buffer.from(this.issued.certPem));
    const backoff = new Backoff(AGENT_DEFAULTS.reconnectBaseMs, AGENT_DEFAULTS.reconnectMaxMs);
    while (!stopped) {
      const conn = new BrokerConnection({
        address: broker, credentials: creds, agentId: this.id, agentVersion: 'bench', minIdleOffers: AGENT_DEFAULTS.minIdleOffers,
        maxOffers: AGENT_DEFAULTS.maxOffers, maxMessageBytes: AGENT_DEFAULTS.maxMessageBytes, drainTimeoutMs: 1_000,
        keepalive: AGENT_DEFAULTS.keepalive, upstreams, builtins, metrics, logger,
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
      } catch {
        this.failedAttempts++;
      }
      const why = await ended;
      if (stopped) break;
      if (why === 'drain') { backoff.reset(); continue; }
      if (sessionStartMs !== undefined && Date.now() - sessionStartMs >= HEALTHY_SESSION_MS) backoff.reset();
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, backoff.nextDelayMs());
        this.wake = () => { clearTimeout(timer); resolve(); };
      });
    }
  }
}

serveIpc({
  /** Issues one agent certificate per id (kept in memory: nothing else needs the files). */
  async issue({ pkiDir, ids }) {
    for (const id of ids) agents.push(new SwarmAgent(id, await issueCertificate({ dir: pkiDir, role: 'agent', name: id })));
    return { issued: ids.length };
  },
  /** Starts every agent's connection loop at once (the connect storm); resolves at once. */
  start({ broker, caPem, upstream }) {
    upstreams = new UpstreamTable([parseUpstreamRoute(upstream)], upstreamChannelOptions(AGENT_DEFAULTS.maxMessageBytes));
    for (const a of agents) a.loop = a.run(broker, Buffer.from(caPem));
    return { started: agents.length };
  },
  status() {
    return {
      connected: agents.filter((a) => a.connected).length,
      sessions: agents.reduce((n, a) => n + a.sessions, 0),
      failedAttempts: agents.reduce((n, a) => n + a.failedAttempts, 0),
      rssKiB: Math.round(process.memoryUsage().rss / 1024),
    };
  },
  async stop() {
    stopped = true;
    for (const a of agents) { a.wake?.(); a.conn?.close(); }
    await Promise.all(agents.map((a) => a.loop));
    upstreams?.close();
    return { stopped: agents.length };
  },
});
