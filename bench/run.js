#!/usr/bin/env node
'use strict';
// `make bench`: Burrow's cost next to what a site admin would otherwise pick, every process
// separate as in production (caller, broker, agent, upstream; sshd and ssh for the ssh side),
// all sides in one run with the same payloads, warm-up and fixed counts, interleaved round by
// round so that a noisy machine moves every side alike. Writes bench/results/latest.json and
// prints a Markdown table with each target met or missed. Nothing here is a test.
//
// Sides of the unary and stream cases: `direct` (the caller straight to the echo upstream,
// plaintext), `burrow` (caller -> broker -> agent -> upstream), `ssh` (sshd and `ssh -R`, see
// ssh-tunnel.js), and two floors on Burrow's processes and hops that do nothing but forward:
// `relay` (two grpc-js relays, relay.js: re-making each call with grpc-js) and `raw` (two raw
// node:http2 relays in a reverse tunnel's shape, raw-relay.js: the second dials the first, which
// then opens one HTTP/2 stream per call on that connection). `raw` is the floor Burrow's data
// plane is judged against (issue 15): any tunnel of that shape in Node pays at least its cost.
//
//   make bench                       # quick profile (< 5 min on 2 cores)
//   BENCH_PROFILE=full make bench    # full profile (10,000 agents, 10 s streams, more rounds)
//   BENCH_CASES=unary,policy,stream,scale,issuance   run only some cases (development)
//   BENCH_CASES=gateway              Envoy ext_authz Check next to the policy case's Evaluate (in the default set)
//   BENCH_CASES=tracing              the cost of tracing: unary and policy calls with a broker and
//                                    agent tracing every call (ratio 1.0, a local OTLP sink) next
//                                    to a pair with tracing off (in the default set too)
//   BENCH_AGENTS=N                   agents in the scale case instead of the profile's
//   BENCH_ROUNDS=N                   rounds instead of the profile's
//   BENCH_CPU_PROF_DIR=DIR           run broker, agent and the first agent swarm with --cpu-prof into DIR
//   BENCH_BROKER_FLAGS="--flag v"    extra burrow-broker flags for every broker (A/B of a setting)
//                                    (summarize: node scripts/cpuprofile-summary.js DIR/*.cpuprofile)
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { performance } = require('node:perf_hooks');
const { API_CODECS, POLICY_METHODS } = require('@burrow/tunnel');
const { EXT_AUTHZ_CHECK_METHOD } = require('@burrow/broker');
const { createCsr, createJoinToken, signCsr } = require('@burrow/pki');
const { IpcChild } = require('./ipc');
const { startSshTunnel } = require('./ssh-tunnel');
const http = require('node:http');
const { printTable, evaluateTargets } = require('./report');

const ROOT = path.resolve(__dirname, '..');
const HELPERS = path.join(ROOT, 'test', 'dist', 'helpers');
const { BurrowProcess, BROKER_CLI, AGENT_CLI, PKI_CLI, getJson, httpGet, killAll } = require(
  path.join(HELPERS, 'processes.js'),
);
const { pollUntil } = require(path.join(HELPERS, 'wait.js'));
const { ECHO } = require(path.join(HELPERS, 'echo-upstream.js'));
const { accepts, freePorts } = require(path.join(HELPERS, 'free-port.js'));
const { metricSum, parseMetrics } = require(path.join(HELPERS, 'cluster.js'));

const PROFILES = {
  quick: {
    rounds: 2,
    warmupCalls: 200,
    latencyCalls: 1000,
    rpsWarmupMs: 300,
    rpsMs: 1500,
    streamWarmupMs: 500,
    streamMs: 3000,
    scaleAgents: 1000,
    swarmProcesses: 2,
    scaleCalls: 2000,
    scaleArrivalPerS: 100,
    scaleWaitMs: 120_000,
    enrollments: 300,
    signCsrs: 300,
  },
  full: {
    rounds: 5,
    warmupCalls: 500,
    latencyCalls: 3000,
    rpsWarmupMs: 1000,
    rpsMs: 5000,
    streamWarmupMs: 1000,
    streamMs: 10_000,
    scaleAgents: 10_000,
    swarmProcesses: 8,
    scaleCalls: 10_000,
    scaleArrivalPerS: 100,
    scaleWaitMs: 300_000,
    enrollments: 1000,
    signCsrs: 1000,
  },
};
const PROFILE_NAME = process.env.BENCH_PROFILE ?? 'quick';
const P = PROFILES[PROFILE_NAME];
if (!P) throw new Error(`BENCH_PROFILE must be one of ${Object.keys(PROFILES).join(', ')}`);
if (process.env.BENCH_AGENTS) P.scaleAgents = Number(process.env.BENCH_AGENTS);
if (process.env.BENCH_ROUNDS) P.rounds = Number(process.env.BENCH_ROUNDS);
const CASES = (process.env.BENCH_CASES ?? 'unary,policy,gateway,stream,scale,issuance,tracing').split(',');
const CPU_PROF_DIR = process.env.BENCH_CPU_PROF_DIR ? path.resolve(process.env.BENCH_CPU_PROF_DIR) : undefined;

/** Scheduling priority of the agent swarm processes (the broker's is 0). */
const SWARM_NICE = 10;
const UNARY_PAYLOAD_BYTES = 100;
const STREAM_MESSAGE_BYTES = 64 * 1024;
const CONCURRENCIES = [1, 16, 64];
const ENROLL_CONCURRENCY = 16;
const SITE_AGENT_ID = 'bench-site';
const POLICY_REQUEST_FILE = path.join(ROOT, 'examples', 'policy', 'requests', 'permit-owner-edits.json');
const RESULTS_DIR = path.join(__dirname, 'results');
// The gateway case: the same decision as POLICY_REQUEST_FILE (carol edits atlas-design), asked as
// a gateway would, with a bearer token the agent verifies against a JWKS file (its key cached).
const GATEWAY_MAPPING = [
  'token required',
  'subject.type User',
  'subject.id claim:sub',
  'route PUT /documents/{id} action=edit resource=Document::"{id}"',
  'default deny',
  '',
].join('\n');

const log = (text) => process.stderr.write(`[bench] ${text}\n`);

// ---- processes: everything started here is in `running`, and cleanup() ends it all -------------

/** name -> { kill(): Promise<void> } for every process this run started and has not reaped. */
const running = new Map();
let tmp;
let sshCleanup;
let nextKey = 0;

function track(name, kill, exited) {
  const key = `${name}#${nextKey++}`;
  running.set(key, { name, kill });
  void exited.then(() => running.delete(key));
}

