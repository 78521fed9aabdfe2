import type { ChannelOptions, ServerOptions } from '@grpc/grpc-js';
import { FRAME_OVERHEAD_BYTES } from './frames';

/** Keepalive settings; a half-open peer is noticed within about `timeMs + timeoutMs`. */
export interface KeepaliveSettings {
  /** Interval between HTTP/2 pings on an otherwise quiet connection. Default 20 s. */
  timeMs: number;
  /** How long to wait for the ping's answer before the connection is declared dead. Default 10 s. */
  timeoutMs: number;
}

export const DEFAULT_KEEPALIVE: KeepaliveSettings = { timeMs: 20_000, timeoutMs: 10_000 };

// Node's HTTP/2 default session memory cap (10 MiB) would refuse streams carrying one 16 MiB
// message; memory is bounded per call by flow control and the message limit instead.
const UNLIMITED_SESSION_MEMORY = Number.MAX_SAFE_INTEGER;

// Channels only: grpc-js' channelz keeps a call tracker per call, which Burrow never reads. Servers
// keep it on although it costs the broker ~2 KiB of heap per idle agent: grpc-js 1.14's
// Server.forceShutdown() destroys only the sessions channelz tracks, so with it off a draining
// broker could not cut the connections of callers that keep sending (the rolling-restart tests
// then saw calls dropped at exit).
const NO_CHANNELZ = { 'grpc.enable_channelz': 0 } as const;

/** Options of a server that ends tunnel streams (the broker's agent listener). */
export function tunnelServerOptions(maxMessageBytes: number, keepalive: KeepaliveSettings): ServerOptions {
  return {
    ...tunnelConnectionOptions(maxMessageBytes, keepalive),
    'grpc-node.max_session_memory': UNLIMITED_SESSION_MEMORY,
  };
}

// Both ends of a tunnel connection: frames carry a message plus framing overhead, and pings run even
// between calls, so an idle agent's dead connection is noticed from either side.
function tunnelConnectionOptions(maxMessageBytes: number, keepalive: KeepaliveSettings) {
  return {
    'grpc.max_receive_message_length': maxMessageBytes + FRAME_OVERHEAD_BYTES,
    'grpc.max_send_message_length': maxMessageBytes + FRAME_OVERHEAD_BYTES,
    'grpc.keepalive_time_ms': keepalive.timeMs,
    'grpc.keepalive_timeout_ms': keepalive.timeoutMs,
    'grpc.keepalive_permit_without_calls': 1,
  };
}

/** Options of the agent's channel to a broker. */
export function tunnelChannelOptions(maxMessageBytes: number, keepalive: KeepaliveSettings): ChannelOptions {
  return {
    ...tunnelConnectionOptions(maxMessageBytes, keepalive),
    // One connection per agent process and broker: the agent manages reconnects itself.
    'grpc.use_local_subchannel_pool': 1,
    'grpc.enable_retries': 0,
    'grpc.initial_reconnect_backoff_ms': 1000,
    ...NO_CHANNELZ,
  };
}

/** Options of a server that receives calls to forward (broker caller API, agent local listener). */
export function callServerOptions(maxMessageBytes: number, keepalive: KeepaliveSettings): ServerOptions {
  return {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.keepalive_time_ms': keepalive.timeMs,
    'grpc.keepalive_timeout_ms': keepalive.timeoutMs,
    'grpc-node.max_session_memory': UNLIMITED_SESSION_MEMORY,
  };
}

/** Options of channels to upstream servers. Retries are off: the tunnel must not duplicate calls. */
export function upstreamChannelOptions(maxMessageBytes: number): ChannelOptions {
  return {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.enable_retries': 0,
    'grpc.initial_reconnect_backoff_ms': 200,
    'grpc.max_reconnect_backoff_ms': 2000,
    ...NO_CHANNELZ,
  };
}
