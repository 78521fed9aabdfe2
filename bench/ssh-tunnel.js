'use strict';
// The "ssh" alternative a site admin would otherwise pick: Debian's OpenSSH sshd on a loopback
// port with its own config, host key and authorized_keys (all made here, in a temp dir), and
// `ssh -R` from "inside the site" publishing the upstream on a port of the sshd side, where
// the caller dials it with plaintext gRPC.
//
// The ssh client holds a session with a pty open (`-tt ... sleep infinity`) instead of `-N`: sshd
// sets TCP_NODELAY on its connection only for a session with a pty (or X11), and `-N` opens none.
// With Nagle's algorithm on sshd's side and loopback's 64 KiB MSS, every write of a gRPC stream is a
// "small segment" held until the peer's delayed ACK (~50 a second, 20-40 ms each): a 64 KiB bidi
// stream moved 2-4 MB/s while plain TCP through the same tunnel moved 200-500 MB/s. On a real
// network (1,448-byte MSS) most of that stall goes away, so the pty makes the side measure ssh,
// not a loopback artifact (docs/performance-notes.md, "The ssh side").
const { execFileSync, spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const SSHD = '/usr/sbin/sshd';
const PRIVSEP_DIR = '/run/sshd';

function have(cmd) {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Installs openssh-server and -client when missing (the bench runs as root on Debian). */
function ensureOpenSsh(log) {
  if (fs.existsSync(SSHD) && have('ssh') && have('ssh-keygen')) return;
  log('installing openssh-server and openssh-client (apt-get)');
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const install = () =>
    execFileSync('apt-get', ['install', '-y', 'openssh-server', 'openssh-client'], { stdio: 'ignore', env });
  try {
    install();
  } catch {
    execFileSync('apt-get', ['update'], { stdio: 'ignore', env });
    install();
  }
}

/**
 * Starts sshd and the reverse forward; resolves once the forwarded port accepts connections.
 * `track(child)` registers each process with the orchestrator's cleanup. `waitAccepts(port,
 * child)` resolves when the port accepts, rejects when the child exits first.
 */
async function startSshTunnel({ dir, upstreamPort, sshPort, forwardPort, track, waitAccepts, log }) {
  ensureOpenSsh(log);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const hostKey = path.join(dir, 'host_ed25519');
  const clientKey = path.join(dir, 'client_ed25519');
  for (const key of [hostKey, clientKey])
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'burrow-bench', '-f', key]);
  fs.copyFileSync(`${clientKey}.pub`, path.join(dir, 'authorized_keys'));
  const user = os.userInfo().username;
  const config = path.join(dir, 'sshd_config');
  fs.writeFileSync(
    config,
    [
      `Port ${sshPort}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${hostKey}`,
      `PidFile ${path.join(dir, 'sshd.pid')}`,
      `AuthorizedKeysFile ${path.join(dir, 'authorized_keys')}`,
      `AllowUsers ${user}`,
      'PubkeyAuthentication yes',
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'PermitRootLogin prohibit-password',
      'UsePAM no',
      // The temp dir is ours; sshd's ownership checks of home directories do not apply to it.
      'StrictModes no',
      'AllowTcpForwarding remote',
      'GatewayPorts no',
      'X11Forwarding no',
      'PrintMotd no',
      'PrintLastLog no',
      'LogLevel ERROR',
      '',
    ].join('\n'),
  );
  // sshd refuses to start without its privilege separation directory; a container may lack it.
  const madePrivsep = !fs.existsSync(PRIVSEP_DIR);
  if (madePrivsep) fs.mkdirSync(PRIVSEP_DIR, { mode: 0o755 });
  const sshd = track(spawn(SSHD, ['-D', '-e', '-f', config], { stdio: ['ignore', 'ignore', 'pipe'] }), 'sshd');
  await waitAccepts(sshPort, sshd);
  const ssh = track(
    spawn(
      'ssh',
      [
        // A pty, so that sshd turns Nagle's algorithm off on its connection (see the header).
        '-tt',
        '-F',
        '/dev/null',
        '-i',
        clientKey,
        '-p',
        String(sshPort),
        '-o',
        'BatchMode=yes',
        '-o',
        'IdentitiesOnly=yes',
        '-o',
        'StrictHostKeyChecking=no',
        '-o',
        `UserKnownHostsFile=${path.join(dir, 'known_hosts')}`,
        '-o',
        'ExitOnForwardFailure=yes',
        '-R',
        `127.0.0.1:${forwardPort}:127.0.0.1:${upstreamPort}`,
        `${user}@127.0.0.1`,
        // The session's only job is to exist (and keep the pty): the forward lives as long as it does.
        'sleep infinity',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    ),
    'ssh',
  );
  await waitAccepts(forwardPort, ssh);
  return {
    forwardPort,
    sshdPid: sshd.pid,
    sshPid: ssh.pid,
    // ssh -V prints on stderr.
    version: execFileSync('sh', ['-c', 'ssh -V 2>&1'], { encoding: 'utf8' }).trim(),
    cleanup() {
      if (madePrivsep) fs.rmSync(PRIVSEP_DIR, { recursive: true, force: true });
    },
  };
}

module.exports = { startSshTunnel };
