import type { HttpClient, HttpRequestError } from './http-client';
import { MAX_JWKS_BYTES } from './jwks-file-loader';
import type { JwksLoader } from './jwks-source';

/**
 * Fetches a site's JWKS from its identity provider over HTTP(S). Any answer but a 200 with a body
 * is a failure (the source then keeps its last good keys).
 */
export class JwksUrlLoader implements JwksLoader {
  readonly description: string;

  constructor(
    private readonly url: URL,
    private readonly http: HttpClient,
    private readonly timeoutMs: number,
  ) {
    this.description = `jwks-url ${url.href}`;
  }

  async load(): Promise<Buffer> {
    let res: Awaited<ReturnType<HttpClient['request']>>;
    try {
      res = await this.http.request({
        method: 'GET',
        url: this.url,
        headers: { accept: 'application/jwk-set+json, application/json' },
        timeoutMs: this.timeoutMs,
        maxBodyBytes: MAX_JWKS_BYTES,
      });
    } catch (err) {
      throw new Error(`GET ${this.url.href}: ${(err as HttpRequestError).message}`);
    }
    if (res.status !== 200) throw new Error(`GET ${this.url.href}: HTTP ${res.status}`);
    return res.body;
  }
}
