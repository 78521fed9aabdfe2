import type { AgentSummary, RegistryCounts } from './tunnel-registry';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics, type Metric } from 'prom-client';

// Method names come from callers; past this many distinct ones, new names are counted as "other"
// so that a caller sending random paths cannot grow the metrics without bound.
const MAX_METHOD_LABELS = 500;
/** Longest method path kept as a label; longer ones are `other`. */
const MAX_METHOD_LABEL_CHARS = 256;

/** Every metric the broker exports, on its own registry (served at the admin listener's /metrics). */
export class BrokerMetrics {
  readonly registry = new Registry();
  private readonly knownMethods = new Set<string>();

  // Registry gauges are computed when scraped, so the per-call path never walks the registry.
  readonly connectedAgents = new Gauge({
    name: 'burrow_broker_connected_agents',
    help: 'Agents with at least one tunnel session to this broker.',
    registers: [this.registry],
    collect: () => {
      this.connectedAgents.set(this.counts().agents);
    },
  });
  readonly sessions = new Gauge({
    name: 'burrow_broker_sessions',
    help: 'Agent tunnel sessions (connections) open.',
    registers: [this.registry],
    collect: () => {
      this.sessions.set(this.counts().sessions);
    },
  });
  readonly tunnelStreams = new Gauge({
    name: 'burrow_broker_tunnel_streams',
    help: "Call streams open on agents' tunnels now, by state (active).",
    labelNames: ['state'],
    registers: [this.registry],
    collect: () => {
      const c = this.counts();
      this.tunnelStreams.set({ state: 'active' }, c.activeCalls);
    },
  });
  // One series per connected agent (value: its sessions here), so that an alert can name the agent
  // that went away. Cardinality is the number of agents, which an operator sizes for anyway; the
  // series disappears when the agent's last session ends, which is what the alert looks for.
  readonly agentSessions = new Gauge({
    name: 'burrow_broker_agent_sessions',
    help: 'Tunnel sessions of each connected agent to this broker (absent when it has none).',
    labelNames: ['agent_id'],
    registers: [this.registry],
    collect: () => {
      this.agentSessions.reset();
      for (const a of this.agents()) this.agentSessions.set({ agent_id: a.id }, a.connections);
    },
  });
  readonly callsWaiting = new Gauge({
    name: 'burrow_broker_calls_waiting',
    help: 'Caller calls waiting for their agent to connect.',
    registers: [this.registry],
    collect: () => {
      this.callsWaiting.set(this.counts().waiters);
    },
  });
  readonly callsInFlight = new Gauge({
    name: 'burrow_broker_calls_in_flight',
    help: 'Forwarded calls in progress, by direction.',
    labelNames: ['direction'],
    registers: [this.registry],
  });
  readonly calls = new Counter({
    name: 'burrow_broker_calls_total',
    help: 'Forwarded calls finished, by direction (to_agent, from_agent), method and gRPC status code.',
    labelNames: ['direction', 'method', 'code'],
    registers: [this.registry],
  });
  readonly callDuration = new Histogram({
    name: 'burrow_broker_call_duration_seconds',
    help: 'Duration of forwarded calls, from arrival at the broker to status.',
    labelNames: ['direction'],
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [this.registry],
  });
  readonly messageBytes = new Counter({
    name: 'burrow_broker_message_bytes_total',
    help:
      'Message bytes forwarded, by direction of the call and ' +
      'flow (request = towards the upstream, response = back).',
    labelNames: ['direction', 'flow'],
    registers: [this.registry],
  });
  readonly agentConnects = new Counter({
    name: 'burrow_broker_agent_connects_total',
    help: 'Agent sessions established (first connections and reconnects).',
    registers: [this.registry],
  });
  readonly rejectedHandshakes = new Counter({
    name: 'burrow_broker_rejected_handshakes_total',
    help: 'Connections or tunnel/API calls refused for their credentials or protocol version, by listener and reason.',
    labelNames: ['listener', 'reason'],
    registers: [this.registry],
  });
  readonly abandonedHandshakes = new Counter({
    name: 'burrow_broker_abandoned_handshakes_total',
    help:
      'TLS handshakes the peer closed or reset before they finished (agents giving up on a busy broker, ' +
      'scanners), by listener; not refusals.',
    labelNames: ['listener'],
    registers: [this.registry],
  });
  readonly handshakesShed = new Counter({
    name: 'burrow_broker_handshakes_shed_total',
    help:
      'Agent connections closed at accept because --max-pending-handshakes TLS handshakes were already running ' +
      '(the agents retry after their backoff).',
    registers: [this.registry],
  });
  readonly handshakesPending = new Gauge({
    name: 'burrow_broker_handshakes_pending',
    help: 'TLS handshakes the agent listener is running now.',
    registers: [this.registry],
    collect: () => {
      this.handshakesPending.set(this.pendingHandshakes());
    },
  });
  readonly connectionsGuarded = new Counter({
    name: 'burrow_broker_connections_guarded_total',
    help:
      'Connections a listener closed before they proved a client certificate, by listener and reason ' +
      '(address_cap, handshake_timeout, unauthenticated_cap, unauthenticated_timeout; pending_cap is ' +
      'handshakes_shed_total).',
    labelNames: ['listener', 'reason'],
    registers: [this.registry],
  });
  readonly unauthenticatedConnections = new Gauge({
    name: 'burrow_broker_unauthenticated_connections',
    help: 'Agent-listener connections open without a valid client certificate (enrollment; with --pki-dir).',
    registers: [this.registry],
    collect: () => {
      this.unauthenticatedConnections.set(this.openUnauthenticated());
    },
  });
  /** Read when scraped; the broker sets it once its agent listener is bound. */
  openUnauthenticated: () => number = () => 0;
  /** Read when scraped; the broker sets it once its agent listener is bound. */
  pendingHandshakes: () => number = () => 0;
  readonly protocolErrors = new Counter({
    name: 'burrow_broker_protocol_errors_total',
    help: 'Tunnel sessions closed because the agent broke the protocol.',
    registers: [this.registry],
  });
  readonly connectionsClosed = new Counter({
    name: 'burrow_broker_connections_closed_total',
    help: 'Agent sessions closed by the broker for their credentials, by reason (expired, revoked).',
    labelNames: ['reason'],
    registers: [this.registry],
  });
  readonly callsCut = new Counter({
    name: 'burrow_broker_calls_cut_total',
    help:
      'Calls in flight ended because the client certificate they came with was revoked or expired, ' +
      'by listener (api, authzen, ext_authz, forward_auth, peer) and reason (revoked, expired).',
    labelNames: ['listener', 'reason'],
    registers: [this.registry],
  });
  readonly enrollments = new Counter({
    name: 'burrow_pki_enrollments_total',
    help:
      'Enrollment attempts, by result (ok, repeated (same token and key: the same certificate again), malformed, ' +
      'unknown, expired, used, banned, bad_csr, rate_limited, error).',
    labelNames: ['result'],
    registers: [this.registry],
  });
  readonly renewals = new Counter({
    name: 'burrow_pki_renewals_total',
    help: 'Certificate renewals served, by result (ok, revoked, denied, bad_csr, error).',
    labelNames: ['result'],
    registers: [this.registry],
  });
  readonly servingCertificatesIssued = new Counter({
    name: 'burrow_pki_serving_certificates_issued_total',
    help: 'Serving certificates the broker issued itself (start, renewal, rotation).',
    registers: [this.registry],
  });
  readonly revocationsApplied = new Counter({
    name: 'burrow_pki_revocations_total',
    help: 'Revocation list changes the broker applied.',
    registers: [this.registry],
  });
  readonly certificateExpiry = new Gauge({
    name: 'burrow_pki_certificate_expiry_seconds',
    help:
      'Seconds until the earliest certificate expiry, by role (broker: its own serving certificate; agent: ' +
      'connected agents).',
    labelNames: ['role'],
    registers: [this.registry],
  });
  readonly caExpiry = new Gauge({
    name: 'burrow_pki_ca_expiry_seconds',
    help: 'Seconds until each CA in the PKI directory expires.',
    labelNames: ['ca', 'kind'],
    registers: [this.registry],
  });
  readonly authzDecisions = new Counter({
    name: 'burrow_broker_authz_decisions_total',
    help: 'Caller authorization decisions, by decision (allow, deny).',
    labelNames: ['decision'],
    registers: [this.registry],
  });
  readonly limitedCalls = new Counter({
    name: 'burrow_broker_limited_calls_total',
    help:
      'Calls refused with RESOURCE_EXHAUSTED by a per-caller or per-agent limit, by limit (caller_concurrency, ' +
      'caller_rate, agent_concurrency, agent_rate).',
    labelNames: ['limit'],
    registers: [this.registry],
  });
  readonly httpRequests = new Counter({
    name: 'burrow_broker_authzen_requests_total',
    help: 'Requests on the AuthZEN HTTP binding, by endpoint (evaluation, evaluations, configuration) and HTTP status.',
    labelNames: ['endpoint', 'status'],
    registers: [this.registry],
  });
  readonly gatewayChecks = new Counter({
    name: 'burrow_broker_gateway_checks_total',
    help:
      'Gateway checks (Envoy ext_authz, nginx/Traefik forward auth), by gateway (ext_authz, forward_auth) and ' +
      'verdict (allow, deny, unauthenticated, error: no verdict, the check failed).',
    labelNames: ['gateway', 'verdict'],
    registers: [this.registry],
  });
  readonly gatewayCheckDuration = new Histogram({
    name: 'burrow_broker_gateway_check_duration_seconds',
    help: 'Time from a gateway check arriving to its answer, through the tunnel and back, by gateway.',
    labelNames: ['gateway'],
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });
  // Cluster (--redis-url): the agent directory and broker-to-broker forwarding.
  readonly redisUp = new Gauge({
    name: 'burrow_broker_redis_up',
    help: 'Whether the agent directory (Redis) is reachable (1) or not (0); absent without --redis-url.',
    registers: [],
  });
  readonly redisErrors = new Counter({
    name: 'burrow_broker_redis_errors_total',
    help: 'Failed agent directory (Redis) commands and connection losses.',
    registers: [],
  });
  readonly redisCommands = new Counter({
    name: 'burrow_broker_redis_commands_total',
    help: 'Redis commands sent, by purpose (claim, release, lookup, refresh, brokers, join, leave).',
    labelNames: ['command'],
    registers: [],
  });
  readonly directoryLookups = new Counter({
    name: 'burrow_broker_directory_lookups_total',
    help: 'Agent directory lookups for agents not connected here, by result (found, absent, cached, merged, error).',
    labelNames: ['result'],
    registers: [],
  });
  readonly peerForwards = new Counter({
    name: 'burrow_broker_peer_forwards_total',
    help: 'Attempts to forward a call to the broker holding its agent, by result (served, refused, unreachable).',
    labelNames: ['result'],
    registers: [],
  });
  readonly peerCalls = new Counter({
    name: 'burrow_broker_peer_calls_total',
    help: 'Calls other brokers forwarded to this one, by gRPC status code.',
    labelNames: ['code'],
    registers: [],
  });

