import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { EventEmitter, once } from 'node:events';
import * as http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import * as tls from 'node:tls';
import { type Metadata, status as Status } from '@grpc/grpc-js';
import {
  CALLER_ID_KEY,
  CONTROL_PATH,
  GRPC_CONTENT_TYPE,
  MessageReader,
  TUNNEL_ALPN,
  decodeSessionFrame,
  encodeSessionFrame,
  forwardedRequestMetadata,
  forwardedResponseMetadata,
  frameMessage,
  statusOfHeaders,
} from '@burrow/tunnel';
import { ECHO, metadataJson, type SeenCall } from './helpers/echo-upstream';
import { readReply, type RawReply } from './helpers/h2';
import type { CertFiles } from './helpers/pki-fixture';
import { RawAgent } from './helpers/raw-agent';
import { Stack } from './helpers/stack';

/**
 * Which metadata crosses the tunnel (tunnel.proto, "Metadata"; issue 13, item 1), on the raw HTTP/2
 * data plane of protocol version 4: hop keys never cross; the identity keys are set by the side that
 * owns them (`burrow-agent-id` by the broker on site -> platform calls, `burrow-caller-id` by the
 * broker on platform -> site calls) and replace whatever a peer sent; keys that are not legal
 * metadata names are dropped; repeated keys keep their values in order.
 *
 * The attackers are hand-made peers holding valid certificates: a rogue agent calling the platform
 * over `h2`, a rogue agent answering a caller on its tunnel, and a rogue BROKER that opens call
 * streams on a real agent's tunnel. HTTP/2 carries header names in lower case (node:http2 lowercases
 * what it sends), so the case spellings of a key arrive as repeats of the lowercase key; spellings
 * that are not even legal names are checked on the crossing functions themselves, and on the wire with
 * hand-written HEADERS frames.
 */

/** Keys that never cross as request metadata (tunnel.proto, "Metadata"). */
const STRIPPED_REQUEST_KEYS = [
  'burrow-agent-id',
  'burrow-caller-id',
  'burrow-call-id',
  'burrow-session-id',
  'burrow-forwarded-by',
  'burrow-hop-caller',
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
  'grpc-status',
  'grpc-message',
  'grpc-status-details-bin',
  'grpc-previous-rpc-attempts',
];

/** Headers node:http2 sends with one value only (it refuses an array). */
const HTTP2_SINGLE_VALUE = new Set(['authorization', 'proxy-authorization', 'user-agent']);

/** Headers node:http2 refuses to send (connection-specific), or sends only as the call needs them. */
const HTTP2_UNSENDABLE = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'transfer-encoding',
  'upgrade',
  'te',
  'content-type',
  'host',
]);

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

/** Every spelling of every stripped key (as node's flat raw header list), plus the illegal keys. */
function injectedRawHeaders(agentIdValue: string): string[] {
  const raw: string[] = [];
  for (const key of STRIPPED_REQUEST_KEYS)
    for (const spelling of caseSpellings(key))
      raw.push(spelling, key === 'burrow-agent-id' ? agentIdValue : `injected:${spelling}`);
  for (const key of ILLEGAL_KEYS) raw.push(key, `injected:${key}`);
  // A legal key in mixed case is not an attack: it crosses, lowercased.
  raw.push('X-Kept-Key', 'kept');
  return raw;
}

/**
 * The stripped keys a node:http2 peer can send, each in every case spelling (node lowercases them,
 * so they arrive as repeats), with values naming them; `identity` values for the identity keys.
 */
function injectedHeaders(identity: Record<string, string> = {}): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  for (const key of STRIPPED_REQUEST_KEYS) {
    if (HTTP2_UNSENDABLE.has(key)) continue;
    const values = caseSpellings(key).map((s) => identity[key] ?? `injected:${s}`);
    out[key] = HTTP2_SINGLE_VALUE.has(key) ? values.slice(0, 1) : values;
  }
  return out;
}

/** Every value the upstream saw that the attacker sent. */
function injectedValuesSeen(md: Metadata, forbidden: string[]): string[] {
  const seen: string[] = [];
  for (const [key, values] of Object.entries(metadataJson(md)))
    for (const v of values) if (v.includes('injected') || forbidden.includes(v)) seen.push(`${key}: ${v}`);
  return seen;
}

