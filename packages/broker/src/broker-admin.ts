import type { AdminRoute, Logger } from '@burrow/tunnel';
import type { TunnelRegistry } from './tunnel-registry';

/** Longest reason an operator may attach to a disconnect (it travels in the status message). */
const MAX_REASON_CHARS = 200;

/** What an operator's disconnect did (POST /agents/<id>/disconnect). */
export interface DisconnectResult {
  agentId: string;
  sessionsClosed: number;
  callsAborted: number;
  reason: string;
  /** Whether the agent's certificate is revoked: if not, it reconnects within its backoff. */
  revoked: boolean;
  willReconnect: boolean;
}

/**
 * What the admin routes need of the broker (`Broker` has it). An interface rather than the class,
 * so that this module does not import broker.ts, which imports it.
 */
export interface BrokerAdminTarget {
  /** The body of `GET /status`. */
  status(): Promise<object>;
  /** Where `GET /agents/<id>` reads one connected agent. */
  readonly registry: Pick<TunnelRegistry, 'detail'>;
  /** `POST /agents/<id>/disconnect`; undefined when the agent is not connected here. */
  disconnectByOperator(agentId: string, reason: string): DisconnectResult | undefined;
}

/**
 * The broker's admin routes beyond the read-only listings (see createAdminServer):
 *
 * - `GET /agents/<id>`: one connected agent's sessions, peers, certificates, streams and calls;
 *   404 when it is not connected here.
 * - `POST /agents/<id>/disconnect` with an optional JSON body `{"reason": "..."}`: closes every
 *   tunnel of the agent; its calls in flight fail UNAVAILABLE with the reason. Mutating: needs the
 *   admin token, or a loopback admin listener.
 * - `GET /status`: version, uptime, listeners, agents, calls, draining, serving certificate, PKI.
 */
export function brokerAdminRoutes(broker: BrokerAdminTarget, logger: Logger): AdminRoute[] {
  const notConnected = (id: string) => ({
    status: 404,
    body: { error: `agent "${id}" is not connected to this broker` },
  });
  return [
    {
      method: 'GET',
      pattern: /^\/status$/,
      mutating: false,
      handle: async () => ({ status: 200, body: await broker.status() }),
    },
    {
      method: 'GET',
      pattern: /^\/agents\/([^/]+)$/,
      mutating: false,
      handle: ([id]) => {
        const detail = broker.registry.detail(id!);
        return detail ? { status: 200, body: detail } : notConnected(id!);
      },
    },
    {
      method: 'POST',
      pattern: /^\/agents\/([^/]+)\/disconnect$/,
      mutating: true,
      handle: ([id], req) => {
        const given = (req.body as { reason?: unknown } | null)?.reason;
        if (given !== undefined && typeof given !== 'string')
          return { status: 400, body: { error: 'reason must be a string' } };
        const reason = (given ?? '').trim().slice(0, MAX_REASON_CHARS) || 'no reason given';
        const result = broker.disconnectByOperator(id!, reason);
        if (!result) return notConnected(id!);
        logger.warn('agent disconnected by an operator', {
          agentId: id,
          reason,
          sessions: result.sessionsClosed,
          callsAborted: result.callsAborted,
          from: req.remoteAddress,
          revoked: result.revoked,
        });
        return { status: 200, body: result };
      },
    },
  ];
}
