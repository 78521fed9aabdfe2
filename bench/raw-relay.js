#!/usr/bin/env node
'use strict';
// The bench's raw node:http2 reverse relay: the floor of a reverse tunnel whose data plane is plain
// HTTP/2 (issue 15). Two of them make the same processes and hops as caller -> broker -> agent ->
// upstream, and the same direction of dialing:
//
//   caller -mTLS-> hop1 (broker-like) <-mTLS- hop2 (agent-like, it dials hop1) -h2c-> upstream
//
// On the TLS connection hop2 dialed, the roles flip: hop1 is the HTTP/2 client and hop2 the HTTP/2
// server, so hop1 opens one ordinary HTTP/2 stream on hop2's connection per caller stream, and hop2
// one per stream on a persistent h2c session to the upstream. Each stream is forwarded as it is:
// headers copied, DATA piped both ways with backpressure, response headers, trailers (also a
// trailers-only answer) and resets mapped to a grpc-status. No identity, policy, metrics or logs:
// `raw` next to `burrow` in the table says what Burrow costs above forwarding HTTP/2 streams at all.
const fs = require('node:fs');
const http2 = require('node:http2');
const tls = require('node:tls');
const { serveIpc } = require('./ipc');

const { NGHTTP2_CANCEL, NGHTTP2_FLAG_END_STREAM, NGHTTP2_NO_ERROR, NGHTTP2_REFUSED_STREAM, HTTP2_HEADER_STATUS } =
  http2.constants;
/** The name in the bench's broker certificate, which hop1 serves to callers and to hop2. */
const TLS_NAME = 'localhost';
/** gRPC status codes the relay answers with itself. */
const GRPC = { CANCELLED: 1, INTERNAL: 13, UNAVAILABLE: 14 };
/** Hop-by-hop headers HTTP/2 forbids or that describe one connection only (RFC 9113 8.2.2). */
const CONNECTION_HEADERS = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'transfer-encoding',
  'upgrade',
  'http2-settings',
  'host',
]);

/** The headers to pass on: no pseudo-headers (the caller of this sets those it needs), no connection headers. */
function copyHeaders(headers, into = {}) {
  for (const name of Object.keys(headers))
    if (name[0] !== ':' && !CONNECTION_HEADERS.has(name)) into[name] = headers[name];
  return into;
}

/**
 * The grpc-status for a stream that ended without trailers: a reset by the far side (CANCEL: the
 * call was cancelled; REFUSED_STREAM: it never started, so it may be retried elsewhere), or the
 * connection gone (every stream then closes with CANCEL too, but the session says it is gone).
 */
function statusOfReset(out, session) {
  const code = out.rstCode;
  if (session.destroyed) return GRPC.UNAVAILABLE;
  if (code === NGHTTP2_CANCEL) return GRPC.CANCELLED;
  if (code === NGHTTP2_REFUSED_STREAM) return GRPC.UNAVAILABLE;
  return GRPC.INTERNAL;
}

const trailersOnly = (grpcStatus, message) => ({
  [HTTP2_HEADER_STATUS]: 200,
  'content-type': 'application/grpc',
  'grpc-status': String(grpcStatus),
  'grpc-message': message,
});

/** Answers a stream that cannot be forwarded with a trailers-only gRPC status. */
function refuse(stream, grpcStatus, message) {
  if (stream.destroyed || stream.headersSent) return;
  stream.respond(trailersOnly(grpcStatus, message), { endStream: true });
}

/**
 * Forwards the server stream `inbound` (request `headers`) as one new stream on `session`:
 * request DATA piped out, the answer's headers, DATA and trailers piped back, each side's reset
 * passed on to the other. Nothing is buffered beyond what pipe() and the two streams' HTTP/2
 * windows hold, so a reader that stops stalls only its own stream.
 */
function forward(inbound, headers, session) {
  inbound.on('error', () => {});
  if (!session || session.destroyed || session.closed) return refuse(inbound, GRPC.UNAVAILABLE, 'no session');
  let out;
  try {
    out = session.request(
      copyHeaders(headers, {
        ':method': headers[':method'],
        ':path': headers[':path'],
        ':authority': headers[':authority'],
      }),
    );
  } catch (err) {
    // A session that got GOAWAY throws synchronously (ERR_HTTP2_GOAWAY_SESSION): the call never started.
    return refuse(inbound, GRPC.UNAVAILABLE, err.code ?? 'request failed');
  }
  // Every error also ends in 'close', where the status is decided; an unhandled one would kill the process.
  out.on('error', () => {});
  inbound.pipe(out);
  let trailers;
  // Called once both the answer's end and its trailers (or the reason there are none) are known.
  let onTrailers;
  out.once('response', (responseHeaders, flags) => {
    if (inbound.destroyed) return;
    const answer = copyHeaders(responseHeaders, { [HTTP2_HEADER_STATUS]: responseHeaders[HTTP2_HEADER_STATUS] });
    // A trailers-only answer (grpc-js answers errors so): HEADERS with END_STREAM, no trailers to wait for.
    if (flags & NGHTTP2_FLAG_END_STREAM) return inbound.respond(answer, { endStream: true });
    inbound.respond(answer, { waitForTrailers: true });
    inbound.once('wantTrailers', () => {
      if (trailers) return inbound.sendTrailers(trailers);
      onTrailers = () => inbound.sendTrailers(trailers);
    });
    out.pipe(inbound);
  });
  out.once('trailers', (t) => {
    trailers = copyHeaders(t);
  });
  out.once('close', () => {
    // A clean end brought trailers first; anything else (reset, lost connection, an answer cut
    // short) is a status the relay says itself, since pipe() ends the inbound side as if all went well.
    if (!trailers) {
      const status = statusOfReset(out, session);
      trailers = { 'grpc-status': String(status), 'grpc-message': `upstream stream reset (code ${out.rstCode})` };
      if (inbound.destroyed) return;
      if (!inbound.headersSent) return refuse(inbound, status, trailers['grpc-message']);
      if (!inbound.writableEnded) inbound.end();
    }
    onTrailers?.();
  });
  inbound.once('close', () => {
    // The caller went away (or reset the stream) before the answer ended: so does the forwarded stream.
    if (!out.closed) out.close(inbound.rstCode === NGHTTP2_NO_ERROR ? NGHTTP2_CANCEL : inbound.rstCode);
  });
}

