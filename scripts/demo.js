#!/usr/bin/env node
// `make demo`: the whole Burrow path on this machine, with real processes and real mTLS.
//  1. makes a throwaway PKI (root + issuing CA, a caller certificate, a join token) in a temp dir;
//  2. starts two sample upstreams (one "inside the site", one "on the platform");
//  3. starts a broker process on the PKI directory (it issues its own certificate), enrolls the
//     agent with the join token alone, and starts the agent process, which dials out;
//  4. sends unary and streaming calls caller -> broker -> agent -> site upstream, and
//     site client -> agent -> broker -> platform upstream;
//  5. asks the site, through the tunnel, to verify tokens (site keys made at run time by
//     examples/auth/mint-token.js) and to decide policy questions (examples/policy, Cedar), over
//     gRPC with @burrow/client and over the AuthZEN HTTP binding; the broker's own caller policy
//     (examples/callers) lets "billing" in and keeps an unlisted service out;
//  6. shows the broker's view (/agents, a few metrics), shuts both down with SIGTERM, cleans up.
// Exits 0 when every step worked, 1 otherwise.
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const grpc = require('@grpc/grpc-js');
const { createJoinToken, initPki, issueCertificate, writeIssued } = require('@burrow/pki');
const https = require('node:https');
const { execFileSync } = require('node:child_process');
const { BurrowClient } = require('@burrow/client');
const { loadGreeter, startSampleUpstream } = require('../examples/sample-upstream');

const ROOT = path.resolve(__dirname, '..');
// The names of the README quick start: agent site-a, caller billing, upstream site-upstream.
const AGENT_ID = 'site-a';
const children = [];
let tmp;

const say = (text) => process.stdout.write(`${text}\n`);
const step = (n, text) => say(`\n[${n}] ${text}`);

/** Starts a Burrow binary; resolves with its "started" log record (which carries the ports). */
function startBinary(name, args) {
  const child = spawn(process.execPath, [path.join(ROOT, 'packages', name, 'dist', 'cli.js'), ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  children.push(child);
  const lines = [];
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const started = new Promise((resolve, reject) => {
    readline.createInterface({ input: child.stderr }).on('line', (line) => {
      lines.push(line);
      let rec;
      try {
        rec = JSON.parse(line);
      } catch {
        return;
      }
      if (rec.message === 'broker started' || rec.message === 'agent started') resolve(rec);
    });
    exited.then(({ code }) => reject(new Error(`${name} exited with ${code} before starting:\n${lines.join('\n')}`)));
  });
  return { child, started, exited, lines };
}

function waitForLine(proc, predicate, timeoutMs) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`timed out waiting for a log line:\n${proc.lines.slice(-5).join('\n')}`)),
      timeoutMs,
    );
    const check = () => {
      const hit = proc.lines.find((l) => {
        try {
          return predicate(JSON.parse(l));
        } catch {
          return false;
        }
      });
      if (hit) {
        clearTimeout(timer);
        clearInterval(poll);
        resolve(JSON.parse(hit));
      }
    };
    const poll = setInterval(check, 20);
    check();
  });
}

const unary = (client, method, req, md) =>
  new Promise((resolve, reject) =>
    client[method](req, md, { deadline: Date.now() + 5000 }, (err, res) => (err ? reject(err) : resolve(res))),
  );

const stream = (call) =>
  new Promise((resolve, reject) => {
    const out = [];
    call.on('data', (m) => out.push(m));
    call.on('error', reject);
    call.on('end', () => resolve(out));
  });

/** POSTs JSON to the broker's AuthZEN binding with a service certificate. */
function postJson(port, urlPath, body, tls) {
  return new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: '127.0.0.1',
        port,
        path: urlPath,
        method: 'POST',
        servername: 'localhost',
        agent: false,
        ca: fs.readFileSync(tls.ca),
        cert: fs.readFileSync(tls.cert),
        key: fs.readFileSync(tls.key),
        headers: { 'content-type': 'application/json' },
      },
      (res) => {
        let text = '';
        res.on('data', (d) => {
          text += d;
        });
        res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(text) }));
      },
    );
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

