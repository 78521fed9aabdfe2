import * as http2 from 'node:http2';

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

/** An upstream's HTTP/2 session and how it is named in status messages. */
export interface UpstreamSession {
  readonly session: http2.ClientHttp2Session;
  readonly address: string;
}

/**
 * Routes forwarded calls to upstream gRPC servers by service name, over one reused plaintext HTTP/2
 * (h2c) session per address. Used by the agent (site upstreams) and the broker (platform upstreams).
 * Sessions connect lazily and are made again after they close; a call to an unreachable upstream
 * fails fast with UNAVAILABLE, so it never holds other calls.
 */
export class UpstreamTable {
  private readonly byService = new Map<string, string>();
  private readonly sessions = new Map<string, UpstreamSession>();
  private closed = false;

  constructor(routes: readonly UpstreamRoute[]) {
    for (const r of routes) this.byService.set(r.service, r.address);
  }

  get size(): number {
    return this.byService.size;
  }

  /** True when `service` has a route of its own (the default route `*` does not count). */
  hasRoute(service: string): boolean {
    return this.byService.has(service);
  }

  /** The address serving `method`, or undefined when no route (not even `*`) matches. */
  addressFor(method: string): string | undefined {
    return this.byService.get(serviceOfMethod(method)) ?? this.byService.get('*');
  }

  /** The session for the service of `method`, or undefined when no route (not even `*`) matches. */
  sessionFor(method: string): UpstreamSession | undefined {
    const address = this.addressFor(method);
    if (address === undefined || this.closed) return undefined;
    const kept = this.sessions.get(address);
    if (kept && !kept.session.closed && !kept.session.destroyed) return kept;
    const session = http2.connect(`http://${address}`, { settings: { enablePush: false } });
    const made: UpstreamSession = { session, address };
    this.sessions.set(address, made);
    session.on('connect', (_session, socket) => {
      // Calls are small writes each way: Nagle would hold every other one for a delayed ACK.
      (socket as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
    });
    // The calls on the session report its error (stream-relay.ts reads it as their cause).
    session.on('error', () => {});
    session.on('goaway', () => this.forget(made));
    session.on('close', () => this.forget(made));
    // The table keeps sessions for reuse; they must not keep a stopping process alive.
    session.unref();
    return made;
  }

  private forget(made: UpstreamSession): void {
    if (this.sessions.get(made.address) === made) this.sessions.delete(made.address);
  }

  /** Closes every upstream session. Calls still running on them finish first (HTTP/2 close). */
  close(): void {
    this.closed = true;
    for (const s of this.sessions.values()) s.session.close();
    this.sessions.clear();
  }
}
