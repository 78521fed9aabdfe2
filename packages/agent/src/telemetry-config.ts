import { ConfigError, TRACING_OPTIONS, telemetryBytesFromArgs, tracingFromArgs } from '@burrow/tunnel';
import type { AgentTelemetryConfig } from './agent-telemetry';

/** The agent's tracing and telemetry flags (docs/operations.md, "Tracing one call end to end"). */
export const TELEMETRY_RUN_OPTIONS = {
  ...TRACING_OPTIONS,
  'telemetry-upload': {
    type: 'boolean',
    describe:
      "send the agent's spans to the broker over the tunnel (default); --no-telemetry-upload: never, and " +
      'export to --otlp-endpoint instead when given',
    default: true,
  },
  'telemetry-buffer-bytes': {
    type: 'string',
    describe: 'encoded spans held for the tunnel (or the endpoint) at most; the oldest are dropped past it',
    default: '1MiB',
  },
  'trace-include-context': {
    type: 'boolean',
    describe: "policy spans carry the request's context values (off: never leave the site)",
    default: false,
  },
} as const;

type Args = Record<string, unknown>;

/** Reads the agent's telemetry flags; a bad one is a ConfigError naming it. */
export function telemetryConfigFromArgs(args: Args): AgentTelemetryConfig {
  const tracing = tracingFromArgs(args);
  const upload = args['telemetry-upload'] !== false;
  if (upload && tracing.otlp)
    throw new ConfigError(
      'otlp-endpoint',
      "needs --no-telemetry-upload: the agent's spans go up the tunnel to the broker's endpoint by default",
    );
  return {
    tracing,
    upload,
    bufferBytes: telemetryBytesFromArgs(args, 'telemetry-buffer-bytes', 64 * 1024),
    includeContext: args['trace-include-context'] === true,
  };
}
