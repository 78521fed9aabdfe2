import * as http from 'node:http';
import * as https from 'node:https';

/** One HTTP request of {@link HttpClient.request}. */
export interface HttpRequest {
  method: 'GET' | 'POST';
  url: URL;
  headers?: Record<string, string>;
  body?: string;
  /** Whole exchange, connect to last byte. */
  timeoutMs: number;
  /** Largest response body accepted; a longer one fails the request. */
  maxBodyBytes: number;
}

/** What came back: any status (the caller decides what a 4xx means) and the whole body. */
export interface HttpResponse {
  status: number;
  contentType: string;
  body: Buffer;
}

/** A request that got no usable answer: refused, timed out, too large, cut off. */
export class HttpRequestError extends Error {
  constructor(
    message: string,
    readonly errno?: string,
  ) {
    super(message);
  }
}

/**
 * A small HTTP(S) client for the verifier's key and introspection endpoints. Not `fetch`: it bounds
 * the response size (a JWKS or an introspection answer is a few KiB; an endpoint that streams
 * forever must not grow memory), keeps its own keep-alive pools so that introspection does not pay
 * a TLS handshake per token, and {@link close} ends every socket it opened, which the global fetch
 * dispatcher cannot promise. Redirects are not followed: a key endpoint inside a site has no reason
 * to redirect, and following one could move trust elsewhere.
 */
export class HttpClient {
  private readonly httpAgent = new http.Agent({ keepAlive: true, maxSockets: 32, scheduling: 'lifo' });
  private readonly httpsAgent = new https.Agent({ keepAlive: true, maxSockets: 32, scheduling: 'lifo' });
  private closed = false;

  /** Sends one request. Rejects with {@link HttpRequestError} when there is no complete answer. */
  request(req: HttpRequest): Promise<HttpResponse> {
    if (this.closed) return Promise.reject(new HttpRequestError('the HTTP client is closed'));
    const secure = req.url.protocol === 'https:';
    const send = secure ? https.request : http.request;
    return new Promise<HttpResponse>((resolve, reject) => {
      let settled = false;
      const finish = (err: HttpRequestError | undefined, res?: HttpResponse): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) {
          outgoing.destroy();
          reject(err);
        } else {
          resolve(res!);
        }
      };
      const headers: Record<string, string> = { ...req.headers };
      if (req.body !== undefined) headers['content-length'] = String(Buffer.byteLength(req.body));
      const outgoing = send(
        req.url,
        { method: req.method, headers, agent: secure ? this.httpsAgent : this.httpAgent },
        (incoming) => {
          const chunks: Buffer[] = [];
          let size = 0;
          incoming.on('data', (chunk: Buffer) => {
            size += chunk.length;
            if (size > req.maxBodyBytes) {
              incoming.destroy();
              finish(new HttpRequestError(`answer larger than ${req.maxBodyBytes} bytes`));
              return;
            }
            chunks.push(chunk);
          });
          incoming.on('end', () =>
            finish(undefined, {
              status: incoming.statusCode ?? 0,
              contentType: String(incoming.headers['content-type'] ?? ''),
              body: Buffer.concat(chunks),
            }),
          );
          incoming.on('error', (err: NodeJS.ErrnoException) =>
            finish(new HttpRequestError(`answer cut off: ${err.message}`, err.code)),
          );
          incoming.on('aborted', () => finish(new HttpRequestError('answer cut off')));
        },
      );
      const timer = setTimeout(
        () => finish(new HttpRequestError(`no answer within ${req.timeoutMs} ms`, 'ETIMEDOUT')),
        req.timeoutMs,
      );
      outgoing.on('error', (err: NodeJS.ErrnoException) => finish(new HttpRequestError(err.message, err.code)));
      outgoing.end(req.body);
    });
  }

  /** Ends every pooled connection; later requests reject at once. */
  close(): void {
    this.closed = true;
    this.httpAgent.destroy();
    this.httpsAgent.destroy();
  }
}
