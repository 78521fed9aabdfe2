/**
 * Binding listeners to `HOST:PORT` addresses, the same way for the broker and the agent: one error
 * message (`cannot listen on <address>: <reason>`) and the bound port back (useful with port 0).
 */
import type { AddressInfo, Server as NetServer } from 'node:net';

/** Splits `HOST:PORT` (an IPv6 host may be in brackets, which are removed). */
export function splitHostPort(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(address.slice(i + 1)) };
}

/** Starts an HTTP(S) or TCP `server` on `address`; resolves to the bound port. */
export function listenOn(server: NetServer, address: string): Promise<number> {
  const { host, port } = splitHostPort(address);
  return new Promise((resolve, reject) => {
    server.once('error', (err) => reject(new Error(`cannot listen on ${address}: ${err.message}`)));
    server.listen(port, host, () => resolve((server.address() as AddressInfo).port));
  });
}
