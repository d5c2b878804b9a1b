#!/usr/bin/env bash
# Installs the pinned agent CLIs from npm into tools/agent-clis/node_modules. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/tools/agent-clis"
stamp=node_modules/.installed-$(sha256sum package.json | cut -c1-16)
if [[ -f "$stamp" ]]; then echo "agent CLIs ok"; exit 0; fi
npm install --no-audit --no-fund --loglevel=error >/dev/null
# @factory/cli's postinstall replaces its node shim with a link to the native droid binary; npm
# skips it when the platform package arrives later (or scripts are held back), and the shim does
# not forward signals, so an interrupted droid would run on. Run it again once everything is in.
npm rebuild @factory/cli --loglevel=error >/dev/null
touch "$stamp"
echo "agent CLIs installed"
