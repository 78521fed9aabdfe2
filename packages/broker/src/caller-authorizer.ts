import type { PeerIdentity } from '@burrow/tunnel';

/** The broker's answer to "may this service make this call on this agent?". */
export interface CallerDecision {
  allowed: boolean;
  /** Why, for the PERMISSION_DENIED message and the log. */
  reason: string;
  /** Ids of the policies that decided (empty without a policy set). */
  policies: string[];
}

/** A call another broker admitted and forwarded to the broker holding the agent (hop metadata). */
export interface ForwardedCall {
  /** Id of the broker where the call entered. */
  forwardedBy: string;
  /** Ids of that broker's caller policies that permitted the call (empty: it has none). */
  entryPolicies: string[];
}

/**
 * Decides which platform services (by certificate identity) may call which methods on which
 * agents. The caller API asks before a call touches the registry, so a denied caller learns
 * nothing about whether the agent is connected.
 */
export interface CallerAuthorizer {
  /** `forwarded`: the call entered at another broker, which let it in with `entryPolicies` (audit). */
  authorize(caller: PeerIdentity, agentId: string, method: string, forwarded?: ForwardedCall): CallerDecision;
  close(): Promise<void>;
}

/** Used when no caller policy is configured: every service may call everything (logged loudly at start). */
export const ALLOW_ALL_CALLERS: CallerAuthorizer = {
  authorize: () => ({ allowed: true, reason: 'no caller policy configured', policies: [] }),
  close: async () => {},
};
