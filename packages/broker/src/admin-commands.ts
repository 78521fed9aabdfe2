import { AdminClient, AdminRequestError, type AdminClientOptions } from './admin-client';
import type { BrokerStatus, DisconnectResult } from './broker';
import type { AgentDetail, AgentSummary } from './tunnel-registry';

/**
 * Exit codes of `burrow-broker agents|status`: 0 done, 1 the agent is not connected,
 * 2 the admin listener cannot be reached (or bad options), 3 the broker refused the request
 * (admin token), 4 any other failure.
 */
export const ADMIN_EXIT = { ok: 0, notFound: 1, unreachable: 2, refused: 3, failed: 4 } as const;

/** One admin command, as parsed by cli.ts. */
export type AdminCommand =
  | { kind: 'list' }
  | { kind: 'show'; agentId: string }
  | { kind: 'disconnect'; agentId: string; reason?: string }
  | { kind: 'status' };

export interface AdminCommandOptions extends AdminClientOptions {
  /** Print the broker's JSON instead of tables (for scripts). */
  json: boolean;
}

/** What the command printed and its exit code; cli.ts writes and exits. */
export interface AdminCommandResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Lays out rows in columns two spaces apart; the first row is the header. */
export function formatTable(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return `${rows
    .map((r) =>
      r
        .map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n')}\n`;
}

/** `3725` -> `1h 2m 5s`; negative durations (already past) say so. */
export function formatSeconds(seconds: number): string {
  if (seconds < 0) return `${formatSeconds(-seconds)} ago`;
  const s = Math.round(seconds);
  const parts: string[] = [];
  const d = Math.floor(s / 86_400),
    h = Math.floor((s % 86_400) / 3600),
    m = Math.floor((s % 3600) / 60),
    sec = s % 60;
  if (d) parts.push(`${d}d`);
  if (h) parts.push(`${h}h`);
  if (m && !d) parts.push(`${m}m`);
  if (!d && !h) parts.push(`${sec}s`);
  return parts.join(' ');
}

function since(iso: string, nowMs: number): string {
  return `${iso} (${formatSeconds((nowMs - Date.parse(iso)) / 1000)} ago)`;
}

function keyValues(pairs: [string, string | number | boolean][]): string {
  return formatTable([['', ''], ...pairs.map(([k, v]) => [k, String(v)])])
    .split('\n')
    .slice(1)
    .join('\n');
}

function listText(agents: AgentSummary[], address: string, nowMs: number): string {
  if (agents.length === 0) return `no agents connected to the broker at ${address}\n`;
  const rows = [['AGENT', 'SESSIONS', 'CONNECTED SINCE', 'UP', 'CALLS', 'PEERS']];
  for (const a of [...agents].sort((x, y) => x.id.localeCompare(y.id))) {
    rows.push([
      a.id,
      String(a.connections),
      a.connectedSince,
      formatSeconds((nowMs - Date.parse(a.connectedSince)) / 1000),
      String(a.callsInFlight),
      a.sessions.map((s) => s.peer).join(','),
    ]);
  }
  return formatTable(rows);
}

function showText(a: AgentDetail, nowMs: number): string {
  const head = keyValues([
    ['agent', a.id],
    ['sessions', a.connections],
    ['connected since', since(a.connectedSince, nowMs)],
    ['calls in flight', a.callsInFlight],
  ]);
  const rows = [
    [
      'SESSION',
      'PEER',
      'CONNECTED AT',
      'PROTOCOL',
      'AGENT VERSION',
      'CALLS',
      'DRAINING',
      'CERT SERIAL',
      'CERT EXPIRES',
    ],
  ];
  for (const s of a.sessions) {
    rows.push([
      s.id,
      s.peer,
      s.connectedAt,
      String(s.protocolVersion),
      s.agentVersion,
      String(s.callsInFlight),
      s.draining ? 'yes' : 'no',
      s.certificate.serial,
      `${s.certificate.notAfter} (in ${formatSeconds(s.certificate.secondsLeft)})`,
    ]);
  }
  return `${head}\n${formatTable(rows)}`;
}

function disconnectText(r: DisconnectResult): string {
  const what =
    `disconnected agent "${r.agentId}": closed ${r.sessionsClosed} session(s), failed ${r.callsAborted} call(s) ` +
    `in flight (reason: ${r.reason})`;
  const next = r.revoked
    ? 'Its certificate is revoked: it will not reconnect.'
    : `The agent will reconnect after its backoff unless its certificate is revoked (burrow-pki revoke ` +
      `--agent-id ${r.agentId}).`;
  return `${what}\n${next}\n`;
}

