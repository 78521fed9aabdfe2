import * as net from 'node:net';

/**
 * Ports that were free a moment ago on `host`: all are bound at once (so they are distinct), then
 * released. Another process could take one in between; tests use them at once.
 */
export async function freePorts(count: number, host = '127.0.0.1'): Promise<number[]> {
  const servers: net.Server[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const s = net.createServer();
      servers.push(s);
      await new Promise<void>((resolve, reject) => { s.once('error', reject); s.listen(0, host, () => resolve()); });
    }
    return servers.map((s) => (s.address() as net.AddressInfo).port);
  } finally {
    await Promise.all(servers.map((s) => new Promise<void>((resolve) => (s.listening ? s.close(() => resolve()) : resolve()))));
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
    socket.once('connect', () => { socket.destroy(); resolve(true); });
    socket.once('error', () => { socket.destroy(); resolve(false); });
  });
}

/**
 * Probes `ports` again and again until `until` settles, then once more, and returns every port on
 * which a connection was accepted. Nothing tells a test "this process never bound a socket", so
 * this is a poll; each refused loopback connect takes well under a millisecond, so the loop is paced
 * by a short timer.
 */
export async function portsThatAccepted(ports: number[], until: Promise<unknown>, host = '127.0.0.1'): Promise<number[]> {
  let done = false;
  void until.finally(() => { done = true; });
  const hits = new Set<number>();
  const round = async (): Promise<void> => {
    const results = await Promise.all(ports.map((p) => accepts(p, host)));
    results.forEach((ok, i) => { if (ok) hits.add(ports[i]!); });
  };
  while (!done) {
    await round();
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  await round();
  return [...hits];
}
