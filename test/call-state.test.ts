import { EventEmitter } from 'node:events';
import { expect } from 'chai';
import { Metadata, status as Status, type StatusObject } from '@grpc/grpc-js';
import {
  BurrowError,
  CallStream,
  INITIAL_CALL_STATE,
  ProtocolError,
  answerLocally,
  decodeCallFrame,
  encodeCallFrame,
  isCallDone,
  transition,
  type CallFrame,
  type CallState,
  type CallStreamHandlers,
  type FrameSender,
} from '@burrow/tunnel';

/**
 * Unit tests of the forwarded-call state machine (packages/tunnel/src/call-state.ts) against the
 * order rules written in tunnel.proto's `CallFrame` comment, and of CallStream driven through a
 * fake duplex that implements exactly what CallStream touches.
 */

type Kind = CallFrame['kind'];
/** A frame as `o:kind` (sent by the originator) or `a:kind` (sent by the answerer). */
type Step = `${'o' | 'a'}:${Kind}`;

const KINDS: readonly Kind[] = ['start', 'message', 'halfClose', 'cancel', 'headers', 'trailers'];
const ALL_STEPS: readonly Step[] = KINDS.flatMap((k) => [`o:${k}`, `a:${k}`] as Step[]);

const senderOf = (s: Step): FrameSender => (s.startsWith('o:') ? 'originator' : 'answerer');
const kindOf = (s: Step): Kind => s.slice(2) as Kind;

interface RunResult {
  state: CallState;
  delivered: boolean[];
}

/** Runs `steps` through transition(); throws whatever transition() throws. */
function run(steps: readonly Step[]): RunResult {
  let state = INITIAL_CALL_STATE;
  const delivered: boolean[] = [];
  for (const s of steps) {
    const t = transition(state, senderOf(s), kindOf(s));
    state = t.state;
    delivered.push(t.deliver);
  }
  return { state, delivered };
}

/** The index of the step that transition() rejects, or -1; any other exception is rethrown. */
function firstError(steps: readonly Step[]): { index: number; error?: ProtocolError } {
  let state = INITIAL_CALL_STATE;
  for (let i = 0; i < steps.length; i++) {
    try {
      state = transition(state, senderOf(steps[i]!), kindOf(steps[i]!)).state;
    } catch (err) {
      if (err instanceof ProtocolError) return { index: i, error: err };
      throw err;
    }
  }
  return { index: -1 };
}

/**
 * An independent reference model written from the proto comment, not from call-state.ts:
 *   originator: Start Message* HalfClose? with Cancel allowed after Start; nothing after Cancel;
 *               after HalfClose only Cancel.
 *   answerer:   Headers? Message* Trailers; nothing after Trailers; nothing before the originator's Start.
 *   races:      originator frames after the answerer's Trailers are legal and dropped;
 *               answerer frames after the originator's Cancel are legal and dropped.
 * Returns `undefined` when the sequence is illegal, else the deliver flag of every step and whether
 * the call is done.
 */
function reference(steps: readonly Step[]): { delivered: boolean[]; done: boolean } | undefined {
  let started = false,
    halfClosed = false,
    cancelled = false;
  let answered = false /* headers or message */,
    trailers = false;
  const delivered: boolean[] = [];
  for (const s of steps) {
    const k = kindOf(s);
    if (senderOf(s) === 'originator') {
      if (k === 'headers' || k === 'trailers' || cancelled) return undefined;
      if (k === 'start') {
        if (started) return undefined;
        started = true;
        delivered.push(true);
        continue;
      }
      if (!started) return undefined;
      if (k === 'message' && halfClosed) return undefined;
      if (k === 'halfClose') {
        if (halfClosed) return undefined;
        halfClosed = true;
      }
      if (k === 'cancel') cancelled = true;
      delivered.push(!trailers);
    } else {
      if (k === 'start' || k === 'halfClose' || k === 'cancel') return undefined;
      if (!started || trailers) return undefined;
      if (k === 'headers') {
        if (answered) return undefined;
        answered = true;
      }
      if (k === 'message') answered = true;
      if (k === 'trailers') trailers = true;
      delivered.push(!cancelled);
    }
  }
  return { delivered, done: trailers || cancelled };
}

