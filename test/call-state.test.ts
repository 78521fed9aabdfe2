import { expect } from 'chai';
import { type CallEvent, type CallState, INITIAL_CALL_STATE, isSettled, transition } from '@burrow/tunnel';

const OK = { code: 0, details: '' };
const DEADLINE = { code: 4, details: 'deadline exceeded waiting for agent "a"' };

function run(events: CallEvent[]): CallState {
  return events.reduce(transition, INITIAL_CALL_STATE);
}

/**
 * The relayed call's state machine (call-state.ts), alone: when the status is decided and by whom,
 * and that nothing changes it afterwards.
 */
describe('call state machine (relayed call)', () => {
  it('headers, then the status, then the caller closes: the next hop decided', () => {
    const s = run([{ kind: 'response-headers' }, { kind: 'status', status: OK }, { kind: 'caller-closed' }]);
    expect(s).to.deep.equal({ phase: 'closed', outcome: OK });
  });

  it('a trailers-only status settles without headers', () => {
    const s = run([{ kind: 'status', status: DEADLINE }]);
    expect(s).to.deep.equal({ phase: 'settled', outcome: DEADLINE });
  });

  it('the first status wins: a status, failure or reset after it changes nothing', () => {
    const first = run([{ kind: 'response-headers' }, { kind: 'failed', status: DEADLINE }]);
    for (const late of [
      { kind: 'status', status: OK },
      { kind: 'failed', status: { code: 8, details: 'late' } },
      { kind: 'caller-gone' },
      { kind: 'response-headers' },
    ] as CallEvent[]) {
      expect(transition(first, late)).to.equal(first);
    }
  });

  it('a caller that goes away first settles the call as CANCELLED', () => {
    const s = run([{ kind: 'response-headers' }, { kind: 'caller-gone' }, { kind: 'caller-closed' }]);
    expect(s.outcome?.code).to.equal(1);
    expect(s.phase).to.equal('closed');
  });

  it('a caller stream closed with nothing decided is CANCELLED; closed is final', () => {
    const s = run([{ kind: 'caller-closed' }]);
    expect(s).to.deep.equal({ phase: 'closed', outcome: { code: 1, details: 'the caller cancelled the call' } });
    expect(transition(s, { kind: 'status', status: OK })).to.equal(s);
    expect(isSettled(s)).to.equal(true);
  });

  it('headers arriving after the status do not reopen the call', () => {
    const s = run([{ kind: 'status', status: OK }, { kind: 'response-headers' }]);
    expect(s.phase).to.equal('settled');
    expect(isSettled(INITIAL_CALL_STATE)).to.equal(false);
    expect(isSettled(run([{ kind: 'response-headers' }]))).to.equal(false);
  });
});
