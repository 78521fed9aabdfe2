import * as http from 'node:http';
import type { Registry } from 'prom-client';

export interface AdminSources {
  metrics: Registry;
  /** Extra JSON routes, e.g. `/agents` on the broker, `/brokers` on the agent. */
  json: Record<string, () => unknown>;
  /** False while starting or draining: /readyz answers 503. */
  isReady(): boolean;
}

/**
 * The admin HTTP listener: `/metrics` (Prometheus), `/healthz` (the process is alive), `/readyz`
 * (it takes new work) and the JSON routes its owner adds. Plain HTTP: bind it to loopback or a management network.
 */
export function createAdminServer(sources: AdminSources): http.Server {
  return http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    const send = (code: number, type: string, body: string): void => {
      res.writeHead(code, { 'content-type': type, 'cache-control': 'no-store' });
      res.end(body);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') return send(405, 'text/plain', 'method not allowed\n');
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
        return send(200, 'application/json', JSON.stringify(route(), null, 2) + '\n');
      }
    }
  });
}
