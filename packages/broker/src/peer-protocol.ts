import type { IncomingHttpHeaders } from 'node:http2';
import { status as Status } from '@grpc/grpc-js';
import { BurrowError, parseSpiffeId } from '@burrow/tunnel';

/*
 * The broker-to-broker protocol (tunnel.proto, service BrokerPeer) as both of its sides see it:
 * the method, the header and trailer keys, and the hop metadata by which the broker where a call
 * entered vouches for it. Kept apart from either side so that the forwarder and the listener
 * depend on it and not on each other.
 */

/**
 * Trailer on every refusal by the owning broker, so the forwarder can tell it from a transport
 * failure: `1` when it cannot serve the call (try another broker), {@link PEER_REFUSED_DECISION}
 * when it decided against the call itself (caller policy, the agent's limit, bad hop metadata).
 */
export const PEER_REFUSED_KEY = 'burrow-peer-refused';
/** {@link PEER_REFUSED_KEY} value of a decision on the call: the forwarder passes it to the caller. */
export const PEER_REFUSED_DECISION = 'decision';
/** Request header naming the forwarding broker: the broker where the call entered (logs, audit). */
export const FORWARDED_BY_KEY = 'burrow-forwarded-by';
/** Hop metadata: the caller's verified SPIFFE id, as the broker where the call entered saw it. */
export const HOP_CALLER_KEY = 'burrow-hop-caller';
/** Hop metadata: the gRPC method the call was admitted for (its `:path` must be the same). */
export const HOP_METHOD_KEY = 'burrow-hop-method';
/** Hop metadata: the entry broker's caller-policy decision, `allow` or `allow policies=<id>,...` (ids URI-encoded). */
export const HOP_DECISION_KEY = 'burrow-hop-decision';

/** What the broker where a call entered vouches for when it forwards the call (hop metadata). */
export interface Hop {
  /** The caller's verified SPIFFE id. */
  caller: string;
  method: string;
  /** Ids of the caller policies that permitted the call there (empty: it has no caller policy). */
  policies: string[];
}

const MAX_HOP_POLICIES = 32;
const MAX_HOP_VALUE_CHARS = 4_096;
const HOP_DECISION = /^allow(?: policies=([A-Za-z0-9%._~!*'()-]+(?:,[A-Za-z0-9%._~!*'()-]+)*))?$/;
const GRPC_METHOD = /^\/[A-Za-z0-9_.-]+\/[A-Za-z0-9_.-]+$/;

/** Writes `hop` into the headers of a forwarded call (the forwarding side). */
export function encodeHop(hop: Hop, headers: Record<string, string>): void {
  headers[HOP_CALLER_KEY] = hop.caller;
  headers[HOP_METHOD_KEY] = hop.method;
  const ids = hop.policies.slice(0, MAX_HOP_POLICIES).map(encodeURIComponent);
  headers[HOP_DECISION_KEY] = ids.length ? `allow policies=${ids.join(',')}` : 'allow';
}

/**
 * Reads and checks the hop metadata of a forwarded call: `undefined` when there is none (a broker
 * of an older version), else the hop, or the first problem found (the call is refused with it).
 */
export function decodeHop(headers: IncomingHttpHeaders, trustDomain: string): Hop | undefined | { problem: string } {
  const value = (key: string): string | undefined => {
    const v = headers[key];
    return typeof v === 'string' ? v : undefined;
  };
  const caller = value(HOP_CALLER_KEY);
  const method = value(HOP_METHOD_KEY);
  const decision = value(HOP_DECISION_KEY);
  if (caller === undefined && method === undefined && decision === undefined) return undefined;
  if (caller === undefined || method === undefined || decision === undefined) {
    return { problem: `${HOP_CALLER_KEY}, ${HOP_METHOD_KEY} and ${HOP_DECISION_KEY} go together` };
  }
  if ([caller, method, decision].some((v) => v.length > MAX_HOP_VALUE_CHARS)) {
    return { problem: `a hop metadata value is longer than ${MAX_HOP_VALUE_CHARS} characters` };
  }
  const id = parseSpiffeId(caller);
  if (id?.role !== 'service' || id.trustDomain !== trustDomain) {
    const shown = caller.slice(0, 200);
    return { problem: `${HOP_CALLER_KEY} "${shown}" is not a service SPIFFE id of trust domain ${trustDomain}` };
  }
  if (!GRPC_METHOD.test(method)) {
    const shown = method.slice(0, 200);
    return { problem: `${HOP_METHOD_KEY} "${shown}" is not a gRPC method path (/package.Service/Method)` };
  }
  const m = HOP_DECISION.exec(decision);
  const ids = m?.[1]?.split(',') ?? [];
  if (!m || ids.length > MAX_HOP_POLICIES) {
    const expected = `"allow" or "allow policies=<id>,..." (at most ${MAX_HOP_POLICIES})`;
    return { problem: `${HOP_DECISION_KEY} "${decision.slice(0, 200)}" is not ${expected}` };
  }
  try {
    return { caller, method, policies: ids.map(decodeURIComponent) };
  } catch {
    return { problem: `${HOP_DECISION_KEY}: a policy id is not URI-encoded` };
  }
}

/** Thrown to callers when no broker could take a call (kept for messages naming the attempts). */
export function noBrokerServes(agentId: string, waitedMs: number, attempts: string[]): BurrowError {
  const tried = attempts.length ? `; tried ${attempts.join('; ')}` : '';
  return new BurrowError(
    Status.UNAVAILABLE,
    `agent "${agentId}" is not connected to this broker or any other (waited ${waitedMs} ms${tried})`,
  );
}