  /** `counts` and `agents` read the tunnel registry; called only when metrics are scraped. */
  constructor(
    private readonly counts: () => RegistryCounts,
    private readonly agents: () => AgentSummary[] = () => [],
  ) {
    collectDefaultMetrics({ register: this.registry, prefix: 'burrow_broker_process_' });
    // Every label value known in advance starts at 0, so its series exists from the first scrape:
    // Prometheus' increase() cannot see the first event of a series that appears with value 1,
    // and an alert on "any failure" would miss it.
    for (const result of [
      'ok',
      'repeated',
      'malformed',
      'unknown',
      'expired',
      'used',
      'banned',
      'bad_csr',
      'rate_limited',
      'error',
    ])
      this.enrollments.inc({ result }, 0);
    for (const result of ['ok', 'denied', 'revoked', 'bad_csr', 'error']) this.renewals.inc({ result }, 0);
    for (const reason of ['expired', 'revoked']) this.connectionsClosed.inc({ reason }, 0);
    for (const reason of ['tls', 'wrong_role', 'no_identity', 'revoked'])
      this.rejectedHandshakes.inc({ listener: 'agent', reason }, 0);
    for (const reason of ['tls', 'wrong_role', 'no_identity'])
      this.rejectedHandshakes.inc({ listener: 'api', reason }, 0);
    for (const listener of ['agent', 'api']) this.abandonedHandshakes.inc({ listener }, 0);
    for (const direction of ['to_agent', 'from_agent']) {
      this.callDuration.zero({ direction });
      this.callsInFlight.set({ direction }, 0);
    }
  }

