#!/usr/bin/env node
'use strict';
// The bench's caller process: drives load at one target (an upstream, the broker's API, the
// ssh-forwarded port, the broker's enrollment RPC) and answers the orchestrator over IPC with
// latencies, rates and every failed call. Messages are raw bytes (the test suite's RawClient),
// so the caller does the same work whichever side it calls.
const fs = require('node:fs');
const path = require('node:path');
const { performance } = require('node:perf_hooks');
const { Client, Metadata, credentials, status: Status } = require('@grpc/grpc-js');
const { ENROLLMENT_SERVICE } = require('@burrow/tunnel');
const { serveIpc } = require('./ipc');
const { RawClient } = require(path.join(__dirname, '..', 'test', 'dist', 'helpers', 'raw-grpc.js'));

const CALL_DEADLINE_MS = 10_000;
/** The name in the broker's certificate; the target is a loopback IP, which TLS does not use as a server name. */
const BROKER_TLS_NAME = 'localhost';

let client;
let agentIds = [];

/** Failed calls by gRPC status name: what a case reports as its misses. */
class Misses {
  constructor() {
    this.count = 0;
    this.byCode = {};
  }
  add(err) {
    this.count++;
    const name = Status[err?.code] ?? 'UNKNOWN';
    this.byCode[name] = (this.byCode[name] ?? 0) + 1;
  }
}

function tlsChannel(tls) {
  return {
    creds: credentials.createSsl(
      fs.readFileSync(tls.ca),
      tls.key ? fs.readFileSync(tls.key) : null,
      tls.cert ? fs.readFileSync(tls.cert) : null,
    ),
    options: { 'grpc.ssl_target_name_override': BROKER_TLS_NAME, 'grpc.default_authority': BROKER_TLS_NAME },
  };
}

/** One unary call; a Metadata per call (grpc-js takes ownership of it). */
function unary(method, payload) {
  const md = new Metadata();
  if (agentIds.length === 1) md.set('burrow-agent-id', agentIds[0]);
  else if (agentIds.length > 1) md.set('burrow-agent-id', agentIds[Math.floor(Math.random() * agentIds.length)]);
  return client.unary(method, payload, md, { deadline: Date.now() + CALL_DEADLINE_MS });
}

function quantileUs(sortedMs, q) {
  if (sortedMs.length === 0) return null;
  return Math.round(sortedMs[Math.min(sortedMs.length - 1, Math.floor(q * sortedMs.length))] * 1000);
}

