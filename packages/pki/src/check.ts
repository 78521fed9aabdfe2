/**
 * `burrow-pki check`: is any CA of the PKI close to expiry? Meant for cron and monitoring: CA
 * expiry is the one PKI failure that takes everything down at once, and it is entirely
 * predictable.
 */
import * as path from 'node:path';
import { loadCaCertificate, readManifest } from './pki-dir';
import { PkiError } from './pki-error';

const DAY_MS = 86_400_000;
/** Warn when a CA has fewer days left than this. */
export const DEFAULT_WARN_DAYS = 60;

/** Result of {@link checkPki}. */
export interface PkiCheckResult {
  /** No problems. */
  ok: boolean;
  /** One line each, naming the CA and what to do. */
  problems: string[];
  /** Every CA in the trust bundle, with its notAfter and days left (fractional, negative when expired). */
  cas: { id: string; kind: string; notAfter: Date; daysLeft: number }[];
}

/**
 * Checks every trusted CA (root and issuing) of `dir` for expiry: a problem for each that has
 * fewer than `warnDays` (default 60) days left, or has expired. `nowMs` defaults to now.
 *
 * @throws PkiError if `dir` is not a readable PKI (that is not a "problem": it is an error).
 */
export async function checkPki(opts: { dir: string; nowMs?: number; warnDays?: number }): Promise<PkiCheckResult> {
  if (typeof opts?.dir !== 'string' || opts.dir === '') throw new PkiError('dir: is required');
  const warnDays = opts.warnDays ?? DEFAULT_WARN_DAYS;
  if (typeof warnDays !== 'number' || !Number.isFinite(warnDays) || warnDays < 0) {
    throw new PkiError(`warnDays: must be a number of days >= 0 (got ${String(warnDays)})`);
  }
  const nowMs = opts.nowMs ?? Date.now();
  const absDir = path.resolve(opts.dir);
  const manifest = await readManifest(absDir);
  const rotating = manifest.rotation !== undefined;
  const problems: string[] = [];
  const cas: PkiCheckResult['cas'] = [];
  for (const record of manifest.cas) {
    const ca = await loadCaCertificate(absDir, record);
    const daysLeft = (ca.notAfter.getTime() - nowMs) / DAY_MS;
    cas.push({ id: record.id, kind: record.kind, notAfter: ca.notAfter, daysLeft });
    const label = `${record.kind} CA ${record.id}`;
    const replacing =
      rotating && (record.id === manifest.rotation!.oldIssuingCaId || record.id === manifest.rotation!.oldRootCaId);
    const advice = replacing
      ? `a rotation replacing it is in phase ${manifest.rotation!.phase}; complete it with 'burrow-pki rotate'`
      : `rotate it with 'burrow-pki rotate --dir ${opts.dir} init'`;
    if (daysLeft <= 0) {
      problems.push(`${label} expired at ${ca.notAfter.toISOString()}; ${advice}`);
    } else if (daysLeft < warnDays) {
      problems.push(
        `${label} expires at ${ca.notAfter.toISOString()}, ${daysText(daysLeft)} left (warning ` +
          `threshold ${warnDays} days); ${advice}`,
      );
    }
  }
  return { ok: problems.length === 0, problems, cas };
}

/** Whole days, rounded ("30 days" for a CA created with a 30-day lifetime a moment ago), or hours under a day. */
function daysText(daysLeft: number): string {
  if (daysLeft < 1) return `${Math.max(1, Math.round(daysLeft * 24))} hours`;
  const days = Math.round(daysLeft);
  return `${days} day${days === 1 ? '' : 's'}`;
}
