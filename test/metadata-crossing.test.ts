import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { EventEmitter, once } from 'node:events';
import { type Metadata, ServerCredentials, status as Status, type ServerDuplexStream } from '@grpc/grpc-js';
import {
  TUNNEL_METHODS,
  decodeCallFrame,
  decodeSessionFrame,
  encodeCallFrame,
  encodeSessionFrame,
  requestMetadataFromWire,
  type CallFrame,
  type WireMetadataEntry,
} from '@burrow/tunnel';
import { ECHO, metadataJson, type SeenCall } from './helpers/echo-upstream';
import type { CertFiles } from './helpers/pki-fixture';
import { RawAgent, type RawCallStream } from './helpers/raw-agent';
import { startRawServer } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';

/**
 * Which metadata crosses the tunnel, attacked in every case spelling (issue 13, item 1): a rogue
 * agent or a rogue broker sends identity and hop keys such as `Burrow-Agent-Id` or `Authorization`
 * in a Start frame; the upstream on the far side must see none of them, and exactly one identity
 * value, the one Burrow verified. A grpc-js caller cannot send such keys in upper case (grpc-js and
 * node:http2 lowercase header names, and HTTP/2 treats an upper-case name as malformed), so the
 * mixed-case attacks come from hand-made tunnel peers, which write whatever key they like.
 */

/** Keys that never cross as request metadata (tunnel.proto, MetadataEntry). */
const STRIPPED_REQUEST_KEYS = [
  'burrow-agent-id',
  'burrow-caller-id',
  'burrow-session-id',
  'burrow-forwarded-by',
  'burrow-anything',
  'authorization',
  'proxy-authorization',
  'proxy-connection',
  'host',
  'user-agent',
  'te',
  'content-type',
  'connection',
  'keep-alive',
  'transfer-encoding',
  'upgrade',
  'grpc-timeout',
  'grpc-encoding',
  'grpc-accept-encoding',
  'grpc-status',
  'grpc-message',
  'grpc-status-details-bin',
  'grpc-previous-rpc-attempts',
];

/** Headers node:http2 never sends, so a grpc-js caller cannot try them. */
const HTTP2_FORBIDDEN = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te']);

/** Keys that are not legal metadata names even after lowercasing, each of which must be dropped. */
const ILLEGAL_KEYS = [
  ':authority',
  ':path',
  ':method',
  'x bad',
  'x-caf\u00e9',
  'burrow-agent-id\u0000',
  '',
  // U+212A KELVIN SIGN lowercases to an ASCII "k": it must not become `keep-alive`.
  '\u212Aeep-alive',
  // U+0130 (I with a dot) lowercases to "i" plus a combining dot.
  'BURROW-AGENT-\u0130D',
];

/** The spellings of `key` an attacker would try: lower, UPPER, Title-Case, aLtErNaTiNg, iNVERSE title. */
function caseSpellings(key: string): string[] {
  const title = key
    .split('-')
    .map((w) => w.charAt(0).toUpperCase() + w.slice(1))
    .join('-');
  const alternating = [...key].map((c, i) => (i % 2 ? c.toUpperCase() : c)).join('');
  const inverse = [...title].map((c) => (c === c.toUpperCase() ? c.toLowerCase() : c.toUpperCase())).join('');
  return [...new Set([key, key.toUpperCase(), title, alternating, inverse])];
}

/** Every spelling of every stripped key, plus the illegal keys, each with a value naming it. */
function injectedEntries(agentIdValue: string): WireMetadataEntry[] {
  const entries: WireMetadataEntry[] = [];
  for (const key of STRIPPED_REQUEST_KEYS) {
    for (const spelling of caseSpellings(key)) {
      const value = key === 'burrow-agent-id' ? agentIdValue : `injected:${spelling}`;
      entries.push({ key: spelling, value: Buffer.from(value, 'latin1') });
    }
  }
  for (const key of ILLEGAL_KEYS) entries.push({ key, value: Buffer.from(`injected:${key}`, 'latin1') });
  // A legal key in mixed case is not an attack: it crosses, lowercased.
  entries.push({ key: 'X-Kept-Key', value: Buffer.from('kept') });
  return entries;
}

/** Every value the upstream saw that the attacker sent (text values; -bin values are base64 here). */
function injectedValuesSeen(md: Metadata, forbidden: string): string[] {
  const seen: string[] = [];
  for (const [key, values] of Object.entries(metadataJson(md))) {
    for (const v of values) if (v.includes('injected') || v === forbidden) seen.push(`${key}: ${v}`);
  }
  return seen;
}