/** A spawned non-Node process (sshd, ssh): tracked, with its stderr kept for error messages. */
function trackChild(child, name) {
  child.stderrText = '';
  child.stderr?.setEncoding('utf8').on('data', (s) => {
    child.stderrText = (child.stderrText + s).slice(-4000);
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  track(
    name,
    () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      return exited;
    },
    exited,
  );
  return child;
}

function forkChild(script, name, { profile = false } = {}) {
  const execArgv =
    profile && CPU_PROF_DIR
      ? ['--cpu-prof', '--cpu-prof-dir', CPU_PROF_DIR, '--cpu-prof-name', `${name}-${Date.now()}.cpuprofile`]
      : [];
  const child = new IpcChild(path.join(__dirname, script), [], { name, execArgv });
  track(name, () => child.kill(), child.exited);
  return child;
}

/** The environment without BURROW_* variables, so the host's settings cannot change the bench. */
function benchEnv() {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('BURROW_')));
}

/** Starts a Burrow CLI (`node [flags] cli.js args`) and waits for its "started" log line. */
async function startBurrow(name, cli, args, { nodeFlags = [], startedMessage, onUnexpectedExit }) {
  const profFlags = CPU_PROF_DIR
    ? ['--cpu-prof', '--cpu-prof-dir', CPU_PROF_DIR, '--cpu-prof-name', `${name}-${Date.now()}.cpuprofile`]
    : [];
  const proc = new BurrowProcess(
    name,
    cli,
    [...nodeFlags, ...profFlags, cli, ...args],
    {},
    { executable: process.execPath, cwd: ROOT, env: benchEnv() },
  );
  track(
    name,
    async () => {
      proc.expectedExit = true;
      proc.signal('SIGKILL');
      await proc.exited;
    },
    proc.exited,
  );
  // A broker or agent that dies mid-case would turn every later call into a 5 s wait for it.
  void proc.exited.then((exit) => {
    if (proc.expectedExit) return;
    log(
      `${name} (pid ${proc.pid}) exited unexpectedly (${JSON.stringify(exit)}); its stderr ends ` +
        `with:\n${proc.stderrTail(30)}`,
    );
    if (onUnexpectedExit) onUnexpectedExit(exit, proc.stderrTail(30));
    else void cleanup().finally(() => process.exit(1));
  });
  const started = await proc.waitForLog(startedMessage, undefined, { timeoutMs: 30_000 });
  return { proc, started };
}

/** SIGTERM (so a --cpu-prof profile gets written), SIGKILL after 15 s. */
async function stopGracefully(proc) {
  proc.expectedExit = true;
  proc.signal('SIGTERM');
  try {
    await proc.waitExit(15_000);
  } catch {
    proc.signal('SIGKILL');
    await proc.exited;
  }
}

async function cleanup() {
  await Promise.all([...running.values()].map((r) => r.kill().catch(() => {})));
  await killAll().catch((err) => log(`cleanup: ${err.message}`));
  try {
    sshCleanup?.();
  } catch (err) {
    log(`cleanup: ${err.message}`);
  }
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  tmp = undefined;
}

for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(signal, () => {
    log(`${signal}: stopping every process the bench started`);
    void cleanup().finally(() => process.exit(130));
  });
}