async function main() {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'burrow-demo-'));
  step(1, `throwaway PKI in ${tmp}`);
  const pkiDir = path.join(tmp, 'pki');
  await initPki({ dir: pkiDir, trustDomain: 'demo.burrow.local' });
  const files = {};
  const issued = await issueCertificate({ dir: pkiDir, role: 'service', name: 'billing' });
  await writeIssued(path.join(tmp, 'service'), issued);
  files.service = {
    cert: path.join(tmp, 'service', 'tls.crt'),
    key: path.join(tmp, 'service', 'tls.key'),
    ca: path.join(tmp, 'service', 'ca.crt'),
  };
  say(`    caller  ${issued.spiffeId}  (expires ${issued.notAfter.toISOString()})`);
  const { token } = await createJoinToken({ dir: pkiDir, agentId: AGENT_ID, ttlMs: 10 * 60_000 });
  say(`    join token for agent "${AGENT_ID}": ${token.slice(0, 40)}...`);
  const outsider = await issueCertificate({ dir: pkiDir, role: 'service', name: 'reporting' });
  await writeIssued(path.join(tmp, 'outsider'), outsider);
  files.outsider = {
    cert: path.join(tmp, 'outsider', 'tls.crt'),
    key: path.join(tmp, 'outsider', 'tls.key'),
    ca: path.join(tmp, 'outsider', 'ca.crt'),
  };
  say(`    caller  ${outsider.spiffeId}  (not in the broker's caller policy)`);
  const mint = (...args) =>
    execFileSync(process.execPath, [path.join(ROOT, 'examples', 'auth', 'mint-token.js'), ...args], {
      encoding: 'utf8',
    }).trim();
  mint('keys', '--out', path.join(tmp, 'site-keys'));
  say(`    site token keys (the site's identity provider): ${path.join(tmp, 'site-keys', 'jwks.json')}`);

  step(2, 'a site upstream and a platform upstream (examples/sample-upstream.js: burrow.demo.v1.Greeter)');
  const site = await startSampleUpstream('127.0.0.1:0', 'site-upstream');
  const platform = await startSampleUpstream('127.0.0.1:0', 'platform-upstream');
  say(`    site upstream (inside the site):     ${site.address}`);
  say(`    platform upstream (on the platform): ${platform.address}`);

  step(3, 'broker and agent processes');
  const broker = startBinary('broker', [
    'serve',
    '--agent-listen',
    '127.0.0.1:0',
    '--api-listen',
    '127.0.0.1:0',
    '--admin-listen',
    '127.0.0.1:0',
    '--pki-dir',
    pkiDir,
    '--tls-dns',
    'localhost',
    '--tls-ip',
    '127.0.0.1',
    '--upstream',
    `burrow.demo.v1.Greeter=${platform.address}`,
    '--authzen-listen',
    '127.0.0.1:0',
    '--caller-policies',
    path.join(ROOT, 'examples', 'callers'),
    '--caller-entities',
    path.join(ROOT, 'examples', 'callers', 'entities.json'),
  ]);
  const b = await broker.started;
  say(
    `    broker pid ${broker.child.pid}: agent listener 127.0.0.1:${b.agentPort}, API listener (callers) ` +
      `127.0.0.1:${b.apiPort}, AuthZEN https://localhost:${b.authzenPort}, admin http://127.0.0.1:${b.adminPort}`,
  );
  const stateDir = path.join(tmp, 'agent-state');
  const enrolled = await new Promise((resolve, reject) => {
    const p = spawn(
      process.execPath,
      [
        path.join(ROOT, 'packages', 'agent', 'dist', 'cli.js'),
        'enroll',
        '--broker',
        `127.0.0.1:${b.agentPort}`,
        '--token',
        token,
        '--state-dir',
        stateDir,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.push(p);
    let out = '';
    p.stdout.on('data', (d) => {
      out += d;
    });
    p.stderr.on('data', (d) => {
      out += d;
    });
    p.on('exit', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`enroll failed: ${out}`))));
  });
  say(`    burrow-agent enroll -> ${enrolled.split(';')[0]}`);
  const agent = startBinary('agent', [
    'run',
    '--broker',
    `127.0.0.1:${b.agentPort}`,
    '--state-dir',
    stateDir,
    '--upstream',
    `burrow.demo.v1.Greeter=${site.address}`,
    '--local-listen',
    '127.0.0.1:0',
    '--policies',
    path.join(ROOT, 'examples', 'policy', 'policies'),
    '--entities',
    path.join(ROOT, 'examples', 'policy', 'entities.json'),
    '--policy-schema',
    path.join(ROOT, 'examples', 'policy', 'schema.cedarschema'),
    '--audit-log',
    path.join(tmp, 'audit.jsonl'),
    '--jwks',
    path.join(tmp, 'site-keys', 'jwks.json'),
    '--token-issuer',
    'https://idp.site-a.example',
    '--token-audience',
    'site-api',
    '--token-allowed-audience',
    'site-api',
  ]);
  const a = await agent.started;
  await waitForLine(agent, (r) => r.message === 'tunnel session established', 10_000);
  say(
    `    agent  pid ${agent.child.pid}: id "${AGENT_ID}" dialed out with its enrolled certificate; local ` +
      `listener (site clients) 127.0.0.1:${a.localPort}`,
  );

  const Greeter = loadGreeter();
  const serviceCreds = grpc.credentials.createSsl(
    fs.readFileSync(files.service.ca),
    fs.readFileSync(files.service.key),
    fs.readFileSync(files.service.cert),
  );
  // "localhost", not the IP: TLS server names must be host names (RFC 6066).
  const caller = new Greeter(`localhost:${b.apiPort}`, serviceCreds);
  const siteClient = new Greeter(`127.0.0.1:${a.localPort}`, grpc.credentials.createInsecure());
  const md = new grpc.Metadata();
  md.set('burrow-agent-id', AGENT_ID);

  step(4, 'caller -> broker -> agent -> site upstream');
  const r1 = await unary(caller, 'sayHello', { name: 'platform' }, md);
  say(`    unary  SayHello        -> "${r1.message}" (answered by ${r1.answeredBy})`);
  const r2 = await stream(caller.countdown({ from: 3 }, md));
  say(`    stream Countdown(3)    -> ${r2.map((m) => m.message).join(', ')}`);

  step(5, 'site client -> agent -> broker -> platform upstream');
  const r3 = await unary(siteClient, 'sayHello', { name: 'site' }, new grpc.Metadata());
  say(
    `    unary  SayHello        -> "${r3.message}" (answered by ${r3.answeredBy}; broker says the caller is ` +
      `agent "${r3.callingAgent}")`,
  );
  const chat = siteClient.chat(new grpc.Metadata());
  const chatDone = stream(chat);
  for (const word of ['ping', 'pong', 'done']) chat.write({ name: word });
  chat.end();
  const r4 = await chatDone;
  say(`    bidi   Chat            -> ${r4.map((m) => `"${m.message}"`).join(', ')}`);

  step(6, 'auth and policy: the platform asks the site, the site answers from its own keys and rules');
  const client = new BurrowClient({
    broker: `localhost:${b.apiPort}`,
    tls: { certFile: files.service.cert, keyFile: files.service.key, caFile: files.service.ca },
  });
  const sign = (...extra) =>
    mint(
      'sign',
      '--key',
      path.join(tmp, 'site-keys', 'signing-key.jwk'),
      '--iss',
      'https://idp.site-a.example',
      '--aud',
      'site-api',
      '--sub',
      'alice',
      '--groups',
      'engineering',
      ...extra,
    );
  const good = await client.authenticate(AGENT_ID, sign('--exp', '10m'));
  say(
    `    Authenticate(valid token)    -> authenticated=${good.authenticated} subject=${good.subject} ` +
      `groups=${good.groups.join(',')}`,
  );
  const expired = await client.authenticate(AGENT_ID, sign('--exp', '-5m'));
  say(`    Authenticate(expired token)  -> authenticated=${expired.authenticated} reason="${expired.reason}"`);
  const request = (name) =>
    JSON.parse(fs.readFileSync(path.join(ROOT, 'examples', 'policy', 'requests', name), 'utf8'));
  const permit = await client.evaluate(AGENT_ID, request('permit-owner-edits.json'));
  say(
    `    Evaluate(permit-owner-edits)            -> decision=${permit.decision} ` +
      `by ${JSON.stringify(permit.context.policies)}`,
  );
  const deny = await client.evaluate(AGENT_ID, request('deny-confidential-without-mfa.json'));
  say(`    Evaluate(deny-confidential-without-mfa) -> decision=${deny.decision} (${deny.context.reason})`);
  const viaHttp = await postJson(
    b.authzenPort,
    `/agents/${AGENT_ID}/access/v1/evaluation`,
    request('permit-owner-edits.json'),
    files.service,
  );
  say(
    `    POST https://localhost:${b.authzenPort}/agents/${AGENT_ID}/access/v1/evaluation ` +
      `-> ${viaHttp.status} ${JSON.stringify({ decision: viaHttp.body.decision })}`,
  );
  const outsiderClient = new BurrowClient({
    broker: `localhost:${b.apiPort}`,
    tls: { certFile: files.outsider.cert, keyFile: files.outsider.key, caFile: files.outsider.ca },
  });
  const refused = await outsiderClient.evaluate(AGENT_ID, request('permit-owner-edits.json')).then(
    () => undefined,
    (e) => e,
  );
  say(`    the same question from service "reporting" -> ${refused ? refused.message : 'allowed?!'}`);
  client.close();
  outsiderClient.close();

  step(7, "the broker's view");
  const agents = await (await fetch(`http://127.0.0.1:${b.adminPort}/agents`)).json();
  say(
    `    GET /agents  ` +
      `-> ${JSON.stringify(agents.map(({ id, connections, callsInFlight }) => ({ id, connections, callsInFlight })))}`,
  );
  const metrics = await (await fetch(`http://127.0.0.1:${b.adminPort}/metrics`)).text();
  for (const line of metrics.split('\n').filter((l) => /^burrow_broker_(connected_agents|calls_total)/.test(l)))
    say(`    ${line}`);

  step(8, 'graceful shutdown (SIGTERM)');
  caller.close();
  siteClient.close();
  agent.child.kill('SIGTERM');
  const ae = await agent.exited;
  broker.child.kill('SIGTERM');
  const be = await broker.exited;
  say(`    agent exited ${ae.code}, broker exited ${be.code}`);
  site.server.forceShutdown();
  platform.server.forceShutdown();
  if (ae.code !== 0 || be.code !== 0) throw new Error('a binary did not exit cleanly');
  const audited = fs.readFileSync(path.join(tmp, 'audit.jsonl'), 'utf8').trim().split('\n').length;
  say(`    the agent's audit log holds ${audited} decision records`);
  const ok =
    r1.message === 'hello, platform' &&
    r2.length === 3 &&
    r3.callingAgent === AGENT_ID &&
    r4.length === 3 &&
    agents[0]?.id === AGENT_ID &&
    good.authenticated &&
    !expired.authenticated &&
    expired.reason.startsWith('expired') &&
    permit.decision &&
    !deny.decision &&
    viaHttp.status === 200 &&
    viaHttp.body.decision === true &&
    refused?.code === grpc.status.PERMISSION_DENIED &&
    audited >= 3;
  if (!ok) throw new Error('unexpected answers');
  say('\ndemo: every call crossed the tunnel in both directions; the site verified tokens and decided policy itself.');
}

main().then(
  () => {
    fs.rmSync(tmp, { recursive: true, force: true });
    process.exit(0);
  },
  (err) => {
    process.stderr.write(`demo failed: ${err.message}\n`);
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
    process.exit(1);
  },
);