/**
 * What a site upstream must see of a platform call: the caller's verified id once, no agent id, no
 * injected value, and the legal custom key.
 */
function expectSiteSawCaller(md: Metadata): void {
  console.log('      the site upstream saw:', JSON.stringify(metadataJson(md)));
  expect(md.get('burrow-caller-id'), 'burrow-caller-id').to.deep.equal(['spiffe://burrow.local/service/platform-svc']);
  expect(md.get('burrow-agent-id'), 'burrow-agent-id').to.deep.equal([]);
  expect(injectedValuesSeen(md, 'site-a'), 'injected values that reached the upstream').to.deep.equal([]);
  expect(md.get('x-kept-key'), 'a legal mixed-case key crosses, lowercased').to.deep.equal(['kept']);
}

/** The upstream's record of its next call. */
function nextCall(upstream: EventEmitter): Promise<SeenCall> {
  return once(upstream, 'call').then(([seen]) => seen as SeenCall);
}

/** Sends a unary call's frames on a tunnel call stream and collects the answer up to Trailers. */
async function callOverStream(
  send: (f: CallFrame) => void,
  next: () => Promise<CallFrame>,
  start: Extract<CallFrame, { kind: 'start' }>['start'],
): Promise<{ data: string[]; code: number; message: string }> {
  send({ kind: 'start', start });
  send({ kind: 'message', data: Buffer.from('ping') });
  send({ kind: 'halfClose' });
  const data: string[] = [];
  for (;;) {
    const f = await next();
    if (f.kind === 'message') data.push(f.data.toString());
    if (f.kind === 'trailers') return { data, code: f.trailers.code, message: f.trailers.message };
  }
}

