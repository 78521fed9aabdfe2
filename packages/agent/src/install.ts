/**
 * `burrow-agent install --token T` and `burrow-agent uninstall`: the air-gapped path in one command.
 *
 * install: checks the token and the binary (self-check), enrolls into the state directory (nothing
 * local can fail after the token is presented: see {@link enroll}), writes agent.yaml, creates the
 * `burrow` system user, installs and starts the systemd unit, and prints what it did and how to see
 * the agent's status. Without systemd (no /run/systemd/system) it does the rest and prints the
 * command that runs the agent in the foreground. `dryRun` prints the plan and changes nothing (the
 * token is not presented either), and checks that a broker answers with the pinned CA. Every step
 * is idempotent: install run again keeps an existing enrollment and rewrites the rest.
 *
 * uninstall: stops and disables the unit, removes it, agent.yaml and a binary install copied; the
 * state directory (the agent's identity) and the user stay unless `purge`.
 *
 * Every path is taken from {@link InstallPaths} so the tests run it under a temporary directory
 * without root; commands (useradd, systemctl) go through {@link CommandRunner}.
 */
import { execFile } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import * as path from 'node:path';
import { status as Status } from '@grpc/grpc-js';
import { parseJoinToken, type ParsedJoinToken } from '@burrow/pki';
import { BurrowError, seaAssets } from '@burrow/tunnel';
import { enroll, fetchPinnedCa } from './enroll';
import { readState, writeFileAtomic } from './state-dir';
import { selfCheck } from './self-check';
import { SYSTEMD_UNIT } from './systemd-unit';

/** Where install puts things; {@link defaultInstallPaths} gives the standard ones under a root. */
export interface InstallPaths {
  /** The agent's state directory (key, certificate, trust bundle). */
  stateDir: string;
  /** agent.yaml; its directory also holds install.json (what install did, for uninstall). */
  configFile: string;
  /** The systemd unit file. */
  unitFile: string;
  /** Where a single-executable binary copies itself, so the unit does not depend on where it was unpacked. */
  binary: string;
}

/** The standard paths (those of deploy/systemd) under `root` ('/' for the real system). */
export function defaultInstallPaths(rootDir = '/'): InstallPaths {
  const root = path.resolve(rootDir);
  return {
    stateDir: path.join(root, 'var/lib/burrow-agent'),
    configFile: path.join(root, 'etc/burrow-agent/agent.yaml'),
    unitFile: path.join(root, 'etc/systemd/system/burrow-agent.service'),
    binary: path.join(root, 'usr/local/bin/burrow-agent'),
  };
}

/** Runs a system command; resolves with its exit code and output (never rejects for a non-zero exit). */
export type CommandRunner = (file: string, args: string[]) => Promise<{ code: number; output: string }>;

/** Runs commands with child_process.execFile (30 s limit each). */
export const runCommand: CommandRunner = (file, args) =>
  new Promise((resolve) => {
    execFile(file, args, { timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 127;
      resolve({ code, output: `${stdout}${stderr}`.trim() || (err?.message ?? '') });
    });
  });

export interface InstallOptions {
  token: string;
  /** Overrides the token's brokers. */
  brokers?: string[];
  /** Overrides the token's TLS server name. */
  serverName?: string;
  paths: InstallPaths;
  /** SERVICE=HOST:PORT routes for agent.yaml (default `*=127.0.0.1:50051`). */
  upstreams: string[];
  /** Admin listener for agent.yaml (status, metrics). */
  adminListen: string;
  /** System user to create and run as; undefined: none (the agent runs as whoever starts it). */
  user?: string;
  /** Whether systemd runs this machine (default: /run/systemd/system exists). */
  systemd: boolean;
  dryRun: boolean;
  /** The command that runs this agent: [binary] or [node, cli.js]. */
  self: string[];
  out: (line: string) => void;
  /** Where a failed step is reported (default: `out`). */
  err?: (line: string) => void;
  run?: CommandRunner;
  timeoutMs?: number;
}

export interface UninstallOptions {
  paths: InstallPaths;
  purge: boolean;
  user?: string;
  systemd: boolean;
  dryRun: boolean;
  out: (line: string) => void;
  run?: CommandRunner;
}