/** Resolves when `port` accepts a TCP connection; rejects when `child` exits first. */
async function waitAccepts(port, child, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  // Nothing announces that sshd listens or that ssh's forward is up, so this polls the port.
  while (!(await accepts(port))) {
    if (child.exitCode !== null || child.signalCode !== null)
      throw new Error(`port ${port}: the process exited first: ${child.stderrText}`);
    if (Date.now() > deadline)
      throw new Error(`port ${port} did not accept within ${timeoutMs} ms: ${child.stderrText}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

// ---- statistics -----------------------------------------------------------------------------

function median(xs) {
  const s = xs.filter((x) => x !== null && x !== undefined).sort((a, b) => a - b);
  if (s.length === 0) return null;
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

const CLOCK_TICKS_PER_S = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());

/** User + system CPU ms of `pid` and its descendants (sshd's session processes), from /proc. */
function cpuMsOfTree(pid) {
  let ms = 0;
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    // Fields 14 and 15 of stat (utime, stime), counted after the command name.
    ms = ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS_PER_S;
    for (const child of fs
      .readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8')
      .trim()
      .split(/\s+/)
      .filter(Boolean))
      ms += cpuMsOfTree(Number(child));
  } catch {
    // The process is gone: it contributes nothing more.
  }
  return ms;
}

/**
 * CPU each named process (or list of processes) spends from now on: `ms()` per name so far,
 * `seconds()` the same in seconds. What each hop or phase costs, which other load on the machine
 * disturbs far less than the wall clock.
 */
function cpuMeter(pids) {
  const total = (p) => (Array.isArray(p) ? p.reduce((ms, one) => ms + cpuMsOfTree(one), 0) : cpuMsOfTree(p));
  const before = Object.fromEntries(Object.entries(pids).map(([name, p]) => [name, total(p)]));
  const ms = () => Object.fromEntries(Object.entries(pids).map(([name, p]) => [name, total(p) - before[name]]));
  return {
    ms,
    seconds: () => Object.fromEntries(Object.entries(ms()).map(([name, v]) => [name, Math.round(v) / 1000])),
  };
}

/** CPU µs per call of each process on a side's path during one measurement. */
async function withCpuPerCall(pids, measure) {
  const cpu = cpuMeter(pids);
  const r = await measure();
  const calls = r.allCalls;
  r.cpuUsPerCall = Object.fromEntries(
    Object.entries(cpu.ms()).map(([name, ms]) => [name, calls ? Math.round((ms * 1000) / calls) : null]),
  );
  return r;
}

/**
 * Collects one side's measurements over rounds: each metric keeps every round's value (`rounds`)
 * and reports their median; failed calls of every measurement add up, by code.
 */
class SideResult {
  constructor() {
    this.rounds = {};
    this.failed = 0;
    this.failedByCode = {};
    this.notes = {};
  }
  add(metric, value, outcome) {
    this.rounds[metric] ??= [];
    this.rounds[metric].push(value);
    this.addFailures(outcome);
  }
  addFailures(outcome) {
    this.failed += (outcome.failed ?? 0) + (outcome.warmupFailed ?? 0);
    for (const [code, n] of Object.entries(outcome.failedByCode ?? {}))
      this.failedByCode[code] = (this.failedByCode[code] ?? 0) + n;
  }
  toJSON() {
    const out = {};
    for (const [metric, values] of Object.entries(this.rounds)) out[metric] = median(values);
    return { ...out, failed: this.failed, failedByCode: this.failedByCode, rounds: this.rounds, ...this.notes };
  }
}

// ---- setup ----------------------------------------------------------------------------------

function pki(...args) {
  return execFileSync(process.execPath, [PKI_CLI, ...args], { encoding: 'utf8', env: benchEnv() });
}

function certFiles(dir) {
  return { cert: path.join(dir, 'tls.crt'), key: path.join(dir, 'tls.key'), ca: path.join(dir, 'ca.crt') };
}

function machineInfo() {
  const git = (...args) => {
    try {
      return execFileSync('git', args, { cwd: ROOT, encoding: 'utf8' }).trim();
    } catch {
      return null;
    }
  };
  const cpus = os.cpus();
  return {
    cpus: cpus.length,
    model: cpus[0]?.model ?? 'unknown',
    memKiB: Math.round(os.totalmem() / 1024),
    node: process.version,
    os: `${os.type()} ${os.release()}`,
    loadAverageStart: os.loadavg().map((x) => Math.round(x * 100) / 100),
    profile: PROFILE_NAME,
    gitCommit: git('rev-parse', 'HEAD'),
    gitDirty: !!git('status', '--porcelain'),
    date: new Date().toISOString(),
    fdLimit: Number(execFileSync('sh', ['-c', 'ulimit -n'], { encoding: 'utf8' }).trim()),
  };
}

const EXTRA_BROKER_FLAGS = (process.env.BENCH_BROKER_FLAGS ?? '').split(/\s+/).filter(Boolean);

function brokerArgs(ports, files, extra = []) {
  return [
    'serve',
    '--agent-listen',
    `127.0.0.1:${ports.agent}`,
    '--api-listen',
    `127.0.0.1:${ports.api}`,
    '--admin-listen',
    `127.0.0.1:${ports.admin}`,
    '--tls-cert',
    files.cert,
    '--tls-key',
    files.key,
    '--ca',
    files.ca,
    // Every agent of the bench dials from 127.0.0.1: the per-address cap (for one attacker address)
    // would measure itself instead of the fleet's reconnect storm against --max-pending-handshakes.
    '--max-pending-handshakes-per-address',
    '0',
    ...extra,
    ...EXTRA_BROKER_FLAGS,
  ];
}

// ---- cases 1-3: unary, policy, stream on one broker + agent ----------------------------------

async function runTunnelCases(ctx, result) {
  const { dirs, echo, floor } = ctx;
  const [agentPort, apiPort, adminPort, sshPort, forwardPort, extAuthzPort] = await freePorts(6);
  const gateway = CASES.includes('gateway') ? await gatewaySetup(extAuthzPort) : undefined;
  const broker = await startBurrow(
    'broker',
    BROKER_CLI,
    brokerArgs({ agent: agentPort, api: apiPort, admin: adminPort }, certFiles(dirs.broker), gateway?.brokerArgs),
    { startedMessage: 'broker started' },
  );
  const agentArgs = [...siteAgentArgs(dirs, agentPort, echo, 'audit.jsonl'), ...(gateway?.agentArgs ?? [])];
  // An agent that dies is started again, as systemd would (Restart=on-failure), and the death is
  // recorded: the calls it failed count as misses of the measurement that was running.
  let agent;
  let restarting;
  const onAgentDeath = (exit, stderrTail) => {
    result.machine.agentDeaths = [
      ...(result.machine.agentDeaths ?? []),
      { exit, stderrTail: stderrTail.split('\n').slice(-12).join('\n') },
    ];
    restarting = startBurrow('agent', AGENT_CLI, agentArgs, {
      startedMessage: 'agent started',
      onUnexpectedExit: onAgentDeath,
    }).then((a) => {
      agent = a;
      if (pathPids) pathPids.burrow.agent = a.proc.pid;
    });
  };
  agent = await startBurrow('agent', AGENT_CLI, agentArgs, {
    startedMessage: 'agent started',
    onUnexpectedExit: onAgentDeath,
  });
  let pathPids;
  await agent.proc.waitForLog('tunnel session established', undefined, { timeoutMs: 15_000 });
  const echoPort = Number(echo.split(':').pop());

  const sides = {
    direct: { address: echo },
    burrow: { address: `127.0.0.1:${apiPort}`, tls: certFiles(dirs.caller), agentIds: [SITE_AGENT_ID] },
  };
  let ssh;
  try {
    ssh = await startSshTunnel({
      dir: path.join(tmp, 'ssh'),
      upstreamPort: echoPort,
      sshPort,
      forwardPort,
      track: trackChild,
      waitAccepts,
      log,
    });
    sshCleanup = ssh.cleanup;
    sides.ssh = { address: `127.0.0.1:${ssh.forwardPort}` };
  } catch (err) {
    // Reported, not hidden: the ssh columns stay empty and the JSON says why.
    log(`ssh side unavailable: ${err.message}`);
    result.machine.sshError = err.message;
  }
  result.machine.ssh = ssh?.version;
  // The floor of forwarding with grpc-js: two bare relays on the same hops (see relay.js).
  const relays = [forkChild('relay.js', 'relay-agent-hop'), forkChild('relay.js', 'relay-broker-hop')];
  const agentHop = await relays[0].call('start', { listenTls: certFiles(dirs.broker), target: echo });
  const brokerHop = await relays[1].call('start', {
    listenTls: certFiles(dirs.broker),
    target: agentHop,
    targetTls: certFiles(dirs.agent),
  });
  sides.relay = { address: brokerHop, tls: certFiles(dirs.caller) };
  // The floor of forwarding with raw node:http2 in the shape of a reverse tunnel (see raw-relay.js):
  // hop 2 dials hop 1, then hop 1 opens one HTTP/2 stream per call on that connection.
  const rawHops = [forkChild('raw-relay.js', 'raw-hop1'), forkChild('raw-relay.js', 'raw-hop2')];
  const rawHop1 = await rawHops[0].call('hop1', { listenTls: certFiles(dirs.broker) });
  await rawHops[1].call('hop2', { hop1: rawHop1.agents, dialTls: certFiles(dirs.agent), target: echo });
  await rawHops[0].call('agentConnected');
  sides.raw = { address: rawHop1.callers, tls: certFiles(dirs.caller) };
  // And the policy case's two-hop floor: one relay behind mTLS in front of the trivial server.
  relays.push(forkChild('relay.js', 'relay-policy'));
  const policyHop = await relays[2].call('start', {
    listenTls: certFiles(dirs.broker),
    target: floor,
    methods: [POLICY_METHODS.evaluate],
  });

  const callers = {};
  for (const [name, target] of Object.entries(sides)) {
    callers[name] = forkChild('caller.js', `caller-${name}`);
    await callers[name].call('connect', target);
  }
  callers.floor = forkChild('caller.js', 'caller-floor');
  await callers.floor.call('connect', { address: floor });
  callers.relayPolicy = forkChild('caller.js', 'caller-relay-policy');
  await callers.relayPolicy.call('connect', { address: policyHop, tls: certFiles(dirs.caller) });
  if (gateway) {
    await gateway.expectAllowed(certFiles(dirs.caller));
    callers.extAuthz = forkChild('caller.js', 'caller-ext-authz');
    await callers.extAuthz.call('connect', { address: gateway.address, tls: certFiles(dirs.caller) });
  }

  const unarySides = Object.keys(sides);
  const upstreamPid = ctx.upstreamPid;
  pathPids = {
    direct: { caller: callers.direct.proc.pid, upstream: upstreamPid },
    burrow: { caller: callers.burrow.proc.pid, broker: broker.proc.pid, agent: agent.proc.pid, upstream: upstreamPid },
    ...(ssh
      ? { ssh: { caller: callers.ssh.proc.pid, sshd: ssh.sshdPid, ssh: ssh.sshPid, upstream: upstreamPid } }
      : {}),
    relay: {
      caller: callers.relay.proc.pid,
      relayBroker: relays[1].proc.pid,
      relayAgent: relays[0].proc.pid,
      upstream: upstreamPid,
    },
    raw: {
      caller: callers.raw.proc.pid,
      rawHop1: rawHops[0].proc.pid,
      rawHop2: rawHops[1].proc.pid,
      upstream: upstreamPid,
    },
  };
  const unary = Object.fromEntries(unarySides.map((s) => [s, new SideResult()]));
  const policy = { floor: new SideResult(), burrow_policy: new SideResult(), relay_policy: new SideResult() };
  const stream = Object.fromEntries(unarySides.map((s) => [s, new SideResult()]));
  const policyCallers = { floor: callers.floor, burrow_policy: callers.burrow, relay_policy: callers.relayPolicy };
  // The gateway case is judged against Evaluate measured in the same rounds.
  if (gateway) {
    policy.ext_authz = new SideResult();
    policyCallers.ext_authz = callers.extAuthz;
  }
  const policyPayloads = { ext_authz: gateway?.payloadB64 };
  const policyMethods = { ext_authz: EXT_AUTHZ_CHECK_METHOD };
  const payloadB64 = Buffer.alloc(UNARY_PAYLOAD_BYTES, 7).toString('base64');
  const policyB64 = API_CODECS.evaluationRequest
    .encode(JSON.parse(fs.readFileSync(POLICY_REQUEST_FILE, 'utf8')))
    .toString('base64');
  const latencyArgs = (method, b64) => ({ method, payloadB64: b64, calls: P.latencyCalls, warmupCalls: P.warmupCalls });
  const rpsArgs = (method, b64, concurrency) => ({
    method,
    payloadB64: b64,
    concurrency,
    durationMs: P.rpsMs,
    warmupMs: P.rpsWarmupMs,
  });

  for (let round = 0; round < P.rounds; round++) {
    // Alternate the order of the sides so that drift in machine load cancels out.
    const order = (names) => (round % 2 === 0 ? names : [...names].reverse());
    log(`round ${round + 1}/${P.rounds}`);
    if (CASES.includes('unary')) {
      for (const s of order(unarySides)) {
        const r = await callers[s].call('latency', latencyArgs(ECHO.unary, payloadB64));
        unary[s].add('p50_us', r.p50_us, r);
        unary[s].add('p99_us', r.p99_us, {});
      }
      for (const c of CONCURRENCIES) {
        for (const s of order(unarySides)) {
          const r = await withCpuPerCall(pathPids[s], () =>
            callers[s].call('throughput', rpsArgs(ECHO.unary, payloadB64, c)),
          );
          unary[s].add(`rps_c${c}`, r.rps, r);
          if (c === 64)
            for (const [proc, us] of Object.entries(r.cpuUsPerCall)) unary[s].add(`cpuUsPerCallC64_${proc}`, us, {});
        }
      }
    }
    if (CASES.includes('policy') || gateway) {
      for (const s of order(Object.keys(policy))) {
        const method = policyMethods[s] ?? POLICY_METHODS.evaluate;
        const b64 = policyPayloads[s] ?? policyB64;
        const l = await policyCallers[s].call('latency', latencyArgs(method, b64));
        policy[s].add('p50_us', l.p50_us, l);
        policy[s].add('p99_us', l.p99_us, {});
        // Where a decision's CPU goes (broker, agent) on the two paths the gateway case compares.
        const pids = s === 'burrow_policy' || s === 'ext_authz' ? pathPids.burrow : {};
        const r = await withCpuPerCall({ ...pids, caller: policyCallers[s].proc.pid }, () =>
          policyCallers[s].call('throughput', rpsArgs(method, b64, 64)),
        );
        policy[s].add('rps_c64', r.rps, r);
        for (const hop of ['broker', 'agent'])
          if (r.cpuUsPerCall[hop] !== undefined) policy[s].add(`cpuUsPerCallC64_${hop}`, r.cpuUsPerCall[hop], {});
      }
    }
  }
  // Streams run after every unary and policy round, in rounds of their own, so that each case
  // measures a process warmed up by the same kind of traffic.
  for (let round = 0; round < P.rounds; round++) {
    const order = (names) => (round % 2 === 0 ? names : [...names].reverse());
    if (CASES.includes('stream')) {
      for (const s of order(unarySides)) {
        const warm = await callers[s].call('stream', {
          method: ECHO.bidi,
          messageBytes: STREAM_MESSAGE_BYTES,
          durationMs: P.streamWarmupMs,
        });
        stream[s].addFailures(warm);
        const cpu = cpuMeter(pathPids[s]);
        const r = await callers[s].call('stream', {
          method: ECHO.bidi,
          messageBytes: STREAM_MESSAGE_BYTES,
          durationMs: P.streamMs,
        });
        stream[s].add('mb_s', r.mb_s, r);
        // CPU ms per MiB echoed, each process of the path: where a streamed byte's cost goes.
        const mib = r.receivedBytes / 2 ** 20;
        for (const [proc, ms] of Object.entries(cpu.ms()))
          stream[s].add(`cpuMsPerMiB_${proc}`, mib ? Math.round((ms / mib) * 100) / 100 : null, {});
        stream[s].add('durationMs', r.durationMs, {});
        if (r.failed)
          stream[s].notes.lastFailure =
            `${r.status} ${r.details ?? ''} (${r.receivedBytes} of ${r.sentBytes} bytes echoed)`;
      }
    }
  }
  const plain = (bySide) => Object.fromEntries(Object.entries(bySide).map(([side, r]) => [side, r.toJSON()]));
  const extAuthz = policy.ext_authz;
  delete policy.ext_authz;
  if (gateway) {
    result.cases.gateway = {
      request: 'PUT /documents/atlas-design, Bearer ES256 token of carol (the policy request, asked as a gateway)',
      mapping: GATEWAY_MAPPING,
      ext_authzIs: 'Envoy-shaped envoy.service.auth.v3.Authorization/Check on --ext-authz-listen (mTLS)',
      evaluateIs: "the policy case's Evaluate through the tunnel, measured in the same rounds",
      ext_authz: extAuthz.toJSON(),
      evaluate: policy.burrow_policy.toJSON(),
      floor: policy.floor.toJSON(),
    };
  }
  if (CASES.includes('unary')) result.cases.unary = { payloadBytes: UNARY_PAYLOAD_BYTES, ...plain(unary) };
  if (CASES.includes('policy')) {
    result.cases.policy = {
      request: path.relative(ROOT, POLICY_REQUEST_FILE),
      policyCacheTtl: '0s',
      floorIs: 'direct plaintext gRPC call to a trivial server answering a fixed permit (one hop)',
      relayPolicyIs: 'the same server behind one bare grpc-js relay reached over mTLS (two hops, no decision work)',
      ...plain(policy),
    };
  }
  if (CASES.includes('stream')) result.cases.stream = { messageBytes: STREAM_MESSAGE_BYTES, ...plain(stream) };

  for (const c of Object.values(callers)) await c.call('close');
  await restarting;
  await Promise.all([stopGracefully(agent.proc), stopGracefully(broker.proc)]);
  for (const c of Object.values(callers)) await c.kill();
  for (const r of [...relays, ...rawHops]) await r.kill();
}

/**
 * The gateway case's pieces: the broker's --ext-authz-listen, the agent's mapping, JWKS and token
 * flags, the Envoy CheckRequest (built by the test suite's Envoy-shaped client) with a token signed
 * here, and a check that the site allows it (a DENY is a gRPC OK too: the load loop cannot tell).
 */
async function gatewaySetup(extAuthzPort) {
  const { loadJose } = require('@burrow/agent');
  const { ISS, AUD, makeKey, jwksOf, signToken } = require(path.join(HELPERS, 'token-fixture.js'));
  const { EnvoyAuthzClient, envoyCheckRequest, encodeEnvoyCheckRequest } = require(
    path.join(HELPERS, 'envoy-client.js'),
  );
  const jose = await loadJose();
  const key = await makeKey(jose, 'ES256', 'bench-key');
  const jwks = path.join(tmp, 'jwks.json');
  const mapping = path.join(tmp, 'gateway-mapping.conf');
  fs.writeFileSync(jwks, jwksOf(key));
  fs.writeFileSync(mapping, GATEWAY_MAPPING);
  const nowS = Math.floor(Date.now() / 1000);
  const token = await signToken(jose, key, { sub: 'carol', exp: nowS + 3600 });
  const request = envoyCheckRequest({
    method: 'PUT',
    path: '/documents/atlas-design',
    token,
    agent: SITE_AGENT_ID,
    requestId: 'bench-gateway',
  });
  const address = `127.0.0.1:${extAuthzPort}`;
  return {
    address,
    brokerArgs: ['--ext-authz-listen', address],
    agentArgs: ['--gateway-mapping', mapping, '--jwks', jwks, '--token-issuer', ISS, '--token-audience', AUD],
    payloadB64: encodeEnvoyCheckRequest(request).toString('base64'),
    async expectAllowed(tls) {
      const client = new EnvoyAuthzClient(address, tls);
      try {
        const res = await client.check(request, 10_000);
        if (!res.ok_response) throw new Error(`the gateway check is not allowed: ${JSON.stringify(res)}`);
      } finally {
        client.close();
      }
    },
  };
}

/**
 * `burrow-agent run` for the site of the tunnel cases: the echo upstream for every service, the
 * example policies with the decision cache off (every decision is evaluated by Cedar: with the
 * cache on, repeating one request would measure a map lookup instead), its audit log in `auditFile`.
 */
function siteAgentArgs(dirs, agentPort, echo, auditFile) {
  return [
    'run',
    '--broker',
    `127.0.0.1:${agentPort}`,
    ...tlsArgs(certFiles(dirs.agent)),
    '--upstream',
    `*=${echo}`,
    '--policies',
    path.join(ROOT, 'examples', 'policy', 'policies'),
    '--entities',
    path.join(ROOT, 'examples', 'policy', 'entities.json'),
    '--policy-cache-ttl',
    '0s',
    '--audit-log',
    path.join(tmp, auditFile),
  ];
}

function tlsArgs(files) {
  return ['--tls-cert', files.cert, '--tls-key', files.key, '--ca', files.ca];
}

// ---- case 4: many idle agents against one broker ---------------------------------------------

/** The broker's VmRSS (KiB) after full GCs, asked of the gc-preload hook. */
async function settledRssKiB(proc) {
  const from = proc.logs.length;
  proc.signal('SIGUSR2');
  const settled = await proc.waitForLog('bench gc settled', undefined, { from, timeoutMs: 30_000 });
  const status = fs.readFileSync(`/proc/${proc.pid}/status`, 'utf8');
  return { rssKiB: Number(/^VmRSS:\s+(\d+) kB/m.exec(status)[1]), heapUsedBytes: Number(settled.heapUsedBytes) };
}

/** Seconds from `t0Ms` until the broker's /status counts `n` agents, or null at the timeout. */
async function timeUntilAgents(adminPort, n, t0Ms, timeoutMs) {
  let last = 0;
  try {
    await pollUntil(
      `${n} agents`,
      async () => {
        last = (await getJson(`http://127.0.0.1:${adminPort}/status`)).agents;
        return last >= n;
      },
      timeoutMs,
      100,
    );
    return { seconds: Math.round((performance.now() - t0Ms) / 10) / 100, connected: last };
  } catch {
    return { seconds: null, connected: last };
  }
}

