import { expect } from 'chai';
import type * as net from 'node:net';
import * as tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { type ConnectionGuard, guardConnections, listenOn } from '@burrow/tunnel';
import { ECHO } from './helpers/echo-upstream';
import { stalledConnection } from './helpers/late-connection';
import { expectNoLeaks, snapshotResources } from './helpers/leaks';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { Stack } from './helpers/stack';
import { pollUntil } from './helpers/wait';

/** Polls a condition (pending handshakes and metric values have no event of their own). */
const until = async (what: string, probe: () => boolean | Promise<boolean>): Promise<void> => {
  await pollUntil(what, probe, 5_000);
};

type MetricLike = { get(): Promise<{ values: { value: number; labels: Record<string, unknown> }[] }> };

/** Sum of a prom-client metric's series whose labels include `labels`. */
async function metricValue(metric: MetricLike, labels: Record<string, string> = {}): Promise<number> {
  return (await metric.get()).values
    .filter((v) => Object.entries(labels).every(([k, val]) => v.labels[k] === val))
    .reduce((n, v) => n + v.value, 0);
}

/** A full mTLS handshake as an agent; resolves with how it ended. */
function handshake(port: number, cert: CertFiles): Promise<'secure' | string> {
  return new Promise((resolve) => {
    const s = tls.connect(
      {
        port,
        host: '127.0.0.1',
        servername: 'localhost',
        key: readFileSync(cert.key),
        cert: readFileSync(cert.cert),
        ca: readFileSync(cert.ca),
        ALPNProtocols: ['h2'],
      },
      () => {
        s.destroy();
        resolve('secure');
      },
    );
    s.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
  });
}

describe('TLS handshake cap (guardConnections maxPending)', () => {
  let pki: PkiFixture;
  let brokerCert: CertFiles;
  let agentCert: CertFiles;

  before(async () => {
    pki = await PkiFixture.create();
    [brokerCert, agentCert] = await Promise.all([pki.issue('broker', 'b'), pki.issue('agent', 'a')]);
  });
  after(() => pki?.cleanup());

  async function serve(
    maxPending: number,
  ): Promise<{ port: number; limiter: ConnectionGuard; shedSockets: net.Socket[]; stop(): Promise<void> }> {
    // Like the broker's agent listener: a TLS server that requires a client certificate.
    const server = tls.createServer({
      ca: readFileSync(brokerCert.ca),
      key: readFileSync(brokerCert.key),
      cert: readFileSync(brokerCert.cert),
      requestCert: true,
      rejectUnauthorized: true,
    });
    server.on('secureConnection', (socket: tls.TLSSocket) => socket.on('error', () => {}));
    const port = await listenOn(server, '127.0.0.1:0');
    const shedSockets: net.Socket[] = [];
    // The pending cap alone, as the broker's agent listener has it with the other guards off.
    const limiter = guardConnections([server], {
      maxPending,
      maxUnprovenPerAddress: 0,
      handshakeTimeoutMs: 0,
      onClose: (s) => shedSockets.push(s),
    });
    return {
      port,
      limiter,
      shedSockets,
      stop: () =>
        new Promise<void>((resolve) => {
          server.close(() => resolve());
        }),
    };
  }

  it(
    'closes connections past the cap before any TLS work, ' + 'and counts a handshake only until it is secure',
    async () => {
      const baseline = snapshotResources();
      const srv = await serve(2);
      const stalled = [await stalledConnection(srv.port), await stalledConnection(srv.port)];
      try {
        await until('two handshakes pending', () => srv.limiter.pending() === 2);

        // A third connection is shed: the agent sees the connection drop, the server did no handshake.
        expect(await handshake(srv.port, agentCert)).to.equal('ECONNRESET');
        expect(srv.limiter.shed()).to.equal(1);
        expect(srv.shedSockets).to.have.length(1);
        expect(srv.limiter.pending()).to.equal(2);

        // One stalled client goes away: its slot is free again.
        stalled.pop()!.destroy();
        await until('one handshake pending', () => srv.limiter.pending() === 1);
        // Finished handshakes stop counting: more secure connections in a row than the cap, all
        // admitted (the server's side of a handshake ends a moment after the client's: wait for it).
        for (let i = 0; i < 4; i++) {
          expect(await handshake(srv.port, agentCert)).to.equal('secure');
          await until('only the stalled handshake pending', () => srv.limiter.pending() === 1);
        }
        expect(srv.limiter.shed()).to.equal(1);
      } finally {
        for (const s of stalled) s.destroy();
        await srv.stop();
      }
      await expectNoLeaks(baseline);
    },
  );

  it('0 turns the cap off', async () => {
    const baseline = snapshotResources();
    const srv = await serve(0);
    const stalled = await Promise.all(Array.from({ length: 5 }, () => stalledConnection(srv.port)));
    try {
      await until('five handshakes pending', () => srv.limiter.pending() === 5);
      expect(await handshake(srv.port, agentCert)).to.equal('secure');
      expect(srv.limiter.shed()).to.equal(0);
    } finally {
      for (const s of stalled) s.destroy();
      await srv.stop();
    }
    await expectNoLeaks(baseline);
  });
});

describe('broker --max-pending-handshakes', () => {
  let stack: Stack;
  after(async () => {
    await stack?.stop();
  });

  it(
    'sheds an agent while the cap is full, counts it apart from ' +
      'refused handshakes, and the agent gets in once a slot frees',
    async () => {
      stack = await Stack.start({ broker: { maxPendingHandshakes: 1 }, startAgent: false });
      const metrics = stack.broker.metrics;
      const stall = await stalledConnection(Number(stack.agentAddress.split(':')[1]));
      try {
        await until('the stalled handshake counted', () => metrics.pendingHandshakes() === 1);
        const connected = stack.startAgent();
        await until(
          'the agent shed at least twice (it retries after its backoff)',
          async () => (await metricValue(metrics.handshakesShed)) >= 2,
        );
        expect(
          await metricValue(metrics.rejectedHandshakes, { listener: 'agent', reason: 'tls' }),
          'shed connections are not refused handshakes',
        ).to.equal(0);
        stall.destroy();
        await connected;
      } finally {
        stall.destroy();
      }
      const r = await stack.caller.unary(ECHO.unary, Buffer.from('after the storm'), stack.md());
      expect(r.response.toString()).to.equal('after the storm');
      const scrape = await (await fetch(`${stack.adminUrl}/metrics`)).text();
      expect(scrape).to.match(/^burrow_broker_handshakes_shed_total [1-9]\d*$/m);
      expect(scrape).to.match(/^burrow_broker_handshakes_pending 0$/m);
    },
  );

  it(
    'a peer that hangs up mid-handshake (an agent giving up, ' +
      'a TCP health check) is counted as abandoned, not refused',
    async () => {
      const metrics = stack.broker.metrics;
      const before = await metricValue(metrics.abandonedHandshakes, { listener: 'agent' });
      // One at a time: this broker's cap is 1 handshake.
      for (let i = 1; i <= 3; i++) {
        (await stalledConnection(Number(stack.agentAddress.split(':')[1]))).destroy();
        await until(
          `abandoned handshake ${i} counted`,
          async () => (await metricValue(metrics.abandonedHandshakes, { listener: 'agent' })) === before + i,
        );
      }
      expect(await metricValue(metrics.rejectedHandshakes, { listener: 'agent', reason: 'tls' })).to.equal(0);
    },
  );
});
