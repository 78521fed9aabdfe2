import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import * as path from 'node:path';

/**
 * The agent's state directory (`--state-dir`), written by `burrow-agent enroll` and kept current by
 * renewal and trust-bundle updates:
 *   tls.key     the agent's private key (0600; made here, never sent anywhere)
 *   tls.crt     its certificate, then the issuing CA
 *   ca.crt      the trust bundle: CAs that sign brokers
 *   state.json  agent id, SPIFFE id, trust-bundle version, enrollment time, broker
 * Every file is replaced atomically (temp file, fsync, rename), so a crash never leaves a torn one.
 */
export interface AgentState {
  agentId: string;
  spiffeId: string;
  bundleVersion: number;
  enrolledAt: string;
  broker: string;
}

/** Writes `data` to `file` atomically with `mode`. */
export async function writeFileAtomic(file: string, data: string | Buffer, mode = 0o644): Promise<void> {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${randomBytes(6).toString('hex')}.tmp`);
  const fh = await open(tmp, 'wx', mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
}

export async function writeState(dir: string, state: AgentState): Promise<void> {
  await writeFileAtomic(path.join(dir, 'state.json'), `${JSON.stringify(state, null, 2)}\n`, 0o600);
}

/** The state, or undefined when the directory has none (not enrolled). */
export function readState(dir: string): AgentState | undefined {
  try {
    return JSON.parse(readFileSync(path.join(dir, 'state.json'), 'utf8')) as AgentState;
  } catch {
    return undefined;
  }
}