/**
 * Starts every swarm's agents (first connects paced at `P.scaleArrivalPerS` over the whole
 * fleet), waits until the broker counts them all or `rampMs + P.scaleWaitMs` passes, and returns
 * how long that took, the broker's settled RSS and the swarm's start parameters.
 */
async function connectFleet(swarms, admin, broker, startArgs) {
  const t0 = performance.now();
  const cpu = cpuMeter({ broker: broker.proc.pid, swarm: swarms.map((s) => s.proc.pid) });
  const started = await Promise.all(
    swarms.map((s) => s.call('start', { ...startArgs, arrivalPerS: P.scaleArrivalPerS / swarms.length })),
  );
  const rampMs = Math.max(...started.map((s) => s.rampMs));
  const connect = await timeUntilAgents(admin, P.scaleAgents, t0, rampMs + P.scaleWaitMs);
  const cpuS = cpu.seconds();
  const status = await Promise.all(swarms.map((s) => s.call('status')));
  const sum = (key) => status.reduce((total, s) => total + s[key], 0);
  return {
    connect,
    cpuS,
    neverConnected: sum('neverConnected'),
    failedAttempts: sum('failedAttempts'),
    failuresByCause: sumFailures(status),
    rampMs,
    loaded: await settledRssKiB(broker.proc),
    started: started[0],
  };
}

