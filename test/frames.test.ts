import { randomBytes } from 'node:crypto';
import { expect } from 'chai';
import { status as Status } from '@grpc/grpc-js';
import {
  MAX_REPLICA_SET_SIZE,
  PROTOCOL_VERSION,
  PROTOCOL_VERSIONS,
  REPLICA_SET_VERSION,
  ProtocolError,
  decodeCallFrame,
  decodeSessionFrame,
  encodeCallFrame,
  encodeSessionFrame,
  negotiateVersion,
  type CallFrame,
  type SessionFrame,
  type WireMetadataEntry,
} from '@burrow/tunnel';
import { mulberry32 } from './helpers/seeded-random';

/** Metadata as comparable plain data (values as hex, so Buffer vs Uint8Array does not matter). */
const mdPlain = (md: readonly WireMetadataEntry[]): [string, string][] =>
  md.map((e) => [e.key, Buffer.from(e.value).toString('hex')]);

/** A frame as comparable plain data. */
function plainCall(f: CallFrame): unknown {
  switch (f.kind) {
    case 'start':
      return { kind: f.kind, ...f.start, metadata: mdPlain(f.start.metadata) };
    case 'message':
      return { kind: f.kind, data: Buffer.from(f.data).toString('hex') };
    case 'headers':
      return { kind: f.kind, metadata: mdPlain(f.metadata) };
    case 'trailers':
      return { kind: f.kind, ...f.trailers, metadata: mdPlain(f.trailers.metadata) };
    default:
      return f;
  }
}

const roundTripCall = (f: CallFrame): CallFrame => decodeCallFrame(encodeCallFrame(f));
const roundTripSession = (f: SessionFrame): SessionFrame => decodeSessionFrame(encodeSessionFrame(f));

const BINARY_MD: WireMetadataEntry[] = [
  { key: 'x-text', value: Buffer.from('plain value') },
  { key: 'x-raw-bin', value: Buffer.from([0x00, 0xff, 0x80, 0x00, 0x7f, 0x0a, 0x0d]) },
  { key: 'x-text', value: Buffer.from('repeated key keeps order') },
  { key: 'x-empty-bin', value: Buffer.alloc(0) },
  { key: 'grpc-status-details-bin', value: randomBytes(300) },
];