/** What install did, in `<config dir>/install.json`: uninstall removes exactly this. */
interface InstallRecord {
  installedAt: string;
  unitFile: string;
  configFile: string;
  stateDir: string;
  /** Set when install copied the binary (a single executable) there. */
  binary?: string;
  /** Set when install created this user. */
  createdUser?: string;
}

/** True when systemd is the init system (what sd_booted(3) checks). */
export function systemdRunning(): boolean {
  return existsSync('/run/systemd/system');
}

/** The command that runs this program: the single executable itself, or node and the CLI script. */
export function selfCommand(): string[] {
  return seaAssets() === undefined ? [process.execPath, path.resolve(process.argv[1] ?? '')] : [process.execPath];
}

const quote = (arg: string): string => (/^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`);
const yamlList = (values: string[]): string => values.map((v) => `\n  - ${JSON.stringify(v)}`).join('');

function unitName(paths: InstallPaths): string {
  return path.basename(paths.unitFile);
}

function installRecordFile(paths: InstallPaths): string {
  return path.join(path.dirname(paths.configFile), 'install.json');
}

/** agent.yaml for `burrow-agent run --config`: what the enrollment found and the site's routes. */
export function agentYaml(opts: {
  brokers: string[];
  serverName?: string;
  stateDir: string;
  upstreams: string[];
  adminListen: string;
}): string {
  return [
    '# Written by `burrow-agent install`; keys are the flag names of `burrow-agent run` (README configuration',
    '# table). Flags and BURROW_AGENT_* environment variables override them.',
    `broker:${yamlList(opts.brokers)}`,
    ...(opts.serverName === undefined ? [] : [`broker-server-name: ${JSON.stringify(opts.serverName)}`]),
    `state-dir: ${JSON.stringify(opts.stateDir)}`,
    `upstream:${yamlList(opts.upstreams)}`,
    `admin-listen: ${JSON.stringify(opts.adminListen)}`,
    'drain-timeout: 30s',
    '',
  ].join('\n');
}

/**
 * The unit with ExecStart and WorkingDirectory pointing at the paths of this install, running as
 * `user` (no user: the User=/Group= lines go, and systemd runs it as root).
 */
export function unitText(runCommand: string[], paths: InstallPaths, user: string | undefined): string {
  const unit = SYSTEMD_UNIT.replace(/^ExecStart=.*$/m, `ExecStart=${runCommand.map(quote).join(' ')}`).replace(
    /^WorkingDirectory=.*$/m,
    `WorkingDirectory=${paths.stateDir}`,
  );
  return user === undefined
    ? unit.replace(/^(User|Group)=.*\n/gm, '')
    : unit.replace(/^User=.*$/m, `User=${user}`).replace(/^Group=.*$/m, `Group=${user}`);
}

interface Step {
  /** What the step does, as the plan and the report say it. */
  says: string;
  apply: () => Promise<string | undefined>;
}

/** What install works out before any step: the token, the brokers, what is there already. */
interface InstallContext {
  run: CommandRunner;
  token: ParsedJoinToken;
  brokers: string[];
  serverName: string | undefined;
  /** The enrollment already in the state directory, if any (then the token is not used). */
  enrolled: ReturnType<typeof readState>;
  /** The agent's run command as the unit (or the foreground advice) has it. */
  runLine: string[];
  userExists: boolean;
  /** What uninstall will reverse; steps fill it in as they go. */
  record: InstallRecord;
}

/**
 * Installs the agent (see the file comment). Resolves with the exit code: 0 installed (or planned),
 * 1 a step failed (the message names it; steps before it stay done, and running install again resumes).
 */
export async function install(opts: InstallOptions): Promise<number> {
  const ctx = await installContext(opts);
  const steps = installSteps(opts, ctx);
  if (opts.dryRun) {
    opts.out(`burrow-agent install --dry-run: nothing is changed and the token is not used. The plan:`);
    for (const [i, step] of steps.entries()) opts.out(`  ${i + 1}. ${step.says}`);
    if (!opts.systemd) opts.out(`  then: ${foregroundAdvice(ctx.runLine, opts.user)}`);
    return ctx.enrolled === undefined ? checkBrokers(ctx.brokers, ctx.token, ctx.serverName, opts) : 0;
  }
  // Steps done stay done and each is idempotent: the same command resumes (a token not yet accepted
  // by the broker is still unused; one accepted is kept in the state directory).
  if (!(await runSteps('install', steps, opts, 'fix it and run the same command again'))) return 1;
  const unit = unitName(opts.paths);
  if (opts.systemd) {
    opts.out(
      `status: systemctl status ${unit}; logs: journalctl -u ${unit}; ready: curl http://${opts.adminListen}/readyz`,
    );
  } else {
    opts.out(`systemd is not running here (no /run/systemd/system); ${foregroundAdvice(ctx.runLine, opts.user)}`);
    opts.out(`status: curl http://${opts.adminListen}/readyz (and /brokers)`);
  }
  return 0;
}

