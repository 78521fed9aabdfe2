/**
 * The systemd unit `burrow-agent install` writes: a copy of deploy/systemd/burrow-agent.service, kept in the
 * code because the single executable carries no other files (test/agent-install.test.ts checks they are equal).
 */
export const SYSTEMD_UNIT = `# Burrow agent as a hardened systemd service (see docs/install-air-gapped.md).
#   install -m 0755 burrow-agent-linux-x64 /usr/local/bin/burrow-agent
#   install -m 0644 burrow-agent.sysusers /usr/lib/sysusers.d/burrow-agent.conf && systemd-sysusers
#   install -m 0644 burrow-agent.service /etc/systemd/system/burrow-agent.service
# The agent only dials out (to its brokers and its upstreams) and listens at most on loopback (admin
# and local listeners), so it needs no capability, no privileged port and no writable path besides
# its state directory, where \`burrow-agent enroll\` put its key and where renewals replace it.

[Unit]
Description=Burrow agent (outbound-only mTLS tunnel to the platform brokers)
Documentation=file:/usr/local/share/doc/burrow-agent/install-air-gapped.md
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=burrow
Group=burrow
ExecStart=/usr/local/bin/burrow-agent run --config /etc/burrow-agent/agent.yaml
# Relative paths in agent.yaml resolve against this directory.
WorkingDirectory=/var/lib/burrow-agent

# The agent reconnects to brokers by itself; systemd restarts it only when the process fails
# (a bad config exits 2 at once: StartLimit* below stops the loop and \`systemctl status\` shows why).
Restart=on-failure
RestartSec=5s
# SIGTERM: the agent stops taking calls, lets calls in flight finish for up to its drain-timeout
# (30s by default; keep this above it if you raise it) and exits 0. A second signal exits at once.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=45s

# /var/lib/burrow-agent (0700, owned by burrow): tls.key, tls.crt, ca.crt, state.json.
StateDirectory=burrow-agent
StateDirectoryMode=0700
# /etc/burrow-agent: agent.yaml (root:burrow 0640); read-only for the service.
ConfigurationDirectory=burrow-agent
ConfigurationDirectoryMode=0750
UMask=0077

# Hardening.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# V8 probes for memory protection keys (pkey_alloc) on CPUs that have them; allowing the pkey_*
# calls keeps its code-space protection the same as outside the sandbox.
SystemCallFilter=pkey_alloc pkey_free pkey_mprotect
SystemCallErrorNumber=EPERM
# MemoryDenyWriteExecute= is deliberately NOT set: V8 (Node's JavaScript JIT) and WebAssembly
# (the Cedar policy engine) must make freshly written code pages executable, which is exactly what
# it forbids. Under the kernel's equivalent (prctl PR_SET_MDWE) Node aborts at start-up in
# v8::base::OS::SetPermissions; --jitless would avoid that but disables WebAssembly, hence Cedar.
# test/systemd-unit.test.ts checks both facts on the machine that runs the tests.

[Install]
WantedBy=multi-user.target
`;