describe('frames: encode/decode', () => {
  describe('CallFrame round trips', () => {
    const cases: [string, CallFrame][] = [
      [
        'start with metadata and deadline',
        { kind: 'start', start: { method: '/pkg.v1.Svc/Do', metadata: BINARY_MD, timeoutMs: 2500, callId: 'abc-1' } },
      ],
      [
        'start without deadline or metadata',
        { kind: 'start', start: { method: '/a.B/C', metadata: [], timeoutMs: 0, callId: '' } },
      ],
      [
        'start with a 30-day timeout (> 2^32 ms)',
        { kind: 'start', start: { method: '/a.B/C', metadata: [], timeoutMs: 30 * 24 * 3600 * 1000, callId: 'x' } },
      ],
      [
        'start with the largest safe timeout',
        { kind: 'start', start: { method: '/a.B/C', metadata: [], timeoutMs: Number.MAX_SAFE_INTEGER, callId: 'x' } },
      ],
      ['message of 0 bytes', { kind: 'message', data: Buffer.alloc(0) }],
      ['message of 1 byte 0x00', { kind: 'message', data: Buffer.from([0]) }],
      ['message of 1 MiB random bytes', { kind: 'message', data: randomBytes(1024 * 1024) }],
      ['halfClose', { kind: 'halfClose' }],
      ['cancel with reason', { kind: 'cancel', reason: 'deadline exceeded' }],
      ['cancel without reason', { kind: 'cancel', reason: '' }],
      ['headers with binary metadata', { kind: 'headers', metadata: BINARY_MD }],
      ['headers empty', { kind: 'headers', metadata: [] }],
      ['trailers OK, empty', { kind: 'trailers', trailers: { code: 0, message: '', metadata: [] } }],
      [
        'trailers with non-BMP unicode and whitespace kept',
        {
          kind: 'trailers',
          trailers: { code: Status.FAILED_PRECONDITION, message: '  tab\t😀 𝄞 \n ', metadata: BINARY_MD },
        },
      ],
      [
        'trailers with code 16',
        { kind: 'trailers', trailers: { code: Status.UNAUTHENTICATED, message: 'ünïcödé ✓', metadata: [] } },
      ],
    ];
    for (const [name, frame] of cases) {
      it(name, () => {
        const back = roundTripCall(frame);
        expect(plainCall(back)).to.deep.equal(plainCall(frame));
      });
    }

    it('1 MiB message is byte-exact and decodes to a Buffer', () => {
      const data = randomBytes(1024 * 1024);
      const back = roundTripCall({ kind: 'message', data });
      if (back.kind !== 'message') throw new Error(`decoded ${back.kind}`);
      expect(Buffer.isBuffer(back.data)).to.equal(true);
      expect(back.data.length).to.equal(data.length);
      expect(back.data.equals(data)).to.equal(true);
    });

    it('a 0-byte message is still a message frame, not a frame with no kind', () => {
      const bytes = encodeCallFrame({ kind: 'message', data: Buffer.alloc(0) });
      expect(bytes.length).to.be.greaterThan(0);
      const back = decodeCallFrame(bytes);
      expect(back.kind).to.equal('message');
      if (back.kind === 'message') expect(back.data.length).to.equal(0);
    });

    it('trailers message survives as exactly the same UTF-16 string', () => {
      const message = '  tab\t😀 𝄞 \n ';
      const back = roundTripCall({ kind: 'trailers', trailers: { code: 2, message, metadata: [] } });
      if (back.kind !== 'trailers') throw new Error(`decoded ${back.kind}`);
      expect(back.trailers.message).to.equal(message);
      expect(back.trailers.message.length).to.equal(message.length);
    });
  });

  describe('SessionFrame round trips', () => {
    const cases: [string, SessionFrame][] = [
      [
        'hello',
        { kind: 'hello', hello: { protocolVersions: [1, 2, 7], agentVersion: '1.2.3-rc.1', minIdleOffers: 4 } },
      ],
      [
        'hello with no versions',
        { kind: 'hello', hello: { protocolVersions: [], agentVersion: '', minIdleOffers: 0 } },
      ],
      [
        'welcome',
        {
          kind: 'welcome',
          welcome: {
            protocolVersion: 1,
            sessionId: '6f7c4c2e-1f7a-4c55-9b3a-1b1d3c5a9e01',
            maxMessageBytes: 16 * 1024 * 1024,
            brokerId: 'broker-ü',
          },
        },
      ],
      [
        'welcome with a > 2^32 message limit',
        { kind: 'welcome', welcome: { protocolVersion: 1, sessionId: 's', maxMessageBytes: 2 ** 40, brokerId: 'b' } },
      ],
      ['demand', { kind: 'demand', offers: 5 }],
      ['demand of 0', { kind: 'demand', offers: 0 }],
      ['drain', { kind: 'drain', reason: 'broker shutting down 😀' }],
      ['drain without reason', { kind: 'drain', reason: '' }],
      [
        'brokers: a replica set of hosts, IPv4 and IPv6',
        {
          kind: 'brokers',
          brokers: [
            { brokerId: 'broker-a', address: 'broker-a.example.internal:7443' },
            { brokerId: 'b', address: '10.0.0.2:7443' },
            { brokerId: 'brökër-c', address: '[fd00::3]:1' },
          ],
        },
      ],
      ['brokers: an empty set', { kind: 'brokers', brokers: [] }],
      [
        `brokers: ${MAX_REPLICA_SET_SIZE} entries, the most allowed`,
        {
          kind: 'brokers',
          brokers: Array.from({ length: MAX_REPLICA_SET_SIZE }, (_, i) => ({
            brokerId: `b${i}`,
            address: `10.0.0.${i}:65535`,
          })),
        },
      ],
    ];
    for (const [name, frame] of cases) {
      it(name, () => {
        expect(roundTripSession(frame)).to.deep.equal(frame);
      });
    }
  });

  describe('malformed input throws ProtocolError', () => {
    const expectProtocolError = (fn: () => unknown, what: string): void => {
      let thrown: unknown;
      try {
        fn();
      } catch (err) {
        thrown = err;
      }
      expect(thrown, what).to.be.instanceOf(ProtocolError);
      expect((thrown as ProtocolError).code, what).to.equal(Status.INTERNAL);
    };

    it('a frame with no oneof set (empty bytes, or only unknown fields)', () => {
      for (const bytes of [Buffer.alloc(0), Buffer.from([0x78, 0x01]), Buffer.from([0xa2, 0x06, 0x00])]) {
        expectProtocolError(() => decodeCallFrame(bytes), `call frame ${bytes.toString('hex')}`);
        expectProtocolError(() => decodeSessionFrame(bytes), `session frame ${bytes.toString('hex')}`);
      }
    });

    it('every truncation of a valid frame', () => {
      const call = encodeCallFrame({
        kind: 'start',
        start: { method: '/pkg.Svc/M', metadata: BINARY_MD, timeoutMs: 99_999, callId: 'id' },
      });
      for (let n = 1; n < call.length; n++)
        expectProtocolError(
          () => decodeCallFrame(call.subarray(0, n)),
          `call frame cut to ${n} of ${call.length} bytes`,
        );
      const session = encodeSessionFrame({
        kind: 'welcome',
        welcome: { protocolVersion: 1, sessionId: 'abc', maxMessageBytes: 1 << 20, brokerId: 'b' },
      });
      for (let n = 1; n < session.length; n++)
        expectProtocolError(
          () => decodeSessionFrame(session.subarray(0, n)),
          `session frame cut to ${n} of ${session.length} bytes`,
        );
    });

    it('known garbage: bad varints, lengths past the end, invalid wire types', () => {
      const garbage = [
        Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        Buffer.from([0x0a, 0x05, 0x01]),
        Buffer.from([0x12, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        Buffer.from([0x0f]), // wire type 7 does not exist
        Buffer.from('this is not a protobuf frame at all'),
      ];
      for (const g of garbage) {
        expectProtocolError(() => decodeCallFrame(g), `call frame ${g.toString('hex')}`);
        expectProtocolError(() => decodeSessionFrame(g), `session frame ${g.toString('hex')}`);
      }
    });

    it('a start frame without a method path', () => {
      const bytes = encodeCallFrame({ kind: 'start', start: { method: '', metadata: [], timeoutMs: 0, callId: '' } });
      expectProtocolError(() => decodeCallFrame(bytes), 'start without method');
      const relative = encodeCallFrame({
        kind: 'start',
        start: { method: 'pkg.Svc/M', metadata: [], timeoutMs: 0, callId: '' },
      });
      expectProtocolError(() => decodeCallFrame(relative), 'start with a method not starting with /');
    });

    describe('a Brokers frame that breaks the rules (tunnel.proto, "Brokers")', () => {
      const rejects = (brokers: { brokerId: string; address: string }[], message: RegExp): void => {
        const bytes = encodeSessionFrame({ kind: 'brokers', brokers });
        expectProtocolError(() => decodeSessionFrame(bytes), JSON.stringify(brokers).slice(0, 80));
        expect(() => decodeSessionFrame(bytes)).to.throw(message);
      };
      for (const address of [
        'broker-a',
        'broker-a:',
        ':7443',
        'broker-a:7443:1',
        'broker-a:0',
        'broker-a:65536',
        'broker-a:123456',
        'fd00::3:7443',
        'http://broker-a:7443',
        'broker a:7443',
        '',
      ]) {
        it(`address ${JSON.stringify(address)}: a protocol error naming it`, () => {
          rejects(
            [
              { brokerId: 'ok', address: 'ok:1' },
              { brokerId: 'bad', address },
            ],
            new RegExp(
              `entry 1 \\(broker "bad"\\): address ` +
                `"${address.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}" is not HOST:PORT`,
            ),
          );
        });
      }
      it(`more than ${MAX_REPLICA_SET_SIZE} entries`, () => {
        rejects(
          Array.from({ length: MAX_REPLICA_SET_SIZE + 1 }, (_, i) => ({ brokerId: `b${i}`, address: 'h:1' })),
          new RegExp(`lists ${MAX_REPLICA_SET_SIZE + 1} brokers; at most ${MAX_REPLICA_SET_SIZE}`),
        );
      });
      it('an entry without a broker id', () => {
        rejects([{ brokerId: '', address: 'h:1' }], /entry 0 has no broker id/);
      });
      it('a broker id listed twice', () => {
        rejects(
          [
            { brokerId: 'x', address: 'h:1' },
            { brokerId: 'x', address: 'g:1' },
          ],
          /lists broker "x" twice/,
        );
      });
    });

    it('random garbage never throws anything but ProtocolError, and what decodes is a well-formed frame', () => {
      const rnd = mulberry32(0xb0220);
      const callKinds = new Set(['start', 'message', 'halfClose', 'cancel', 'headers', 'trailers']);
      const sessionKinds = new Set(['hello', 'welcome', 'demand', 'drain', 'credentials', 'trustBundle', 'brokers']);
      let rejected = 0;
      for (let i = 0; i < 5000; i++) {
        const bytes = Buffer.alloc(1 + Math.floor(rnd() * 64));
        for (let j = 0; j < bytes.length; j++) bytes[j] = Math.floor(rnd() * 256);
        for (const [decode, kinds] of [
          [decodeCallFrame, callKinds],
          [decodeSessionFrame, sessionKinds],
        ] as const) {
          try {
            const f = decode(bytes) as { kind: string };
            expect(kinds.has(f.kind), `input #${i} ${bytes.toString('hex')} decoded to kind ${f.kind}`).to.equal(true);
          } catch (err) {
            if (!(err instanceof ProtocolError))
              throw new Error(`input #${i} ${bytes.toString('hex')} threw ${String(err)}`);
            rejected++;
          }
        }
      }
      // Random bytes are overwhelmingly not valid frames.
      expect(rejected).to.be.greaterThan(5000);
    });
  });

  describe('version negotiation', () => {
    it('picks the highest common version, or none', () => {
      expect(negotiateVersion([1], [1, 2])).to.equal(1);
      expect(negotiateVersion([1, 2], [1])).to.equal(1);
      expect(negotiateVersion([1, 2, 3], [3, 1, 2])).to.equal(3);
      expect(negotiateVersion([1, 3], [2, 3, 4])).to.equal(3);
      expect(negotiateVersion([1], [2])).to.equal(undefined);
      expect(negotiateVersion([1], [])).to.equal(undefined);
      expect(negotiateVersion([], [1])).to.equal(undefined);
    });

    it('this build speaks versions 1, 2 and 3; the replica set arrived in 3', () => {
      expect(PROTOCOL_VERSIONS).to.deep.equal([1, 2, 3]);
      expect(PROTOCOL_VERSION).to.equal(3);
      expect(REPLICA_SET_VERSION).to.equal(3);
    });
  });
});