async function installContext(opts: InstallOptions): Promise<InstallContext> {
  const run = opts.run ?? runCommand;
  const { paths } = opts;
  const token = parseJoinToken(opts.token);
  const brokers = opts.brokers?.length ? opts.brokers : token.brokers;
  if (brokers.length === 0) {
    throw new BurrowError(
      Status.INVALID_ARGUMENT,
      'broker: is required: this join token does not name a broker (an older token); pass --broker HOST:PORT',
    );
  }
  const binary = opts.self.length === 1 ? [paths.binary] : opts.self;
  return {
    run,
    token,
    brokers,
    serverName: opts.serverName ?? token.serverName,
    enrolled: readState(paths.stateDir),
    runLine: [...binary, 'run', '--config', paths.configFile],
    userExists: opts.user === undefined ? true : (await run('getent', ['passwd', opts.user])).code === 0,
    record: {
      installedAt: new Date().toISOString(),
      unitFile: paths.unitFile,
      configFile: paths.configFile,
      stateDir: paths.stateDir,
    },
  };
}

/** The plan: self-check, the user, enrollment, the binary, the config, the unit, the start. */
function installSteps(opts: InstallOptions, ctx: InstallContext): Step[] {
  const { paths } = opts;
  const steps: Step[] = [
    {
      says: 'check this binary (self-check: protos, Cedar policy engine, JWT signing)',
      apply: async () => {
        const r = await selfCheck();
        return `self-check ok: ${r.protos.length} protos, cedar ${r.cedarVersion}, jose ${r.joseAlgorithm}`;
      },
    },
  ];
  if (opts.user !== undefined && !ctx.userExists) steps.push(createUserStep(opts.user, paths, ctx));
  steps.push(enrollStep(opts, ctx));
  if (opts.self.length === 1 && path.resolve(opts.self[0]!) !== path.resolve(paths.binary))
    steps.push(copyBinaryStep(opts.self[0]!, paths.binary, ctx));
  steps.push(configStep(opts, ctx));
  steps.push({
    says: `install the systemd unit ${paths.unitFile}`,
    apply: async () => {
      await fs.mkdir(path.dirname(paths.unitFile), { recursive: true });
      await writeFileAtomic(paths.unitFile, unitText(ctx.runLine, paths, opts.user), 0o644);
      await writeFileAtomic(installRecordFile(paths), `${JSON.stringify(ctx.record, null, 2)}\n`, 0o600);
      return `installed ${paths.unitFile}`;
    },
  });
  if (opts.systemd) steps.push(startStep(unitName(paths), ctx.run));
  return steps;
}

function createUserStep(user: string, paths: InstallPaths, ctx: InstallContext): Step {
  return {
    says: `create the system user ${user} (useradd --system, no login shell)`,
    apply: async () => {
      const args = ['--system', '--user-group', '--home-dir', paths.stateDir, '--no-create-home'];
      const r = await ctx.run('useradd', [...args, '--shell', '/usr/sbin/nologin', user]);
      if (r.code !== 0) throw new Error(`useradd ${user} failed (exit ${r.code}): ${r.output}`);
      ctx.record.createdUser = user;
      return `created system user ${user}`;
    },
  };
}

