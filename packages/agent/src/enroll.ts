import { X509Certificate } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { Client, Metadata, credentials, status as Status, type ServiceError } from '@grpc/grpc-js';
import {
  caPinOf,
  createCsr,
  describeTightened,
  parseJoinToken,
  securePrivateDir,
  writeIssued,
  type ParsedJoinToken,
} from '@burrow/pki';
import {
  BurrowError,
  ENROLLMENT_NOT_ENABLED,
  ENROLLMENT_SERVICE,
  brokerIdentityCheck,
  type EnrollRequest,
  type IssuedAgentCertificate,
} from '@burrow/tunnel';
import { writeFileAtomic, writeState } from './state-dir';

export interface EnrollOptions {
  /** The broker's agent listener, HOST:PORT (default: the ones a self-contained token names, tried in order). */
  broker?: string;
  token: string;
  stateDir: string;
  /** TLS name to expect in the broker certificate (default: the token's, else the host of `broker`). */
  serverName?: string;
  timeoutMs?: number;
  /** Called with a one-line notice, e.g. that the state directory was tightened to 0700. */
  notice?: (line: string) => void;
}

/** An HTTP/2 SETTINGS frame with no settings: length 0, type 4, no flags, stream 0. */
const H2_EMPTY_SETTINGS = Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0]);

function splitHostPort(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(address.slice(i + 1)) };
}

/** The certificate of the presented chain (PEM) whose SHA-256 pin is one of `pins`, if any. */
function pinnedInChain(leaf: tls.DetailedPeerCertificate | undefined, pins: readonly string[]): string | undefined {
  const seen = new Set<string>();
  let cert = leaf;
  while (cert?.raw && !seen.has(cert.fingerprint256)) {
    seen.add(cert.fingerprint256);
    const pem = new X509Certificate(cert.raw).toString();
    if (pins.includes(caPinOf(pem))) return pem;
    cert = cert.issuerCertificate;
  }
  return undefined;
}

/**
 * Connects without trusting anything yet, reads the broker's certificate chain and returns the
 * CA certificate whose SHA-256 pin the join token carries. The enrollment call then runs over a
 * normal TLS connection that trusts only that CA, so OpenSSL does the real chain and hostname
 * checks; this first look only picks the anchor.
 */
