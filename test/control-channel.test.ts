import * as http2 from 'node:http2';
import { expect } from 'chai';
import {
  ControlChannel,
  encodeSessionFrame,
  frameMessage,
  MAX_SESSION_FRAME_BYTES,
  ProtocolError,
  type SessionFrame,
} from '@burrow/tunnel';
import { closeSession, connectH2, type LoopbackServer, listenH2 } from './helpers/h2';
import { expectNoLeaks, type ResourceSnapshot, snapshotResources } from './helpers/leaks';

/** What a channel reported to its owner. */
class Recorder {
  frames: SessionFrame[] = [];
  errors: ProtocolError[] = [];
  closed = 0;
  private wake: (() => void)[] = [];
  readonly handlers = {
    onFrame: (f: SessionFrame) => this.note(() => this.frames.push(f)),
    onProtocolError: (e: ProtocolError) => this.note(() => this.errors.push(e)),
    onClosed: () => this.note(() => this.closed++),
  };
  private note(f: () => void): void {
    f();
    for (const w of this.wake.splice(0)) w();
  }
  /** Resolves once `cond` holds (checked after every report). */
  until(cond: () => boolean): Promise<void> {
    return new Promise((resolve) => {
      const check = (): void => (cond() ? resolve() : void this.wake.push(check));
      check();
    });
  }
}

describe('control-channel: session frames on a real HTTP/2 stream', function () {
  this.timeout(10_000);
  let baseline: ResourceSnapshot;
  let server: LoopbackServer;
  let session: http2.ClientHttp2Session;
  let serverSide: Promise<http2.ServerHttp2Stream>;
  let client: http2.ClientHttp2Stream;

  beforeEach(async () => {
    baseline = snapshotResources();
    let accept!: (s: http2.ServerHttp2Stream) => void;
    serverSide = new Promise((resolve) => {
      accept = resolve;
    });
    server = await listenH2((stream) => {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' });
      accept(stream);
    });
    session = await connectH2(server.address);
    client = session.request({ ':method': 'POST', ':path': '/burrow.tunnel.v1.Tunnel/Connect' }, { endStream: false });
    client.on('error', () => {});
  });
  afterEach(async () => {
    await closeSession(session);
    await server.close();
    await expectNoLeaks(baseline);
  });

  const drain: SessionFrame = { kind: 'drain', reason: 'maintenance ✓' };
  const refused: SessionFrame = { kind: 'refused', code: 7, message: 'no' };

  it('carries frames both ways, in order', async () => {
    const atServer = new Recorder();
    const atClient = new Recorder();
    const serverChannel = new ControlChannel(await serverSide, atServer.handlers);
    const clientChannel = new ControlChannel(client, atClient.handlers);
    expect(clientChannel.send(drain)).to.equal(true);
    expect(clientChannel.send(refused)).to.equal(true);
    await atServer.until(() => atServer.frames.length === 2);
    expect(atServer.frames).to.deep.equal([drain, refused]);
    expect(serverChannel.send({ kind: 'brokers', brokers: [] })).to.equal(true);
    await atClient.until(() => atClient.frames.length === 1);
    expect(atClient.frames[0]!.kind).to.equal('brokers');
    expect(atServer.errors).to.deep.equal([]);
  });

  it('reassembles a frame written one byte at a time, and many frames in one write', async () => {
    const at = new Recorder();
    const bytes = frameMessage(encodeSessionFrame(drain));
    client.write(bytes.subarray(0, 1));
    new ControlChannel(await serverSide, at.handlers);
    for (let i = 1; i < bytes.length; i++) client.write(bytes.subarray(i, i + 1));
    client.write(Buffer.concat([bytes, bytes, bytes]));
    await at.until(() => at.frames.length === 4);
    expect(at.frames).to.deep.equal([drain, drain, drain, drain]);
  });

  it('refuses a frame of 64 KiB + 1 as a protocol error', async () => {
    const at = new Recorder();
    client.write(frameMessage(Buffer.alloc(MAX_SESSION_FRAME_BYTES + 1)));
    new ControlChannel(await serverSide, at.handlers);
    await at.until(() => at.errors.length > 0);
    expect(at.errors[0]).to.be.instanceOf(ProtocolError);
    expect(at.errors[0]!.message).to.contain(String(MAX_SESSION_FRAME_BYTES + 1));
    expect(at.frames).to.deep.equal([]);
  });

  it('refuses a frame from its prefix alone (10 MiB declared, no body sent)', async () => {
    const at = new Recorder();
    const prefix = Buffer.from([0, 0, 0xa0, 0, 0]);
    client.write(prefix);
    new ControlChannel(await serverSide, at.handlers);
    await at.until(() => at.errors.length > 0);
    expect(at.errors[0]!.message).to.contain(String(10 * 1024 * 1024));
    expect(at.errors).to.have.length(1);
  });

  it('reports garbage bytes as one protocol error and ignores what follows', async () => {
    const at = new Recorder();
    const garbage = Buffer.concat([Buffer.from([0, 0, 0, 0, 4]), Buffer.from([0xff, 0xff, 0xff, 0xff])]);
    client.write(garbage);
    new ControlChannel(await serverSide, at.handlers);
    await at.until(() => at.errors.length > 0);
    client.write(frameMessage(encodeSessionFrame(drain)));
    client.end();
    await at.until(() => at.closed > 0);
    expect(at.errors).to.have.length(1);
    expect(at.errors[0]).to.be.instanceOf(ProtocolError);
    expect(at.frames).to.deep.equal([]);
  });

  it('reports a compressed frame as a protocol error', async () => {
    const at = new Recorder();
    client.write(Buffer.from([1, 0, 0, 0, 1, 0]));
    new ControlChannel(await serverSide, at.handlers);
    await at.until(() => at.errors.length > 0);
    expect(at.errors[0]).to.be.instanceOf(ProtocolError);
  });

  it('calls onClosed once when the peer ends the stream', async () => {
    const at = new Recorder();
    const channel = new ControlChannel(await serverSide, at.handlers);
    client.end();
    await at.until(() => at.closed > 0);
    channel.end();
    const s = await serverSide;
    if (!s.closed) await new Promise((r) => s.on('close', r));
    expect(at.closed).to.equal(1);
    expect(channel.send(drain)).to.equal(false);
  });

  it('calls onClosed once when the peer resets the stream', async () => {
    const at = new Recorder();
    const s = await serverSide;
    new ControlChannel(s, at.handlers);
    client.close(http2.constants.NGHTTP2_CANCEL);
    await new Promise((r) => s.on('close', r));
    expect(at.closed).to.equal(1);
    expect(at.errors).to.deep.equal([]);
  });

  it('sends a frame before its end (a Refused then the end)', async () => {
    const at = new Recorder();
    const s = await serverSide;
    const serverChannel = new ControlChannel(s, new Recorder().handlers);
    new ControlChannel(client, at.handlers);
    serverChannel.send(refused);
    serverChannel.end();
    await at.until(() => at.closed > 0);
    expect(at.frames).to.deep.equal([refused]);
  });
});