function enrollStep(opts: InstallOptions, ctx: InstallContext): Step {
  const { paths } = opts;
  const { enrolled, brokers } = ctx;
  if (enrolled !== undefined) {
    return {
      says: `keep the enrollment in ${paths.stateDir} (agent ${enrolled.agentId}); the token is not used`,
      apply: async () =>
        `already enrolled as ${enrolled.spiffeId}; kept ${paths.stateDir} (uninstall --purge to start over)`,
    };
  }
  return {
    says: `enroll with join token ${ctx.token.tokenId} at ${brokers.join(' or ')} into ${paths.stateDir}`,
    apply: async () => {
      const issued = await enroll({
        broker: opts.brokers?.length ? brokers[0] : undefined,
        token: opts.token,
        stateDir: paths.stateDir,
        serverName: ctx.serverName,
        timeoutMs: opts.timeoutMs,
        notice: opts.out,
      });
      return `enrolled as ${issued.spiffeId} at ${issued.broker}; key and certificate in ${paths.stateDir}`;
    },
  };
}

function copyBinaryStep(self: string, binary: string, ctx: InstallContext): Step {
  return {
    says: `copy this binary to ${binary}`,
    apply: async () => {
      await fs.mkdir(path.dirname(binary), { recursive: true });
      await fs.copyFile(self, `${binary}.tmp`);
      await fs.chmod(`${binary}.tmp`, 0o755);
      await fs.rename(`${binary}.tmp`, binary);
      ctx.record.binary = binary;
      return `installed ${binary}`;
    },
  };
}

function configStep(opts: InstallOptions, ctx: InstallContext): Step {
  const { paths } = opts;
  return {
    says: `write ${paths.configFile} (brokers ${ctx.brokers.join(', ')}, upstream ${opts.upstreams.join(', ')})`,
    apply: async () => {
      await fs.mkdir(path.dirname(paths.configFile), { recursive: true, mode: 0o750 });
      const { upstreams, adminListen } = opts;
      const { brokers, serverName } = ctx;
      const yaml = agentYaml({ brokers, serverName, stateDir: paths.stateDir, upstreams, adminListen });
      await writeFileAtomic(paths.configFile, yaml, 0o640);
      if (opts.user !== undefined) {
        // root:burrow 0640: the service reads its config, cannot change it; it owns its state.
        await chownTo(ctx.run, `root:${opts.user}`, [path.dirname(paths.configFile), paths.configFile]);
        await chownTo(ctx.run, `${opts.user}:${opts.user}`, ['-R', paths.stateDir]);
      }
      return `wrote ${paths.configFile}`;
    },
  };
}

function startStep(unit: string, run: CommandRunner): Step {
  return {
    says: `start it: systemctl daemon-reload; systemctl enable --now ${unit}`,
    apply: async () => {
      for (const args of [['daemon-reload'], ['enable', '--now', unit]]) {
        const r = await run('systemctl', args);
        if (r.code !== 0) throw new Error(`systemctl ${args.join(' ')} failed (exit ${r.code}): ${r.output}`);
      }
      const active = await run('systemctl', ['is-active', unit]);
      return `started ${unit} (${active.output || 'state unknown'})`;
    },
  };
}

/**
 * Runs `steps` in order, printing what each did; at the first failure prints one line naming the
 * step (and `advice`) and resolves false.
 */
async function runSteps(
  command: 'install' | 'uninstall',
  steps: Step[],
  opts: Pick<InstallOptions, 'out' | 'err'>,
  advice?: string,
): Promise<boolean> {
  for (const [i, step] of steps.entries()) {
    let did: string | undefined;
    try {
      did = await step.apply();
    } catch (err) {
      const message = (err as Error).message.replace(/\s*\n\s*/g, ' ');
      const then = advice ? `; ${advice}` : '';
      (opts.err ?? opts.out)(`${command}: step ${i + 1} of ${steps.length} failed: ${step.says}: ${message}${then}`);
      return false;
    }
    if (did !== undefined) opts.out(`${i + 1}. ${did}`);
  }
  return true;
}

/**
 * The dry run's look at the brokers: each is reached over TLS and must show the CA the token pins
 * (what enrollment checks first; nothing is sent). 0 when one of them does, else 1.
 */
async function checkBrokers(
  brokers: string[],
  token: ParsedJoinToken,
  serverName: string | undefined,
  opts: Pick<InstallOptions, 'out' | 'err' | 'timeoutMs'>,
): Promise<number> {
  let ok = false;
  for (const broker of brokers) {
    try {
      await fetchPinnedCa(broker, token.caPinsSha256, serverName, opts.timeoutMs ?? 15_000);
      opts.out(`broker ${broker}: reachable, shows the CA the token pins, enrollment on`);
      ok = true;
    } catch (err) {
      (opts.err ?? opts.out)(`install: broker ${broker}: ${(err as Error).message}`);
    }
  }
  return ok ? 0 : 1;
}