const read = (f) => fs.readFileSync(f);
/** hop1's HTTP/2 client sessions on the connections hop2 dialed; the newest takes new streams. */
const agentSessions = [];
/** Resolves when hop2's first session is up (the caller must not start before it). */
let agentSessionUp;
const whenAgentSession = new Promise((resolve) => {
  agentSessionUp = resolve;
});
const servers = [];
let upstream;
let upstreamTarget;
let dialed;

/** hop2's persistent h2c session to the upstream, made again when it is gone. */
function upstreamSession() {
  if (!upstream || upstream.destroyed || upstream.closed) {
    upstream = http2.connect(`http://${upstreamTarget}`);
    // Streams on it learn of the failure by their own 'close'; the next stream opens a new session.
    upstream.on('error', () => {});
  }
  return upstream;
}

const listen = (server) =>
  new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(`127.0.0.1:${server.address().port}`));
  });

serveIpc({
  /**
   * hop1: listenTls {ca, cert, key} files for both of its mTLS listeners. Resolves with
   * { callers, agents }: the address callers dial and the address hop2 dials.
   */
  async hop1({ listenTls }) {
    const tlsOptions = {
      key: read(listenTls.key),
      cert: read(listenTls.cert),
      ca: read(listenTls.ca),
      requestCert: true,
      rejectUnauthorized: true,
    };
    const callerServer = http2.createSecureServer(tlsOptions);
    callerServer.on('stream', (stream, headers) => forward(stream, headers, agentSessions.at(-1)));
    const agentServer = tls.createServer({ ...tlsOptions, ALPNProtocols: ['h2'] }, (socket) => {
      socket.setNoDelay(true);
      // The accepted socket is hop1's HTTP/2 client connection: nothing may read it before this.
      const session = http2.connect(`https://${TLS_NAME}`, { createConnection: () => socket });
      session.on('error', () => {});
      session.once('close', () => agentSessions.splice(agentSessions.indexOf(session), 1));
      agentSessions.push(session);
      agentSessionUp();
    });
    servers.push(callerServer, agentServer);
    return { callers: await listen(callerServer), agents: await listen(agentServer) };
  },

  /** hop1: resolves once hop2 has dialed and its session is up. */
  async agentConnected() {
    await whenAgentSession;
    return true;
  },

  /**
   * hop2: dials hop1 at `hop1` (HOST:PORT) with the {ca, cert, key} files `dialTls`, serves
   * HTTP/2 on that connection and forwards its streams to `target` (HOST:PORT, h2c).
   */
  async hop2({ hop1, dialTls, target }) {
    upstreamTarget = target;
    const [host, port] = [hop1.slice(0, hop1.lastIndexOf(':')), Number(hop1.slice(hop1.lastIndexOf(':') + 1))];
    const server = http2.createServer();
    server.on('stream', (stream, headers) => forward(stream, headers, upstreamSession()));
    servers.push(server);
    dialed = tls.connect({
      host,
      port,
      servername: TLS_NAME,
      key: read(dialTls.key),
      cert: read(dialTls.cert),
      ca: read(dialTls.ca),
      ALPNProtocols: ['h2'],
    });
    await new Promise((resolve, reject) => {
      dialed.once('secureConnect', resolve);
      dialed.once('error', reject);
    });
    if (dialed.alpnProtocol !== 'h2') throw new Error(`hop1 negotiated ALPN ${dialed.alpnProtocol}, not h2`);
    // One connection for the life of the bench child: a lost one fails the calls (UNAVAILABLE at
    // hop1), and no redial hides it.
    dialed.setNoDelay(true);
    // The dialed socket is hop2's HTTP/2 server connection (the role flip of a reverse tunnel).
    server.emit('connection', dialed);
    upstreamSession();
    return true;
  },

  stop() {
    for (const s of agentSessions) s.destroy();
    upstream?.destroy();
    dialed?.destroy();
    for (const s of servers) s.close();
    return true;
  },
});