export function fetchPinnedCa(
  broker: string,
  pins: readonly string[],
  serverName: string | undefined,
  timeoutMs: number,
): Promise<string> {
  const { host, port } = splitHostPort(broker);
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host,
      port,
      servername: serverName ?? (/^[\d.:]+$/.test(host) ? undefined : host),
      rejectUnauthorized: false,
      ALPNProtocols: ['h2'],
    });
    let found: string | undefined;
    let settled = false;
    const settle = (err?: BurrowError): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.end(); // a polite close: the broker would log a destroyed socket as a refused handshake
      if (err) reject(err);
      else if (found) resolve(found);
      else
        reject(
          new BurrowError(
            Status.PERMISSION_DENIED,
            `broker ${broker} does not present the CA pinned in the join token; is this the right broker?`,
          ),
        );
    };
    const timer = setTimeout(() => {
      socket.destroy();
      settle(new BurrowError(Status.UNAVAILABLE, `no TLS answer from ${broker} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('error', (err: Error & { code?: string }) => {
      // A broker without a PKI directory requires a client certificate: in TLS 1.3 it says so with
      // an alert after the handshake (1.2: during it), which no enrollment can get past.
      if (err.code === 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED' || /certificate required/i.test(err.message)) {
        settle(new BurrowError(Status.FAILED_PRECONDITION, `broker ${broker}: ${ENROLLMENT_NOT_ENABLED}`));
        return;
      }
      settle(new BurrowError(Status.UNAVAILABLE, `cannot reach broker ${broker}: ${err.message}`));
    });
    socket.once('secureConnect', () => {
      found = pinnedInChain(socket.getPeerCertificate(true), pins);
      // Whether the broker lets a client without a certificate through (enrollment on) shows only
      // once it answers: send the HTTP/2 preface and an empty SETTINGS frame, and wait for its
      // SETTINGS (enrollment on) or its certificate-required alert (the error above).
      socket.write(Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), H2_EMPTY_SETTINGS]));
      socket.once('data', () => settle());
      socket.once('close', () => settle());
    });
  });
}

/** The key an enrollment presents, kept until the certificate is written: a retry presents it again. */
export const PENDING_KEY_FILE = 'enroll-pending.key';

/** What {@link enroll} did: the identity, and the broker and TLS name it enrolled with (for `run`). */
export interface EnrollResult extends IssuedAgentCertificate {
  /** The broker that answered. */
  broker: string;
  /** Every broker the enrollment was to try (the token's, or the one given): what `run` should dial. */
  brokers: string[];
  serverName?: string;
}

/**
 * Everything that can fail on this machine, done before the token is shown to anyone: the state
 * directory exists (or is created 0700) and is writable, and the key is made and stored in it.
 * A key left by an enrollment that failed later is reused, so its retry is the same enrollment
 * (the broker answers the same token and key with the same certificate). Rejects with a one-line
 * BurrowError (FAILED_PRECONDITION) naming the directory.
 */
export async function prepareStateDir(stateDir: string, notice?: (line: string) => void): Promise<string> {
  const pendingKey = path.join(stateDir, PENDING_KEY_FILE);
  try {
    const dir = await securePrivateDir(stateDir, 'state-dir');
    const tightened = describeTightened(dir);
    if (tightened) notice?.(tightened);
    const existing = await fs.readFile(pendingKey, 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
    if (existing !== undefined) {
      await createCsr({ keyPem: existing }); // proves the kept key is usable before the token is spent
      return existing;
    }
    const { keyPem } = await createCsr();
    await writeFileAtomic(pendingKey, keyPem, 0o600);
    return keyPem;
  } catch (err) {
    const reason = (err as Error).message.replace(/^state-dir: /, '');
    throw new BurrowError(
      Status.FAILED_PRECONDITION,
      `state-dir: cannot prepare ${stateDir} (${reason}); the join token was not used, fix this and run the same ` +
        'command again',
      err,
    );
  }
}

/**
 * `burrow-agent enroll`: makes a key (it never leaves this machine) and checks the state directory
 * before anything goes to the broker, sends a CSR with the join token, and writes the certificate,
 * key and trust bundle to the state directory (each file atomically). A self-contained token names
 * the brokers (tried in order while unreachable) and the TLS name; `broker` and `serverName` override.
 */
export async function enroll(opts: EnrollOptions): Promise<EnrollResult> {
  const timeoutMs = opts.timeoutMs ?? 15_000;
  const token = parseJoinToken(opts.token);
  const brokers = opts.broker ? [opts.broker] : token.brokers;
  if (brokers.length === 0) {
    throw new BurrowError(
      Status.INVALID_ARGUMENT,
      'broker: is required: this join token does not name a broker (an older token); pass --broker HOST:PORT',
    );
  }
  const serverName = opts.serverName ?? token.serverName;
  const keyPem = await prepareStateDir(opts.stateDir, opts.notice);
  const { csrPem } = await createCsr({ keyPem });
  let lastError: unknown;
  for (const broker of brokers) {
    let issued: IssuedAgentCertificate;
    try {
      issued = await enrollAt(broker, serverName, token, opts.token, csrPem, timeoutMs);
    } catch (err) {
      lastError = err;
      // Only an unreachable broker sends us to the next: any answer from a broker is final.
      if (err instanceof BurrowError && err.code === Status.UNAVAILABLE) continue;
      throw err;
    }
    const files = { certPem: issued.certificateChainPem, keyPem, caPem: issued.trustBundlePem };
    try {
      await writeIssued(opts.stateDir, files);
      await writeState(opts.stateDir, {
        agentId: issued.agentId,
        spiffeId: issued.spiffeId,
        bundleVersion: issued.bundleVersion,
        enrolledAt: new Date().toISOString(),
        broker,
      });
    } catch (err) {
      // The token is spent now, but the key that was presented stays in the state directory, and the
      // broker answers that token and key with the same certificate while the token is valid.
      throw new BurrowError(
        Status.FAILED_PRECONDITION,
        `state-dir: the broker issued the certificate but it cannot be written to ${opts.stateDir} ` +
          `(${(err as Error).message}); fix this and run the same command again with the same token before it ` +
          'expires: the kept key gets the same certificate',
        err,
      );
    }
    await fs.rm(path.join(opts.stateDir, PENDING_KEY_FILE), { force: true });
    return serverName === undefined ? { ...issued, broker, brokers } : { ...issued, broker, brokers, serverName };
  }
  throw lastError;
}

async function enrollAt(
  broker: string,
  serverName: string | undefined,
  token: ParsedJoinToken,
  tokenText: string,
  csrPem: string,
  timeoutMs: number,
): Promise<IssuedAgentCertificate> {
  // During a CA rotation a token pins both trusted roots; the broker may chain to either.
  const anchorPem = await fetchPinnedCa(
    broker,
    token.caPinsSha256.length ? token.caPinsSha256 : [token.caPinSha256],
    serverName,
    timeoutMs,
  );
  const channelOptions: Record<string, string> = {};
  if (serverName) channelOptions['grpc.ssl_target_name_override'] = serverName;
  // The server must be a broker of the pinned CA's trust domain (its subject's O, as burrow-pki
  // names CAs), not any certificate that CA signed.
  const trustDomain = /^O=(.+)$/m.exec(new X509Certificate(anchorPem).subject)?.[1];
  const verify = { checkServerIdentity: brokerIdentityCheck(trustDomain) };
  const creds = credentials.createSsl(Buffer.from(anchorPem), null, null, verify);
  const client = new Client(broker, creds, channelOptions);
  try {
    return await new Promise<IssuedAgentCertificate>((resolve, reject) => {
      client.makeUnaryRequest(
        ENROLLMENT_SERVICE.enroll.path,
        ENROLLMENT_SERVICE.enroll.requestSerialize,
        ENROLLMENT_SERVICE.enroll.responseDeserialize,
        { token: tokenText, csrPem } satisfies EnrollRequest,
        new Metadata(),
        { deadline: Date.now() + timeoutMs },
        (err: ServiceError | null, res?: IssuedAgentCertificate) =>
          err ? reject(new BurrowError(err.code, err.details, err)) : resolve(res!),
      );
    });
  } finally {
    client.close();
  }
}

/** Paths of the files in an agent state directory. */
export function stateFiles(stateDir: string): { cert: string; key: string; ca: string; state: string } {
  return {
    cert: path.join(stateDir, 'tls.crt'),
    key: path.join(stateDir, 'tls.key'),
    ca: path.join(stateDir, 'ca.crt'),
    state: path.join(stateDir, 'state.json'),
  };
}