describe('call state machine: transition() and isCallDone()', () => {
  describe('legal sequences', () => {
    // [sequence, deliver flags, done at the end]
    const legal: [Step[], boolean[], boolean][] = [
      [['o:start'], [true], false],
      [['o:start', 'o:message', 'o:message', 'o:halfClose'], [true, true, true, true], false],
      [['o:start', 'o:halfClose', 'a:trailers'], [true, true, true], true],
      [
        ['o:start', 'o:halfClose', 'a:headers', 'a:message', 'a:message', 'a:trailers'],
        [true, true, true, true, true, true],
        true,
      ],
      [
        ['o:start', 'a:headers', 'o:message', 'a:message', 'o:message', 'a:message', 'o:halfClose', 'a:trailers'],
        Array(8).fill(true),
        true,
      ],
      [['o:start', 'a:message', 'a:trailers'], [true, true, true], true], // Headers is optional
      [['o:start', 'a:trailers'], [true, true], true], // Trailers-only response, before HalfClose
      [['o:start', 'o:cancel'], [true, true], true],
      [['o:start', 'o:message', 'o:cancel'], [true, true, true], true],
      [['o:start', 'o:halfClose', 'o:cancel'], [true, true, true], true], // Cancel may follow HalfClose
      [['o:start', 'a:headers', 'o:cancel', 'a:trailers'], [true, true, true, false], true],
      // Allowed races: originator frames crossing the answerer's Trailers are dropped, not errors.
      [['o:start', 'a:trailers', 'o:message'], [true, true, false], true],
      [['o:start', 'a:trailers', 'o:halfClose'], [true, true, false], true],
      [['o:start', 'a:trailers', 'o:cancel'], [true, true, false], true],
      [
        ['o:start', 'a:trailers', 'o:message', 'o:message', 'o:halfClose', 'o:cancel'],
        [true, true, false, false, false, false],
        true,
      ],
      // Allowed races: answerer frames in flight when the originator cancelled are dropped.
      [['o:start', 'o:cancel', 'a:headers'], [true, true, false], true],
      [['o:start', 'o:cancel', 'a:message'], [true, true, false], true],
      [['o:start', 'o:cancel', 'a:trailers'], [true, true, false], true],
      [['o:start', 'o:cancel', 'a:headers', 'a:message', 'a:trailers'], [true, true, false, false, false], true],
    ];
    for (const [steps, deliver, done] of legal) {
      it(`${steps.join(' ')} -> deliver [${deliver.map(Number).join('')}], done=${done}`, () => {
        const r = run(steps);
        expect(r.delivered).to.deep.equal(deliver);
        expect(isCallDone(r.state)).to.equal(done);
      });
    }

    it('is not done before Trailers or Cancel, whatever else happened', () => {
      const r = run(['o:start', 'a:headers', 'a:message', 'o:message', 'o:halfClose']);
      expect(r.state).to.deep.equal({ request: 'half-closed', response: 'streaming' });
      expect(isCallDone(r.state)).to.equal(false);
      expect(isCallDone(INITIAL_CALL_STATE)).to.equal(false);
    });

    it('does not mutate the state it is given', () => {
      const before = { request: 'open', response: 'pending' } as const;
      const copy = { ...before };
      transition(before, 'answerer', 'headers');
      transition(before, 'originator', 'halfClose');
      expect(before).to.deep.equal(copy);
    });
  });

  describe('illegal sequences throw ProtocolError (INTERNAL) at the offending frame', () => {
    // [name, sequence]; the last step is the one that must be rejected.
    const illegal: [string, Step[]][] = [
      ['message before start', ['o:message']],
      ['half-close before start', ['o:halfClose']],
      ['cancel before start', ['o:cancel']],
      ['second start', ['o:start', 'o:start']],
      ['second start after messages', ['o:start', 'o:message', 'o:start']],
      ['half-close twice', ['o:start', 'o:halfClose', 'o:halfClose']],
      ['message after half-close', ['o:start', 'o:halfClose', 'o:message']],
      ['start after half-close', ['o:start', 'o:halfClose', 'o:start']],
      ['message after cancel', ['o:start', 'o:cancel', 'o:message']],
      ['half-close after cancel', ['o:start', 'o:cancel', 'o:halfClose']],
      ['cancel after cancel', ['o:start', 'o:cancel', 'o:cancel']],
      ['start after cancel', ['o:start', 'o:cancel', 'o:start']],
      ['message after cancel, even after trailers', ['o:start', 'a:trailers', 'o:cancel', 'o:message']],
      ['headers after messages', ['o:start', 'a:message', 'a:headers']],
      ['headers twice', ['o:start', 'a:headers', 'a:headers']],
      ['headers after trailers', ['o:start', 'a:trailers', 'a:headers']],
      ['message after trailers', ['o:start', 'a:trailers', 'a:message']],
      ['trailers after trailers', ['o:start', 'a:headers', 'a:trailers', 'a:trailers']],
      ['answerer headers before start', ['a:headers']],
      ['answerer message before start', ['a:message']],
      ['answerer trailers before start', ['a:trailers']],
      ['start sent by the answerer', ['a:start']],
      ['start sent by the answerer after start', ['o:start', 'a:start']],
      ['half-close sent by the answerer', ['o:start', 'a:halfClose']],
      ['cancel sent by the answerer', ['o:start', 'a:cancel']],
      ['headers sent by the originator', ['o:start', 'o:headers']],
      ['headers sent by the originator before start', ['o:headers']],
      ['trailers sent by the originator', ['o:start', 'o:trailers']],
    ];
    for (const [name, steps] of illegal) {
      it(`${name}: ${steps.join(' ')}`, () => {
        const { index, error } = firstError(steps);
        expect(index, 'rejected step').to.equal(steps.length - 1);
        expect(error).to.be.instanceOf(ProtocolError);
        expect(error!.code).to.equal(Status.INTERNAL);
        expect(error!.message).to.match(/^tunnel protocol error: /);
      });
    }
  });

  it('agrees with a reference model of the proto rules on every sequence of up to 7 frames', () => {
    // Depth-first over every sequence of (sender, kind) pairs; illegal prefixes are not extended
    // (the state after an error is undefined). Checks legality, deliver flags and isCallDone.
    let legalCount = 0,
      illegalCount = 0;
    const visit = (prefix: Step[]): void => {
      for (const step of ALL_STEPS) {
        const seq = [...prefix, step];
        const want = reference(seq);
        const { index } = firstError(seq);
        if (!want) {
          expect(index, `${seq.join(' ')} must be rejected at its last frame`).to.equal(seq.length - 1);
          illegalCount++;
          continue;
        }
        expect(index, `${seq.join(' ')} must be legal`).to.equal(-1);
        const got = run(seq);
        expect(got.delivered, `deliver flags of ${seq.join(' ')}`).to.deep.equal(want.delivered);
        expect(isCallDone(got.state), `isCallDone after ${seq.join(' ')}`).to.equal(want.done);
        legalCount++;
        if (seq.length < 7) visit(seq);
      }
    };
    visit([]);
    // Guards against a vacuous walk (e.g. a reference that rejects everything).
    expect(legalCount).to.be.greaterThan(1000);
    expect(illegalCount).to.be.greaterThan(1000);
  });

  describe('reusable streams (protocol version 2)', () => {
    /**
     * Reference for reusable mode, written from tunnel.proto: the frames are one single-call
     * sequence after another; a call ends when the originator has sent HalfClose or Cancel and
     * the answerer Trailers, and the next frame belongs to the next call. Returns undefined when
     * illegal, else deliver flags and the indices of the frames that ended a call.
     */
    function reusableReference(steps: readonly Step[]): { delivered: boolean[]; endedAt: number[] } | undefined {
      const delivered: boolean[] = [];
      const endedAt: number[] = [];
      let call: Step[] = [];
      // After a call the originator half-closed, its Cancel may still come (it crossed the
      // Trailers): legal once, dropped, and not the start of the next call.
      let lateCancel = false;
      for (let i = 0; i < steps.length; i++) {
        if (call.length === 0 && lateCancel && steps[i] === 'o:cancel') {
          delivered.push(false);
          lateCancel = false;
          continue;
        }
        lateCancel = false;
        call.push(steps[i]!);
        const r = reference(call);
        if (!r) return undefined;
        delivered.push(r.delivered[r.delivered.length - 1]!);
        const originatorDone = call.some((s) => s === 'o:halfClose' || s === 'o:cancel');
        if (originatorDone && call.includes('a:trailers')) {
          endedAt.push(i);
          lateCancel = !call.includes('o:cancel');
          call = [];
        }
      }
      return { delivered, endedAt };
    }

    function runReusable(steps: readonly Step[]): {
      index: number;
      delivered: boolean[];
      endedAt: number[];
      state: CallState;
    } {
      let state = INITIAL_CALL_STATE;
      const delivered: boolean[] = [];
      const endedAt: number[] = [];
      for (let i = 0; i < steps.length; i++) {
        let t: ReturnType<typeof transition>;
        try {
          t = transition(state, senderOf(steps[i]!), kindOf(steps[i]!), true);
        } catch (err) {
          if (err instanceof ProtocolError) return { index: i, delivered, endedAt, state };
          throw err;
        }
        state = t.state;
        delivered.push(t.deliver);
        if (t.callEnded) endedAt.push(i);
      }
      return { index: -1, delivered, endedAt, state };
    }

    it(
      'carries calls one after the other: each ends at the frame ' +
        'that completes both halves, then Start is legal again',
      () => {
        const seq: Step[] = [
          'o:start',
          'o:halfClose',
          'a:headers',
          'a:message',
          'a:trailers', //        a unary call
          'o:start',
          'o:message',
          'o:cancel',
          'a:message',
          'a:trailers', //           cancelled; Trailers free the stream
          'o:start',
          'a:trailers',
          'o:message',
          'o:cancel', //                        answerer first; originator's Cancel frees it
          'o:start',
          'o:halfClose',
        ];
        const r = runReusable(seq);
        expect(r.index).to.equal(-1);
        expect(r.endedAt).to.deep.equal([4, 9, 13]);
        expect(r.delivered).to.deep.equal([
          true,
          true,
          true,
          true,
          true,
          true,
          true,
          true,
          false,
          false,
          true,
          true,
          false,
          false,
          true,
          true,
        ]);
        expect(r.state).to.deep.equal({ request: 'half-closed', response: 'pending' });
      },
    );

    it('never lets a second call start before the first has ended on both sides', () => {
      for (const seq of [
        ['o:start', 'o:start'],
        ['o:start', 'o:halfClose', 'o:start'],
        ['o:start', 'a:trailers', 'o:start'],
        ['o:start', 'o:cancel', 'o:start'],
      ] as Step[][]) {
        expect(runReusable(seq).index, seq.join(' ')).to.equal(seq.length - 1);
      }
      // Between calls only Start is legal, from the originator (and the late Cancel below).
      for (const step of ALL_STEPS.filter((s) => s !== 'o:start' && s !== 'o:cancel')) {
        expect(runReusable(['o:start', 'o:halfClose', 'a:trailers', step]).index, step).to.equal(3);
      }
    });

    it(
      'drops a Cancel sent after HalfClose that crossed the ' +
        'Trailers, once; any other Cancel between calls is an error',
      () => {
        // The originator's view: HalfClose, Cancel (its client gave up), then the Trailers arrive.
        const originator = runReusable(['o:start', 'o:halfClose', 'o:cancel', 'a:trailers', 'o:start']);
        expect(originator.index).to.equal(-1);
        expect(originator.endedAt).to.deep.equal([3]);
        // The answerer's view of the same call: its Trailers went out first, then the Cancel came.
        const answerer = runReusable(['o:start', 'o:halfClose', 'a:trailers', 'o:cancel', 'o:start', 'o:halfClose']);
        expect(answerer.index).to.equal(-1);
        expect(answerer.endedAt).to.deep.equal([2]);
        expect(answerer.delivered).to.deep.equal([true, true, true, false, true, true]);
        expect(runReusable(['o:start', 'o:halfClose', 'a:trailers', 'o:cancel', 'o:cancel']).index).to.equal(4);
        expect(runReusable(['o:start', 'o:cancel', 'a:trailers', 'o:cancel']).index).to.equal(3);
        expect(runReusable(['o:cancel']).index).to.equal(0);
      },
    );

    it('single-call mode never reports callEnded and never resets', () => {
      const t = transition(
        transition(transition(INITIAL_CALL_STATE, 'originator', 'start').state, 'originator', 'halfClose').state,
        'answerer',
        'trailers',
      );
      expect(t.callEnded).to.equal(false);
      expect(t.state).to.deep.equal({ request: 'half-closed', response: 'closed' });
      expect(() => transition(t.state, 'originator', 'start')).to.throw(ProtocolError);
    });

    it('agrees with the reference on every sequence of up to 7 frames', () => {
      let legalCount = 0,
        illegalCount = 0,
        ended = 0;
      const visit = (prefix: Step[]): void => {
        for (const step of ALL_STEPS) {
          const seq = [...prefix, step];
          const want = reusableReference(seq);
          const got = runReusable(seq);
          if (!want) {
            expect(got.index, `${seq.join(' ')} must be rejected at its last frame`).to.equal(seq.length - 1);
            illegalCount++;
            continue;
          }
          expect(got.index, `${seq.join(' ')} must be legal`).to.equal(-1);
          expect(got.delivered, `deliver flags of ${seq.join(' ')}`).to.deep.equal(want.delivered);
          expect(got.endedAt, `call ends in ${seq.join(' ')}`).to.deep.equal(want.endedAt);
          legalCount++;
          if (want.endedAt.length > 1) ended++;
          if (seq.length < 7) visit(seq);
        }
      };
      visit([]);
      expect(legalCount).to.be.greaterThan(1000);
      expect(illegalCount).to.be.greaterThan(1000);
      expect(ended).to.be.greaterThan(10); // sequences with two whole calls were walked
    });
  });
});

