/**
 * `burrow-agent policy check|eval`: offline tools for site admins over the same engine the agent
 * runs (@burrow/policy). cli.ts registers them with {@link registerPolicyCommands}; the handlers
 * take their streams as arguments so that nothing here reads the process environment itself.
 */
import { readFile } from 'node:fs/promises';
import type { Argv, CommandModule } from 'yargs';
import { ConfigError, loadYamlConfig } from '@burrow/tunnel';
import { GatewayMappingError, loadGatewayMapping } from './gateway/gateway-mapping';
import {
  PolicyEngine,
  PolicyInputError,
  PolicyLoadError,
  formatPolicyIssue,
  loadPolicySet,
  type PolicySources,
} from '@burrow/policy';

/** Flags shared by both commands; each is also a YAML key and a BURROW_AGENT_* variable. */
export const POLICY_SOURCE_OPTIONS = {
  policies: { type: 'string', describe: 'directory of *.cedar policy files', demandOption: true },
  entities: { type: 'string', describe: 'Cedar JSON entity file (users, groups, resources and their attributes)' },
  'policy-schema': {
    type: 'string',
    describe: 'Cedar schema (JSON or human format); policies, entities and requests are validated against it',
  },
} as const;

export const POLICY_CHECK_OPTIONS = {
  ...POLICY_SOURCE_OPTIONS,
  'gateway-mapping': {
    type: 'string',
    describe: 'gateway mapping file to validate too (what burrow-agent run --gateway-mapping would load)',
  },
} as const;

export const POLICY_EVAL_OPTIONS = {
  ...POLICY_SOURCE_OPTIONS,
  explain: {
    type: 'boolean',
    describe: 'add the satisfied policies (file:line) and evaluation errors to every answer',
    default: false,
  },
  input: { type: 'string', describe: 'file holding the AuthZEN request JSON (default: stdin)' },
} as const;

/** Exit codes of the policy commands. */
export const POLICY_EXIT = { ok: 0, policyError: 1, invalidInput: 2 } as const;

/** Where the commands read and write (process streams in cli.ts, buffers in tests). */
export interface PolicyCliIo {
  readStdin(): Promise<string>;
  out(text: string): void;
  err(text: string): void;
}

type Args = Record<string, unknown>;

function sourcesFrom(args: Args): PolicySources {
  const str = (k: string): string | undefined =>
    args[k] === undefined || args[k] === '' ? undefined : String(args[k]);
  const policiesDir = str('policies');
  if (!policiesDir) throw new ConfigError('policies', 'is required (a directory of *.cedar files)');
  return { policiesDir, entitiesFile: str('entities'), schemaFile: str('policy-schema') };
}

/**
 * `policy check`: loads and validates the set offline (and the gateway mapping, when named). Prints
 * `ok: N policies, M entities` (`; gateway mapping: R routes`) and returns 0, or prints every
 * problem as `file:line:column: message` (a mapping's as `FILE:LINE: problem`) and returns 1.
 */
export async function runPolicyCheck(args: Args, io: PolicyCliIo): Promise<number> {
  try {
    const set = await loadPolicySet(sourcesFrom(args));
    const mappingFile = args['gateway-mapping'] ? String(args['gateway-mapping']) : undefined;
    const mapping = mappingFile ? loadGatewayMapping(mappingFile) : undefined;
    for (const w of set.warnings) io.err(`warning: ${w}\n`);
    const n = mapping?.routes.length ?? 0;
    const routes = mapping ? `; gateway mapping: ${n} ${n === 1 ? 'route' : 'routes'}` : '';
    io.out(`ok: ${set.policies.length} policies, ${set.entities.size} entities${routes}\n`);
    return POLICY_EXIT.ok;
  } catch (err) {
    if (err instanceof GatewayMappingError) {
      io.err(`${err.message}\n`);
      return POLICY_EXIT.policyError;
    }
    if (err instanceof PolicyLoadError) {
      for (const issue of err.issues) io.err(`${formatPolicyIssue(issue)}\n`);
      return POLICY_EXIT.policyError;
    }
    io.err(`${(err as Error).message}\n`);
    return err instanceof ConfigError ? POLICY_EXIT.invalidInput : POLICY_EXIT.policyError;
  }
}

