import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { Agent, AGENT_DEFAULTS } from '@burrow/agent';
import { silentLogger } from '@burrow/tunnel';
import { EchoUpstream } from './helpers/echo-upstream';
import { PkiFixture, type CertFiles } from './helpers/pki-fixture';
import { killAll, startBroker, type BurrowProcess } from './helpers/processes';

/**
 * Issue 13, item 5: what a peer without a client certificate can make a broker with --pki-dir
 * (enrollment open) hold. Each flood comes from one address (127.0.0.3) against a real broker
 * process; a real agent connects from 127.0.0.1 meanwhile. The bounds are generous; the measured
 * numbers are printed.
 */
const ATTACKER = '127.0.0.3';
const ENROLL_PATH = '/burrow.pki.v1.Enrollment/Enroll';
const UNAUTHENTICATED_TIMEOUT_MS = 3_000;

/** Resident and peak resident memory of a process, in MiB, and its CPU time in ms. */
function usage(pid: number): { rssMiB: number; hwmMiB: number; cpuMs: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
  // utime and stime, fields 14 and 15 of /proc/<pid>/stat, in clock ticks (100 per second on Linux).
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  const cpuMs = (Number(stat[11]) + Number(stat[12])) * 10;
  return { rssMiB: kib('VmRSS') / 1024, hwmMiB: kib('VmHWM') / 1024, cpuMs };
}

/** Every attacker session, destroyed after each test (also when the test failed midway). */
const attackerSessions: http2.ClientHttp2Session[] = [];

interface AttackerSession {
  session: http2.ClientHttp2Session;
  closed: Promise<void>;
}

/** An HTTP/2 session over TLS from ATTACKER with no client certificate. */
function unauthenticatedSession(port: number, ca: string): Promise<AttackerSession> {
  return new Promise((resolve, reject) => {
    const raw = net.connect({ port, host: '127.0.0.1', localAddress: ATTACKER });
    raw.on('error', () => {});
    const session = http2.connect('https://localhost', {
      // The attacker queues 16 MiB per stream: Node's default (10 MB) would reset its own streams.
      maxSessionMemory: 4096,
      createConnection: () => tls.connect({ socket: raw, servername: 'localhost', ca, ALPNProtocols: ['h2'] }),
    });
    session.on('error', () => {});
    attackerSessions.push(session);
    const closed = new Promise<void>((done) => session.once('close', () => done()));
    session.once('connect', () => resolve({ session, closed }));
    // Reset at accept (the per-address cap): the session closes without connecting.
    session.once('close', () => reject(new Error('closed before connecting')));
  });
}

/** A gRPC message frame holding an EnrollRequest whose token is `tokenBytes` long. */
function enrollFrame(tokenBytes: number): Buffer {
  const varint: number[] = [];
  for (let n = tokenBytes; ; n = Math.floor(n / 128)) {
    if (n < 128) {
      varint.push(n);
      break;
    }
    varint.push((n % 128) | 128);
  }
  const body = Buffer.alloc(1 + varint.length + tokenBytes, 0x41);
  body[0] = 0x0a; // field 1 (token), length-delimited
  Buffer.from(varint).copy(body, 1);
  const header = Buffer.alloc(5);
  header.writeUInt32BE(body.length, 1);
  return Buffer.concat([header, body]);
}

/** Opens an Enroll stream; resolves with its gRPC status code (or how it ended) once it closes. */
function enrollStream(session: http2.ClientHttp2Session, body?: Buffer): Promise<string> {
  return new Promise((resolve) => {
    let stream: http2.ClientHttp2Stream;
    try {
      const headers = { ':method': 'POST', ':path': ENROLL_PATH, 'content-type': 'application/grpc', te: 'trailers' };
      stream = session.request(headers, { endStream: false });
    } catch (err) {
      resolve(`not sent: ${(err as Error).message}`);
      return;
    }
    let code = 'none';
    stream.on('response', (h) => {
      if (h['grpc-status'] !== undefined) code = String(h['grpc-status']);
    });
    stream.on('trailers', (h) => {
      if (h['grpc-status'] !== undefined) code = String(h['grpc-status']);
    });
    stream.on('error', () => {});
    stream.resume();
    stream.once('close', () => resolve(code === 'none' ? `reset ${stream.rstCode}` : code));
    if (body) stream.end(body);
  });
}