// ---------------------------------------------------------------------------------------------
// CallStream through a fake duplex

/**
 * A stand-in for a grpc-js ServerDuplexStream / ClientDuplexStream with exactly the surface
 * CallStream uses: events 'data', 'drain', 'end', 'error', 'status' (client) and 'cancelled'
 * (server); methods write() (returns `writeResult`), pause(), resume(), end(), cancel().
 */
class FakeDuplex extends EventEmitter {
  readonly written: Buffer[] = [];
  writeResult = true;
  paused = false;
  endCalls = 0;
  cancelCalls = 0;
  readonly emittedErrors: unknown[] = [];

  constructor() {
    super();
    this.on('error', (e) => this.emittedErrors.push(e));
  }

  write(b: Buffer): boolean {
    this.written.push(b);
    return this.writeResult;
  }
  pause(): this {
    this.paused = true;
    return this;
  }
  resume(): this {
    this.paused = false;
    return this;
  }
  end(): this {
    this.endCalls++;
    return this;
  }
  cancel(): void {
    this.cancelCalls++;
  }

  /** The peer sends `frame`. */
  receive(frame: CallFrame): void {
    this.emit('data', encodeCallFrame(frame));
  }
  /** Client role: the server finished the gRPC stream with `code`. */
  finishWith(code: Status, details = ''): void {
    const s: StatusObject = { code, details, metadata: new Metadata() };
    this.emit('status', s);
  }
}

