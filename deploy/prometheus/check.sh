#!/usr/bin/env bash
# Validates and unit-tests the Burrow alerting rules with promtool:
#   promtool check rules alerts.yaml         (syntax, PromQL, templates)
#   promtool test rules  alerts.test.yaml    (every alert fires when it should, and only then)
# Installs Debian's prometheus package (promtool) first when promtool is missing.
# Exit 0 when both pass; promtool's own output says what failed otherwise.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/install-prometheus.sh"
cd "$here"
promtool check rules alerts.yaml
promtool test rules alerts.test.yaml
