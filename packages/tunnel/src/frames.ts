import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import { ProtocolError } from './errors';
import { resolveProtoDir } from './embedded-protos';

/** The protocol versions this build speaks, highest last. See tunnel.proto, "Versioning". */
export const PROTOCOL_VERSIONS: readonly number[] = [4];
export const PROTOCOL_VERSION = 4;

/**
 * ALPN of a tunnel connection (tunnel.proto, "Roles"): the broker is the HTTP/2 client on the
 * connection the agent dialed. `h2` on the same listener is ordinary gRPC with the agent as client.
 */
export const TUNNEL_ALPN = 'burrow-tunnel';

/** Most entries a `Brokers` frame may list (tunnel.proto, "Brokers"). */
export const MAX_REPLICA_SET_SIZE = 64;

/**
 * Largest session frame either side accepts, in bytes (tunnel.proto, "Session"). The session
 * stream carries control frames only (the biggest a certificate chain or a trust bundle of a few
 * KiB), so a frame past this is a peer breaking the protocol; the broker's agent listener refuses
 * it before it is even buffered (receiveLimitInterceptor), everyone else before decoding it.
 */
export const MAX_SESSION_FRAME_BYTES = 64 * 1024;

/**
 * Bounds on the fields of session frames (tunnel.proto). A peer's frame past one is a protocol
 * error: these strings end up in logs, `/agents` and status messages, and a version list is
 * scanned per session, so each must stay small whatever the peer sends.
 */
export const SESSION_FIELD_LIMITS = {
  /** `Hello.protocol_versions`: entries (this build speaks 3 versions). */
  protocolVersions: 16,
  /** `Hello.agent_version`: characters (a semantic version with build metadata fits). */
  agentVersionChars: 256,
  /** `Welcome.session_id`, `Welcome.broker_id`, `BrokerEndpoint.broker_id`: characters. */
  idChars: 256,
  /** `BrokerEndpoint.address` (HOST:PORT; a DNS name is at most 253 characters): characters. */
  addressChars: 300,
  /** `Drain.reason`: characters. */
  reasonChars: 1024,
} as const;

/** Default largest forwarded gRPC message, in bytes (16 MiB). */
export const DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

/**
 * How long either side of a new tunnel waits for the other's first session frame (the broker for
 * Hello, the agent for Welcome or Refused) before it gives the connection up.
 */
export const SESSION_HANDSHAKE_TIMEOUT_MS = 10_000;

/** The control stream's path: the first stream the broker opens on a tunnel connection. */
export const CONTROL_PATH = '/burrow.tunnel.v1.Tunnel/Control';

/** Methods of the Tunnel service of versions 1-3, which agents of those versions call on `h2`. */
export const LEGACY_TUNNEL_SERVICE = 'burrow.tunnel.v1.Tunnel';
/** The session method of versions 1-3, whose Hello names the old agent's versions. */
export const LEGACY_SESSION_PATH = '/burrow.tunnel.v1.Tunnel/Session';

/** Request header on the broker's call streams: the call's id in the broker's logs. */
export const CALL_ID_KEY = 'burrow-call-id';

export interface HelloFrame {
  protocolVersions: number[];
  agentVersion: string;
}
export interface WelcomeFrame {
  protocolVersion: number;
  sessionId: string;
  maxMessageBytes: number;
  brokerId: string;
  /** The broker takes Telemetry frames on this session (tunnel.proto, "Telemetry"). */
  acceptsTelemetry?: boolean;
}

/**
 * Largest `Telemetry.otlp_traces` an agent puts in one frame: the frame limit less the frame's own
 * fields (the oneof tag and two length prefixes take at most 8 bytes).
 */
export const MAX_TELEMETRY_BYTES = MAX_SESSION_FRAME_BYTES - 16;

/** One broker replica (tunnel.proto `BrokerEndpoint`): its id and its agent listener's HOST:PORT. */
export interface BrokerEndpoint {
  brokerId: string;
  address: string;
}

/** One frame of a session stream (decoded `SessionFrame`). */
export type SessionFrame =
  | { kind: 'hello'; hello: HelloFrame }
  | { kind: 'welcome'; welcome: WelcomeFrame }
  | { kind: 'refused'; code: number; message: string }
  | { kind: 'drain'; reason: string }
  | { kind: 'credentials'; certificateChainPem: string }
  | { kind: 'trustBundle'; pem: string; version: number }
  | { kind: 'brokers'; brokers: BrokerEndpoint[] }
  | { kind: 'telemetry'; otlpTraces: Buffer };

/**
 * Throws {@link ProtocolError} when `value` (a string field of a peer's frame) is longer than
 * `max` characters. The message gives the length, never the value: it may be megabytes.
 */
function tooLong(field: string, value: string, max: number): void {
  if (value.length > max) throw new ProtocolError(`${field} is ${value.length} characters; at most ${max} allowed`);
}