interface Recorder extends CallStreamHandlers {
  frames: CallFrame[];
  drains: number;
  closed: (BurrowError | undefined)[];
  protocolErrors: ProtocolError[];
  /** Every handler call in order, e.g. ['frame:start', 'closed:INTERNAL', 'protocolError']. */
  log: string[];
}

function recorder(): Recorder {
  const r: Recorder = {
    frames: [],
    drains: 0,
    closed: [],
    protocolErrors: [],
    log: [],
    onFrame(f) {
      r.frames.push(f);
      r.log.push(`frame:${f.kind}`);
    },
    onDrain() {
      r.drains++;
      r.log.push('drain');
    },
    onClosed(e) {
      r.closed.push(e);
      r.log.push(e ? `closed:${e.code}` : 'closed');
    },
    onProtocolError(e) {
      r.protocolErrors.push(e);
      r.log.push('protocolError');
    },
  };
  return r;
}

const START: CallFrame = {
  kind: 'start',
  start: {
    method: '/pkg.Svc/Method',
    metadata: [{ key: 'x-a', value: Buffer.from('1') }],
    timeoutMs: 1500,
    callId: 'c1',
  },
};
const msg = (s: string): CallFrame => ({ kind: 'message', data: Buffer.from(s) });
const TRAILERS_OK: CallFrame = { kind: 'trailers', trailers: { code: 0, message: '', metadata: [] } };

