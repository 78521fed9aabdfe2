import { expect } from 'chai';
import { status as Status } from '@grpc/grpc-js';
import {
  BurrowError,
  MessageReader,
  MessageSizeGuard,
  decodeGrpcMessage,
  deadlineFromTimeout,
  encodeGrpcMessage,
  frameMessage,
  statusOfHeaders,
  statusOfReset,
  statusTrailers,
  timeoutHeader,
} from '@burrow/tunnel';

/** A 5-byte prefix declaring `length` (the body is not included). */
function prefix(length: number, compressed = 0): Buffer {
  const p = Buffer.alloc(5);
  p[0] = compressed;
  p.writeUInt32BE(length, 1);
  return p;
}

/** `data` cut into pieces of `size` bytes. */
function chunks(data: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < data.length; i += size) out.push(data.subarray(i, i + size));
  return out;
}

const messages = [Buffer.from('a'), Buffer.alloc(0), Buffer.alloc(300, 7), Buffer.from('last one')];
const stream = Buffer.concat(messages.map(frameMessage));

describe('grpc-wire', () => {
  describe('frameMessage', () => {
    it('writes an uncompressed 5-byte prefix with the big-endian length', () => {
      const framed = frameMessage(Buffer.from('hello'));
      expect([...framed.subarray(0, 5)]).to.deep.equal([0, 0, 0, 0, 5]);
      expect(framed.subarray(5).toString()).to.equal('hello');
    });
  });

  describe('MessageSizeGuard', () => {
    for (const size of [1, 2, 3, 4, 5, 6, 7, 301, stream.length]) {
      it(`follows every boundary with ${size}-byte chunks`, () => {
        const guard = new MessageSizeGuard(300);
        for (const c of chunks(stream, size)) expect(guard.check(c)).to.equal(undefined);
        expect(guard.messages).to.equal(messages.length);
        expect(guard.atBoundary).to.equal(true);
      });
    }

    it('is not at a boundary inside a prefix or a body', () => {
      const guard = new MessageSizeGuard(100);
      guard.check(prefix(10).subarray(0, 3));
      expect(guard.atBoundary).to.equal(false);
      guard.check(prefix(10).subarray(3));
      expect(guard.atBoundary).to.equal(false);
      guard.check(Buffer.alloc(9));
      expect(guard.atBoundary).to.equal(false);
      guard.check(Buffer.alloc(1));
      expect(guard.atBoundary).to.equal(true);
    });

    it('reports the first oversized declared length, many messages in one chunk', () => {
      const guard = new MessageSizeGuard(300);
      const data = Buffer.concat([stream, prefix(301), prefix(5000)]);
      expect(guard.check(data)).to.equal(301);
      expect(guard.messages).to.equal(messages.length + 1);
    });

    it('reports an oversized length from a prefix split into 1-byte chunks, before any body byte', () => {
      const guard = new MessageSizeGuard(1024);
      const data = Buffer.concat([frameMessage(Buffer.alloc(1024)), prefix(10 * 1024 * 1024)]);
      const results = chunks(data, 1).map((c) => guard.check(c));
      // The only report is on the last byte of the oversized prefix.
      expect(results.filter((r) => r !== undefined)).to.deep.equal([10 * 1024 * 1024]);
      expect(results[results.length - 1]).to.equal(10 * 1024 * 1024);
    });

    it('takes a message of exactly the limit', () => {
      const guard = new MessageSizeGuard(4);
      expect(guard.check(frameMessage(Buffer.alloc(4)))).to.equal(undefined);
      expect(guard.check(prefix(5))).to.equal(5);
    });
  });

  describe('MessageReader', () => {
    for (const size of [1, 3, 5, 6, 301, stream.length]) {
      it(`returns whole messages in order with ${size}-byte chunks`, () => {
        const reader = new MessageReader(300);
        const got: Buffer[] = [];
        for (const c of chunks(stream, size)) got.push(...reader.push(c));
        expect(got.map((m) => m.toString('hex'))).to.deep.equal(messages.map((m) => m.toString('hex')));
        expect(reader.empty).to.equal(true);
      });
    }

    it('is not empty while a message is partial', () => {
      const reader = new MessageReader(300);
      expect(reader.push(frameMessage(Buffer.from('abc')).subarray(0, 6))).to.deep.equal([]);
      expect(reader.empty).to.equal(false);
    });

    it('refuses an oversized message from its prefix alone, with RESOURCE_EXHAUSTED', () => {
      const reader = new MessageReader(300);
      const bytes = Buffer.concat([frameMessage(Buffer.from('ok')), prefix(10 * 1024 * 1024)]);
      let thrown: unknown;
      try {
        for (const c of chunks(bytes, 1)) reader.push(c);
      } catch (err) {
        thrown = err;
      }
      expect(thrown).to.be.instanceOf(BurrowError);
      expect((thrown as BurrowError).code).to.equal(Status.RESOURCE_EXHAUSTED);
      expect((thrown as BurrowError).message).to.contain(String(10 * 1024 * 1024));
    });

    it('uses the tooLarge factory it was given', () => {
      const reader = new MessageReader(10, (n) => new BurrowError(Status.INTERNAL, `custom ${n}`));
      expect(() => reader.push(prefix(11))).to.throw(BurrowError, 'custom 11');
    });

    it('refuses a compressed message', () => {
      const reader = new MessageReader(300);
      expect(() => reader.push(Buffer.concat([prefix(1, 1), Buffer.from('x')])))
        .to.throw(BurrowError, 'compressed')
        .with.property('code', Status.INTERNAL);
    });
  });

  describe('grpc-timeout', () => {
    const now = 1_700_000_000_000;
    const cases: [string, number][] = [
      ['2H', 2 * 3_600_000],
      ['3M', 3 * 60_000],
      ['4S', 4000],
      ['250m', 250],
      ['1500u', 1.5],
      ['2000000n', 2],
      ['0m', 0],
      ['99999999S', 99_999_999_000],
    ];
    for (const [value, ms] of cases) {
      it(`reads ${value} as ${ms} ms`, () => {
        expect(deadlineFromTimeout(value, now)).to.equal(now + ms);
      });
    }

    it('reads the first value of a repeated header; Infinity when absent', () => {
      expect(deadlineFromTimeout(['10m', '20m'], now)).to.equal(now + 10);
      expect(deadlineFromTimeout(undefined, now)).to.equal(Number.POSITIVE_INFINITY);
    });

    for (const bad of ['', '10', 'm', '10x', '123456789m', '-5m', '1.5S', ' 5m', '5m ', '10 m', '0x10m', '1e3m']) {
      it(`refuses ${JSON.stringify(bad)} as malformed`, () => {
        expect(deadlineFromTimeout(bad, now)).to.equal(undefined);
      });
    }
    it('refuses an empty list of values', () => {
      expect(deadlineFromTimeout([], now)).to.equal(undefined);
    });

    it('formats the time left in whole milliseconds, rounded up', () => {
      expect(timeoutHeader(now + 1500, now)).to.equal('1500m');
      expect(timeoutHeader(now + 0.2, now)).to.equal('1m');
      expect(timeoutHeader(now + 10.01, now)).to.equal('11m');
    });

    it('never says 0 for time that is left (nor for a deadline just passed)', () => {
      expect(timeoutHeader(now + 0.0001, now)).to.equal('1m');
      expect(timeoutHeader(now, now)).to.equal('1m');
      expect(timeoutHeader(now - 50, now)).to.equal('1m');
    });

    it('has no header without a deadline', () => {
      expect(timeoutHeader(Number.POSITIVE_INFINITY, now)).to.equal(undefined);
    });

    it('switches to seconds past 27 hours and stays within 8 digits', () => {
      expect(timeoutHeader(now + 99_999_999, now)).to.equal('99999999m');
      expect(timeoutHeader(now + 100_000_000, now)).to.equal('100000S');
      expect(timeoutHeader(now + 100_000_001, now)).to.equal('100001S');
      expect(timeoutHeader(now + 10 * 365 * 86_400_000, now)).to.equal('99999999S');
    });

    it('round-trips: read back, never earlier than written and less than one unit later', () => {
      for (const left of [1, 999, 60_000, 3_600_000, 99_999_999, 100_000_000, 1_234_567_890]) {
        const header = timeoutHeader(now + left, now)!;
        const back = deadlineFromTimeout(header, now)!;
        expect(back, header).to.be.at.least(now + left);
        expect(back - (now + left), header).to.be.below(left < 100_000_000 ? 1 : 1000);
      }
    });
  });

  describe('grpc-message percent-encoding', () => {
    const samples = [
      'plain ascii',
      '100% sure',
      '%41 is not A',
      'line one\nline two\r\n\ttab',
      'Grüße, 日本語, emoji 🚀',
      '',
      '%',
      '~ and space and \u007f',
    ];
    for (const s of samples) {
      it(`round-trips ${JSON.stringify(s)}`, () => {
        const encoded = encodeGrpcMessage(s);
        expect(encoded).to.match(/^[\x20-\x7e]*$/);
        expect(decodeGrpcMessage(encoded)).to.equal(s);
      });
    }

    it('escapes % and bytes outside printable ASCII, nothing else', () => {
      expect(encodeGrpcMessage('a%b\né')).to.equal('a%25b%0A%C3%A9');
    });

    it('keeps malformed escapes as they are', () => {
      expect(decodeGrpcMessage('50%')).to.equal('50%');
      expect(decodeGrpcMessage('%zz and %4')).to.equal('%zz and %4');
      expect(decodeGrpcMessage('%c3%a9')).to.equal('é');
    });

    it('treats an absent message as empty', () => {
      expect(decodeGrpcMessage(undefined)).to.equal('');
    });
  });

  describe('statusOfHeaders', () => {
    it('reads code and decoded message', () => {
      expect(statusOfHeaders({ 'grpc-status': '5', 'grpc-message': 'not%20found %E2%9C%93' })).to.deep.equal({
        code: 5,
        details: 'not found ✓',
      });
      expect(statusOfHeaders({ 'grpc-status': '0' })).to.deep.equal({ code: 0, details: '' });
    });

    it('is undefined without grpc-status', () => {
      expect(statusOfHeaders({ 'content-type': 'application/grpc' })).to.equal(undefined);
      expect(statusOfHeaders(undefined)).to.equal(undefined);
    });

    for (const bad of ['17', '-1', 'abc', '1.5', '', ' ', '0x1', '1e1', '+3', ' 3']) {
      it(`maps the invalid code ${JSON.stringify(bad)} to UNKNOWN naming it`, () => {
        const s = statusOfHeaders({ 'grpc-status': bad, 'grpc-message': 'ignored' });
        expect(s?.code).to.equal(Status.UNKNOWN);
        expect(s?.details).to.contain('invalid grpc-status');
      });
    }

    it('builds trailers that statusOfHeaders reads back', () => {
      const t = statusTrailers(Status.NOT_FOUND, 'nicht gefunden: Ü%', { 'x-extra': 'kept' });
      expect(t['x-extra']).to.equal('kept');
      expect(statusOfHeaders(t as unknown as Record<string, string>)).to.deep.equal({
        code: Status.NOT_FOUND,
        details: 'nicht gefunden: Ü%',
      });
      expect(statusTrailers(0, '')).to.deep.equal({ 'grpc-status': '0' });
    });
  });

  describe('statusOfReset', () => {
    const cases: [number, boolean, Status][] = [
      [8, false, Status.CANCELLED],
      [7, false, Status.UNAVAILABLE],
      [11, false, Status.RESOURCE_EXHAUSTED],
      [12, false, Status.PERMISSION_DENIED],
      [2, false, Status.INTERNAL],
      [0, false, Status.INTERNAL],
      [8, true, Status.UNAVAILABLE],
    ];
    for (const [rst, gone, code] of cases) {
      it(`maps RST_STREAM ${rst}${gone ? ' on a lost connection' : ''} to ${Status[code]}`, () => {
        const e = statusOfReset(rst, gone, 'upstream u');
        expect(e.code).to.equal(code);
        expect(e.message).to.contain('upstream u');
      });
    }
  });
});
