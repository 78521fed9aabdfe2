import { EventEmitter, once } from 'node:events';
import { renameSync, writeFileSync } from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { JoseModule } from '@burrow/agent';

/** A signing key made at test time and its public JWK (with kid, alg and use). */
export interface TestKey {
  kid: string;
  alg: string;
  privateKey: Parameters<JoseModule['SignJWT']['prototype']['sign']>[0];
  publicJwk: Record<string, unknown>;
}

export const ISS = 'https://idp.site.test';
export const AUD = 'burrow-site-api';

/** Makes a key pair for `alg` with jose (RS256 keys are 2048 bits). */
export async function makeKey(jose: JoseModule, alg: string, kid: string): Promise<TestKey> {
  const { privateKey, publicKey } = await jose.generateKeyPair(alg, { extractable: true });
  return { kid, alg, privateKey, publicJwk: { ...(await jose.exportJWK(publicKey)), kid, alg, use: 'sig' } };
}

/** A JWKS document holding the public halves of `keys`. */
export function jwksOf(...keys: TestKey[]): string {
  return JSON.stringify({ keys: keys.map((k) => k.publicJwk) });
}

/** Writes a file the way config tools do: a temporary file renamed over the old one. */
export function writeAtomically(file: string, text: string): void {
  writeFileSync(`${file}.tmp`, text);
  renameSync(`${file}.tmp`, file);
}

/**
 * Signs a JWT with `key`. The payload starts as a valid one (iss, aud, sub, groups, iat, exp in 10
 * minutes, times from `nowS`) and `claims` overrides it; a claim set to undefined is left out.
 */
export function signToken(
  jose: JoseModule,
  key: TestKey,
  claims: Record<string, unknown> = {},
  header: Record<string, unknown> = {},
  nowS = Math.floor(Date.now() / 1000),
): Promise<string> {
  const payload = { iss: ISS, aud: AUD, sub: 'alice', groups: ['ops', 'dev'], iat: nowS, exp: nowS + 600, ...claims };
  const crit = Array.isArray(header.crit)
    ? Object.fromEntries((header.crit as string[]).map((c) => [c, true]))
    : undefined;
  return new jose.SignJWT(payload)
    .setProtectedHeader({ alg: key.alg, kid: key.kid, ...header })
    .sign(key.privateKey, crit ? { crit } : undefined);
}

/**
 * A local HTTP server on port 0 whose answers a test sets (`handler`), counting requests. Emits
 * `request` after each one is answered, so tests wait on events, not time.
 */
export class TestHttpServer {
  readonly server: http.Server;
  requests = 0;
  readonly events = new EventEmitter();
  handler: (req: http.IncomingMessage, body: string, res: http.ServerResponse) => void = (_req, _body, res) => {
    res.writeHead(404).end();
  };

  private constructor() {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        this.requests++;
        this.handler(req, Buffer.concat(chunks).toString('utf8'), res);
        this.events.emit('request', req);
      });
    });
  }

  static async start(): Promise<TestHttpServer> {
    const s = new TestHttpServer();
    s.server.listen(0, '127.0.0.1');
    await once(s.server, 'listening');
    return s;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  /** Serves `body` as JSON with status 200 (or the status given). */
  serveJson(body: string, status = 200): void {
    this.handler = (_req, _body, res) => {
      res.writeHead(status, { 'content-type': 'application/json' }).end(body);
    };
  }

  /** Resolves when the server has answered `count` requests in all. */
  async waitForRequests(count: number): Promise<void> {
    while (this.requests < count) await once(this.events, 'request');
  }

  async close(): Promise<void> {
    if (!this.server.listening) return;
    const closed = once(this.server, 'close');
    this.server.close();
    this.server.closeAllConnections();
    await closed;
  }
}