const HOST_PORT = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/;

/**
 * Checks a replica set against tunnel.proto's rules for `Brokers`: at most
 * {@link MAX_REPLICA_SET_SIZE} entries, each with a non-empty broker id unique in the list and an
 * address of the form HOST:PORT (port 1-65535). Throws {@link ProtocolError} naming the first bad
 * entry; the decoder uses it on frames from the wire, the broker on sets it is given to send.
 */
export function checkReplicaSet(set: readonly BrokerEndpoint[]): void {
  if (set.length > MAX_REPLICA_SET_SIZE)
    throw new ProtocolError(`brokers frame lists ${set.length} brokers; at most ${MAX_REPLICA_SET_SIZE} are allowed`);
  const seen = new Set<string>();
  for (const [i, b] of set.entries()) {
    if (!b.brokerId) throw new ProtocolError(`brokers frame entry ${i} has no broker id`);
    tooLong(`brokers frame entry ${i} broker_id`, b.brokerId, SESSION_FIELD_LIMITS.idChars);
    tooLong(`brokers frame entry ${i} address`, b.address, SESSION_FIELD_LIMITS.addressChars);
    if (seen.has(b.brokerId)) throw new ProtocolError(`brokers frame lists broker "${b.brokerId}" twice`);
    seen.add(b.brokerId);
    const m = HOST_PORT.exec(b.address);
    const port = m ? Number(m[2]) : 0;
    if (port < 1 || port > 65535)
      throw new ProtocolError(
        `brokers frame entry ${i} (broker "${b.brokerId}"): address "${b.address}" is not HOST:PORT`,
      );
  }
}

/**
 * Directory holding the `.proto` files; resolved relative to this package's build output, or, in the
 * agent's single executable, a virtual directory served from the embedded copies (embedded-protos.ts).
 */
export const PROTO_DIR = resolveProtoDir(path.resolve(__dirname, '..', '..', '..', 'proto'));

/**
 * Loads `file` (a path relative to {@link PROTO_DIR}) into a root of its own. Its imports resolve
 * from PROTO_DIR, as `protoc -I proto` reads them (resolveImportsFromRoot, set up with PROTO_DIR):
 * the vendored Envoy and OpenTelemetry protos import each other by such paths.
 */
export function loadProto(file: string, options?: protobuf.IParseOptions): protobuf.Root {
  return new protobuf.Root().loadSync(path.join(PROTO_DIR, file), options);
}

let root: protobuf.Root | undefined;
function tunnelRoot(): protobuf.Root {
  root ??= protobuf.loadSync(path.join(PROTO_DIR, 'burrow', 'tunnel', 'v1', 'tunnel.proto'));
  return root;
}
let sessionFrameType: protobuf.Type | undefined;
function sessionType(): protobuf.Type {
  sessionFrameType ??= tunnelRoot().lookupType('burrow.tunnel.v1.SessionFrame');
  return sessionFrameType;
}

function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

// protobufjs represents uint64 as number or Long; timeouts and sizes fit in a double.
function toNumber(v: unknown): number {
  if (typeof v === 'number') return v;
  if (v && typeof v === 'object' && 'toNumber' in v) return (v as { toNumber(): number }).toNumber();
  return 0;
}

/** Encodes a session frame for the wire. */
export function encodeSessionFrame(frame: SessionFrame): Buffer {
  let body: Record<string, unknown>;
  switch (frame.kind) {
    case 'hello':
      body = { hello: frame.hello };
      break;
    case 'welcome':
      body = { welcome: frame.welcome };
      break;
    case 'refused':
      body = { refused: { code: frame.code, message: frame.message } };
      break;
    case 'drain':
      body = { drain: { reason: frame.reason } };
      break;
    case 'credentials':
      body = { credentials: { certificateChainPem: frame.certificateChainPem } };
      break;
    case 'trustBundle':
      body = { trustBundle: { pem: frame.pem, version: frame.version } };
      break;
    case 'brokers':
      body = { brokers: { brokers: frame.brokers.map((b) => ({ brokerId: b.brokerId, address: b.address })) } };
      break;
    case 'telemetry':
      body = { telemetry: { otlpTraces: frame.otlpTraces } };
      break;
  }
  return toBuffer(sessionType().encode(body).finish());
}

/**
 * Decodes a session frame; a malformed one, one over {@link MAX_SESSION_FRAME_BYTES} (checked
 * before decoding) or one with a field past {@link SESSION_FIELD_LIMITS} throws
 * {@link ProtocolError} naming the frame, the field and the bound.
 */
