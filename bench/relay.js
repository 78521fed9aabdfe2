#!/usr/bin/env node
'use strict';
// The bench's grpc-js relay: the floor of a forwarder built on grpc-js. It accepts the echo
// upstream's methods on a grpc-js server and makes each call again, as a new grpc-js client call,
// to its target: raw bytes both ways, metadata and status passed on, backpressure honoured, and
// nothing else (no identity, policy, tunnel frames, metrics or logs). Two of them in a row, the
// first behind mTLS and the second reached over mTLS, are the same hops as caller -> broker ->
// agent -> upstream, so `relay` next to `burrow` in the table says what Burrow costs above
// forwarding with grpc-js at all. A third one in front of the policy case's floor server is the
// floor of any two-hop answer (`relay_policy`, next to `burrow_policy`).
const fs = require('node:fs');
const path = require('node:path');
const { Client, Server, ServerCredentials, credentials, status: Status } = require('@grpc/grpc-js');
const { serveIpc } = require('./ipc');

const { ECHO } = require(path.join(__dirname, '..', 'test', 'dist', 'helpers', 'echo-upstream.js'));
const identity = (b) => b;
/** The name in the bench's broker certificate (the relays use it as their server certificate). */
const TLS_NAME = 'localhost';

let server;
let client;

/** Forwards one server call as a client call to the target, until either side ends it. */
function relay(method, call) {
  const deadline = call.getDeadline();
  const out = client.makeBidiStreamRequest(method, identity, identity, call.metadata, {
    deadline: deadline instanceof Date || typeof deadline === 'number' ? deadline : Infinity,
  });
  let done = false;
  call.on('error', () => {});
  out.on('error', () => {});
  call.on('cancelled', () => {
    if (!done) out.cancel();
  });
  call.on('data', (m) => {
    if (!out.write(m)) {
      call.pause();
      out.once('drain', () => call.resume());
    }
  });
  call.on('end', () => out.end());
  out.on('metadata', (md) => call.sendMetadata(md));
  out.on('data', (m) => {
    if (!call.write(m)) {
      out.pause();
      call.once('drain', () => out.resume());
    }
  });
  // grpc-js may report the status while answers are still buffered in a paused stream: an OK
  // status is passed on once every answer has been read ('end'), an error at once.
  let status;
  let answersRead = false;
  const finish = () => {
    if (!status || done) return;
    if (status.code === Status.OK && !answersRead) return;
    done = true;
    if (status.code === Status.OK) call.end(status.metadata);
    else call.emit('error', { code: status.code, details: status.details, metadata: status.metadata });
  };
  out.on('end', () => {
    answersRead = true;
    finish();
  });
  out.on('status', (s) => {
    status = s;
    finish();
  });
}

serveIpc({
  /**
   * listenTls: {ca, cert, key} files to serve mTLS with (else plaintext); target: HOST:PORT;
   * targetTls: {ca, cert, key} files to reach it over mTLS (else plaintext); methods: the full
   * method paths to relay (default: the echo upstream's unary and bidi). Resolves with the
   * address listened on.
   */
  async start({ listenTls, target, targetTls, methods = [ECHO.unary, ECHO.bidi] }) {
    const read = (f) => fs.readFileSync(f);
    client = targetTls
      ? new Client(target, credentials.createSsl(read(targetTls.ca), read(targetTls.key), read(targetTls.cert)), {
          'grpc.ssl_target_name_override': TLS_NAME,
          'grpc.default_authority': TLS_NAME,
          'grpc.enable_retries': 0,
        })
      : new Client(target, credentials.createInsecure(), { 'grpc.enable_retries': 0 });
    server = new Server();
    for (const method of methods) server.register(method, (call) => relay(method, call), identity, identity, 'bidi');
    const creds = listenTls
      ? ServerCredentials.createSsl(
          read(listenTls.ca),
          [{ cert_chain: read(listenTls.cert), private_key: read(listenTls.key) }],
          true,
        )
      : ServerCredentials.createInsecure();
    const port = await new Promise((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', creds, (err, p) => (err ? reject(err) : resolve(p))),
    );
    return `127.0.0.1:${port}`;
  },
  stop() {
    client?.close();
    server?.forceShutdown();
    return true;
  },
});