/** The swarms' failed attempts by cause, added up (`minus`: a previous total to subtract). */
function sumFailures(statuses, minus = {}) {
  const out = {};
  for (const st of statuses)
    for (const [cause, n] of Object.entries(st.failuresByCause ?? {}))
      if (typeof n === 'number') out[cause] = (out[cause] ?? 0) + n;
  for (const [cause, n] of Object.entries(minus)) out[cause] = (out[cause] ?? 0) - n;
  return out;
}

/** The sum of a metric's series in the broker's /metrics. */
async function brokerCounter(adminPort, name) {
  return metricSum(parseMetrics((await httpGet(`http://127.0.0.1:${adminPort}/metrics`)).body), name);
}

/**
 * Node's own memory per idle mTLS connection (bench/connection-floor.js: bare node:tls, an idle
 * node:http2 session on it in v4's roles, and the same with `streams` open streams: an idle v4
 * agent holds one, its control stream), with the bench's broker and agent certificates: the floor
 * under the broker's RSS per agent.
 */
function connectionFloor(dirs, connections, streams) {
  const pem = (dir) => {
    const f = certFiles(dir);
    return {
      certPem: fs.readFileSync(f.cert, 'utf8'),
      keyPem: fs.readFileSync(f.key, 'utf8'),
      caPem: fs.readFileSync(f.ca, 'utf8'),
    };
  };
  const certsFile = path.join(tmp, 'connection-floor-certs.json');
  fs.writeFileSync(certsFile, JSON.stringify({ server: pem(dirs.broker), client: pem(dirs.agent) }), { mode: 0o600 });
  const out = execFileSync(
    process.execPath,
    [path.join(__dirname, 'connection-floor.js'), certsFile, String(connections), String(streams)],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] },
  );
  return JSON.parse(out);
}

