import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** Result label of `burrow_agent_authn_requests_total`. */
export type AuthnResult = 'authenticated' | 'refused' | 'error';

// A verifier rebuilt on the same registry (a test, a reload) reuses the metrics already there:
// prom-client refuses a second registration of one name.
function reuse<T>(registry: Registry, name: string, make: () => T): T {
  return (registry.getSingleMetric(name) as T | undefined) ?? make();
}

/** The token verifier's metrics, registered on the agent's registry. */
export class AuthnMetrics {
  /**
   * Authenticate requests by result and reason (the refusal's stable word, or the error's status name in lower case;
   * empty when authenticated).
   */
  readonly requests: Counter<'result' | 'reason'>;
  readonly duration: Histogram<'result'>;
  /** JWKS loads (start, change, unknown key, background), by result (ok, failed). */
  readonly jwksRefreshes: Counter<'result'>;
  /** Usable keys in the current JWKS. */
  readonly jwksKeys: Gauge;

  constructor(registry: Registry) {
    const registers = [registry];
    this.requests = reuse(
      registry,
      'burrow_agent_authn_requests_total',
      () =>
        new Counter({
          name: 'burrow_agent_authn_requests_total',
          help:
            "Token verifications, by result (authenticated, refused, error) and reason (the refusal's stable word " +
            'or the error status).',
          labelNames: ['result', 'reason'],
          registers,
        }),
    );
    this.duration = reuse(
      registry,
      'burrow_agent_authn_duration_seconds',
      () =>
        new Histogram({
          name: 'burrow_agent_authn_duration_seconds',
          help: 'Time to judge a token, key fetches and introspection included.',
          labelNames: ['result'],
          buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
          registers,
        }),
    );
    this.jwksRefreshes = reuse(
      registry,
      'burrow_agent_authn_jwks_refresh_total',
      () =>
        new Counter({
          name: 'burrow_agent_authn_jwks_refresh_total',
          help: "Loads of the site's JWKS (file or URL), by result (ok, failed).",
          labelNames: ['result'],
          registers,
        }),
    );
    this.jwksKeys = reuse(
      registry,
      'burrow_agent_authn_jwks_keys',
      () =>
        new Gauge({
          name: 'burrow_agent_authn_jwks_keys',
          help: 'Usable public keys in the JWKS the agent verifies tokens with.',
          registers,
        }),
    );
  }
}
