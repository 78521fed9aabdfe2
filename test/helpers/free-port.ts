import * as net from 'node:net';
import { readFileSync } from 'node:fs';

/**
 * The low end of the kernel's ephemeral port range: where a bind to port 0 and every outgoing
 * connection get their port. A port handed out from inside that range can be taken by either
 * between the check and the use (a broker binding its other listeners to port 0, an agent dialing
 * out): ports are picked below it.
 */
function ephemeralLow(): number {
  try {
    const low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
    if (low) return low;
  } catch {
    // not Linux: the IANA range
  }
  return 49152;
}

const LOWEST_PORT = 10_000;
/** Ports this process has handed out: never twice, so two callers cannot race for one. */
const handedOut = new Set<number>();

/** Listens on host:port; false when the port is taken (or not allowed). */
function tryListen(server: net.Server, port: number, host: string): Promise<boolean> {
  return new Promise((resolve) => {
    const onError = (): void => resolve(false);
    server.once('error', onError);
    server.listen(port, host, () => {
      server.off('error', onError);
      resolve(true);
    });
  });
}

/**
 * Ports that were free a moment ago on `host`, below the ephemeral range and never handed out
 * before by this process: all are bound at once (so they are distinct), then released. Only a
 * process that binds fixed ports itself could take one in between.
 */
export async function freePorts(count: number, host = '127.0.0.1'): Promise<number[]> {
  const below = ephemeralLow();
  const span = below - LOWEST_PORT;
  const servers: net.Server[] = [];
  try {
    for (let tries = 0; servers.length < count; tries++) {
      if (span < 1_000 || tries > 1_000)
        throw new Error(`no free port below the ephemeral range (${below}) on ${host}`);
      const port = LOWEST_PORT + Math.floor(Math.random() * span);
      if (handedOut.has(port)) continue;
      const s = net.createServer();
      if (await tryListen(s, port, host)) servers.push(s);
    }
    const ports = servers.map((s) => (s.address() as net.AddressInfo).port);
    for (const p of ports) handedOut.add(p);
    return ports;
  } finally {
    await Promise.all(
      servers.map((s) => new Promise<void>((resolve) => (s.listening ? s.close(() => resolve()) : resolve()))),
    );
  }
}

/** One free port on `host`. */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  return (await freePorts(1, host))[0]!;
}

/** True when something accepts a TCP connection on host:port right now. */
export function accepts(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => {
      socket.destroy();
      resolve(false);
    });
  });
}

/**
 * Probes `ports` again and again until `until` settles, then once more, and returns every port on
 * which a connection was accepted. Nothing tells a test "this process never bound a socket", so
 * this is a poll; each refused loopback connect takes well under a millisecond, so the loop is paced
 * by a short timer.
 */
export async function portsThatAccepted(
  ports: number[],
  until: Promise<unknown>,
  host = '127.0.0.1',
): Promise<number[]> {
  let done = false;
  void until.finally(() => {
    done = true;
  });
  const hits = new Set<number>();
  const round = async (): Promise<void> => {
    const results = await Promise.all(ports.map((p) => accepts(p, host)));
    results.forEach((ok, i) => {
      if (ok) hits.add(ports[i]!);
    });
  };
  while (!done) {
    await round();
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  await round();
  return [...hits];
}