  /** Registers the cluster metrics (only brokers started with --redis-url export them). */
  enableClusterMetrics(): void {
    for (const m of [
      this.redisUp,
      this.redisErrors,
      this.redisCommands,
      this.directoryLookups,
      this.peerForwards,
      this.peerCalls,
    ] as Metric[])
      this.registry.registerMetric(m);
    for (const command of ['claim', 'release', 'lookup', 'refresh', 'brokers', 'join', 'leave'])
      this.redisCommands.inc({ command }, 0);
    for (const result of ['found', 'absent', 'cached', 'merged', 'error']) this.directoryLookups.inc({ result }, 0);
    for (const result of ['served', 'refused', 'unreachable']) this.peerForwards.inc({ result }, 0);
  }

  /** Caller calls (direct and forwarded to this broker) between arrival and status: the drain waits for 0. */
  toAgentInFlight = 0;

  /** A call towards an agent arrived (caller API, AuthZEN binding or peer API). */
  toAgentCallStarted(): void {
    this.toAgentInFlight++;
    this.callsInFlight.inc({ direction: 'to_agent' });
  }

  /** That call has its status. */
  toAgentCallEnded(): void {
    this.toAgentInFlight--;
    this.callsInFlight.dec({ direction: 'to_agent' });
  }

  /** The method label for `method`: itself while fewer than the cap are known, else "other". */
  methodLabel(method: string): string {
    if (this.knownMethods.has(method)) return method;
    // A path is whatever a caller or agent put in it; /metrics must not carry a megabyte label.
    if (this.knownMethods.size >= MAX_METHOD_LABELS || method.length > MAX_METHOD_LABEL_CHARS) return 'other';
    this.knownMethods.add(method);
    return method;
  }
}