function foregroundAdvice(runLine: string[], user: string | undefined): string {
  const asUser = user === undefined ? [] : ['runuser', '-u', user, '--'];
  return `start the agent in the foreground with: ${[...asUser, ...runLine].map(quote).join(' ')}`;
}

async function chownTo(run: CommandRunner, owner: string, targets: string[]): Promise<void> {
  const r = await run('chown', [owner, ...targets]);
  if (r.code !== 0) throw new Error(`chown ${owner} failed (exit ${r.code}): ${r.output}`);
}

/** Reverses {@link install} (see the file comment). Resolves with the exit code. */
export async function uninstall(opts: UninstallOptions): Promise<number> {
  const run = opts.run ?? runCommand;
  const recordFile = installRecordFile(opts.paths);
  const record = await fs
    .readFile(recordFile, 'utf8')
    .then((text) => JSON.parse(text) as InstallRecord)
    .catch(() => undefined);
  const paths: InstallPaths = record === undefined ? opts.paths : { ...opts.paths, ...record };
  const steps = uninstallSteps(opts, paths, record, recordFile, run);
  if (opts.dryRun) {
    opts.out('burrow-agent uninstall --dry-run: nothing is changed. The plan:');
    for (const [i, step] of steps.entries()) opts.out(`  ${i + 1}. ${step.says}`);
    return 0;
  }
  if (!(await runSteps('uninstall', steps, opts))) return 1;
  if (!opts.purge) opts.out(`kept ${paths.stateDir} (the agent identity): uninstall --purge removes it`);
  return 0;
}

function uninstallSteps(
  opts: UninstallOptions,
  paths: InstallPaths,
  record: InstallRecord | undefined,
  recordFile: string,
  run: CommandRunner,
): Step[] {
  const unit = unitName(paths);
  const steps: Step[] = [];
  if (opts.systemd) {
    steps.push({
      says: `stop and disable ${unit}`,
      apply: async () => {
        const r = await run('systemctl', ['disable', '--now', unit]);
        // A unit that is not loaded has nothing to stop: that is the state uninstall wants.
        return r.code === 0 ? `stopped and disabled ${unit}` : `${unit} was not running (${r.output})`;
      },
    });
  }
  steps.push(removeStep(paths.unitFile, 'the unit'));
  if (opts.systemd) {
    steps.push({
      says: 'systemctl daemon-reload',
      apply: async () => (await run('systemctl', ['daemon-reload'])).output || undefined,
    });
  }
  steps.push(removeStep(paths.configFile, 'the config'));
  if (record?.binary !== undefined) steps.push(removeStep(record.binary, 'the binary install copied'));
  steps.push({
    says: `remove ${path.dirname(paths.configFile)} if empty`,
    apply: async () => {
      await fs.rm(recordFile, { force: true });
      await fs.rmdir(path.dirname(paths.configFile)).catch(() => undefined);
      return undefined;
    },
  });
  if (opts.purge) {
    steps.push(removeStep(paths.stateDir, 'the state directory (the agent identity)'));
    const user = record?.createdUser ?? opts.user;
    if (user !== undefined) steps.push(removeUserStep(user, run));
  }
  return steps;
}

function removeStep(file: string, what: string): Step {
  return {
    says: `remove ${what} ${file}`,
    apply: async () => {
      if (!existsSync(file)) return `${file}: already gone`;
      await fs.rm(file, { recursive: true, force: true });
      return `removed ${file}`;
    },
  };
}

function removeUserStep(user: string, run: CommandRunner): Step {
  return {
    says: `remove the system user ${user}`,
    apply: async () => {
      if ((await run('getent', ['passwd', user])).code !== 0) return `user ${user}: already gone`;
      const r = await run('userdel', [user]);
      if (r.code !== 0) throw new Error(`userdel ${user} failed (exit ${r.code}): ${r.output}`);
      return `removed user ${user}`;
    },
  };
}
