import { expect } from 'chai';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { loadJose, type JoseModule } from '@burrow/agent';
import { BurrowClient } from '@burrow/client';
import { AGENT_ID, Stack } from './helpers/stack';
import { AUD, ISS, jwksOf, makeKey, signToken, type TestKey } from './helpers/token-fixture';

/**
 * Issue 13 item 11, through the agent's AuthenticationService as a platform service reaches it
 * (broker, tunnel, agent; real mTLS): a JWT without `exp` never expires and is refused by default,
 * and with pinned audiences (`allowedAudiences`, `--token-allowed-audience`) the caller can no
 * longer choose an audience the site did not pin.
 */
describe('authn: exp required by default; audiences pinned by the site', function () {
  this.timeout(30_000);
  const OTHER = 'another-site-api';
  let stack: Stack;
  let client: BurrowClient;
  let jose: JoseModule;
  let key: TestKey;
  let tmp: string;

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), 'burrow-token-'));
    jose = await loadJose();
    key = await makeKey(jose, 'ES256', 'site-key-1');
    writeFileSync(path.join(tmp, 'jwks.json'), jwksOf(key));
    stack = await Stack.start({
      agent: {
        authn: {
          jwksFile: path.join(tmp, 'jwks.json'),
          issuers: [ISS],
          audiences: [AUD],
          allowedAudiences: [AUD, 'second-api'],
        },
      },
    });
    const tls = { certFile: stack.serviceCert.cert, keyFile: stack.serviceCert.key, caFile: stack.serviceCert.ca };
    client = new BurrowClient({ broker: stack.apiAddress, tls, serverName: 'localhost' });
  });
  after(async () => {
    client?.close();
    await stack?.stop();
    rmSync(tmp, { recursive: true, force: true });
  });

  it('a token without exp is refused by default, the reason naming exp', async () => {
    const noExp = await client.authenticate(AGENT_ID, await signToken(jose, key, { exp: undefined }));
    expect(noExp.authenticated).to.equal(false);
    expect(noExp.reason).to.match(/^malformed: .*"exp"/);
    expect(noExp.claims).to.deep.equal({});
    const withExp = await client.authenticate(AGENT_ID, await signToken(jose, key));
    expect(withExp.authenticated, withExp.reason).to.equal(true);
  });

  it('a token for an audience outside the pinned set is refused, even when the caller asks for it', async () => {
    const forOther = await signToken(jose, key, { aud: OTHER });
    const asked = await client.authenticate(AGENT_ID, forOther, OTHER);
    expect(asked.authenticated).to.equal(false);
    expect(asked.reason).to.match(/^audience: the requested audience "another-site-api" is not one this agent accepts/);
    const notAsked = await client.authenticate(AGENT_ID, forOther);
    expect(notAsked.authenticated).to.equal(false);
    expect(notAsked.reason).to.match(/^audience: /);
    // A token for one pinned audience is not good for another pinned one.
    const forSecond = await signToken(jose, key, { aud: 'second-api' });
    expect((await client.authenticate(AGENT_ID, forSecond, AUD)).reason).to.match(/^audience: /);
    expect((await client.authenticate(AGENT_ID, forSecond, 'second-api')).authenticated).to.equal(true);
    expect((await client.authenticate(AGENT_ID, await signToken(jose, key), AUD)).authenticated).to.equal(true);
  });
});
