import { X509Certificate, createPrivateKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import * as YAML from 'yaml';
import { identityOfCertificate } from './identity';

/**
 * Helpers for the binaries' option handling (flags > environment > YAML config file > defaults).
 * Kept here, beside the protocol code, only because both CLIs need them and must not import each
 * other; nothing in the protocol code uses them.
 */

/** A bad configuration value. `field` is the flag name without dashes, as the user wrote it. */
export class ConfigError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
  }
}

/**
 * Reads a YAML config file whose keys are flag names (`agent-listen: 127.0.0.1:7000`). An
 * unreadable file, a YAML error (with its line) or an unknown key is a {@link ConfigError}.
 */
export function loadYamlConfig(file: string, knownKeys: readonly string[]): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError('config', `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  let doc: unknown;
  try {
    doc = YAML.parse(text);
  } catch (err) {
    // The yaml package's first message line already says "at line N, column M:".
    const first = (err as Error).message.split('\n')[0]!.replace(/:\s*$/, '');
    throw new ConfigError('config', `${file} is not valid YAML: ${first}`);
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== 'object' || Array.isArray(doc))
    throw new ConfigError('config', `${file} must hold a mapping of option names to values`);
  for (const key of Object.keys(doc)) {
    if (!knownKeys.includes(key))
      throw new ConfigError(key, `unknown key in ${file}; known keys: ${knownKeys.join(', ')}`);
  }
  return doc as Record<string, unknown>;
}

/** Validates `HOST:PORT` (IPv6 in brackets); port 0 allowed (pick a free port). */
export function parseListenAddress(field: string, value: unknown): string {
  const text = String(value ?? '').trim();
  const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(text);
  if (!m || Number(m[2]) > 65535) throw new ConfigError(field, `"${text}" is not HOST:PORT`);
  return text;
}

/**
 * Validates the host names of a repeatable `--admin-allowed-host`: a DNS name or an IP address,
 * without a port or wildcard (a port is never compared; a wildcard would undo the check).
 * Returns them lowercased, without brackets or a trailing dot.
 */
export function parseAllowedHosts(field: string, value: unknown): string[] {
  return asList(value).map((raw) => {
    const host = raw
      .trim()
      .replace(/^\[(.*)\]$/, '$1')
      .replace(/\.$/, '')
      .toLowerCase();
    const label = '[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?';
    if (isIP(host) === 0 && !new RegExp(`^${label}(\\.${label})*$`).test(host)) {
      throw new ConfigError(field, `"${raw}" is not a host name or IP address (no port, no wildcard)`);
    }
    return host;
  });
}

const DURATION_UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/**
 * Parses `500ms`, `5s`, `1m30s`, `24h` into milliseconds. A number needs a unit (`30` in a YAML
 * file or an environment variable could mean seconds as well as milliseconds), except `0`, which
 * means the same in every unit.
 *
 * @throws ConfigError naming `field`: `"30" has no unit; write 30s or 30ms`.
 */
export function parseDurationMs(field: string, value: unknown): number {
  const text = String(value ?? '').trim();
  if (/^0+$/.test(text)) return 0;
  if (/^\d+(\.\d+)?$/.test(text)) throw new ConfigError(field, `"${text}" has no unit; write ${text}s or ${text}ms`);
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/gy;
  let total = 0;
  let consumed = 0;
  for (let m = re.exec(text); m !== null; m = re.exec(text)) {
    total += Number(m[1]) * DURATION_UNITS_MS[m[2]!]!;
    consumed = re.lastIndex;
  }
  if (text === '' || consumed !== text.length)
    throw new ConfigError(field, `"${text}" is not a duration like 500ms, 5s, 1m or 24h`);
  return Math.round(total);
}

const SIZE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  kib: 1024,
  mib: 1024 ** 2,
  gib: 1024 ** 3,
  kb: 1000,
  mb: 1000 ** 2,
  gb: 1000 ** 3,
};

/** Parses `16MiB`, `512KiB`, `1048576` into bytes. */
export function parseBytes(field: string, value: unknown): number {
  const text = String(value ?? '').trim();
  const m = /^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$/.exec(text);
  const unit = m ? SIZE_UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new ConfigError(field, `"${text}" is not a size like 16MiB or 1048576`);
  return Math.round(Number(m[1]) * unit);
}

/** Parses a positive integer within [min, max]. */
export function parseIntInRange(field: string, value: unknown, min: number, max: number): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < min || n > max)
    throw new ConfigError(field, `"${String(value)}" is not a whole number from ${min} to ${max}`);
  return n;
}

/** Checks that a file exists and is readable, naming the field when not. */
export function requireReadableFile(field: string, value: unknown): string {
  const file = String(value ?? '');
  if (file === '') throw new ConfigError(field, 'is required');
  try {
    readFileSync(file);
  } catch (err) {
    throw new ConfigError(field, `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  return file;
}

/**
 * Checks a certificate/key pair before anything listens: the certificate parses, carries a Burrow
 * identity of `role`, and the key is its private key. Problems name `certField` or `keyField`.
 */
export function requireCertificatePair(
  certField: string,
  certFile: string,
  keyField: string,
  keyFile: string,
  role: 'agent' | 'broker' | 'service',
): void {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(readFileSync(certFile));
  } catch (err) {
    throw new ConfigError(certField, `${certFile} is not a PEM certificate (${(err as Error).message})`);
  }
  const id = identityOfCertificate(cert.raw);
  if (!id || id.role !== role)
    throw new ConfigError(
      certField,
      `${certFile} is not a ${role} certificate (expected URI SAN ` +
        `spiffe://<trust-domain>/${role === 'broker' ? 'broker' : `${role}/<name>`})`,
    );
  let key: KeyObject;
  try {
    key = createPrivateKey(readFileSync(keyFile));
  } catch (err) {
    throw new ConfigError(keyField, `${keyFile} is not a PEM private key (${(err as Error).message})`);
  }
  if (!cert.checkPrivateKey(key)) throw new ConfigError(keyField, `${keyFile} is not the private key of ${certFile}`);
}

/** Normalises a flag that may be given once or many times (or as a YAML list) to a string array. */
export function asList(value: unknown): string[] {
  if (value === undefined || value === null) return [];
  return (Array.isArray(value) ? value : [value]).map(String);
}

/**
 * Silences Node's DEP0123 ("Setting the TLS ServerName to an IP address"), which grpc-js triggers
 * whenever a broker is addressed by IP. The certificate's IP SAN is still verified; the warning
 * only tells operators something they cannot act on. Every other warning passes through.
 */
export function silenceIpServerNameWarning(): void {
  const emit = process.emitWarning.bind(process) as (...args: unknown[]) => void;
  process.emitWarning = ((warning: unknown, ...rest: unknown[]) => {
    const code = typeof rest[0] === 'object' && rest[0] !== null ? (rest[0] as { code?: string }).code : rest[1];
    if (code === 'DEP0123') return;
    emit(warning, ...rest);
  }) as typeof process.emitWarning;
}
