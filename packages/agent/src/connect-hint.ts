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
  const { address, message } = f;
  if (message.includes(NOT_A_BROKER)) {
    return (
      `the server at ${address} is not a broker of this agent's trust domain: check --broker (and DNS); ` +
      'no session was opened'
    );
  }
  // The caller API (same broker certificate, so TLS succeeds) refuses an agent certificate.
  if (/certificate role "agent" may not call agents/.test(message)) {
    return (
      `${address} is the broker's caller API, not its agent listener: point --broker at the broker's agent port ` +
      '(its --agent-listen)'
    );
  }
  // A cluster broker's peer listener refuses an agent certificate the same way.
  if (/certificate role "agent" may not use the peer API/.test(message)) {
    return (
      `${address} is a broker's peer listener (its --peer-listen), not its agent listener: point --broker at the ` +
      "broker's agent port (its --agent-listen)"
    );
  }
  // A plain-HTTP server (the broker's admin port) answers the TLS ClientHello with an HTTP response.
  if (/wrong version number|packet length too long|http_request/i.test(message)) {
    return (
      `${address} answers in plain HTTP, not TLS (the broker's admin port?): point --broker at the broker's agent ` +
      'port (its --agent-listen)'
    );
  }
  // Node's checkServerIdentity: "Host: <name>. is not in the cert's altnames: DNS:a, IP Address:b".
  const altnames =
    /(?:Host|IP): (\S+?)\.? is not in the cert's (?:altnames|list): (.*?)(?:\. Resolution note|\.?\s*$)/s.exec(message);
  if (altnames || /ERR_TLS_CERT_ALTNAME_INVALID/.test(message)) {
    const names = altnames?.[2]?.trim();
    return (
      `the broker's certificate is not for the name ${altnames?.[1] ?? 'dialled'}` +
      `${names ? ` (it has ${names})` : ''}: dial one of its names, or set --broker-server-name`
    );
  }
  if (/unable to get local issuer certificate|self[- ]signed certificate|unable to verify the first/i.test(message)) {
    return `the broker's certificate is not signed by the CA in ${f.caFile}: check --ca-file and --broker`;
  }
  const refused = /ECONNREFUSED (\S+?)\.?(?:\s|$)/.exec(message);
  if (refused) return `nothing listens at ${refused[1]}: is the broker running, and is ${address} its agent port?`;
  const dns = /Name resolution failed for target (?:dns:)?(\S+)|ENOTFOUND (\S+)/.exec(message);
  if (dns) {
    const host = (dns[1] ?? dns[2] ?? address).replace(/:\d+$/, '');
    return `${host} does not resolve: check --broker and the site's DNS`;
  }
  if (/protocol version/.test(message)) {
    // Retrying is still right: the broker (or this agent) may be upgraded while we wait.
    return (
      'this agent and the broker share no tunnel protocol version; upgrade the older one ' +
      '(burrow-agent --version and the broker log show the versions)'
    );
  }
  // The agent's own certificate refused: after a CA rotation or an expiry while offline, or revoked.
  if (
    f.code === Status.PERMISSION_DENIED ||
    /PERMISSION_DENIED|no valid client certificate|certificate (?:expired|revoked|unknown)|bad certificate/i.test(
      message,
    )
  ) {
    return (
      "the broker refused this agent's certificate: if it expired, was revoked, or this agent was offline " +
      'through a CA rotation, enroll again with a new join token (burrow-agent enroll --state-dir ...)'
    );
  }
  return undefined;
}
