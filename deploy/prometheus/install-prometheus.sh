#!/usr/bin/env bash
# Makes sure Debian's `prometheus` package (promtool and the prometheus server) is installed.
# Used by check.sh and by the scrape test. Installs non-interactively and never starts the
# packaged service: the tests run their own prometheus on a free port with a throwaway data dir.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi

SUDO=''
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO='sudo -n'; else
    echo "install-prometheus: promtool is missing and installing it needs root: apt-get install -y prometheus" >&2
    exit 2
  fi
fi

# policy-rc.d exit 101 tells invoke-rc.d not to start services; keep an existing one untouched.
made_policy=''
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  made_policy=1
fi
cleanup() { if [ -n "$made_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
# Several builds may share the machine: wait for the dpkg lock instead of failing on it.
apt_get() { $SUDO apt-get -o DPkg::Lock::Timeout=600 -y -q "$@"; }
if ! apt_get install --no-install-recommends prometheus >/tmp/burrow-install-prometheus.log 2>&1; then
  apt_get update >>/tmp/burrow-install-prometheus.log 2>&1 || true
  apt_get install --no-install-recommends prometheus >>/tmp/burrow-install-prometheus.log 2>&1 || {
    echo "install-prometheus: apt-get install prometheus failed; see /tmp/burrow-install-prometheus.log" >&2
    exit 2
  }
fi
# We installed the package for its binaries only: the packaged service (which listens on :9090,
# the address the runbook uses for broker admin listeners) must neither run now nor at boot.
if command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null 2>&1 || { echo "install-prometheus: promtool still missing after install" >&2; exit 2; }