/** An agent-side offer: gRPC client, forwarded-call answerer. */
function answererClient(): { fake: FakeDuplex; stream: CallStream } {
  const fake = new FakeDuplex();
  return { fake, stream: new CallStream(fake, 'client', 'answerer') };
}
/** A broker-side offer: gRPC server, forwarded-call originator. */
function originatorServer(): { fake: FakeDuplex; stream: CallStream } {
  const fake = new FakeDuplex();
  return {
    fake,
    stream: new CallStream(fake, 'server', 'originator'),
  };
}

describe('CallStream (fake duplex)', () => {
  it('delivers received frames in order, bytes intact', () => {
    const { fake, stream } = answererClient();
    const r = recorder();
    stream.attach(r);
    fake.receive(START);
    fake.receive(msg('one'));
    fake.receive({ kind: 'message', data: Buffer.alloc(0) });
    fake.receive(msg('three'));
    fake.receive({ kind: 'halfClose' });
    expect(r.frames.map((f) => f.kind)).to.deep.equal(['start', 'message', 'message', 'message', 'halfClose']);
    expect(r.frames[0]).to.deep.include({ kind: 'start' });
    const start = (r.frames[0] as Extract<CallFrame, { kind: 'start' }>).start;
    expect(start.method).to.equal('/pkg.Svc/Method');
    expect(start.timeoutMs).to.equal(1500);
    expect(start.callId).to.equal('c1');
    const data = r.frames
      .filter((f): f is Extract<CallFrame, { kind: 'message' }> => f.kind === 'message')
      .map((f) => f.data.toString());
    expect(data).to.deep.equal(['one', '', 'three']);
    expect(stream.callState).to.deep.equal({ request: 'half-closed', response: 'pending' });
    expect(r.protocolErrors).to.have.length(0);
    expect(r.closed).to.have.length(0);
  });

  it('buffers frames that arrive before attach() and delivers them, in order, on attach', () => {
    const { fake, stream } = answererClient();
    fake.receive(START);
    fake.receive(msg('a'));
    fake.receive(msg('b'));
    const r = recorder();
    stream.attach(r);
    expect(r.log).to.deep.equal(['frame:start', 'frame:message', 'frame:message']);
    fake.receive(msg('c'));
    expect(r.frames.map((f) => (f.kind === 'message' ? f.data.toString() : f.kind))).to.deep.equal([
      'start',
      'a',
      'b',
      'c',
    ]);
  });

  it('re-attaching hands later frames to the new handlers only', () => {
    const { fake, stream } = originatorServer();
    const first = recorder();
    stream.attach(first);
    stream.send(START);
    const second = recorder();
    stream.attach(second);
    fake.receive({ kind: 'headers', metadata: [] });
    expect(first.frames).to.have.length(0);
    expect(second.log).to.deep.equal(['frame:headers']);
  });

  it(
    'an out-of-order frame: onProtocolError once, ' + 'the stream is cancelled (client end), nothing more is delivered',
    () => {
      const { fake, stream } = answererClient();
      const r = recorder();
      stream.attach(r);
      fake.receive(msg('before start')); // answerer receiving Message before Start
      expect(r.protocolErrors).to.have.length(1);
      expect(r.protocolErrors[0]).to.be.instanceOf(ProtocolError);
      expect(r.protocolErrors[0]!.message).to.contain('message before start');
      expect(fake.cancelCalls).to.equal(1);
      expect(stream.isClosed).to.equal(true);
      // Nothing after: neither frames nor another protocol error, and sends are refused.
      fake.receive(START);
      fake.receive(msg('x'));
      fake.emit('data', Buffer.from([0xff, 0xff, 0xff]));
      fake.finishWith(Status.UNAVAILABLE);
      expect(r.frames).to.have.length(0);
      expect(r.protocolErrors).to.have.length(1);
      expect(stream.send({ kind: 'headers', metadata: [] })).to.equal(false);
      expect(fake.written).to.have.length(0);
      expect(fake.cancelCalls).to.equal(1);
    },
  );

  it('an out-of-order frame on the server end ends the gRPC stream with INTERNAL', () => {
    const { fake, stream } = originatorServer();
    const r = recorder();
    stream.attach(r);
    stream.send(START);
    fake.receive({ kind: 'headers', metadata: [] });
    fake.receive({ kind: 'headers', metadata: [] }); // headers twice
    fake.receive(msg('late'));
    expect(r.log.filter((l) => l.startsWith('frame:'))).to.deep.equal(['frame:headers']);
    expect(r.protocolErrors).to.have.length(1);
    expect(r.protocolErrors[0]!.message).to.contain('headers frame after headers or messages');
    expect(fake.emittedErrors).to.have.length(1);
    expect((fake.emittedErrors[0] as { code: number }).code).to.equal(Status.INTERNAL);
    expect(fake.cancelCalls).to.equal(0);
  });

  // BUG: CallStream.receive() aborts first (abort -> close -> onClosed(error)) and only then calls
  // onProtocolError, breaking its own invariant "once closed, no handler is called again". The
  // owner is told "stream lost" before "protocol error": originate() then reports the breach to
  // the caller as "connection to agent ... lost during the call" and its onProtocolError never
  // takes effect.
  it(
    'reports a protocol error as such: ' + 'onProtocolError comes first and no handler runs after the stream is closed',
    () => {
      const { fake, stream } = answererClient();
      const r = recorder();
      stream.attach(r);
      fake.receive(START);
      fake.receive(START); // second start
      const afterFrames = r.log.slice(r.log.indexOf('frame:start') + 1);
      expect(afterFrames[0], `handler calls after the bad frame: ${JSON.stringify(afterFrames)}`).to.equal(
        'protocolError',
      );
      expect(afterFrames.filter((l) => l === 'protocolError')).to.have.length(1);
    },
  );

  it('undecodable bytes and a frame with no kind are protocol errors', () => {
    for (const bytes of [Buffer.from([0x0a, 0x05, 0x01]), Buffer.alloc(0), Buffer.from([0x78, 0x01])]) {
      const { fake, stream } = answererClient();
      const r = recorder();
      stream.attach(r);
      fake.emit('data', bytes);
      expect(r.protocolErrors, `bytes ${bytes.toString('hex')}`).to.have.length(1);
      expect(r.protocolErrors[0]).to.be.instanceOf(ProtocolError);
      expect(r.frames).to.have.length(0);
      expect(fake.cancelCalls).to.equal(1);
    }
  });

  it('client end: a non-OK status before the call is done closes with that status code', () => {
    for (const code of [Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED, Status.INTERNAL, Status.CANCELLED]) {
      const { fake, stream } = answererClient();
      const r = recorder();
      stream.attach(r);
      fake.receive(START);
      fake.finishWith(code, 'went away');
      expect(r.closed).to.have.length(1);
      expect(r.closed[0]).to.be.instanceOf(BurrowError);
      expect(r.closed[0]!.code).to.equal(code);
      expect(r.closed[0]!.message).to.contain('went away');
    }
  });

  it('client end: status OK before the call is done closes with UNAVAILABLE', () => {
    const { fake, stream } = answererClient();
    const r = recorder();
    stream.attach(r);
    fake.receive(START);
    fake.receive(msg('m'));
    fake.finishWith(Status.OK);
    expect(r.closed).to.have.length(1);
    expect(r.closed[0]!.code).to.equal(Status.UNAVAILABLE);
    expect(r.closed[0]!.message).to.contain('before the call completed');
  });

  it('server end: the peer resetting the stream closes with UNAVAILABLE, once', () => {
    const { fake, stream } = originatorServer();
    const r = recorder();
    stream.attach(r);
    stream.send(START);
    fake.emit('cancelled');
    fake.emit('cancelled');
    fake.emit('end');
    expect(r.closed).to.have.length(1);
    expect(r.closed[0]!.code).to.equal(Status.UNAVAILABLE);
  });

  it('client end (answerer): clean completion closes with no error', () => {
    const { fake, stream } = answererClient();
    const r = recorder();
    stream.attach(r);
    fake.receive(START);
    fake.receive(msg('req'));
    fake.receive({ kind: 'halfClose' });
    expect(stream.send({ kind: 'headers', metadata: [] })).to.equal(true);
    expect(stream.send(msg('resp'))).to.equal(true);
    expect(stream.send(TRAILERS_OK)).to.equal(true);
    stream.finish();
    expect(fake.endCalls).to.equal(1);
    expect(r.closed).to.have.length(0); // the server has not finished yet
    fake.finishWith(Status.OK);
    expect(r.closed).to.deep.equal([undefined]);
    expect(r.protocolErrors).to.have.length(0);
    expect(fake.written).to.have.length(3);
  });

  it('server end (originator): clean completion needs both halves finished and closes with no error', () => {
    const { fake, stream } = originatorServer();
    const r = recorder();
    stream.attach(r);
    stream.send(START);
    stream.send({ kind: 'halfClose' });
    fake.receive(TRAILERS_OK);
    expect(r.log).to.deep.equal(['frame:trailers']);
    fake.emit('end');
    expect(r.closed).to.have.length(0); // our half is still open
    stream.finish();
    stream.finish(); // idempotent
    expect(fake.endCalls).to.equal(1);
    expect(r.closed).to.deep.equal([undefined]);
    expect(stream.isClosed).to.equal(true);
  });

  it('send() returns false when the transport is full, and onDrain fires on drain', () => {
    const { fake, stream } = originatorServer();
    const r = recorder();
    stream.attach(r);
    expect(stream.send(START)).to.equal(true);
    fake.writeResult = false;
    expect(stream.send(msg('1'))).to.equal(false);
    expect(r.drains).to.equal(0);
    fake.writeResult = true;
    fake.emit('drain');
    expect(r.drains).to.equal(1);
    expect(stream.send(msg('2'))).to.equal(true);
    expect(fake.written).to.have.length(3);
  });

  it('send() refuses a frame this side may not send, without writing it', () => {
    const { fake, stream } = originatorServer();
    stream.attach(recorder());
    expect(() => stream.send(msg('before start'))).to.throw(ProtocolError);
    expect(() => stream.send({ kind: 'headers', metadata: [] })).to.throw(ProtocolError);
    expect(fake.written).to.have.length(0);
  });

  it('pause()/resume() pass through; resume() after close does not resume the transport', () => {
    const { fake, stream } = answererClient();
    stream.attach(recorder());
    stream.pause();
    expect(fake.paused).to.equal(true);
    stream.resume();
    expect(fake.paused).to.equal(false);
    stream.pause();
    fake.finishWith(Status.UNAVAILABLE);
    stream.resume();
    expect(fake.paused).to.equal(true);
  });

  it('abort() on the client end cancels once and closes with the given error', () => {
    const { fake, stream } = answererClient();
    const r = recorder();
    stream.attach(r);
    const err = new BurrowError(Status.UNAVAILABLE, 'shutting down');
    stream.abort(err);
    stream.abort(err);
    expect(fake.cancelCalls).to.equal(1);
    expect(r.closed).to.deep.equal([err]);
    fake.finishWith(Status.CANCELLED);
    expect(r.closed).to.have.length(1);
  });
});

