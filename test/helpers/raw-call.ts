import type * as http2 from 'node:http2';
import { GRPC_CONTENT_TYPE, type WelcomeFrame } from '@burrow/tunnel';
import type { RawControl } from './raw-agent';

/**
 * Answers a call stream the broker opened on a RawAgent as an echo server would: response headers,
 * every request byte back (the 5-byte prefixes included, so each message comes back as it was
 * sent), then `grpc-status: 0`. Resolves with the request headers once the stream has closed.
 */
export function answerEcho(
  stream: http2.ServerHttp2Stream,
  headers: http2.IncomingHttpHeaders,
): Promise<http2.IncomingHttpHeaders> {
  return new Promise((resolve) => {
    stream.respond({ ':status': 200, 'content-type': GRPC_CONTENT_TYPE }, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.on('data', (chunk: Buffer) => stream.write(chunk));
    stream.on('end', () => stream.end());
    stream.on('close', () => resolve(headers));
  });
}

/** How the broker answered a Hello: Welcome, Refused, or the control stream ended with neither. */
export type HelloOutcome =
  | { kind: 'welcome'; welcome: WelcomeFrame }
  | { kind: 'refused'; code: number; message: string }
  | { kind: 'ended' };

/** The broker's first frame on `control` (after the test sent Hello or something else). */
export async function firstAnswer(control: RawControl, timeoutMs = 5_000): Promise<HelloOutcome> {
  const f = await control.next(timeoutMs);
  if (f === undefined) return { kind: 'ended' };
  if (f.kind === 'welcome') return { kind: 'welcome', welcome: f.welcome };
  if (f.kind === 'refused') return { kind: 'refused', code: f.code, message: f.message };
  throw new Error(`the broker answered with ${f.kind}`);
}

/** The Refused frame the broker answers with; fails naming what came instead. */
export async function expectRefused(
  control: RawControl,
  timeoutMs = 5_000,
): Promise<{ code: number; message: string }> {
  const answer = await firstAnswer(control, timeoutMs);
  if (answer.kind !== 'refused') throw new Error(`expected Refused, got ${answer.kind}`);
  return { code: answer.code, message: answer.message };
}