function statusText(s: BrokerStatus): string {
  const pairs: [string, string | number | boolean][] = [
    ['broker', s.brokerId],
    ['version', `${s.version} (protocol ${s.protocolVersions.join(', ')})`],
    ['started', `${s.startedAt} (up ${formatSeconds(s.uptimeSeconds)})`],
    ['state', s.draining ? 'draining' : s.ready ? 'ready' : 'starting'],
    ['trust domain', s.trustDomain],
    ['agent listener', s.listeners.agent],
    ['api listener', s.listeners.api],
    ['admin listener', s.listeners.admin ?? 'off'],
    ['authzen listener', s.listeners.authzen ?? 'off'],
    ['ext_authz listener', s.listeners.extAuthz ?? 'off'],
    ['forward-auth listener', s.listeners.forwardAuth ?? 'off'],
    ['agents', s.agents],
    ['sessions', s.sessions],
    ['calls in flight', s.callsInFlight],
    ['calls waiting', s.callsWaiting],
    [
      'serving certificate',
      `${s.servingCertificate.spiffeId} serial ${s.servingCertificate.serial}, ` +
        `expires ${s.servingCertificate.notAfter} (in ${formatSeconds(s.servingCertificate.secondsLeft)})`,
    ],
  ];
  const pki = s.pki;
  if (!pki.enabled) pairs.push(['pki', 'off (certificates from files)']);
  else if ('error' in pki) pairs.push(['pki', `cannot read the PKI directory: ${pki.error}`]);
  else {
    pairs.push(
      ['pki', pki.dir],
      ['rotation phase', pki.rotationPhase],
      ['trust bundle version', pki.bundleVersion],
      ['revocations version', pki.revocationsVersion],
    );
    for (const ca of pki.cas) {
      const roles = [ca.signsClients ? 'signs agents/services' : '', ca.signsServers ? 'signs brokers' : '']
        .filter(Boolean)
        .join(', ');
      pairs.push([
        `ca ${ca.id}`,
        `${ca.kind}, expires ${ca.notAfter} (in ${formatSeconds(ca.secondsLeft)})${roles ? `, ${roles}` : ''}`,
      ]);
    }
  }
  const cluster = s.cluster;
  if (!cluster?.enabled) pairs.push(['cluster', 'off (no --redis-url)']);
  else {
    pairs.push(['cluster', `peer listener advertised at ${cluster.advertise}`]);
    pairs.push([
      'redis',
      cluster.redis === 'up'
        ? 'up'
        : `DOWN since ${cluster.downSince ?? '?'}${cluster.lastError ? `: ${cluster.lastError}` : ''}`,
    ]);
    pairs.push([
      'replicas',
      cluster.brokers.map((b) => `${b.brokerId} (agents at ${b.agent})`).join(', ') || 'none known',
    ]);
  }
  return keyValues(pairs);
}

const EXIT_OF_FAILURE = {
  unreachable: ADMIN_EXIT.unreachable,
  not_found: ADMIN_EXIT.notFound,
  refused: ADMIN_EXIT.refused,
  failed: ADMIN_EXIT.failed,
} as const;

/**
 * Runs one admin command against the broker's admin listener. Never rejects: failures become a
 * one-line message on stderr and an exit code from {@link ADMIN_EXIT}.
 */
export async function runAdminCommand(
  command: AdminCommand,
  opts: AdminCommandOptions,
  nowMs: () => number = Date.now,
): Promise<AdminCommandResult> {
  const client = new AdminClient(opts);
  const json = (v: unknown): string => `${JSON.stringify(v, null, 2)}\n`;
  const path = (id: string): string => `/agents/${encodeURIComponent(id)}`;
  try {
    let stdout: string;
    switch (command.kind) {
      case 'list': {
        const agents = await client.get<AgentSummary[]>('/agents');
        stdout = opts.json ? json(agents) : listText(agents, opts.address, nowMs());
        break;
      }
      case 'show': {
        const detail = await client.get<AgentDetail>(path(command.agentId));
        stdout = opts.json ? json(detail) : showText(detail, nowMs());
        break;
      }
      case 'disconnect': {
        const result = await client.post<DisconnectResult>(
          `${path(command.agentId)}/disconnect`,
          command.reason === undefined ? {} : { reason: command.reason },
        );
        stdout = opts.json ? json(result) : disconnectText(result);
        break;
      }
      case 'status': {
        const status = await client.get<BrokerStatus>('/status');
        stdout = opts.json ? json(status) : statusText(status);
        break;
      }
    }
    return { exitCode: ADMIN_EXIT.ok, stdout, stderr: '' };
  } catch (err) {
    if (err instanceof AdminRequestError)
      return { exitCode: EXIT_OF_FAILURE[err.kind], stdout: '', stderr: `${err.message}\n` };
    return { exitCode: ADMIN_EXIT.failed, stdout: '', stderr: `${(err as Error).message}\n` };
  }
}