/** Streams an idle v4 agent holds on its connection: the control stream. */
const STREAMS_PER_IDLE_AGENT = 1;

const perAgentKiB = (loaded, idle, n) => Math.round(((loaded.rssKiB - idle.rssKiB) / n) * 10) / 10;

async function runScale(ctx, result) {
  const { dirs, echo } = ctx;
  const n = P.scaleAgents;
  const [agent, api, admin] = await freePorts(3);
  const args = brokerArgs({ agent, api, admin }, certFiles(dirs.broker));
  const gcFlags = ['--expose-gc', '-r', path.join(__dirname, 'gc-preload.js')];
  const startBroker = () =>
    startBurrow('scale-broker', BROKER_CLI, args, { nodeFlags: gcFlags, startedMessage: 'broker started' });
  let broker = await startBroker();
  const ids = Array.from({ length: n }, (_, i) => `scale-${i}`);
  const swarms = Array.from({ length: P.swarmProcesses }, (_, i) =>
    forkChild('agent-swarm.js', `agent-swarm-${i}`, { profile: i === 0 }),
  );
  // In production the agents run on their own machines; here the swarm processes share 2 cores
  // with the broker, and the kernel's fair share would give the one broker process 1/(swarms + 1)
  // of the CPU while every simulated agent does a full client handshake (which costs more than the
  // broker's side). Lower priority lets the broker take the CPU it needs, as it would on its own
  // host; the swarms still get all the rest.
  for (const s of swarms) os.setPriority(s.proc.pid, SWARM_NICE);
  log(`scale: issuing ${n} agent certificates in ${swarms.length} processes`);
  const t0Issue = performance.now();
  await Promise.all(
    swarms.map((s, i) => s.call('issue', { pkiDir: dirs.pki, ids: ids.filter((_, j) => j % swarms.length === i) })),
  );
  const issueSeconds = (performance.now() - t0Issue) / 1000;
  const idle = await settledRssKiB(broker.proc);

  log(`scale: connecting ${n} agents, ${P.scaleArrivalPerS} a second`);
  const caPem = fs.readFileSync(certFiles(dirs.broker).ca, 'utf8');
  // burrow-agent's defaults (--max-concurrent-calls, --reconnect-base, --reconnect-max): the swarm's own.
  const startArgs = { broker: `127.0.0.1:${agent}`, caPem, upstream: `*=${echo}` };
  const first = await connectFleet(swarms, admin, broker, startArgs);
  const { connect, loaded } = first;

  const caller = forkChild('caller.js', 'caller-scale');
  const target = { address: `127.0.0.1:${api}`, tls: certFiles(dirs.caller), agentIds: ids };
  const callArgs = {
    method: ECHO.unary,
    payloadB64: Buffer.alloc(UNARY_PAYLOAD_BYTES, 7).toString('base64'),
    calls: P.scaleCalls,
    concurrency: 16,
  };
  await caller.call('connect', target);
  const callsConnected = await caller.call('randomCalls', callArgs);

  log('scale: SIGKILL the broker, start it again on the same ports');
  const t0Kill = performance.now();
  broker.proc.expectedExit = true;
  broker.proc.signal('SIGKILL');
  await broker.proc.exited;
  const swarmCpu = cpuMeter({ swarm: swarms.map((s) => s.proc.pid) });
  broker = await startBroker();
  const restartSeconds = (performance.now() - t0Kill) / 1000;
  const brokerCpu = cpuMeter({ broker: broker.proc.pid });
  const reconnect = await timeUntilAgents(admin, n, t0Kill, P.scaleWaitMs);
  const reconnectCpuS = { ...brokerCpu.seconds(), ...swarmCpu.seconds() };
  const reconnectShed = await brokerCounter(admin, 'burrow_broker_handshakes_shed_total');
  // A fresh channel: the old one may sit in grpc-js' reconnect backoff from the kill, which is
  // the caller's own client and not what this case measures.
  await caller.call('close');
  await caller.call('connect', target);
  const callsReconnected = await caller.call('randomCalls', callArgs);
  const swarmStatus = await Promise.all(swarms.map((s) => s.call('status')));
  await caller.kill();

  result.cases.scale = {
    agents: n,
    rss_kib_per_agent: perAgentKiB(loaded, idle, n),
    connect_all_s: connect.seconds,
    reconnect_all_s: reconnect.seconds,
    calls_ok: callsConnected.ok + callsReconnected.ok,
    calls_failed: callsConnected.failed + callsReconnected.failed,
    agents_never_connected: first.neverConnected,
    agents_not_back_after_restart: n - reconnect.connected,
    failedConnectAttempts: {
      connect: first.failedAttempts,
      reconnect: swarmStatus.reduce((total, s) => total + s.failedAttempts, 0) - first.failedAttempts,
    },
    failedConnectAttemptsByCause: {
      connect: first.failuresByCause,
      reconnect: sumFailures(swarmStatus, first.failuresByCause),
    },
    agentsConnectedAtEnd: {
      connect: connect.connected,
      reconnect: reconnect.connected,
    },
    brokerRssKiB: { idle: idle.rssKiB, withAgents: loaded.rssKiB },
    heapBytesPerAgent: Math.round((loaded.heapUsedBytes - idle.heapUsedBytes) / n),
    brokerRestartToStartedS: Math.round(restartSeconds * 100) / 100,
    // Where the CPU went: on 2 cores the simulated agents' TLS and gRPC clients compete with the
    // broker, so broker CPU seconds per agent is what a broker on its own core would need.
    cpuS: { connect: first.cpuS, reconnect: reconnectCpuS },
    brokerCpuMsPerAgent: {
      connect: Math.round(((first.cpuS.broker * 1000) / n) * 100) / 100,
      reconnect: Math.round(((reconnectCpuS.broker * 1000) / n) * 100) / 100,
    },
    reconnectHandshakesShed: reconnectShed,
    restartIs:
      'SIGKILL (a crash), then the same command on the same ports; timed from the kill; reconnects are not paced',
    swarmNice: SWARM_NICE,
    connectIs:
      `first connects paced at ${P.scaleArrivalPerS}/s over the fleet (${(first.rampMs / 1000).toFixed(1)} s ` +
      `ramp); timed from the first; waits at most ramp + ${P.scaleWaitMs / 1000} s`,
    arrivalPerS: P.scaleArrivalPerS,
    waitBoundS: P.scaleWaitMs / 1000,
    // Protocol v4: an idle agent holds its connection and the control stream the broker opened, no
    // idle streams; calls are streams the broker opens when they come, up to maxConcurrentCalls.
    streamsPerIdleAgent: STREAMS_PER_IDLE_AGENT,
    maxConcurrentCallsPerAgent: first.started.maxConcurrentCalls,
    reconnectBackoffMs: { base: first.started.reconnectBaseMs, max: first.started.reconnectMaxMs },
    calls: { afterConnect: callsConnected, afterReconnect: callsReconnected },
    swarm: { processes: swarms.length, certificateIssueS: Math.round(issueSeconds * 10) / 10, status: swarmStatus },
  };
  await Promise.all(swarms.map((s) => s.call('stop').catch(() => {})));
  await Promise.all(swarms.map((s) => s.close()));
  await stopGracefully(broker.proc);

  // With the broker and swarms gone, so that nothing else competes for the CPU or the memory.
  log('scale: the floor, idle connections to bare node:tls and node:http2 servers');
  const floor = connectionFloor(dirs, Math.min(n, 2000), STREAMS_PER_IDLE_AGENT);
  result.cases.scale.rss_floor_kib_per_connection = {
    tls: floor.tls,
    http2: floor.http2,
    http2WithControlStream: floor.http2Streams,
    streams: floor.streams,
    connections: floor.connections,
    is:
      'RSS per idle connection of a server with no Burrow and no grpc-js: node:tls with a client certificate; ' +
      'an idle node:http2 session on it in v4 roles (the TLS server is the HTTP/2 client); the same with one ' +
      "open stream that the server side opened, as a broker opens an agent's control stream",
  };
  result.cases.scale.rss_per_agent_vs_floor =
    floor.http2Streams > 0
      ? Math.round((result.cases.scale.rss_kib_per_agent / floor.http2Streams) * 1000) / 1000
      : null;
}

