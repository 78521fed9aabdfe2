import { expect } from 'chai';
import { status as Status } from '@grpc/grpc-js';
import {
  MAX_REPLICA_SET_SIZE,
  MAX_SESSION_FRAME_BYTES,
  PROTOCOL_VERSION,
  PROTOCOL_VERSIONS,
  ProtocolError,
  decodeSessionFrame,
  encodeSessionFrame,
  negotiateVersion,
  type SessionFrame,
} from '@burrow/tunnel';
import { mulberry32 } from './helpers/seeded-random';

/**
 * Session frames (tunnel.proto, version 4): the control stream's frames round-trip, their bounds
 * hold, and nothing a peer sends decodes to anything but a well-formed frame or a ProtocolError.
 * Calls are HTTP/2 streams now, so there are no call frames to test here (see stream-relay and
 * grpc-wire tests for the per-call wire).
 */

const roundTripSession = (f: SessionFrame): SessionFrame => decodeSessionFrame(encodeSessionFrame(f));

describe('frames: encode/decode', () => {
  describe('SessionFrame round trips', () => {
    const cases: [string, SessionFrame][] = [
      ['hello', { kind: 'hello', hello: { protocolVersions: [4, 5, 7], agentVersion: '1.2.3-rc.1' } }],
      ['hello with no versions', { kind: 'hello', hello: { protocolVersions: [], agentVersion: '' } }],
      [
        'welcome',
        {
          kind: 'welcome',
          welcome: {
            protocolVersion: 4,
            sessionId: '6f7c4c2e-1f7a-4c55-9b3a-1b1d3c5a9e01',
            maxMessageBytes: 16 * 1024 * 1024,
            brokerId: 'broker-ü',
          },
        },
      ],
      [
        'welcome with a > 2^32 message limit',
        { kind: 'welcome', welcome: { protocolVersion: 4, sessionId: 's', maxMessageBytes: 2 ** 40, brokerId: 'b' } },
      ],
      [
        'refused',
        { kind: 'refused', code: Status.FAILED_PRECONDITION, message: 'no common version: [4] and [1, 2, 3] 😀' },
      ],
      ['refused with an empty message', { kind: 'refused', code: Status.RESOURCE_EXHAUSTED, message: '' }],
      ['refused with OK (code 0 is a value, not an absent field)', { kind: 'refused', code: 0, message: 'x' }],
      ['credentials', { kind: 'credentials', certificateChainPem: '-----BEGIN CERTIFICATE-----\nAAAA\n' }],
      ['trust bundle with a > 2^32 version', { kind: 'trustBundle', pem: 'pem', version: 2 ** 40 }],
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
        expectProtocolError(() => decodeSessionFrame(bytes), `session frame ${bytes.toString('hex')}`);
      }
    });

    it('a Demand frame of versions 1-3 (field 3, reserved now) is a frame with no kind', () => {
      // SessionFrame.demand = { offers: 5 }, as a version 1-3 broker encoded it.
      const demand = Buffer.from([0x1a, 0x02, 0x08, 0x05]);
      expectProtocolError(() => decodeSessionFrame(demand), 'demand');
      expect(() => decodeSessionFrame(demand)).to.throw(/session frame with no kind/);
    });

    it('every truncation of a valid frame', () => {
      const frames: SessionFrame[] = [
        {
          kind: 'welcome',
          welcome: { protocolVersion: 4, sessionId: 'abc', maxMessageBytes: 1 << 20, brokerId: 'b' },
        },
        { kind: 'refused', code: Status.PERMISSION_DENIED, message: 'certificate of agent "x" is revoked' },
        { kind: 'hello', hello: { protocolVersions: [4, 5], agentVersion: '4.0.0' } },
      ];
      for (const frame of frames) {
        const bytes = encodeSessionFrame(frame);
        for (let n = 1; n < bytes.length; n++)
          expectProtocolError(
            () => decodeSessionFrame(bytes.subarray(0, n)),
            `${frame.kind} frame cut to ${n} of ${bytes.length} bytes`,
          );
      }
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
        expectProtocolError(() => decodeSessionFrame(g), `session frame ${g.toString('hex')}`);
      }
    });

    describe('bounds (tunnel.proto, "The connection of a tunnel")', () => {
      const rejects = (frame: SessionFrame, message: RegExp): void => {
        const bytes = encodeSessionFrame(frame);
        expectProtocolError(() => decodeSessionFrame(bytes), frame.kind);
        expect(() => decodeSessionFrame(bytes)).to.throw(message);
      };
      const chars = (n: number): string => 'x'.repeat(n);

      it(`a frame over ${MAX_SESSION_FRAME_BYTES} bytes is refused from its length, before decoding`, () => {
        // Not a frame at all: the size check comes first, so garbage of that length is refused by it.
        const big = Buffer.alloc(MAX_SESSION_FRAME_BYTES + 1, 0xff);
        expectProtocolError(() => decodeSessionFrame(big), 'oversized');
        expect(() => decodeSessionFrame(big)).to.throw(
          new RegExp(`session frame of ${MAX_SESSION_FRAME_BYTES + 1} bytes; at most ${MAX_SESSION_FRAME_BYTES}`),
        );
        // A real frame just within the bound decodes.
        const pem = chars(MAX_SESSION_FRAME_BYTES - 8);
        const fits = encodeSessionFrame({ kind: 'credentials', certificateChainPem: pem });
        expect(fits.length).to.be.at.most(MAX_SESSION_FRAME_BYTES);
        expect(decodeSessionFrame(fits)).to.deep.equal({ kind: 'credentials', certificateChainPem: pem });
        const over = encodeSessionFrame({ kind: 'credentials', certificateChainPem: chars(MAX_SESSION_FRAME_BYTES) });
        expectProtocolError(() => decodeSessionFrame(over), 'oversized credentials');
      });

      it('Hello: at most 16 versions and an agent_version of at most 256 characters', () => {
        const sixteen = Array.from({ length: 16 }, (_, i) => i + 1);
        const ok: SessionFrame = { kind: 'hello', hello: { protocolVersions: sixteen, agentVersion: chars(256) } };
        expect(roundTripSession(ok)).to.deep.equal(ok);
        rejects(
          { kind: 'hello', hello: { protocolVersions: [...sixteen, 17], agentVersion: '' } },
          /Hello lists 17 versions; at most 16/,
        );
        rejects(
          { kind: 'hello', hello: { protocolVersions: [4], agentVersion: chars(257) } },
          /Hello agent_version is 257 characters; at most 256/,
        );
      });

      it('Welcome: session_id and broker_id of at most 256 characters', () => {
        const welcome = { protocolVersion: 4, sessionId: chars(256), maxMessageBytes: 1, brokerId: chars(256) };
        expect(roundTripSession({ kind: 'welcome', welcome })).to.deep.equal({ kind: 'welcome', welcome });
        rejects({ kind: 'welcome', welcome: { ...welcome, sessionId: chars(257) } }, /Welcome session_id is 257/);
        rejects({ kind: 'welcome', welcome: { ...welcome, brokerId: chars(257) } }, /Welcome broker_id is 257/);
      });

      it('Refused message and Drain reason: at most 1024 characters', () => {
        const refused: SessionFrame = { kind: 'refused', code: Status.INTERNAL, message: chars(1024) };
        expect(roundTripSession(refused)).to.deep.equal(refused);
        rejects({ kind: 'refused', code: Status.INTERNAL, message: chars(1025) }, /Refused message is 1025/);
        const drain: SessionFrame = { kind: 'drain', reason: chars(1024) };
        expect(roundTripSession(drain)).to.deep.equal(drain);
        rejects({ kind: 'drain', reason: chars(1025) }, /Drain reason is 1025/);
      });

      it('BrokerEndpoint: broker_id of at most 256 characters, address of at most 300', () => {
        const host = `${'h'.repeat(290)}:65535`; // 296 characters, HOST:PORT
        const ok: SessionFrame = { kind: 'brokers', brokers: [{ brokerId: chars(256), address: host }] };
        expect(roundTripSession(ok)).to.deep.equal(ok);
        rejects(
          { kind: 'brokers', brokers: [{ brokerId: chars(257), address: 'h:1' }] },
          /entry 0 broker_id is 257 characters; at most 256/,
        );
        rejects(
          { kind: 'brokers', brokers: [{ brokerId: 'b', address: `${'h'.repeat(296)}:1234` }] },
          /entry 0 address is 301 characters; at most 300/,
        );
      });

      it('a bound breached by a long value names its length, never the value', () => {
        const secret = `${'s'.repeat(2000)}-SECRET`;
        expect(() => decodeSessionFrame(encodeSessionFrame({ kind: 'drain', reason: secret })))
          .to.throw(ProtocolError)
          .that.satisfies((e: Error) => !e.message.includes('SECRET'));
      });
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
      const sessionKinds = new Set(['hello', 'welcome', 'refused', 'drain', 'credentials', 'trustBundle', 'brokers']);
      let rejected = 0;
      for (let i = 0; i < 5000; i++) {
        const bytes = Buffer.alloc(1 + Math.floor(rnd() * 64));
        for (let j = 0; j < bytes.length; j++) bytes[j] = Math.floor(rnd() * 256);
        try {
          const f = decodeSessionFrame(bytes);
          expect(sessionKinds.has(f.kind), `input #${i} ${bytes.toString('hex')} decoded to kind ${f.kind}`).to.equal(
            true,
          );
        } catch (err) {
          if (!(err instanceof ProtocolError))
            throw new Error(`input #${i} ${bytes.toString('hex')} threw ${String(err)}`);
          rejected++;
        }
      }
      // Random bytes are overwhelmingly not valid frames.
      expect(rejected).to.be.greaterThan(2500);
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

    it('this build speaks version 4 only: versions 1-3 share none with it', () => {
      expect(PROTOCOL_VERSIONS).to.deep.equal([4]);
      expect(PROTOCOL_VERSION).to.equal(4);
      expect(negotiateVersion(PROTOCOL_VERSIONS, [1, 2, 3])).to.equal(undefined);
      expect(negotiateVersion(PROTOCOL_VERSIONS, [1, 2, 3, 4, 5])).to.equal(4);
    });
  });
});
