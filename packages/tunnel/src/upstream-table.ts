import { Client, credentials, type ChannelOptions } from '@grpc/grpc-js';

/** One `SERVICE=HOST:PORT` route; `service` is a full service name or `*` for the default. */
export interface UpstreamRoute {
  service: string;
  address: string;
}

/**
 * Parses `grpc.testing.TestService=127.0.0.1:50051` (or `*=host:port`). Throws with a message
 * naming the bad text; CLIs turn that into their one-line config error.
 */
export function parseUpstreamRoute(text: string): UpstreamRoute {
  const eq = text.indexOf('=');
  if (eq <= 0) throw new Error(`expected SERVICE=HOST:PORT, got "${text}"`);
  const service = text.slice(0, eq).trim();
  const address = text.slice(eq + 1).trim();
  if (service !== '*' && !/^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$/.test(service)) {
    throw new Error(`"${service}" is not a full gRPC service name (like pkg.Service) or *`);
  }
  if (
    !/^(\[[0-9a-fA-F:.]+\]|[^:\s[\]]+):\d{1,5}$/.test(address) ||
    Number(address.slice(address.lastIndexOf(':') + 1)) > 65535
  ) {
    throw new Error(`"${address}" is not HOST:PORT`);
  }
  return { service, address };
}

/** The service part of a full method path: `/pkg.Svc/Method` -> `pkg.Svc`. */
export function serviceOfMethod(method: string): string {
  const slash = method.indexOf('/', 1);
  return slash < 0 ? method.slice(1) : method.slice(1, slash);
}

/**
 * Routes forwarded calls to upstream gRPC servers by service name, one shared channel per address.
 * Used by the agent (site upstreams) and the broker (platform upstreams). Channels connect lazily;
 * a call to an unreachable upstream fails fast with UNAVAILABLE, so it never holds other calls.
 */
export class UpstreamTable {
  private readonly byService = new Map<string, string>();
  private readonly clients = new Map<string, Client>();

  constructor(
    routes: readonly UpstreamRoute[],
    private readonly channelOptions: ChannelOptions,
  ) {
    for (const r of routes) this.byService.set(r.service, r.address);
  }

  get size(): number {
    return this.byService.size;
  }

  /** True when `service` has a route of its own (the default route `*` does not count). */
  hasRoute(service: string): boolean {
    return this.byService.has(service);
  }

  /** The client for the service of `method`, or undefined when no route (not even `*`) matches. */
  clientFor(method: string): Client | undefined {
    const address = this.byService.get(serviceOfMethod(method)) ?? this.byService.get('*');
    if (address === undefined) return undefined;
    let client = this.clients.get(address);
    if (!client) {
      client = new Client(address, credentials.createInsecure(), this.channelOptions);
      this.clients.set(address, client);
    }
    return client;
  }

  /** Closes every upstream channel. Calls still running on them finish first (grpc-js close). */
  close(): void {
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }
}