/** The upstream's record of its next call. */
function nextCall(upstream: EventEmitter): Promise<SeenCall> {
  return once(upstream, 'call').then(([seen]) => seen as SeenCall);
}

/** A unary gRPC call on `session` with `extra` headers (values of a repeated key in order). */
async function unaryOn(
  session: http2.ClientHttp2Session,
  method: string,
  extra: Record<string, string | string[]>,
  body = Buffer.from('ping'),
): Promise<RawReply & { code: number | undefined; details: string }> {
  const stream = session.request({
    ...extra,
    ':method': 'POST',
    ':path': method,
    'content-type': GRPC_CONTENT_TYPE,
    te: 'trailers',
    'grpc-timeout': '5S',
  });
  const reply = readReply(stream);
  stream.end(frameMessage(body));
  const r = await reply;
  const status = statusOfHeaders(r.trailers) ?? statusOfHeaders(r.headers);
  return { ...r, code: status?.code, details: status?.details ?? `no status (reset ${r.rstCode})` };
}

/** The messages of a reply's DATA. */
function messagesOf(data: Buffer): string[] {
  return new MessageReader(1 << 20).push(data).map((m) => m.toString());
}

/** An mTLS `h2` session to `address` with `cert`, as an agent's site -> platform connection. */
function h2Session(address: string, cert: CertFiles): Promise<http2.ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`https://${address}`, {
      ca: readFileSync(cert.ca),
      cert: readFileSync(cert.cert),
      key: readFileSync(cert.key),
      ALPNProtocols: ['h2'],
      checkServerIdentity: () => undefined,
    });
    session.once('error', reject);
    session.once('connect', () => {
      session.off('error', reject);
      session.on('error', () => {});
      resolve(session);
    });
  });
}

