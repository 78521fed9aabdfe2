import * as http from 'node:http';

/** How an admin request ended, when it did not end with a 2xx answer. */
export type AdminFailureKind = 'unreachable' | 'not_found' | 'refused' | 'failed';

/** An admin request that did not succeed; `message` is one line naming the address. */
export class AdminRequestError extends Error {
  constructor(
    readonly kind: AdminFailureKind,
    message: string,
  ) {
    super(message);
  }
}

export interface AdminClientOptions {
  /** HOST:PORT of the broker's admin listener. */
  address: string;
  /** Sent as `Authorization: Bearer` (mutating requests need it off loopback). */
  token?: string;
  /** Per request, connect to last byte. */
  timeoutMs: number;
}

/**
 * A client of the broker's admin listener (plain HTTP, JSON), for `burrow-broker agents|status`.
 * Every method rejects with an {@link AdminRequestError}: `unreachable` (connection refused,
 * timeout, not HTTP), `not_found` (404), `refused` (401/403), `failed` (anything else).
 */
export class AdminClient {
  constructor(private readonly opts: AdminClientOptions) {}

  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  post<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('POST', path, JSON.stringify(body));
  }

  private request<T>(method: string, path: string, body?: string): Promise<T> {
    const { address, token, timeoutMs } = this.opts;
    const i = address.lastIndexOf(':');
    const host = address.slice(0, i).replace(/^\[|\]$/g, '');
    const port = Number(address.slice(i + 1));
    const headers = requestHeaders(token, body);
    return new Promise<T>((resolve, reject) => {
      const req = http.request({ host, port, method, path, headers, agent: false, timeout: timeoutMs }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          text += c;
        });
        res.on('error', (err) =>
          reject(new AdminRequestError('unreachable', `broker admin listener at ${address}: ${err.message}`)),
        );
        res.on('end', () => {
          try {
            resolve(answerOf<T>(res.statusCode ?? 0, text, { address, method, path }));
          } catch (err) {
            reject(err);
          }
        });
      });
      req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
      req.on('error', (err: NodeJS.ErrnoException) => {
        reject(
          new AdminRequestError(
            'unreachable',
            `cannot reach the broker admin listener at ${address}: ${err.code ?? err.message}`,
          ),
        );
      });
      req.end(body);
    });
  }
}

function requestHeaders(token: string | undefined, body: string | undefined): Record<string, string> {
  const headers: Record<string, string> = { accept: 'application/json' };
  if (token !== undefined) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
    headers['content-length'] = String(Buffer.byteLength(body));
  }
  return headers;
}

/**
 * The parsed JSON of a 2xx answer; any other answer throws an {@link AdminRequestError} whose
 * detail is the answer's `error` field, else its first line, else the HTTP status.
 */
function answerOf<T>(status: number, text: string, call: { address: string; method: string; path: string }): T {
  const { address, method, path } = call;
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  const error = (parsed as { error?: unknown } | undefined)?.error;
  const detail = typeof error === 'string' ? error : text.trim().split('\n')[0] || `HTTP ${status}`;
  if (status >= 200 && status < 300) {
    if (parsed === undefined)
      throw new AdminRequestError(
        'failed',
        `broker admin listener at ${address} answered ${method} ${path} with something that is not JSON`,
      );
    return parsed as T;
  }
  if (status === 404) throw new AdminRequestError('not_found', detail);
  if (status === 401 || status === 403)
    throw new AdminRequestError('refused', `broker admin listener at ${address} refused ${method} ${path}: ${detail}`);
  throw new AdminRequestError(
    'failed',
    `broker admin listener at ${address}: ${method} ${path}: HTTP ${status}: ${detail}`,
  );
}
