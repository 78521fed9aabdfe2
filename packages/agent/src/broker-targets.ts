import { createHash } from 'node:crypto';
import { promises as dns } from 'node:dns';
import { isIP } from 'node:net';
import type { BrokerEndpoint } from '@burrow/tunnel';

/**
 * Which brokers the agent keeps tunnels to. Pure functions; the agent (agent.ts) runs one connect
 * loop per {@link TargetSpec} these return and re-runs them whenever DNS, a Welcome or a Brokers
 * frame tells it something new.
 *
 * Targets are the configured `--broker` addresses (each name expanded to one target per address it
 * resolves to) plus brokers learned from the replica set (the `Brokers` frame),
 * up to `--max-brokers` distinct brokers in all. Configured targets always stay.
 */

/** Resolves a host name to its addresses (every one, not just the first). Injectable for tests. */
export type HostResolver = (host: string) => Promise<string[]>;

/** The system resolver: `dns.promises.lookup(host, { all: true })`, so /etc/hosts counts too. */
export const systemResolver: HostResolver = async (host) =>
  (await dns.lookup(host, { all: true })).map((a) => a.address);

/** One address to keep a tunnel to. */
export interface TargetSpec {
  /** HOST:PORT as dialled. */
  address: string;
  /** TLS name expected in the broker certificate; undefined = the host of `address`. */
  serverName?: string;
  source: 'configured' | 'learned';
  /** Configured targets: the `--broker` entry this one came from. */
  configuredAs?: string;
  /** Learned targets: the broker id the replica set names. */
  advertisedId?: string;
}

/** Splits HOST:PORT (IPv6 in brackets); the host comes back without brackets. */
export function splitHostPort(address: string): { host: string; port: string } {
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i).replace(/^\[|\]$/g, ''), port: address.slice(i + 1) };
}

function joinHostPort(host: string, port: string): string {
  return isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * The targets one `--broker` entry stands for. An IP address is itself. A name that resolves is one
 * target per distinct address, each expecting the configured name in the broker certificate (or
 * `serverNameOverride`), so that one DNS name in front of several brokers gives a tunnel to each.
 * A name that does not resolve (or resolves to nothing) stays the name: grpc-js resolves it when
 * it dials, as it did before the agent knew about replicas. Never rejects.
 */
export async function expandConfigured(
  configured: string,
  resolve: HostResolver,
  serverNameOverride?: string,
): Promise<{ specs: TargetSpec[]; error?: Error }> {
  const { host, port } = splitHostPort(configured);
  const itself: TargetSpec[] = [
    { address: configured, serverName: serverNameOverride, source: 'configured', configuredAs: configured },
  ];
  if (isIP(host)) return { specs: itself };
  let addresses: string[];
  try {
    addresses = [...new Set(await resolve(host))].sort();
  } catch (err) {
    return { specs: itself, error: err as Error };
  }
  if (addresses.length === 0) return { specs: itself };
  return {
    specs: addresses.map((ip) => ({
      address: joinHostPort(ip, port),
      serverName: serverNameOverride ?? host,
      source: 'configured',
      configuredAs: configured,
    })),
  };
}

/**
 * Rendezvous (highest random weight) score of a broker for an agent: every agent ranks the brokers
 * in its own stable order, so a fleet spreads over the replicas, and adding or removing one broker
 * moves only the agents that ranked it among their chosen ones.
 */
export function rendezvousScore(agentId: string, brokerId: string): bigint {
  return createHash('sha256').update(agentId).update('\0').update(brokerId).digest().readBigUInt64BE(0);
}

/** What {@link chooseTargets} needs to know. */
export interface TargetInputs {
  agentId: string;
  /** Configured targets as DNS last expanded them. */
  configured: TargetSpec[];
  /** Broker id each configured address last reached (from its Welcome), when known. */
  knownIds: ReadonlyMap<string, string>;
  /** The most recently received replica set. */
  replicaSet: readonly BrokerEndpoint[];
  /** Most distinct brokers to keep tunnels to; configured targets count first and always stay. */
  maxBrokers: number;
  serverNameOverride?: string;
}

/**
 * Every target the agent should have a tunnel to: all configured ones, then learned ones from the
 * replica set that are not already reached (by broker id, or by address), best rendezvous score
 * first, until `maxBrokers` distinct brokers are covered. A configured target whose broker id is
 * not known yet counts as a broker of its own.
 */
export function chooseTargets(inputs: TargetInputs): TargetSpec[] {
  const taken = new Set<string>();
  const addresses = new Set<string>();
  for (const spec of inputs.configured) {
    taken.add(inputs.knownIds.get(spec.address) ?? `unknown ${spec.address}`);
    addresses.add(spec.address);
  }
  const candidates = inputs.replicaSet
    .filter((b) => !taken.has(b.brokerId) && !addresses.has(b.address))
    .map((b) => ({ b, score: rendezvousScore(inputs.agentId, b.brokerId) }))
    .sort((x, y) => (x.score === y.score ? x.b.brokerId.localeCompare(y.b.brokerId) : x.score > y.score ? -1 : 1));
  const learned: TargetSpec[] = [];
  for (const { b } of candidates) {
    if (taken.size >= inputs.maxBrokers) break;
    if (addresses.has(b.address)) continue; // two ids behind one address: one tunnel
    taken.add(b.brokerId);
    addresses.add(b.address);
    learned.push({
      address: b.address,
      serverName: inputs.serverNameOverride,
      source: 'learned',
      advertisedId: b.brokerId,
    });
  }
  return [...inputs.configured, ...learned];
}
