import { timingSafeEqual } from 'node:crypto';
import * as http from 'node:http';
import { isIP } from 'node:net';
import type { Registry } from 'prom-client';

/** What an admin route answers: an HTTP status and a JSON body. */
export interface AdminResponse {
  status: number;
  body: unknown;
}

/**
 * A route with a path parameter or a side effect, e.g. `GET /agents/<id>` or
 * `POST /agents/<id>/disconnect`. `pattern` is matched against the whole path (no query string);
 * its capture groups are passed, URL-decoded, to `handle`.
 */
export interface AdminRoute {
  method: 'GET' | 'POST';
  pattern: RegExp;
  /**
   * The route changes state: it is served only when {@link AdminSources.mutations} allows the
   * request (token, or loopback listener). Every POST route must say true here.
   */
  mutating: boolean;
  handle(params: string[], req: { remoteAddress: string; body: unknown }): AdminResponse | Promise<AdminResponse>;
}

/**
 * Who may call mutating routes. Without a token, mutating requests are served only while the
 * listener is bound to a loopback address (checked on the bound socket, not on configuration text).
 */
export interface AdminMutationPolicy {
  /**
   * Shared secret: when set, every mutating request must carry `Authorization: Bearer <token>`,
   * wherever the listener is bound.
   */
  token?: string;
}

export interface AdminSources {
  metrics: Registry;
  /** Extra JSON routes, e.g. `/agents` on the broker, `/brokers` on the agent. */
  json: Record<string, () => unknown>;
  /** Routes with parameters or side effects (see {@link AdminRoute}). */
  routes?: AdminRoute[];
  /** Present when the owner has mutating routes; absent means they are all refused. */
  mutations?: AdminMutationPolicy;
  /** False while starting or draining: /readyz answers 503. */
  isReady(): boolean;
  /**
   * Host names (lowercase, no port) the listener answers to besides the ones always allowed:
   * `localhost`, IP literals and the bound address (see {@link refuseHost}). The operator's
   * `--admin-allowed-host`; default none.
   */
  allowedHosts?: readonly string[];
}

/** Largest request body a mutating route accepts (a JSON object with a reason). */
const MAX_BODY_BYTES = 16 * 1024;

/** True for 127.0.0.0/8, ::1 and IPv4-mapped loopback. */
export function isLoopbackAddress(address: string): boolean {
  const a = address.replace(/^\[|\]$/g, '');
  if (a === '::1' || a === 'localhost') return true;
  const v4 = a.startsWith('::ffff:') ? a.slice(7) : a;
  return isIP(v4) === 4 && v4.startsWith('127.');
}

/**
 * The host part of a `Host` header or an origin's host (`name`, `name:port`, `[v6]:port`),
 * lowercased, without brackets or a trailing dot; undefined when it is not of that form.
 */
function hostOf(value: string): string | undefined {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]+)(?::\d{1,5})?$/.exec(value.trim());
  if (!m) return undefined;
  return m[1]!
    .replace(/^\[|\]$/g, '')
    .replace(/\.$/, '')
    .toLowerCase();
}

/**
 * Why a request's `Host` or `Origin` is refused, or undefined when both are allowed. A DNS
 * rebinding page reaches the listener under the attacker's own name, and the browser sends that
 * name as `Host`: so only names the operator listed, `localhost` and the bound address are
 * allowed. Any IP literal is allowed too: no rebinding can produce one (the browser would treat
 * it as its own origin), and Prometheus and probes often scrape by an address the process does
 * not see as its own (NAT, container port mapping). An `Origin` (sent by browsers on
 * cross-origin requests) must name an allowed host that is not just any IP: a page on another
 * address has no business reading the admin data.
 */
function refuseHost(
  server: http.Server,
  req: http.IncomingMessage,
  allowedHosts: readonly string[],
): string | undefined {
  const bound = server.address();
  const boundHost = bound && typeof bound === 'object' ? bound.address.toLowerCase() : '';
  const named = (host: string): boolean =>
    host === 'localhost' || host === boundHost || isLoopbackAddress(host) || allowedHosts.includes(host);
  const how = (name: string): string => `start the listener with --admin-allowed-host ${name} to allow it`;
  const hostHeader = req.headers.host ?? '';
  const host = hostOf(hostHeader);
  if (host === undefined) return `admin request refused: Host "${hostHeader}" is not a host name\n`;
  if (!named(host) && isIP(host) === 0) {
    return `admin request refused: Host "${host}" is not an allowed admin host; ${how(host)}\n`;
  }
  const origin = req.headers.origin;
  if (origin === undefined) return undefined;
  let originHost: string | undefined;
  try {
    originHost = hostOf(new URL(origin).host);
  } catch {
    originHost = undefined;
  }
  if (originHost === undefined) return `admin request refused: Origin "${origin}" names no host\n`;
  if (!named(originHost)) {
    return `admin request refused: Origin "${origin}" is not an allowed admin host; ${how(originHost)}\n`;
  }
  return undefined;
}

function tokenMatches(header: string | undefined, token: string): boolean {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header ?? '');
  if (!m) return false;
  const given = Buffer.from(m[1]!);
  const want = Buffer.from(token);
  return given.length === want.length && timingSafeEqual(given, want);
}

