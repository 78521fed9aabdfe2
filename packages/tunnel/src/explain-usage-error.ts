// No imports: burrow-pki loads this file alone (its CLI does not load the tunnel package).

/** Kebab-case spelling of a flag name: `agent_id`, `agentId`, `AGENT-ID` -> `agent-id`. */
function kebab(name: string): string {
  return name
    .replace(/([a-z0-9])([A-Z])/g, '$1-$2')
    .replace(/_/g, '-')
    .toLowerCase();
}

/**
 * The error for a flag given in another spelling of one of the command's flags (`--agent_id`,
 * `--agentId` for `--agent-id`), else undefined. yargs accepts the camelCase spelling silently
 * (its camel-case expansion) and reports a snake_case one as the real flag missing; each flag has
 * one name, so both are refused naming it. Arguments after `--` are not flags.
 */
export function misspeltFlag(args: readonly string[], options: UsageOptions): string | undefined {
  const known = new Set(Object.keys(options.key));
  const isKnown = (name: string): boolean => known.has(name) || (name.startsWith('no-') && known.has(name.slice(3)));
  const end = args.indexOf('--');
  for (const arg of end < 0 ? args : args.slice(0, end)) {
    const m = /^--([^=]+)/.exec(arg);
    if (!m || isKnown(m[1]!)) continue;
    const meant = kebab(m[1]!);
    if (meant !== m[1] && isKnown(meant)) return `unknown flag --${m[1]}: did you mean --${meant}?`;
  }
  return undefined;
}

/**
 * Rewrites a yargs usage error for people. yargs (with camel-case expansion, which its `.env()`
 * needs: it turns BURROW_AGENT_STATE_DIR into `stateDir`) lists an unknown flag twice
 * (`admin-listn, adminListn`); a misspelt flag such as `--agent_id` is reported as the flag it
 * meant missing; and a missing flag does not say it can come from the environment. Returns one
 * line: the flag given in the wrong spelling with the right one, else the message without twins
 * and with `--` on flags, with each missing flag's environment variable when `envPrefix` is set.
 */
export function explainUsageError(message: string, args: readonly string[], options: UsageOptions): string {
  const misspelt = misspeltFlag(args, options);
  if (misspelt) return misspelt;
  const known = new Set(Object.keys(options.key));
  const [first = '', ...rest] = message.split('\n');
  if (first === 'Invalid values:') {
    // `  Argument: action, Given: "frob", Choices: "list", "show"` per flag.
    const problems = rest.map((line) => {
      const m = /Argument: ([^,]+), Given: (.*), Choices: (.*)$/.exec(line);
      return m ? `${m[1]}: ${m[2]} is not one of ${m[3]}` : line.trim();
    });
    return problems.join('; ');
  }
  const listed = /^(Unknown arguments?|Missing required arguments?): (.*)$/.exec(first);
  if (!listed) return [first, ...rest].join(' ').trim();
  const names = listed[2]!.split(', ');
  // A camelCase twin is the same flag yargs also lists under its own spelling.
  const own = names.filter((n) => !(n !== kebab(n) && names.includes(kebab(n))));
  const asFlag = (n: string): string => (known.has(n) || /^[\w-]+$/.test(n) ? `--${n}` : n);
  if (listed[1]!.startsWith('Unknown')) {
    const unknown = own.map((n) => (args.includes(n) ? n : asFlag(n)));
    return `unknown ${unknown.length === 1 ? 'argument' : 'arguments'}: ${unknown.join(', ')}`;
  }
  const env = (n: string): string =>
    options.envPrefix ? ` (or ${options.envPrefix}_${n.toUpperCase().replace(/-/g, '_')})` : '';
  const missing = own.map((n) => `--${n}${env(n)}`);
  const note = rest.join(' ').trim();
  return `missing required ${missing.length === 1 ? 'flag' : 'flags'}: ${missing.join(', ')}${note ? `; ${note}` : ''}`;
}

/** What {@link explainUsageError} needs of a yargs instance's options. */
export interface UsageOptions {
  /** Every flag of the command being parsed, by name. */
  key: Record<string, unknown>;
  /** The prefix of the flags' environment variables (`BURROW_AGENT`), if they have any. */
  envPrefix?: string;
}

/**
 * The options of a yargs instance: yargs 17 has `getOptions()` at run time but not in its types.
 * During a command's parse it returns that command's options (yargs resets the instance for it).
 */
export function usageOptionsOf(y: unknown): UsageOptions {
  return (y as { getOptions(): UsageOptions }).getOptions();
}
