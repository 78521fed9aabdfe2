import type { Socket } from 'node:net';

// grpc-js internals this module hooks; test/grpc-client-hooks.test.ts fails if an upgrade moves them.
/* eslint-disable @typescript-eslint/no-var-requires */
const transport = require('@grpc/grpc-js/build/src/transport') as {
  Http2SubchannelConnector: { prototype: ConnectorProto };
};
const subchannel = require('@grpc/grpc-js/build/src/subchannel') as { Subchannel: { prototype: SubchannelProto } };

const PENDING = Symbol('burrow.pendingConnects');
const ABANDONED = Symbol('burrow.abandoned');

interface Connector {
  [PENDING]?: Set<Socket>;
  // The subchannel lost its last reference: a connection that completes now is not wanted.
  [ABANDONED]?: boolean;
}
interface ConnectorProto extends Connector {
  tcpConnect(this: Connector, address: unknown, options: unknown): Promise<Socket>;
  connect(this: Connector, address: unknown, secureConnector: unknown, options: unknown): Promise<unknown>;
}
interface SubchannelProto {
  ref(this: { refcount: number; connector: Connector }): void;
  unref(this: { refcount: number; connector: Connector }): void;
}

let installed = false;

/**
 * Makes a grpc-js channel that is closed while it is still connecting drop its half-made
 * connection at once. grpc-js lets the TCP connection and its TLS handshake run on with nobody
 * waiting for them, until the handshake ends or the server's handshake timeout (120 s in Node) cuts
 * it. An agent whose broker is too busy to finish handshakes gives up on each attempt after the
 * Welcome timeout and tries again, so every attempt left a socket behind, on the agent and in the
 * broker's accept queue: in the bench's 10,000-agent reconnect storm the broker spent its CPU on
 * handshakes nobody wanted any more and a swarm process grew past 5 GiB. Idempotent.
 */
export function abortConnectsOnChannelClose(): void {
  if (installed) return;
  const connector = transport.Http2SubchannelConnector?.prototype;
  const sub = subchannel.Subchannel?.prototype;
  if (!connector?.tcpConnect || !connector.connect || !sub?.unref || !sub.ref)
    throw new Error('grpc-js internals changed: cannot abort connects on channel close');
  installed = true;
  const tcpConnect = connector.tcpConnect;
  connector.tcpConnect = async function (address, options) {
    const socket = await tcpConnect.call(this, address, options);
    if (this[ABANDONED]) {
      socket.destroy();
      throw new Error('channel closed while connecting');
    }
    this[PENDING] ??= new Set();
    this[PENDING].add(socket);
    return socket;
  };
  const connect = connector.connect;
  connector.connect = async function (address, secureConnector, options) {
    try {
      return await connect.call(this, address, secureConnector, options);
    } finally {
      // Connected (the session owns the socket now) or failed (grpc-js destroyed it).
      this[PENDING]?.clear();
    }
  };
  const ref = sub.ref;
  sub.ref = function () {
    ref.call(this);
    if (this.connector) this.connector[ABANDONED] = false;
  };
  const unref = sub.unref;
  sub.unref = function () {
    unref.call(this);
    if (this.refcount !== 0 || !this.connector) return;
    this.connector[ABANDONED] = true;
    const pending = this.connector[PENDING];
    if (!pending) return;
    for (const socket of pending) socket.destroy();
    pending.clear();
  };
}
