import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Broker counts read when /metrics is scraped. */
export interface BrokerCounts {
  /** Distinct broker ids with a usable tunnel. */
  connected: number;
  /** Brokers in the replica set most recently received. */
  known: number;
}

/** Everything the agent exports on its admin listener's /metrics. */
export class AgentMetrics {
  readonly registry = new Registry();
  readonly connectedBrokers = new Gauge({
    name: 'burrow_agent_connected_brokers',
    help: 'Broker connections with an established tunnel session.',
    registers: [this.registry],
  });
  readonly brokersConnected: Gauge;
  readonly brokersKnown: Gauge;
  readonly tunnelStreams = new Gauge({
    name: 'burrow_agent_tunnel_streams',
    help: "Calls the broker runs on this agent's tunnels now (state active).",
    labelNames: ['state'],
    registers: [this.registry],
  });
  readonly connects = new Counter({
    name: 'burrow_agent_connects_total',
    help: 'Tunnel session attempts, by result (ok, failed).',
    labelNames: ['result'],
    registers: [this.registry],
  });
  readonly reconnects = new Counter({
    name: 'burrow_agent_reconnects_total',
    help: 'Tunnel sessions lost and re-established.',
    registers: [this.registry],
  });
  readonly calls = new Counter({
    name: 'burrow_agent_calls_total',
    help: 'Forwarded calls finished, by direction (from_broker, to_broker) and gRPC status code.',
    labelNames: ['direction', 'code'],
    registers: [this.registry],
  });
  readonly callDuration = new Histogram({
    name: 'burrow_agent_call_duration_seconds',
    help: 'Duration of forwarded calls at the agent.',
    labelNames: ['direction'],
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [this.registry],
  });
  readonly messageBytes = new Counter({
    name: 'burrow_agent_message_bytes_total',
    help: 'Message bytes forwarded, by direction and flow (request, response).',
    labelNames: ['direction', 'flow'],
    registers: [this.registry],
  });

  readonly renewals = new Counter({
    name: 'burrow_agent_renewals_total',
    help: 'Certificate renewal attempts, by result (ok, failed).',
    labelNames: ['result'],
    registers: [this.registry],
  });
  readonly certificateExpiry = new Gauge({
    name: 'burrow_agent_certificate_expiry_seconds',
    help: 'Seconds until the agent certificate expires.',
    registers: [this.registry],
  });

  /** `brokerCounts` is read at every scrape; without it both broker gauges stay 0. */
  constructor(brokerCounts: () => BrokerCounts = () => ({ connected: 0, known: 0 })) {
    this.brokersConnected = new Gauge({
      name: 'burrow_agent_brokers_connected',
      help: 'Distinct brokers (by broker id) this agent has a usable tunnel to.',
      registers: [this.registry],
      collect() {
        this.set(brokerCounts().connected);
      },
    });
    this.brokersKnown = new Gauge({
      name: 'burrow_agent_brokers_known',
      help: 'Brokers in the replica set most recently received from a broker (Brokers frame).',
      registers: [this.registry],
      collect() {
        this.set(brokerCounts().known);
      },
    });
    collectDefaultMetrics({ register: this.registry, prefix: 'burrow_agent_process_' });
    // Known label values start at 0 so that their series exist before the first event (an
    // alert's increase() cannot see the first event of a series that appears with value 1).
    for (const result of ['ok', 'failed']) {
      this.connects.inc({ result }, 0);
      this.renewals.inc({ result }, 0);
    }
  }
}
