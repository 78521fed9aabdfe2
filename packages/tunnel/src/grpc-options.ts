import type * as http2 from 'node:http2';

/** Keepalive settings; a half-open peer is noticed within about `timeMs + timeoutMs`. */
export interface KeepaliveSettings {
  /** Interval between HTTP/2 pings on a connection. Default 20 s. */
  timeMs: number;
  /** How long to wait for the ping's answer before the connection is declared dead. Default 10 s. */
  timeoutMs: number;
}

export const DEFAULT_KEEPALIVE: KeepaliveSettings = { timeMs: 20_000, timeoutMs: 10_000 };

/**
 * Options of every HTTP/2 session on the data plane. Node's default session memory cap (10 MiB)
 * would refuse streams while one 16 MiB message passes; memory is bounded per call by flow control
 * and the message limit instead. Push is never used.
 */
export const H2_SESSION_OPTIONS = {
  maxSessionMemory: 1 << 20,
  settings: { enablePush: false },
} as const satisfies http2.SessionOptions;

/**
 * Pings `session` every `keepalive.timeMs` and destroys it when an answer does not come within
 * `keepalive.timeoutMs` (a peer gone without a FIN: a cut cable, a crashed host). The timer is
 * unref'd and ends with the session.
 */
export function keepSessionAlive(session: http2.Http2Session, keepalive: KeepaliveSettings): void {
  if (keepalive.timeMs <= 0) return;
  let waiting: NodeJS.Timeout | undefined;
  const timer = setInterval(() => {
    if (session.closed || session.destroyed || waiting) return;
    waiting = setTimeout(() => session.destroy(new Error('keepalive ping not answered')), keepalive.timeoutMs);
    waiting.unref();
    try {
      session.ping(() => {
        clearTimeout(waiting);
        waiting = undefined;
      });
    } catch {
      clearTimeout(waiting);
      waiting = undefined;
    }
  }, keepalive.timeMs);
  timer.unref();
  session.once('close', () => {
    clearInterval(timer);
    clearTimeout(waiting);
  });
}