// ---- case 5: certificate issuance ------------------------------------------------------------

/** Runs `fn` on every item, `concurrency` at a time; per second over the whole batch. */
async function ratePerSecond(items, concurrency, fn) {
  const queue = [...items];
  let ok = 0;
  let failed = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      for (let item = queue.shift(); item; item = queue.shift()) {
        try {
          await fn(item);
          ok++;
        } catch {
          failed++;
        }
      }
    }),
  );
  return { perS: Math.round(ok / ((performance.now() - t0) / 1000)), ok, failed };
}

async function runIssuance(ctx, result) {
  const { dirs } = ctx;
  const k = P.enrollments + 1; // + the caller's warm-up enrollment
  log(`issuance: ${k} join tokens and CSRs (not timed: the platform and the agents make these)`);
  const requests = [];
  for (let i = 0; i < k; i++) {
    const [{ token }, { csrPem }] = await Promise.all([
      createJoinToken({ dir: dirs.pki, agentId: `enroll-${i}`, ttlMs: 3_600_000 }),
      createCsr(),
    ]);
    requests.push({ token, csrPem });
  }
  const [agent, api, admin] = await freePorts(3);
  const broker = await startBurrow(
    'enroll-broker',
    BROKER_CLI,
    [
      'serve',
      '--agent-listen',
      `127.0.0.1:${agent}`,
      '--api-listen',
      `127.0.0.1:${api}`,
      '--admin-listen',
      `127.0.0.1:${admin}`,
      '--pki-dir',
      dirs.pki,
      '--tls-dns',
      'localhost',
      '--tls-ip',
      '127.0.0.1',
      // Every enrollment comes from 127.0.0.1; the default (30/min per address) would measure the limiter.
      '--enroll-per-minute',
      '100000',
      // Likewise the per-address cap; and the callers' connections (one per concurrent enrollment,
      // 2 streams at most each) outlive the budget of connections without a client certificate.
      '--max-pending-handshakes-per-address',
      '0',
      '--unauthenticated-timeout',
      '1h',
    ],
    { startedMessage: 'broker started' },
  );
  const caller = forkChild('caller.js', 'caller-enroll');
  const enrolled = await caller.call('enroll', {
    address: `127.0.0.1:${agent}`,
    caFile: certFiles(dirs.caller).ca,
    requests,
    concurrency: ENROLL_CONCURRENCY,
  });
  await caller.kill();
  await stopGracefully(broker.proc);

  const csrs = [];
  for (let i = 0; i < P.signCsrs; i++) csrs.push({ name: `sign-${i}`, csrPem: (await createCsr()).csrPem });
  const signed = await ratePerSecond(csrs, ENROLL_CONCURRENCY, (c) =>
    signCsr({ dir: dirs.pki, csrPem: c.csrPem, role: 'agent', name: c.name }),
  );
  result.cases.issuance = {
    per_s: enrolled.per_s,
    ok: enrolled.ok,
    failed: enrolled.failed,
    failedByCode: enrolled.failedByCode,
    concurrency: enrolled.concurrency,
    durationMs: enrolled.durationMs,
    path:
      'Enrollment/Enroll RPC on the broker agent listener (--pki-dir): join token + CSR in, chain out; one TLS ' +
      'connection, no client certificate',
    sign_csr_per_s: signed.perS,
    signCsr: {
      ok: signed.ok,
      failed: signed.failed,
      concurrency: ENROLL_CONCURRENCY,
      in: 'the bench process, @burrow/pki signCsr',
    },
  };
}

// ---- tracing: the cost of spans, ratio 1.0 vs off ------------------------------------------------

/**
 * An OTLP/HTTP sink on loopback that takes every export request (200) and counts its bytes: the
 * collector of the tracing case, in this process so its CPU is not on the measured path.
 */