describe('answerLocally: the signal a built-in handler gets (fake duplex)', () => {
  /** A call answered by a handler that resolves when `answer` is called; its signal is kept. */
  function localCall(): {
    fake: FakeDuplex;
    signal: () => AbortSignal | undefined;
    answer: (b: Buffer) => void;
    outcome: Promise<{ code: number }>;
  } {
    const { fake, stream } = answererClient();
    let signal: AbortSignal | undefined;
    let answer: (b: Buffer) => void = () => {};
    const outcome = answerLocally(
      stream,
      (START as Extract<CallFrame, { kind: 'start' }>).start,
      (_req, ctx) => {
        signal = ctx.signal;
        return new Promise<Buffer>((resolve) => {
          answer = resolve;
        });
      },
      { maxMessageBytes: 1024 },
    );
    fake.receive(START);
    fake.receive(msg('question'));
    fake.receive({ kind: 'halfClose' });
    return { fake, signal: () => signal, answer: (b) => answer(b), outcome };
  }

  it(
    'a handler that answered is not aborted afterwards ' + "(an abort per call cost ~2.5% of the agent's CPU)",
    async () => {
      const c = localCall();
      expect(c.signal()?.aborted).to.equal(false);
      c.answer(Buffer.from('answer'));
      await new Promise<void>((resolve) => setImmediate(resolve));
      expect(c.fake.written.map((b) => decodeCallFrame(b).kind)).to.deep.equal(['headers', 'message', 'trailers']);
      c.fake.finishWith(Status.OK);
      expect((await c.outcome).code).to.equal(Status.OK);
      expect(c.signal()!.aborted).to.equal(false);
    },
  );

  it('a handler still running when the originator cancels is aborted, and the call ends CANCELLED', async () => {
    const c = localCall();
    c.fake.receive({ kind: 'cancel', reason: 'caller went away' });
    expect(c.signal()!.aborted).to.equal(true);
    c.fake.finishWith(Status.OK);
    expect((await c.outcome).code).to.equal(Status.CANCELLED);
  });
});
