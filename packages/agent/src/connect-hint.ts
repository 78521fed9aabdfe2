import { status as Status } from '@grpc/grpc-js';
import { NOT_A_BROKER } from '@burrow/tunnel';

/** What {@link connectHint} needs to know about the failed attempt. */
export interface ConnectFailure {
  /** The broker address dialled (host:port). */
  address: string;
  /** The error's message. */
  message: string;
  /** The gRPC status code, when the error has one. */
  code?: number;
  /** The trust bundle file the agent verifies brokers with (--ca-file). */
  caFile: string;
}

/**
 * What the operator should do about a failed tunnel session attempt, one cause each; undefined
 * when the error says nothing more than itself. Called by the agent's connect loop for its
 * `cannot establish tunnel session` warning; pure, never throws. Only a refusal of the agent's
 * own certificate suggests enrolling again: every other cause is fixed without a join token.
 */
export function connectHint(f: ConnectFailure): string | undefined {
  for (const rule of HINTS) {
    const match = rule.match(f);
    if (match) return rule.hint(f, match === true ? undefined : match);
  }
  return undefined;
}

/** One cause: how to recognise it in a failure, and what to say. The first rule that matches wins. */
interface HintRule {
  match(f: ConnectFailure): RegExpExecArray | boolean | null;
  hint(f: ConnectFailure, match: RegExpExecArray | undefined): string;
}

const AGENT_PORT = "point --broker at the broker's agent port (its --agent-listen)";

// Node's checkServerIdentity: "Host: <name>. is not in the cert's altnames: DNS:a, IP Address:b".
const ALTNAMES = /(?:Host|IP): (\S+?)\.? is not in the cert's (?:altnames|list): (.*?)(?:\. Resolution note|\.?\s*$)/s;

const HINTS: readonly HintRule[] = [
  {
    match: (f) => f.message.includes(NOT_A_BROKER),
    hint: (f) =>
      `the server at ${f.address} is not a broker of this agent's trust domain: check --broker (and DNS); ` +
      'no session was opened',
  },
  // The caller API (same broker certificate, so TLS succeeds) refuses an agent certificate.
  {
    match: (f) => /certificate role "agent" may not call agents/.test(f.message),
    hint: (f) => `${f.address} is the broker's caller API, not its agent listener: ${AGENT_PORT}`,
  },
  // A cluster broker's peer listener refuses an agent certificate the same way.
  {
    match: (f) => /certificate role "agent" may not use the peer API/.test(f.message),
    hint: (f) => `${f.address} is a broker's peer listener (its --peer-listen), not its agent listener: ${AGENT_PORT}`,
  },
  // A plain-HTTP server (the broker's admin port) answers the TLS ClientHello with an HTTP response.
  {
    match: (f) => /wrong version number|packet length too long|http_request/i.test(f.message),
    hint: (f) => `${f.address} answers in plain HTTP, not TLS (the broker's admin port?): ${AGENT_PORT}`,
  },
  {
    match: (f) => ALTNAMES.exec(f.message) ?? /ERR_TLS_CERT_ALTNAME_INVALID/.test(f.message),
    hint: (_f, m) => {
      const names = m?.[2]?.trim();
      return (
        `the broker's certificate is not for the name ${m?.[1] ?? 'dialled'}` +
        `${names ? ` (it has ${names})` : ''}: dial one of its names, or set --broker-server-name`
      );
    },
  },
  {
    match: (f) =>
      /unable to get local issuer certificate|self[- ]signed certificate|unable to verify the first/i.test(f.message),
    hint: (f) => `the broker's certificate is not signed by the CA in ${f.caFile}: check --ca-file and --broker`,
  },
  {
    match: (f) => /ECONNREFUSED (\S+?)\.?(?:\s|$)/.exec(f.message),
    hint: (f, m) => `nothing listens at ${m?.[1]}: is the broker running, and is ${f.address} its agent port?`,
  },
  {
    match: (f) => /Name resolution failed for target (?:dns:)?(\S+)|ENOTFOUND (\S+)/.exec(f.message),
    hint: (f, m) =>
      `${(m?.[1] ?? m?.[2] ?? f.address).replace(/:\d+$/, '')} does not resolve: check --broker and the site's DNS`,
  },
  // Retrying is still right: the broker (or this agent) may be upgraded while we wait.
  {
    match: (f) => /protocol version/.test(f.message),
    hint: () =>
      'this agent and the broker share no tunnel protocol version; upgrade the older one ' +
      '(burrow-agent --version and the broker log show the versions)',
  },
  // The agent's own certificate refused: after a CA rotation or an expiry while offline, or revoked.
  {
    match: (f) =>
      f.code === Status.PERMISSION_DENIED ||
      /PERMISSION_DENIED|no valid client certificate|certificate (?:expired|revoked|unknown)|bad certificate/i.test(
        f.message,
      ),
    hint: () =>
      "the broker refused this agent's certificate: if it expired, was revoked, or this agent was offline " +
      'through a CA rotation, enroll again with a new join token (burrow-agent enroll --state-dir ...)',
  },
];
