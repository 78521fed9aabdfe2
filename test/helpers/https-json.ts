import { readFileSync } from 'node:fs';
import * as https from 'node:https';
import type { CertFiles } from './pki-fixture';

export interface JsonResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  // biome-ignore lint/suspicious/noExplicitAny: tests read whatever JSON the endpoint under test answers
  body: any;
}

/**
 * One HTTPS request with a client certificate (or none), body as JSON; resolves with the parsed
 * JSON answer. A fresh agent per request, so no connection outlives the test.
 */
export function httpsJson(
  address: string,
  method: string,
  path: string,
  opts: { cert?: CertFiles; ca: string; body?: unknown; rawBody?: string; headers?: Record<string, string> },
): Promise<JsonResponse> {
  const [host, port] = [
    address.slice(0, address.lastIndexOf(':')),
    Number(address.slice(address.lastIndexOf(':') + 1)),
  ];
  const payload = opts.rawBody ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body));
  return new Promise((resolve, reject) => {
    const agent = new https.Agent({ keepAlive: false });
    const req = https.request(
      {
        host,
        port,
        method,
        path,
        agent,
        servername: 'localhost',
        ca: readFileSync(opts.ca),
        cert: opts.cert ? readFileSync(opts.cert.cert) : undefined,
        key: opts.cert ? readFileSync(opts.cert.key) : undefined,
        headers: { ...(payload !== undefined ? { 'content-type': 'application/json' } : {}), ...opts.headers },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          agent.destroy();
          const text = Buffer.concat(chunks).toString('utf8');
          let body: unknown = text;
          try {
            body = JSON.parse(text);
          } catch {
            /* not JSON: keep the text */
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body });
        });
      },
    );
    req.on('error', (err) => {
      agent.destroy();
      reject(err);
    });
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}