describe('metadata crossing on raw HTTP/2: identity and hop keys (issue 13, item 1)', function () {
  this.timeout(30_000);

  describe('the crossing functions on their own (what every hop applies)', () => {
    it('request: drops every spelling of every hop key and every illegal key; lowercases what crosses', () => {
      const out = forwardedRequestMetadata(injectedRawHeaders('site-a'));
      expect(out).to.deep.equal({ 'x-kept-key': 'kept' });
    });

    it('request: the owned identity key replaces any value a peer sent, in any spelling', () => {
      const raw = ['Burrow-Caller-Id', 'spiffe://x/service/admin', 'burrow-caller-id', 'spiffe://x/service/other'];
      const out = forwardedRequestMetadata(raw, { [CALLER_ID_KEY]: 'spiffe://burrow.local/service/platform-svc' });
      expect(out).to.deep.equal({ [CALLER_ID_KEY]: 'spiffe://burrow.local/service/platform-svc' });
    });

    it('request: repeated keys keep their values in order; compression headers pass unchanged', () => {
      const raw = ['x-rep', 'a', 'X-Rep', 'b', 'x-other', '1', 'x-rep', 'c', 'grpc-encoding', 'gzip'];
      raw.push('grpc-accept-encoding', 'identity,gzip');
      expect(forwardedRequestMetadata(raw)).to.deep.equal({
        'x-rep': ['a', 'b', 'c'],
        'x-other': '1',
        'grpc-encoding': 'gzip',
        'grpc-accept-encoding': 'identity,gzip',
      });
    });

    it('response: grpc-* (but grpc-status-details-bin), content-type, te, connection and burrow-* stay behind', () => {
      const raw: string[] = [];
      const keys = ['grpc-previous-rpc-attempts', 'grpc-retry-pushback-ms', 'content-type', 'te', 'connection'];
      keys.push('transfer-encoding', 'burrow-agent-id', 'burrow-caller-id');
      for (const key of keys) for (const s of caseSpellings(key)) raw.push(s, `injected:${s}`);
      for (const key of ILLEGAL_KEYS) raw.push(key, `injected:${key}`);
      raw.push('Grpc-Status-Details-Bin', 'AAEC', 'X-Kept-Key', 'kept', 'x-kept-key', 'again');
      const kept = { 'grpc-status-details-bin': 'AAEC', 'x-kept-key': ['kept', 'again'] };
      // grpc-status and grpc-message are transport headers of the hop: they pass only as the status.
      const withStatus = ['grpc-status', '5', 'grpc-message', 'gone', ...raw];
      expect(forwardedResponseMetadata(withStatus, false)).to.deep.equal(kept);
      expect(forwardedResponseMetadata(withStatus, true)).to.deep.equal({
        'grpc-status': '5',
        'grpc-message': 'gone',
        ...kept,
      });
    });
  });

  describe('site -> platform: a rogue agent against a real broker (h2)', () => {
    let stack: Stack;
    let session: http2.ClientHttp2Session | undefined;

    before(async () => {
      stack = await Stack.start({ startAgent: false });
      session = await h2Session(stack.agentAddress, await stack.pki.issue('agent', 'fuzz2'));
    });
    after(async () => {
      session?.destroy();
      await stack.stop();
    });

    it("the issue's reproduction (Burrow-Agent-Id: site-a, BURROW-CALLER-ID, Authorization)", async () => {
      const seen = nextCall(stack.platformUpstream);
      const answer = await unaryOn(session!, ECHO.unary, {
        'Burrow-Agent-Id': 'site-a',
        'BURROW-CALLER-ID': 'spiffe://burrow.local/service/admin',
        Authorization: 'Bearer injected',
      });
      expect(answer.code, answer.details).to.equal(Status.OK);
      expect(messagesOf(answer.data)).to.deep.equal(['ping']);
      const md = (await seen).metadata;
      console.log('      the platform upstream saw:', JSON.stringify(metadataJson(md)));
      expect(md.get('burrow-agent-id')).to.deep.equal(['fuzz2']);
      expect(md.get('burrow-caller-id')).to.deep.equal([]);
      expect(md.get('authorization')).to.deep.equal([]);
    });

    it("every sendable hop key, each repeated: one burrow-agent-id, the certificate's, no injected key", async () => {
      const seen = nextCall(stack.platformUpstream);
      const headers = { ...injectedHeaders({ 'burrow-agent-id': 'site-a' }), 'X-Kept-Key': ['kept', 'again'] };
      const answer = await unaryOn(session!, ECHO.unary, headers);
      expect(answer.code, answer.details).to.equal(Status.OK);
      const md = (await seen).metadata;
      console.log('      the platform upstream saw:', JSON.stringify(metadataJson(md)));
      expect(md.get('burrow-agent-id'), 'burrow-agent-id').to.deep.equal(['fuzz2']);
      expect(injectedValuesSeen(md, ['site-a']), 'injected values that reached the upstream').to.deep.equal([]);
      expect(md.get('x-kept-key'), 'a repeated legal key crosses in order, lowercased').to.deep.equal(['kept, again']);
    });

    it('hand-written HEADERS frames: an upper-case name is refused by HTTP/2, illegal names are dropped', async () => {
      const cert = await stack.pki.issue('agent', 'fuzz-raw');
      // Upper case: a malformed request (RFC 9113 8.2.1); the stream is reset, the upstream never sees it.
      const callsBefore = stack.platformUpstream.calls.length;
      const upper = await rawH2Call(stack.agentAddress, cert, [['Burrow-Agent-Id', 'site-a']]);
      expect(upper.reset, 'RST_STREAM for an upper-case header name').to.equal(1); // PROTOCOL_ERROR
      // Names with characters no header name may have are not even delivered to Burrow.
      const seen = nextCall(stack.platformUpstream);
      const dropped = await rawH2Call(stack.agentAddress, cert, [
        ['x bad', 'injected:space'],
        ['x-caf\u00e9', 'injected:latin1'],
        ['burrow-agent-id\u0000', 'site-a'],
        ['x-kept-key', 'kept'],
      ]);
      expect(dropped.reset, 'the call with illegal names was not reset').to.equal(undefined);
      expect(dropped.ended, 'the call was answered').to.equal(true);
      const md = (await seen).metadata;
      console.log('      the platform upstream saw:', JSON.stringify(metadataJson(md)));
      expect(md.get('burrow-agent-id')).to.deep.equal(['fuzz-raw']);
      expect(injectedValuesSeen(md, ['site-a'])).to.deep.equal([]);
      expect(md.get('x-kept-key')).to.deep.equal(['kept']);
      expect(stack.platformUpstream.calls.length).to.equal(callsBefore + 1);
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

    it('headers and trailers with every hop key, each repeated: the caller gets none of them', async () => {
      agent = await RawAgent.connect(stack.agentAddress, await stack.pki.issue('agent', 'fuzz3'));
      await agent.welcome();
      // grpc-encoding is not among them: it passes unchanged, as the message bytes do.
      const keys = ['grpc-previous-rpc-attempts', 'grpc-retry-pushback-ms', 'burrow-agent-id', 'burrow-call-id'];
      keys.push('burrow-caller-id', 'x-kept-key');
      const injected = (): Record<string, string[]> =>
        Object.fromEntries(
          keys.map((k) => [k, caseSpellings(k).map((s) => (k === 'x-kept-key' ? s : `injected:${s}`))]),
        );
      const call = stack.caller.unary(ECHO.unary, Buffer.from('ping'), stack.md({}, 'fuzz3'), {
        deadline: Date.now() + 5_000,
      });
      const [stream] = (await once(agentCalls(agent), 'call')) as [http2.ServerHttp2Stream];
      stream.on('data', () => {});
      await once(stream, 'end');
      stream.respond({ ':status': 200, 'content-type': GRPC_CONTENT_TYPE, ...injected() }, { waitForTrailers: true });
      stream.once('wantTrailers', () => stream.sendTrailers({ ...injected(), 'grpc-status': '0' }));
      stream.end(frameMessage(Buffer.from('pong')));
      const res = await call;
      console.log(
        `      the caller got headers ${JSON.stringify(metadataJson(res.headers))}` +
          ` trailers ${JSON.stringify(metadataJson(res.status.metadata))}`,
      );
      expect(res.response.toString()).to.equal('pong');
      expect(res.status.code).to.equal(Status.OK);
      expect(injectedValuesSeen(res.headers, []), 'injected headers').to.deep.equal([]);
      expect(injectedValuesSeen(res.status.metadata, []), 'injected trailers').to.deep.equal([]);
      // A repeated legal key crosses in order (node:http2, under grpc-js, joins a repeated key's values).
      const inOrder = [caseSpellings('x-kept-key').join(', ')];
      expect(res.headers.get('x-kept-key')).to.deep.equal(inOrder);
      expect(res.status.metadata.get('x-kept-key')).to.deep.equal(inOrder);
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

    it("a grpc-js caller sending the hop keys: one burrow-caller-id, the caller's SPIFFE id", async () => {
      const md = stack.md();
      for (const key of STRIPPED_REQUEST_KEYS) {
        // The caller's own burrow-agent-id names the agent; it is routing data and must not cross either.
        if (key === 'burrow-agent-id' || HTTP2_UNSENDABLE.has(key)) continue;
        if (key.endsWith('-bin')) md.add(key, Buffer.from('injected'));
        else md.add(key, `injected:${key}`);
      }
      md.add('X-Kept-Key', 'kept');
      for (const v of ['1', '2', '3']) md.add('x-rep', v);
      const seen = nextCall(stack.siteUpstream);
      const res = await stack.caller.unary(ECHO.unary, Buffer.from('ping'), md, { deadline: Date.now() + 5_000 });
      expect(res.response.toString()).to.equal('ping');
      const got = (await seen).metadata;
      console.log('      the site upstream saw:', JSON.stringify(metadataJson(got)));
      expect(got.get('burrow-caller-id'), 'burrow-caller-id').to.deep.equal([
        'spiffe://burrow.local/service/platform-svc',
      ]);
      expect(got.get('burrow-agent-id'), 'burrow-agent-id').to.deep.equal([]);
      expect(injectedValuesSeen(got, ['site-a']), 'injected values that reached the upstream').to.deep.equal([]);
      expect(got.get('x-kept-key'), 'a legal mixed-case key crosses, lowercased').to.deep.equal(['kept']);
      // Three header fields on the wire; node:http2 under the grpc-js upstream joins them, in order.
      expect(got.get('x-rep'), 'repeated keys keep their order').to.deep.equal(['1, 2, 3']);
    });
  });

  describe('platform -> site: a rogue broker against a real agent', () => {
    let stack: Stack;
    let fake: FakeBroker;

    before(async () => {
      stack = await Stack.start({ startAgent: false });
      fake = await FakeBroker.start(await stack.pki.issue('broker', 'rogue', { ip: ['127.0.0.1'] }));
      await stack.startAgent({ brokers: [fake.address] });
    });
    after(async () => {
      await stack.agent?.stop();
      await fake.stop();
      await stack.stop();
    });

    it('a call stream carrying its own burrow-caller-id: the upstream sees that one value, no hop key', async () => {
      const caller = 'spiffe://burrow.local/service/platform-svc';
      const seen = nextCall(stack.siteUpstream);
      const headers: Record<string, string | string[]> = injectedHeaders({ 'burrow-agent-id': 'site-a' });
      headers[CALLER_ID_KEY] = caller;
      headers['X-Kept-Key'] = 'kept';
      const answer = await unaryOn(await fake.session(), ECHO.unary, headers);
      expect(answer.code, answer.details).to.equal(Status.OK);
      const md = (await seen).metadata;
      console.log('      the site upstream saw:', JSON.stringify(metadataJson(md)));
      expect(md.get('burrow-caller-id'), 'burrow-caller-id').to.deep.equal([caller]);
      expect(md.get('burrow-agent-id'), 'burrow-agent-id').to.deep.equal([]);
      expect(injectedValuesSeen(md, ['site-a']), 'injected values that reached the upstream').to.deep.equal([]);
      expect(md.get('x-kept-key')).to.deep.equal(['kept']);
    });

    it('burrow-caller-id sent several times (all case spellings): the upstream sees exactly one value', async () => {
      const seen = nextCall(stack.siteUpstream);
      const values = caseSpellings(CALLER_ID_KEY).map((_, i) => `spiffe://burrow.local/service/svc-${i}`);
      const answer = await unaryOn(await fake.session(), ECHO.unary, { [CALLER_ID_KEY]: values });
      const md = (await seen).metadata;
      console.log(
        `      ${Status[answer.code ?? -1]} "${answer.details}"; the site upstream saw:`,
        JSON.stringify(metadataJson(md)),
      );
      expect(answer.code, answer.details).to.equal(Status.OK);
      // One value, and the first the broker sent: not all of them joined into one.
      expect(md.get('burrow-caller-id'), 'burrow-caller-id').to.deep.equal([values[0]]);
    });
  });
});

/** The call streams a RawAgent gets, as 'call' events. */
function agentCalls(agent: RawAgent): EventEmitter {
  const events = new EventEmitter();
  agent.onCall((stream) => events.emit('call', stream));
  return events;
}

/**
 * A hand-made broker holding a real broker certificate: it takes an agent's tunnel (ALPN
 * `burrow-tunnel`), becomes the HTTP/2 client as a broker does, opens the control stream, answers
 * Hello with Welcome, and then lets the test open any call stream it likes on the agent's connection.
 */
class FakeBroker {
  private readonly sockets = new Set<tls.TLSSocket>();
  private readonly ready: Promise<http2.ClientHttp2Session>;
  private gotSession!: (s: http2.ClientHttp2Session) => void;

  private constructor(
    private readonly server: tls.Server,
    readonly address: string,
  ) {
    this.ready = new Promise((resolve) => {
      this.gotSession = resolve;
    });
    server.on('secureConnection', (socket: tls.TLSSocket) => this.tunnel(socket));
  }

  static async start(cert: CertFiles): Promise<FakeBroker> {
    const server = tls.createServer({
      key: readFileSync(cert.key),
      cert: readFileSync(cert.cert),
      ca: readFileSync(cert.ca),
      requestCert: true,
      rejectUnauthorized: true,
      ALPNProtocols: [TUNNEL_ALPN],
    });
    server.on('tlsClientError', () => {});
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return new FakeBroker(server, `127.0.0.1:${(server.address() as AddressInfo).port}`);
  }

  /** The HTTP/2 session (broker = client) of the first tunnel, once the agent has been welcomed. */
  session(): Promise<http2.ClientHttp2Session> {
    return this.ready;
  }

  private tunnel(socket: tls.TLSSocket): void {
    this.sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => this.sockets.delete(socket));
    const session = http2.connect('https://agent', { createConnection: () => socket });
    session.on('error', () => {});
    const control = session.request({
      ':method': 'POST',
      ':path': CONTROL_PATH,
      'content-type': GRPC_CONTENT_TYPE,
      te: 'trailers',
    });
    control.on('error', () => {});
    const reader = new MessageReader(64 * 1024);
    control.on('data', (chunk: Buffer) => {
      for (const m of reader.push(chunk)) {
        if (decodeSessionFrame(m).kind !== 'hello') continue;
        const welcome = { protocolVersion: 4, sessionId: 'fake-session', maxMessageBytes: 4 << 20, brokerId: 'rogue' };
        control.write(frameMessage(encodeSessionFrame({ kind: 'welcome', welcome })));
        this.gotSession(session);
      }
    });
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/**
 * One gRPC call written as raw HTTP/2 frames over mTLS (ALPN h2), so header names go on the wire
 * exactly as given (upper case, spaces, non-ASCII): HPACK literals without Huffman coding. Resolves
 * with the RST_STREAM code the server sent for the call, if any, and whether it ended the stream.
 */
function rawH2Call(
  address: string,
  cert: CertFiles,
  extra: [string, string][],
): Promise<{ reset: number | undefined; ended: boolean }> {
  const [host, port] = [
    address.slice(0, address.lastIndexOf(':')),
    Number(address.slice(address.lastIndexOf(':') + 1)),
  ];
  const frame = (type: number, flags: number, streamId: number, payload: Buffer): Buffer => {
    const head = Buffer.alloc(9);
    head.writeUIntBE(payload.length, 0, 3);
    head[3] = type;
    head[4] = flags;
    head.writeUInt32BE(streamId, 5);
    return Buffer.concat([head, payload]);
  };
  const literal = (name: string, value: string): Buffer => {
    const n = Buffer.from(name, 'latin1');
    const v = Buffer.from(value, 'latin1');
    // Literal header field without indexing, new name (RFC 7541 6.2.2); lengths < 127 here.
    return Buffer.concat([Buffer.from([0x00, n.length]), n, Buffer.from([v.length]), v]);
  };
  const fields: [string, string][] = [
    [':method', 'POST'],
    [':scheme', 'https'],
    [':path', ECHO.unary],
    [':authority', 'broker'],
    ['content-type', GRPC_CONTENT_TYPE],
    ['te', 'trailers'],
    ['grpc-timeout', '5S'],
    ...extra,
  ];
  const block = Buffer.concat(fields.map(([n, v]) => literal(n, v)));
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host,
      port,
      ca: readFileSync(cert.ca),
      cert: readFileSync(cert.cert),
      key: readFileSync(cert.key),
      ALPNProtocols: ['h2'],
      checkServerIdentity: () => undefined,
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error('no answer to the raw HTTP/2 call within 10 s'));
    }, 10_000);
    const done = (r: { reset: number | undefined; ended: boolean }): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(r);
    };
    socket.on('error', () => {});
    socket.once('secureConnect', () => {
      socket.write(
        Buffer.concat([
          Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1'),
          frame(0x4, 0, 0, Buffer.alloc(0)), // SETTINGS
          frame(0x1, 0x4, 1, block), // HEADERS, END_HEADERS
          frame(0x0, 0x1, 1, frameMessage(Buffer.from('ping'))), // DATA, END_STREAM
        ]),
      );
    });
    let buf = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 9) {
        const length = buf.readUIntBE(0, 3);
        if (buf.length < 9 + length) return;
        const [type, flags, streamId] = [buf[3]!, buf[4]!, buf.readUInt32BE(5) & 0x7fffffff];
        const payload = buf.subarray(9, 9 + length);
        buf = buf.subarray(9 + length);
        if (type === 0x4 && !(flags & 0x1)) socket.write(frame(0x4, 0x1, 0, Buffer.alloc(0))); // SETTINGS ACK
        if (streamId !== 1) continue;
        if (type === 0x3) return done({ reset: payload.readUInt32BE(0), ended: false }); // RST_STREAM
        if ((type === 0x1 || type === 0x0) && flags & 0x1) return done({ reset: undefined, ended: true });
      }
    });
  });
}