const handlers = {
  /** target: { address, tls?: {ca, cert?, key?}, agentIds?: string[] } */
  connect({ address, tls, agentIds: ids }) {
    const channel = tls ? tlsChannel(tls) : { creds: credentials.createInsecure(), options: {} };
    client = new RawClient(address, channel.creds, channel.options);
    agentIds = ids ?? [];
    return true;
  },

  /** Sequential calls: p50/p99 of the successful ones, every failure counted. */
  async latency({ method, payloadB64, calls, warmupCalls }) {
    const payload = Buffer.from(payloadB64, 'base64');
    const misses = new Misses();
    for (let i = 0; i < warmupCalls; i++) await unary(method, payload).catch((e) => misses.add(e));
    const warmupMisses = misses.count;
    const ms = [];
    for (let i = 0; i < calls; i++) {
      const t0 = performance.now();
      try {
        await unary(method, payload);
        ms.push(performance.now() - t0);
      } catch (err) {
        misses.add(err);
      }
    }
    ms.sort((a, b) => a - b);
    return {
      p50_us: quantileUs(ms, 0.5),
      p99_us: quantileUs(ms, 0.99),
      calls,
      ok: ms.length,
      failed: misses.count - warmupMisses,
      warmupFailed: warmupMisses,
      failedByCode: misses.byCode,
    };
  },

  /**
   * `concurrency` loops of calls: warm-up for warmupMs (not counted), then the calls that finish
   * within durationMs are counted; calls still in flight at the end are awaited, not counted.
   */
  async throughput({ method, payloadB64, concurrency, durationMs, warmupMs }) {
    const payload = Buffer.from(payloadB64, 'base64');
    const misses = new Misses();
    let counting = false;
    let stop = false;
    let ok = 0;
    // Every call that ends, warm-up and the last in flight included: the CPU accounting's divisor.
    let allCalls = 0;
    const loop = async () => {
      while (!stop) {
        allCalls++;
        try {
          await unary(method, payload);
          if (counting && !stop) ok++;
        } catch (err) {
          if (counting && !stop) misses.add(err);
        }
      }
    };
    const loops = Array.from({ length: concurrency }, loop);
    await new Promise((resolve) => setTimeout(resolve, warmupMs));
    counting = true;
    const t0 = performance.now();
    await new Promise((resolve) => setTimeout(resolve, durationMs));
    stop = true;
    const seconds = (performance.now() - t0) / 1000;
    await Promise.all(loops);
    return {
      rps: Math.round(ok / seconds),
      concurrency,
      durationMs: Math.round(seconds * 1000),
      ok,
      failed: misses.count,
      failedByCode: misses.byCode,
      allCalls,
    };
  },

  /**
   * One bidi call echoing `messageBytes` messages for durationMs, the writer honouring
   * backpressure; MB/s (10^6 bytes) of echoed payload, counted until the call's status.
   */
  stream({ method, messageBytes, durationMs }) {
    return new Promise((resolve) => {
      const msg = Buffer.alloc(messageBytes, 3);
      const md = new Metadata();
      if (agentIds[0]) md.set('burrow-agent-id', agentIds[0]);
      const call = client.bidi(method, md);
      let sentBytes = 0;
      let receivedBytes = 0;
      let writing = true;
      const t0 = performance.now();
      const timer = setTimeout(() => {
        writing = false;
        call.end();
      }, durationMs);
      const pump = () => {
        while (writing) {
          sentBytes += msg.length;
          if (!call.write(msg)) {
            call.once('drain', pump);
            return;
          }
        }
      };
      call.on('data', (m) => {
        receivedBytes += m.length;
      });
      call.on('error', () => {});
      call.on('status', (s) => {
        clearTimeout(timer);
        writing = false;
        const seconds = (performance.now() - t0) / 1000;
        const failed = s.code !== Status.OK || receivedBytes !== sentBytes ? 1 : 0;
        resolve({
          mb_s: Math.round((receivedBytes / 1e6 / seconds) * 10) / 10,
          durationMs: Math.round(seconds * 1000),
          messageBytes,
          sentBytes,
          receivedBytes,
          failed,
          status: Status[s.code],
          details: s.details || undefined,
        });
      });
      pump();
    });
  },

  /**
   * Enrollment RPCs on the broker's agent listener (TLS trusting the CA, no client certificate,
   * as `burrow-agent enroll` does), `concurrency` at a time: certificates per second.
   */
  async enroll({ address, caFile, requests, concurrency }) {
    const { creds, options } = tlsChannel({ ca: caFile });
    // One connection per worker, as agents enroll (one each): the broker gives a connection
    // without a client certificate 2 concurrent streams.
    const clients = Array.from(
      { length: concurrency },
      () => new Client(address, creds, { ...options, 'grpc.use_local_subchannel_pool': 1 }),
    );
    const def = ENROLLMENT_SERVICE.enroll;
    const one = (client, req) =>
      new Promise((resolve, reject) =>
        client.makeUnaryRequest(
          def.path,
          def.requestSerialize,
          def.responseDeserialize,
          req,
          new Metadata(),
          { deadline: Date.now() + CALL_DEADLINE_MS },
          (err, res) => (err ? reject(err) : resolve(res)),
        ),
      );
    // The TLS connections are up before timing (requests[0] stays unused: it was the warm-up call's).
    const misses = new Misses();
    await Promise.all(
      clients.map(
        (c) =>
          new Promise((resolve) =>
            c.waitForReady(Date.now() + CALL_DEADLINE_MS, (err) => {
              if (err) misses.add(err);
              resolve();
            }),
          ),
      ),
    );
    const queue = requests.slice(1);
    let ok = 0;
    const t0 = performance.now();
    await Promise.all(
      clients.map(async (client) => {
        for (let req = queue.shift(); req; req = queue.shift()) {
          try {
            const res = await one(client, req);
            if (!res.certificateChainPem.includes('BEGIN CERTIFICATE')) throw new Error('no certificate in the answer');
            ok++;
          } catch (err) {
            misses.add(err);
          }
        }
      }),
    );
    const seconds = (performance.now() - t0) / 1000;
    for (const c of clients) c.close();
    return {
      per_s: Math.round(ok / seconds),
      ok,
      failed: misses.count,
      failedByCode: misses.byCode,
      concurrency,
      durationMs: Math.round(seconds * 1000),
    };
  },

  /** Unary calls, each to an agent picked at random from agentIds: counts ok and failed. */
  async randomCalls({ method, payloadB64, calls, concurrency }) {
    const payload = Buffer.from(payloadB64, 'base64');
    const misses = new Misses();
    let ok = 0;
    let left = calls;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (left-- > 0) {
          try {
            await unary(method, payload);
            ok++;
          } catch (err) {
            misses.add(err);
          }
        }
      }),
    );
    return { ok, failed: misses.count, failedByCode: misses.byCode, durationMs: Math.round(performance.now() - t0) };
  },

  close() {
    client?.close();
    return true;
  },
};

serveIpc(handlers);