describe('unauthenticated floods on the agent listener (issue 13 item 5)', function () {
  this.timeout(60_000);
  let pki: PkiFixture;
  let broker: BurrowProcess;
  let agentPort = 0;
  let ca = '';
  let agentCert: CertFiles;
  let echo: EchoUpstream;

  before(async () => {
    pki = await PkiFixture.create();
    agentCert = await pki.issue('agent', 'site-a');
    ca = readFileSync(agentCert.ca, 'utf8');
    echo = await new EchoUpstream().start();
  });
  beforeEach(async () => {
    // Settings through the environment, so that the same test runs against brokers without the flag.
    const started = await startBroker(
      [
        '--pki-dir',
        pki.pkiDir,
        '--agent-listen',
        '0.0.0.0:0',
        '--api-listen',
        '127.0.0.1:0',
        '--tls-dns',
        'localhost',
        '--tls-ip',
        '127.0.0.1',
      ],
      { BURROW_BROKER_UNAUTHENTICATED_TIMEOUT: `${UNAUTHENTICATED_TIMEOUT_MS}ms` },
    );
    broker = started.proc;
    agentPort = started.ports.agentPort;
  });
  afterEach(() => {
    for (const s of attackerSessions.splice(0)) s.destroy();
    return killAll();
  });
  after(async () => {
    await echo?.stop();
    pki?.cleanup();
  });

  /** Starts an agent with a valid certificate from 127.0.0.1; resolves with its time to a session. */
  async function agentConnectMs(): Promise<number> {
    const started = Date.now();
    const agent = new Agent(
      {
        ...AGENT_DEFAULTS,
        brokers: [`127.0.0.1:${agentPort}`],
        tlsCertFile: agentCert.cert,
        tlsKeyFile: agentCert.key,
        caFile: agentCert.ca,
        upstreams: [{ service: '*', address: echo.address }],
        reconnectBaseMs: 50,
        reconnectMaxMs: 500,
        drainTimeoutMs: 1_000,
      },
      silentLogger(),
    );
    try {
      await agent.start();
      await agent.waitConnected(15_000);
      return Date.now() - started;
    } finally {
      await agent.stop();
    }
  }

  it('20 parallel Enroll calls with a 16 MiB token: refused before the body is buffered', async () => {
    const before = usage(broker.pid);
    const frame = enrollFrame(16 * 1024 * 1024 - 1024);
    const sessions = await Promise.all(Array.from({ length: 20 }, () => unauthenticatedSession(agentPort, ca)));
    const codes = await Promise.all(sessions.map((s) => enrollStream(s.session, frame)));
    const after = usage(broker.pid);
    for (const s of sessions) s.session.destroy();
    const peakGrowth = after.hwmMiB - before.rssMiB;
    console.log(
      `    16 MiB Enrolls: statuses ${[...new Set(codes)].join(',')}; broker peak RSS` +
        ` +${peakGrowth.toFixed(0)} MiB (${before.rssMiB.toFixed(0)} -> peak ${after.hwmMiB.toFixed(0)}),` +
        ` CPU ${after.cpuMs - before.cpuMs} ms`,
    );
    // RESOURCE_EXHAUSTED (8): the size limit of unauthenticated requests, or the rate limit.
    expect(
      codes.every((c) => c === '8'),
      codes.join(','),
    ).to.equal(true);
    expect(peakGrowth, 'peak RSS growth, MiB').to.be.below(64);
    expect(after.cpuMs - before.cpuMs, 'broker CPU, ms').to.be.below(2_000);
  });

  it('the rate limit answers RESOURCE_EXHAUSTED before the body is read', async () => {
    // 30 attempts per minute per address (the default): the 31st and later are refused at their headers.
    const { session } = await unauthenticatedSession(agentPort, ca);
    const small = enrollFrame(100);
    for (let i = 0; i < 30; i++) await enrollStream(session, small);
    const before = usage(broker.pid);
    // A body that would take 16 MiB is never sent: the refusal comes first, and the stream ends.
    const refused = await enrollStream(session, enrollFrame(16 * 1024 * 1024 - 1024));
    const after = usage(broker.pid);
    session.destroy();
    console.log(
      `    rate-limited 16 MiB Enroll: status ${refused}, broker peak RSS ` +
        `+${(after.hwmMiB - before.hwmMiB).toFixed(0)} MiB`,
    );
    expect(refused).to.equal('8');
    expect(after.hwmMiB - before.hwmMiB, 'peak RSS growth, MiB').to.be.below(8);
  });

  it(
    '100 connections x 500 Enroll streams with no body: bounded ' +
      'memory, closed by the timeout, an agent still connects',
    async () => {
      const before = usage(broker.pid);
      const opened = await Promise.allSettled(Array.from({ length: 100 }, () => unauthenticatedSession(agentPort, ca)));
      const sessions = opened.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
      const streams = sessions.flatMap((s) => Array.from({ length: 500 }, () => enrollStream(s.session)));
      // A ping answered means the broker has read every frame sent before it on that connection.
      await Promise.all(
        sessions.map(
          (s) =>
            new Promise<void>((resolve) => {
              if (!s.session.ping(() => resolve())) resolve();
            }),
        ),
      );
      const held = usage(broker.pid);
      const connectMs = await agentConnectMs();
      const closedAt = Date.now();
      await Promise.all(sessions.map((s) => s.closed));
      const closeMs = Date.now() - closedAt;
      const codes = await Promise.all(streams);
      const counts = codes.reduce<Record<string, number>>((m, c) => {
        m[c] = (m[c] ?? 0) + 1;
        return m;
      }, {});
      console.log(
        `    stream flood: ${sessions.length} of 100 connections admitted, streams ended` +
          ` ${JSON.stringify(counts)}; broker RSS +${(held.rssMiB - before.rssMiB).toFixed(0)} MiB while held;` +
          ` agent connected in ${connectMs} ms; the last flood connection closed ${closeMs} ms after that`,
      );
      expect(held.rssMiB - before.rssMiB, 'RSS growth while the flood is held, MiB').to.be.below(40);
      expect(connectMs, 'agent connect time, ms').to.be.below(5_000);
      expect(closeMs, 'flood connections closed by the unauthenticated timeout').to.be.below(
        UNAUTHENTICATED_TIMEOUT_MS + 5_000,
      );
    },
  );

  it('50 connections that never send the HTTP/2 preface are closed by the unauthenticated timeout', async () => {
    const opened = Date.now();
    let secure = 0;
    const sockets = await Promise.all(
      Array.from(
        { length: 50 },
        () =>
          new Promise<{ closed: Promise<number> }>((resolve) => {
            // node:tls hands localAddress to net.connect, though its type does not list it.
            const options: tls.ConnectionOptions = {
              port: agentPort,
              host: '127.0.0.1',
              servername: 'localhost',
              ca,
              ALPNProtocols: ['h2'],
            };
            const s = tls.connect({ ...options, localAddress: ATTACKER } as tls.ConnectionOptions);
            s.on('error', () => {});
            const closed = new Promise<number>((done) => s.once('close', () => done(Date.now() - opened)));
            s.once('secureConnect', () => {
              secure++;
              // Reading, so that the broker's close is seen (the peer itself never sends anything).
              s.resume();
              resolve({ closed });
            });
            // A reset at accept (the per-address cap) ends it before it connects.
            s.once('close', () => resolve({ closed }));
          }),
      ),
    );
    const limitMs = UNAUTHENTICATED_TIMEOUT_MS + 5_000;
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<'open'>((resolve) => {
      timer = setTimeout(() => resolve('open'), limitMs);
    });
    const ends = await Promise.all(sockets.map((c) => Promise.race([c.closed, deadline])));
    clearTimeout(timer);
    const open = ends.filter((e) => e === 'open').length;
    const times = ends.filter((e): e is number => e !== 'open');
    console.log(
      `    no preface: ${secure} of 50 finished their TLS handshake; ${open} still open after ${limitMs} ms;` +
        ` closed ones after at most ${times.length ? Math.max(...times) : 0} ms`,
    );
    expect(secure, 'connections that finished their handshake (the others: reset at accept)').to.be.at.least(32);
    expect(open).to.equal(0);
  });
});