/**
 * Decides whether a mutating request may run; returns the refusal (status and message) or
 * undefined. Without a token only a loopback listener serves them, and then only to requests that
 * a web page cannot forge: no `Origin` header (browsers send one on cross-site POSTs) and a
 * loopback `Host` (a DNS-rebinding page would send its own name).
 */
function refuseMutation(
  server: http.Server,
  req: http.IncomingMessage,
  policy: AdminMutationPolicy | undefined,
): AdminResponse | undefined {
  if (!policy) return { status: 403, body: { error: 'this admin listener serves no mutating requests' } };
  if (policy.token !== undefined) {
    if (tokenMatches(req.headers.authorization, policy.token)) return undefined;
    return {
      status: 401,
      body: { error: 'missing or wrong admin token: send Authorization: Bearer <contents of the admin token file>' },
    };
  }
  const bound = server.address();
  const boundHost = bound && typeof bound === 'object' ? bound.address : '';
  if (!isLoopbackAddress(boundHost)) {
    return {
      status: 403,
      body: {
        error:
          `mutating admin requests are refused: the admin listener is bound to ${boundHost}, not loopback, and no ` +
          `admin token file is configured`,
      },
    };
  }
  const host = (req.headers.host ?? '').replace(/:\d+$/, '');
  if (req.headers.origin !== undefined || !isLoopbackAddress(host)) {
    return {
      status: 403,
      body: { error: 'mutating admin requests must come from a local client (no Origin header, loopback Host)' },
    };
  }
  return undefined;
}

function readBody(req: http.IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY_BYTES) {
        // Answer 413 (the rest of the body is read and dropped; the response closes the connection).
        reject(Object.assign(new Error(`request body larger than ${MAX_BODY_BYTES} bytes`), { status: 413 }));
        chunks.length = 0;
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => {
      if (size > MAX_BODY_BYTES) return;
      const text = Buffer.concat(chunks).toString('utf8').trim();
      if (text === '') return resolve({});
      try {
        resolve(JSON.parse(text));
      } catch {
        reject(Object.assign(new Error('request body is not JSON'), { status: 400 }));
      }
    });
    req.on('error', reject);
  });
}

/**
 * The admin HTTP listener: `/metrics` (Prometheus), `/healthz` (the process is alive), `/readyz`
 * (it takes new work), the JSON routes its owner adds, and {@link AdminRoute}s. Plain HTTP: bind
 * it to loopback or a management network. Read-only routes are open to whoever reaches the
 * listener under an allowed `Host` (a DNS-rebinding defence, see {@link AdminSources.allowedHosts}:
 * others get 403 and a one-line reason); mutating ones also follow {@link AdminMutationPolicy}.
 */
export function createAdminServer(sources: AdminSources): http.Server {
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0]!;
    const send = (code: number, type: string, body: string, headers: Record<string, string> = {}): void => {
      res.writeHead(code, { 'content-type': type, 'cache-control': 'no-store', ...headers });
      res.end(body);
    };
    const sendJson = (r: AdminResponse): void =>
      send(r.status, 'application/json', `${JSON.stringify(r.body, null, 2)}\n`);
    // Checked before anything else, on every route: reads expose agent ids, addresses and paths.
    const hostRefusal = refuseHost(server, req, sources.allowedHosts ?? []);
    if (hostRefusal) return send(403, 'text/plain', hostRefusal);
    const method = req.method === 'HEAD' ? 'GET' : req.method;
    for (const route of sources.routes ?? []) {
      const m = route.pattern.exec(url);
      if (!m) continue;
      if (method !== route.method) return send(405, 'text/plain', 'method not allowed\n', { allow: route.method });
      let params: string[];
      try {
        params = m.slice(1).map((p) => decodeURIComponent(p ?? ''));
      } catch {
        return sendJson({ status: 400, body: { error: 'malformed percent-encoding in the path' } });
      }
      const refusal = route.mutating ? refuseMutation(server, req, sources.mutations) : undefined;
      if (refusal) return sendJson(refusal);
      const body = method === 'POST' ? readBody(req) : Promise.resolve({});
      body
        .then((b) => route.handle(params, { remoteAddress: req.socket.remoteAddress ?? '', body: b }))
        .then(sendJson, (err: Error & { status?: number }) =>
          sendJson({ status: err.status ?? 500, body: { error: err.message } }),
        );
      return;
    }
    if (method !== 'GET') return send(405, 'text/plain', 'method not allowed\n', { allow: 'GET' });
    switch (url) {
      case '/metrics':
        sources.metrics.metrics().then(
          (text) => send(200, sources.metrics.contentType, text),
          (err: Error) => send(500, 'text/plain', `metrics failed: ${err.message}\n`),
        );
        return;
      case '/healthz':
        return send(200, 'text/plain', 'ok\n');
      case '/readyz':
        return sources.isReady() ? send(200, 'text/plain', 'ready\n') : send(503, 'text/plain', 'not ready\n');
      default: {
        const route = sources.json[url];
        if (!route) return send(404, 'text/plain', 'not found\n');
        return send(200, 'application/json', `${JSON.stringify(route(), null, 2)}\n`);
      }
    }
  });
  return server;
}