async function startOtlpSink() {
  const sink = { requests: 0, bytes: 0 };
  const server = http.createServer((req, res) => {
    req.on('data', (c) => {
      sink.bytes += c.length;
    });
    req.on('end', () => {
      sink.requests++;
      res.writeHead(200, { 'content-type': 'application/x-protobuf' }).end();
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  sink.endpoint = `http://127.0.0.1:${server.address().port}`;
  sink.close = () => new Promise((resolve) => server.close(resolve));
  return sink;
}

/** A broker and an agent (with policies, cache off) for the tracing case; `brokerExtra` turns tracing on. */
async function startTracingPair(ctx, name, brokerExtra) {
  const { dirs, echo } = ctx;
  const [agentPort, apiPort, adminPort] = await freePorts(3);
  const ports = { agent: agentPort, api: apiPort, admin: adminPort };
  const broker = await startBurrow(
    `broker-${name}`,
    BROKER_CLI,
    brokerArgs(ports, certFiles(dirs.broker), brokerExtra),
    {
      startedMessage: 'broker started',
    },
  );
  const agent = await startBurrow(
    `agent-${name}`,
    AGENT_CLI,
    siteAgentArgs(dirs, agentPort, echo, `audit-${name}.jsonl`),
    { startedMessage: 'agent started' },
  );
  await agent.proc.waitForLog('tunnel session established', undefined, { timeoutMs: 15_000 });
  const caller = forkChild('caller.js', `caller-${name}`);
  await caller.call('connect', {
    address: `127.0.0.1:${apiPort}`,
    tls: certFiles(dirs.caller),
    agentIds: [SITE_AGENT_ID],
  });
  return { broker, agent, caller, pids: { broker: broker.proc.pid, agent: agent.proc.pid } };
}

/**
 * Issue 18: what tracing costs per call. Two broker + agent pairs, one tracing every call (ratio
 * 1.0: a broker SERVER, admission and CLIENT span, an agent SERVER and CLIENT or Cedar span, the
 * agent's spans up the tunnel, all exported to a local OTLP sink) and one with tracing off; unary
 * echo and policy decisions at c=64, CPU µs per call of the broker and the agent, rounds alternated.
 */
async function runTracing(ctx, result) {
  const sink = await startOtlpSink();
  const pairs = {
    off: await startTracingPair(ctx, 'trace-off', []),
    on: await startTracingPair(ctx, 'trace-on', ['--otlp-endpoint', sink.endpoint, '--trace-sample-ratio', '1']),
  };
  const payloadB64 = Buffer.alloc(UNARY_PAYLOAD_BYTES, 7).toString('base64');
  const policyB64 = API_CODECS.evaluationRequest
    .encode(JSON.parse(fs.readFileSync(POLICY_REQUEST_FILE, 'utf8')))
    .toString('base64');
  const methods = { unary: [ECHO.unary, payloadB64], policy: [POLICY_METHODS.evaluate, policyB64] };
  const out = {
    unary: { off: new SideResult(), on: new SideResult() },
    policy: { off: new SideResult(), on: new SideResult() },
  };
  for (let round = 0; round < P.rounds; round++) {
    log(`tracing round ${round + 1}/${P.rounds}`);
    const modes = round % 2 === 0 ? ['off', 'on'] : ['on', 'off'];
    for (const [kind, [method, b64]] of Object.entries(methods)) {
      for (const mode of modes) {
        const { caller, pids } = pairs[mode];
        const args = { method, payloadB64: b64, concurrency: 64, durationMs: P.rpsMs, warmupMs: P.rpsWarmupMs };
        const r = await withCpuPerCall(pids, () => caller.call('throughput', args));
        out[kind][mode].add('rps_c64', r.rps, r);
        for (const [proc, us] of Object.entries(r.cpuUsPerCall)) out[kind][mode].add(`cpuUsPerCall_${proc}`, us, {});
        out[kind][mode].add('cpuUsPerCall_total', r.cpuUsPerCall.broker + r.cpuUsPerCall.agent, {});
      }
    }
  }
  const plain = (bySide) => Object.fromEntries(Object.entries(bySide).map(([side, r]) => [side, r.toJSON()]));
  const overhead = (c) => {
    const off = c.off.cpuUsPerCall_total;
    return off ? Math.round(((c.on.cpuUsPerCall_total - off) / off) * 1000) / 10 : null;
  };
  const unary = plain(out.unary);
  const policy = plain(out.policy);
  result.cases.tracing = {
    is: 'ratio 1.0 sampling, spans exported to a local OTLP/HTTP sink (agent spans through the tunnel) vs tracing off',
    concurrency: 64,
    unary: { ...unary, cpuOverheadPct: overhead(unary) },
    policy: { ...policy, cpuOverheadPct: overhead(policy) },
    sink: { requests: sink.requests, bytes: sink.bytes },
  };
  for (const { caller, broker, agent } of Object.values(pairs)) {
    await caller.call('close');
    await caller.kill();
    await Promise.all([stopGracefully(agent.proc), stopGracefully(broker.proc)]);
  }
  await sink.close();
}

// ---- main -----------------------------------------------------------------------------------

async function main() {
  const t0 = performance.now();
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'burrow-bench-'));
  const result = { machine: machineInfo(), cases: {} };
  result.machine.profileSettings = P;
  log(
    `profile ${PROFILE_NAME}: ${result.machine.cpus} x ${result.machine.model}, Node ${process.version}, ` +
      `load ${result.machine.loadAverageStart.join(' ')}`,
  );

  const dirs = {
    pki: path.join(tmp, 'pki'),
    broker: path.join(tmp, 'broker'),
    agent: path.join(tmp, 'agent'),
    caller: path.join(tmp, 'caller'),
  };
  pki('init', '--dir', dirs.pki, '--trust-domain', 'bench.burrow.local');
  pki(
    'issue',
    '--dir',
    dirs.pki,
    '--role',
    'broker',
    '--name',
    'broker',
    '--dns',
    'localhost',
    '--ip',
    '127.0.0.1',
    '--out',
    dirs.broker,
  );
  pki('issue', '--dir', dirs.pki, '--role', 'agent', '--name', SITE_AGENT_ID, '--out', dirs.agent);
  pki('issue', '--dir', dirs.pki, '--role', 'service', '--name', 'bench-caller', '--out', dirs.caller);

  const upstream = forkChild('upstream.js', 'upstream');
  const { echo, floor } = await upstream.call('addresses');
  const ctx = { dirs, echo, floor, upstreamPid: upstream.proc.pid };
  if (['unary', 'policy', 'stream', 'gateway'].some((c) => CASES.includes(c))) await runTunnelCases(ctx, result);
  if (CASES.includes('tracing')) await runTracing(ctx, result);
  if (CASES.includes('scale')) await runScale(ctx, result);
  if (CASES.includes('issuance')) await runIssuance(ctx, result);

  result.machine.loadAverageEnd = os.loadavg().map((x) => Math.round(x * 100) / 100);
  result.machine.benchDurationS = Math.round((performance.now() - t0) / 1000);
  result.targets = evaluateTargets(result.cases);
  fs.mkdirSync(RESULTS_DIR, { recursive: true });
  fs.writeFileSync(path.join(RESULTS_DIR, 'latest.json'), `${JSON.stringify(result, null, 2)}\n`);
  printTable(result);
  log(
    `wrote ${path.relative(process.cwd(), path.join(RESULTS_DIR, 'latest.json'))} ` +
      `in ${result.machine.benchDurationS} s`,
  );
}

main().then(
  () => cleanup(),
  async (err) => {
    process.stderr.write(`bench failed: ${err.stack ?? err}\n`);
    await cleanup();
    process.exitCode = 1;
  },
);