describe('metadata crossing: identity and hop keys in every case spelling (issue 13, item 1)', function () {
  this.timeout(20_000);

  describe('site -> platform: a rogue agent against a real broker', () => {
    let stack: Stack;
    let rogueCert: CertFiles;
    let agent: RawAgent | undefined;

    before(async () => {
      stack = await Stack.start({ startAgent: false });
      rogueCert = await stack.pki.issue('agent', 'fuzz2');
    });
    afterEach(() => {
      agent?.close();
      agent = undefined;
    });

    /** A Forward stream of a session the rogue agent opened with its own valid certificate. */
    const rogueForward = async (): Promise<RawCallStream> => {
      agent = new RawAgent(stack.agentAddress, rogueCert);
      const session = agent.session();
      session.hello();
      const { sessionId } = await session.welcome();
      return agent.forward(sessionId);
    };
    after(async () => {
      await stack.stop();
    });

    it("the issue's reproduction (Burrow-Agent-Id: site-a, BURROW-CALLER-ID, Authorization, Host)", async () => {
      const fwd = await rogueForward();
      const seen = nextCall(stack.platformUpstream);
      const metadata = [
        ['Burrow-Agent-Id', 'site-a'],
        ['BURROW-CALLER-ID', 'spiffe://burrow.local/service/admin'],
        ['Authorization', 'Bearer injected'],
        ['Host', 'evil.example'],
      ].map(([key, value]) => ({ key: key!, value: Buffer.from(value!) }));
      const answer = await callOverStream(
        (f) => fwd.send(f),
        () => fwd.next(),
        {
          method: ECHO.unary,
          metadata,
          timeoutMs: 5_000,
          callId: 'inject-0',
        },
      );
      fwd.end();
      expect(answer.code, answer.message).to.equal(Status.OK);
      const md = (await seen).metadata;
      console.log('      the platform upstream saw:', JSON.stringify(metadataJson(md)));
      expect(metadataJson(md)).to.deep.equal({ 'burrow-agent-id': ['fuzz2'], 'user-agent': md.get('user-agent') });
    });

    it("every spelling of every stripped key: one burrow-agent-id, the certificate's, no injected key", async () => {
      const fwd = await rogueForward();
      const entries = injectedEntries('site-a');
      const seen = nextCall(stack.platformUpstream);
      const answer = await callOverStream(
        (f) => fwd.send(f),
        () => fwd.next(),
        {
          method: ECHO.unary,
          metadata: entries,
          timeoutMs: 5_000,
          callId: 'inject-1',
        },
      );
      fwd.end();
      expect(answer.code, answer.message).to.equal(Status.OK);
      expect(answer.data).to.deep.equal(['ping']);
      const md = (await seen).metadata;
      const json = JSON.stringify(metadataJson(md));
      console.log(`      ${entries.length} injected entries; the platform upstream saw:`, json);
      expect(md.get('burrow-agent-id'), 'burrow-agent-id').to.deep.equal(['fuzz2']);
      expect(injectedValuesSeen(md, 'site-a'), 'injected values that reached the upstream').to.deep.equal([]);
      expect(md.get('x-kept-key'), 'a legal mixed-case key crosses, lowercased').to.deep.equal(['kept']);
    });
  });

  describe('platform -> site responses: a rogue agent answering a caller', () => {
    let stack: Stack;
    let agent: RawAgent | undefined;

    before(async () => {
      stack = await Stack.start({ startAgent: false });
    });
    after(async () => {
      agent?.close();
      await stack.stop();
    });

    it('headers and trailers in every case spelling: the caller gets none of the stripped keys', async () => {
      agent = new RawAgent(stack.agentAddress, await stack.pki.issue('agent', 'fuzz3'));
      const session = agent.session();
      session.hello();
      const offer = agent.offer((await session.welcome()).sessionId);
      const keys = [
        'grpc-status',
        'grpc-message',
        'grpc-encoding',
        'content-type',
        'te',
        'connection',
        'transfer-encoding',
        'burrow-agent-id',
        'burrow-caller-id',
      ];
      const injected = (): WireMetadataEntry[] => [
        ...keys.flatMap((k) => caseSpellings(k).map((key) => ({ key, value: Buffer.from(`injected:${key}`) }))),
        ...ILLEGAL_KEYS.map((key) => ({ key, value: Buffer.from(`injected:${key}`) })),
        { key: 'X-Kept-Key', value: Buffer.from('kept') },
      ];
      const md = stack.md({}, 'fuzz3');
      const call = stack.caller.unary(ECHO.unary, Buffer.from('ping'), md, { deadline: Date.now() + 5_000 });
      await offer.expectNext('start');
      while ((await offer.next()).kind !== 'halfClose');
      offer.send({ kind: 'headers', metadata: injected() });
      offer.send({ kind: 'message', data: Buffer.from('pong') });
      offer.send({ kind: 'trailers', trailers: { code: Status.OK, message: '', metadata: injected() } });
      offer.end();
      const res = await call;
      console.log(
        `      the caller got headers ${JSON.stringify(metadataJson(res.headers))}` +
          ` trailers ${JSON.stringify(metadataJson(res.status.metadata))}`,
      );
      expect(res.response.toString()).to.equal('pong');
      expect(res.status.code).to.equal(Status.OK);
      expect(injectedValuesSeen(res.headers, 'site-a'), 'injected headers').to.deep.equal([]);
      expect(injectedValuesSeen(res.status.metadata, 'site-a'), 'injected trailers').to.deep.equal([]);
      expect(res.headers.get('x-kept-key')).to.deep.equal(['kept']);
      expect(res.status.metadata.get('x-kept-key')).to.deep.equal(['kept']);
    });
  });

  describe('platform -> site: a caller against a real broker and agent', () => {
    let stack: Stack;

    before(async () => {
      stack = await Stack.start();
    });
    after(async () => {
      await stack.stop();
    });

    it("a grpc-js caller sending the stripped keys: one burrow-caller-id, the caller's SPIFFE id", async () => {
      const md = stack.md();
      for (const key of STRIPPED_REQUEST_KEYS) {
        // The caller's own burrow-agent-id names the agent; it is routing data and must not cross either.
        if (key === 'burrow-agent-id') continue;
        // node:http2 refuses to send connection-specific headers at all (ERR_HTTP2_INVALID_CONNECTION_HEADERS).
        if (HTTP2_FORBIDDEN.has(key)) continue;
        if (key.endsWith('-bin')) md.add(key, Buffer.from('injected'));
        else md.add(key, `injected:${key}`);
      }
      md.add('X-Kept-Key', 'kept');
      const seen = nextCall(stack.siteUpstream);
      const res = await stack.caller.unary(ECHO.unary, Buffer.from('ping'), md, { deadline: Date.now() + 5_000 });
      expect(res.response.toString()).to.equal('ping');
      const got = (await seen).metadata;
      expectSiteSawCaller(got);
    });
  });

  describe('platform -> site: a rogue broker against a real agent', () => {
    let stack: Stack;
    let fake: FakeBroker;

    before(async () => {
      stack = await Stack.start({ startAgent: false });
      fake = await FakeBroker.start(await stack.pki.issue('broker', 'rogue'));
      await stack.startAgent({ brokers: [fake.address], minIdleOffers: 1 });
    });
    after(async () => {
      await stack.agent?.stop();
      await fake.stop();
      await stack.stop();
    });

    it('the agent applies the rules on receipt: one burrow-caller-id, Start.caller, and no injected key', async () => {
      const offer = await fake.nextOffer();
      const entries = injectedEntries('site-a');
      for (const spelling of caseSpellings('burrow-caller-id')) {
        entries.push({ key: spelling, value: Buffer.from('spiffe://burrow.local/service/admin') });
      }
      const seen = nextCall(stack.siteUpstream);
      const answer = await callOverStream(
        (f) => offer.send(f),
        () => offer.next(),
        {
          method: ECHO.unary,
          metadata: entries,
          timeoutMs: 5_000,
          callId: 'inject-2',
          caller: 'spiffe://burrow.local/service/platform-svc',
        },
      );
      expect(answer.code, answer.message).to.equal(Status.OK);
      const md = (await seen).metadata;
      expectSiteSawCaller(md);
    });
  });

  describe('the receive path on its own (requestMetadataFromWire)', () => {
    it('drops every spelling of every stripped key and every illegal key; lowercases what crosses', () => {
      const md = requestMetadataFromWire(injectedEntries('site-a'));
      expect(metadataJson(md)).to.deep.equal({ 'x-kept-key': ['kept'] });
    });
  });
});

