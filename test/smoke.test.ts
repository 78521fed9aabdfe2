import { expect } from 'chai';
import { ECHO } from './helpers/echo-upstream';
import { collect } from './helpers/raw-grpc';
import { Stack } from './helpers/stack';

describe('smoke', () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start();
  });
  after(async () => {
    await stack?.stop();
  });

  it('carries a unary call caller -> broker -> agent -> upstream', async () => {
    const res = await stack.caller.unary(ECHO.unary, Buffer.from('hello'), stack.md());
    expect(res.response.toString()).to.equal('hello');
  });

  it('carries a bidi call site client -> agent -> broker -> platform', async () => {
    const call = stack.siteClient.bidi(ECHO.bidi);
    call.write(Buffer.from('a'));
    call.write(Buffer.from('b'));
    call.end();
    const r = await collect(call);
    expect(r.status.code).to.equal(0);
    expect(r.messages.map(String)).to.deep.equal(['a', 'b']);
  });
});
