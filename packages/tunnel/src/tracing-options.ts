import { readFileSync } from 'node:fs';
import { ConfigError, asList, parseBytes, parseDurationMs, requireReadableFile } from './cli-options';
import { DEFAULT_OTLP_TIMEOUT_MS, type OtlpHttpOptions } from './otlp-http-exporter';

/**
 * The tracing flags burrow-broker and burrow-agent share (`--otlp-*`, `--trace-sample-ratio`) and
 * their parsing; each binary adds its own telemetry budget flags.
 */
export const TRACING_OPTIONS = {
  'otlp-endpoint': {
    type: 'string',
    describe: 'OTLP/HTTP collector, http(s)://HOST:PORT[/PREFIX]: spans are POSTed to /v1/traces (protobuf)',
  },
  'otlp-ca': { type: 'string', describe: 'CA (PEM) that signed an https collector' },
  'otlp-cert': { type: 'string', describe: 'client certificate (PEM) for an https collector that asks for one' },
  'otlp-key': { type: 'string', describe: 'key (PEM) of --otlp-cert' },
  'otlp-header': {
    type: 'string',
    array: true,
    describe: 'NAME=VALUE header on export requests, e.g. authorization=Bearer... (repeatable)',
  },
  'otlp-timeout': { type: 'string', describe: 'limit on one export request', default: '10s' },
  'trace-sample-ratio': {
    type: 'number',
    describe: 'share of new traces recorded, 0 to 1 (a caller traceparent decides for its own trace)',
    default: 1,
  },
} as const;

/** Where spans are exported to, as the CLI read it. */
export interface OtlpEndpointConfig {
  endpoint: string;
  caFile?: string;
  certFile?: string;
  keyFile?: string;
  headers: Record<string, string>;
  timeoutMs: number;
}

/** The shared tracing settings. */
export interface TracingConfig {
  /** Set with --otlp-endpoint. */
  otlp?: OtlpEndpointConfig;
  sampleRatio: number;
}

type Args = Record<string, unknown>;

/** Reads the shared tracing flags; a bad one is a ConfigError naming it. */
export function tracingFromArgs(args: Args): TracingConfig {
  const sampleRatio = Number(args['trace-sample-ratio'] ?? 1);
  if (!(sampleRatio >= 0 && sampleRatio <= 1))
    throw new ConfigError('trace-sample-ratio', `"${String(args['trace-sample-ratio'])}" is not a number from 0 to 1`);
  if (!args['otlp-endpoint']) {
    for (const flag of ['otlp-ca', 'otlp-cert', 'otlp-key', 'otlp-header'])
      if (args[flag] !== undefined && asList(args[flag]).length > 0)
        throw new ConfigError(flag, 'needs --otlp-endpoint');
    return { sampleRatio };
  }
  const endpoint = String(args['otlp-endpoint']);
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    throw new ConfigError('otlp-endpoint', `"${endpoint}" is not a URL (http://HOST:PORT or https://HOST:PORT)`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:')
    throw new ConfigError('otlp-endpoint', `"${endpoint}" is not http:// or https://`);
  if ((args['otlp-cert'] === undefined) !== (args['otlp-key'] === undefined))
    throw new ConfigError(
      args['otlp-cert'] === undefined ? 'otlp-cert' : 'otlp-key',
      'needs both --otlp-cert and --otlp-key',
    );
  const headers: Record<string, string> = {};
  for (const h of asList(args['otlp-header'])) {
    const eq = h.indexOf('=');
    if (eq <= 0) throw new ConfigError('otlp-header', `"${h.slice(0, 80)}" is not NAME=VALUE`);
    headers[h.slice(0, eq).trim().toLowerCase()] = h.slice(eq + 1).trim();
  }
  const optionalFile = (flag: string): string | undefined =>
    args[flag] === undefined ? undefined : requireReadableFile(flag, args[flag]);
  const timeoutMs = parseDurationMs('otlp-timeout', args['otlp-timeout'] ?? `${DEFAULT_OTLP_TIMEOUT_MS}ms`);
  if (timeoutMs <= 0) throw new ConfigError('otlp-timeout', 'must be more than 0');
  return {
    sampleRatio,
    otlp: {
      endpoint,
      caFile: optionalFile('otlp-ca'),
      certFile: optionalFile('otlp-cert'),
      keyFile: optionalFile('otlp-key'),
      headers,
      timeoutMs,
    },
  };
}

/** A byte size flag of the telemetry budgets, at least `minBytes`. */
export function telemetryBytesFromArgs(args: Args, flag: string, minBytes: number): number {
  const bytes = parseBytes(flag, args[flag]);
  if (bytes < minBytes) throw new ConfigError(flag, `must be at least ${minBytes} bytes`);
  return bytes;
}

/** The exporter options of an endpoint config (files read now), without the budget and counters. */
export function otlpExporterOptions(
  otlp: OtlpEndpointConfig,
): Pick<OtlpHttpOptions, 'endpoint' | 'ca' | 'cert' | 'key' | 'headers' | 'timeoutMs'> {
  return {
    endpoint: otlp.endpoint,
    ca: otlp.caFile ? readFileSync(otlp.caFile) : undefined,
    cert: otlp.certFile ? readFileSync(otlp.certFile) : undefined,
    key: otlp.keyFile ? readFileSync(otlp.keyFile) : undefined,
    headers: otlp.headers,
    timeoutMs: otlp.timeoutMs,
  };
}