/** One Offer stream the fake broker holds, as frames. */
class FakeOffer {
  private readonly frames: CallFrame[] = [];
  private readonly events = new EventEmitter();
  constructor(private readonly call: ServerDuplexStream<Buffer, Buffer>) {
    call.on('data', (b: Buffer) => {
      this.frames.push(decodeCallFrame(b));
      this.events.emit('frame');
    });
    call.on('error', () => {});
  }
  send(f: CallFrame): void {
    this.call.write(encodeCallFrame(f));
  }
  async next(): Promise<CallFrame> {
    while (this.frames.length === 0) await once(this.events, 'frame');
    return this.frames.shift()!;
  }
}

/**
 * A hand-made broker holding a real broker certificate: it welcomes an agent's session (protocol
 * version 1, one call per offer) and hands the test the agent's Offer streams, on which the test
 * writes whatever Start frame it likes.
 */
class FakeBroker {
  private readonly offers: FakeOffer[] = [];
  private readonly events = new EventEmitter();
  private readonly open = new Set<ServerDuplexStream<Buffer, Buffer>>();
  private constructor(
    readonly address: string,
    private readonly stopServer: () => Promise<void>,
  ) {}

  static async start(cert: CertFiles): Promise<FakeBroker> {
    const creds = ServerCredentials.createSsl(
      readFileSync(cert.ca),
      [{ cert_chain: readFileSync(cert.cert), private_key: readFileSync(cert.key) }],
      true,
    );
    let broker: FakeBroker | undefined;
    const server = await startRawServer(
      {
        [TUNNEL_METHODS.session]: (call) => broker!.session(call),
        [TUNNEL_METHODS.offer]: (call) => broker!.offer(call),
      },
      creds,
    );
    broker = new FakeBroker(server.address, server.stop);
    return broker;
  }

  async nextOffer(): Promise<FakeOffer> {
    while (this.offers.length === 0) await once(this.events, 'offer');
    return this.offers.shift()!;
  }

  async stop(): Promise<void> {
    for (const call of this.open) call.end();
    await this.stopServer();
  }

  private session(call: ServerDuplexStream<Buffer, Buffer>): void {
    this.track(call);
    call.on('data', (b: Buffer) => {
      if (decodeSessionFrame(b).kind !== 'hello') return;
      call.write(
        encodeSessionFrame({
          kind: 'welcome',
          welcome: { protocolVersion: 1, sessionId: 'fake-session', maxMessageBytes: 4 << 20, brokerId: 'fake-broker' },
        }),
      );
    });
  }

  private offer(call: ServerDuplexStream<Buffer, Buffer>): void {
    this.track(call);
    this.offers.push(new FakeOffer(call));
    this.events.emit('offer');
  }

  private track(call: ServerDuplexStream<Buffer, Buffer>): void {
    this.open.add(call);
    call.on('error', () => {});
    call.on('close', () => this.open.delete(call));
    call.on('finish', () => this.open.delete(call));
  }
}