/**
 * `policy eval`: answers one AuthZEN evaluation request, or an evaluations batch (a request with
 * an `evaluations` array), read as JSON; prints the AuthZEN response. Returns 0 for allow and
 * deny alike, 2 for input that is not a valid request, 1 when the policy set does not load.
 */
export async function runPolicyEval(args: Args, io: PolicyCliIo): Promise<number> {
  let sources: PolicySources;
  try {
    sources = sourcesFrom(args);
  } catch (err) {
    io.err(`${(err as Error).message}\n`);
    return POLICY_EXIT.invalidInput;
  }
  let text: string;
  try {
    text = args.input ? await readFile(String(args.input), 'utf8') : await io.readStdin();
  } catch (err) {
    io.err(
      `input: cannot read ${String(args.input)}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}\n`,
    );
    return POLICY_EXIT.invalidInput;
  }
  let request: unknown;
  try {
    request = JSON.parse(text);
  } catch (err) {
    io.err(`input: not JSON: ${(err as Error).message}\n`);
    return POLICY_EXIT.invalidInput;
  }
  let engine: PolicyEngine;
  try {
    engine = await PolicyEngine.open({ ...sources, cacheTtlMs: 0 });
  } catch (err) {
    io.err(`${(err as Error).message}\n`);
    return POLICY_EXIT.policyError;
  }
  try {
    const explain = args.explain === true;
    const isBatch = typeof request === 'object' && request !== null && Array.isArray((request as Args).evaluations);
    let response: unknown;
    if (isBatch) {
      const batch = request as { options?: Args };
      response = engine.evaluations(explain ? { ...batch, options: { ...batch.options, explain: true } } : batch);
    } else {
      response = engine.evaluate(
        explain && typeof request === 'object' && request !== null ? { ...request, explain: true } : request,
      );
    }
    io.out(`${JSON.stringify(response, null, 2)}\n`);
    return POLICY_EXIT.ok;
  } catch (err) {
    if (!(err instanceof PolicyInputError)) throw err;
    io.err(`invalid request: ${err.message}\n`);
    return POLICY_EXIT.invalidInput;
  } finally {
    await engine.close();
  }
}

/**
 * The `policy` command with its `check` and `eval` subcommands, for cli.ts's yargs. `handle` wraps
 * a handler: it runs it and exits with its code (cli.ts owns the process).
 */
export function policyCommand(
  handle: (run: (args: Args, io: PolicyCliIo) => Promise<number>) => (args: Args) => void,
): CommandModule {
  const withConfig = <T>(cmd: Argv<T>, keys: readonly string[]): Argv<T> =>
    cmd
      .env('BURROW_AGENT')
      .config('config', 'YAML config file (keys are flag names)', (file: string) => loadYamlConfig(file, keys))
      .strict();
  return {
    command: 'policy',
    describe: 'check policies offline and evaluate AuthZEN requests against them',
    builder: (p: Argv) =>
      p
        .command(
          'check',
          'parse and validate the policy set: prints "ok: N policies, M entities", or every error as ' +
            'file:line:column and exits 1',
          (c) => withConfig(c.options(POLICY_CHECK_OPTIONS), Object.keys(POLICY_CHECK_OPTIONS)),
          handle(runPolicyCheck),
        )
        .command(
          'eval',
          'evaluate one AuthZEN request (or an evaluations batch) read as JSON from stdin and print the AuthZEN ' +
            'response; exit 0 for allow and deny, 2 for invalid input',
          (c) => withConfig(c.options(POLICY_EVAL_OPTIONS), Object.keys(POLICY_EVAL_OPTIONS)),
          handle(runPolicyEval),
        )
        .demandCommand(1, 'name a policy command: check or eval')
        .strict(),
    handler: () => undefined,
  };
}