export function decodeSessionFrame(bytes: Buffer): SessionFrame {
  if (bytes.length > MAX_SESSION_FRAME_BYTES) throw new ProtocolError(sessionFrameTooLarge(bytes.length));
  let m: protobuf.Message & Record<string, unknown>;
  try {
    m = sessionType().decode(bytes) as protobuf.Message & Record<string, unknown>;
  } catch (err) {
    throw new ProtocolError(`undecodable session frame (${bytes.length} bytes)`, err);
  }
  const decode =
    typeof m.kind === 'string' && Object.hasOwn(FRAME_DECODERS, m.kind) ? FRAME_DECODERS[m.kind] : undefined;
  if (!decode) throw new ProtocolError('session frame with no kind');
  return decode(m[m.kind as string] as Record<string, unknown>);
}

const limits = SESSION_FIELD_LIMITS;

/** Each kind's fields from the decoded oneof member, checked against their bounds. */
const FRAME_DECODERS: Record<string, (f: Record<string, unknown>) => SessionFrame> = {
  hello: (h) => {
    const versions = (h.protocolVersions as number[] | undefined) ?? [];
    if (versions.length > limits.protocolVersions) {
      throw new ProtocolError(`Hello lists ${versions.length} versions; at most ${limits.protocolVersions} allowed`);
    }
    const agentVersion = String(h.agentVersion ?? '');
    tooLong('Hello agent_version', agentVersion, limits.agentVersionChars);
    return { kind: 'hello', hello: { protocolVersions: versions.map(Number), agentVersion } };
  },
  welcome: (w) => {
    const sessionId = String(w.sessionId ?? '');
    const brokerId = String(w.brokerId ?? '');
    tooLong('Welcome session_id', sessionId, limits.idChars);
    tooLong('Welcome broker_id', brokerId, limits.idChars);
    const protocolVersion = Number(w.protocolVersion ?? 0);
    const maxMessageBytes = toNumber(w.maxMessageBytes);
    const welcome: WelcomeFrame = { protocolVersion, sessionId, brokerId, maxMessageBytes };
    if (w.acceptsTelemetry === true) welcome.acceptsTelemetry = true;
    return { kind: 'welcome', welcome };
  },
  refused: (r) => {
    const message = String(r.message ?? '');
    tooLong('Refused message', message, limits.reasonChars);
    return { kind: 'refused', code: Number(r.code ?? 2), message };
  },
  drain: (d) => {
    const reason = String(d.reason ?? '');
    tooLong('Drain reason', reason, limits.reasonChars);
    return { kind: 'drain', reason };
  },
  // PEM fields are bounded by the frame size alone: a chain or bundle has no smaller natural bound.
  credentials: (c) => ({ kind: 'credentials', certificateChainPem: String(c.certificateChainPem ?? '') }),
  trustBundle: (t) => ({ kind: 'trustBundle', pem: String(t.pem ?? ''), version: toNumber(t.version) }),
  brokers: (b) => {
    const list = (b.brokers as { brokerId?: string; address?: string }[] | undefined) ?? [];
    const brokers = list.map((e) => ({ brokerId: String(e.brokerId ?? ''), address: String(e.address ?? '') }));
    checkReplicaSet(brokers);
    return { kind: 'brokers', brokers };
  },
  // Opaque here: the broker decodes the payload and drops (not refuses) one that is malformed.
  telemetry: (t) => {
    const bytes = t.otlpTraces as Uint8Array | undefined;
    return { kind: 'telemetry', otlpTraces: bytes ? toBuffer(bytes) : Buffer.alloc(0) };
  },
};

/** The protocol error for a session frame of `bytes` bytes, over {@link MAX_SESSION_FRAME_BYTES}. */
export function sessionFrameTooLarge(bytes: number): string {
  return `session frame of ${bytes} bytes; at most ${MAX_SESSION_FRAME_BYTES} allowed`;
}

/**
 * The highest version in both lists, or undefined when they share none. `theirs` comes from the
 * peer and may be any length: a loop, not `Math.max(...list)`, which overflows the stack on a few
 * hundred thousand entries.
 */
export function negotiateVersion(ours: readonly number[], theirs: readonly number[]): number | undefined {
  let best: number | undefined;
  for (const v of theirs) if (ours.includes(v) && (best === undefined || v > best)) best = v;
  return best;
}

/** Most distinct versions {@link describeVersions} names before it summarises. */
const DESCRIBED_VERSIONS_MAX = 8;

/**
 * A version list for logs and status messages: `[1, 2]`. A peer's list is bounded only by the
 * message size, so it is de-duplicated and cut to a few entries: `[1, 2, … (300000 entries)]`.
 */
export function describeVersions(versions: readonly number[]): string {
  const distinct = [...new Set(versions)];
  const shown = distinct.slice(0, DESCRIBED_VERSIONS_MAX).join(', ');
  return distinct.length === versions.length && distinct.length <= DESCRIBED_VERSIONS_MAX
    ? `[${shown}]`
    : `[${shown}${distinct.length > DESCRIBED_VERSIONS_MAX ? ', …' : ''} (${versions.length} entries)]`;
}
