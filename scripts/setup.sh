#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: system packages, the Docker engine and Podman's
# API service (started), the Python environment, the pinned agent CLIs and the local images
# (copied into Podman's and containerd's stores too).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Each step says how long the setup has run, so a slow CI run shows where its time went.
step() { "$@"; echo "setup: ${1##*/} done at ${SECONDS}s"; }
step scripts/setup-system.sh
step scripts/start-dockerd.sh
step scripts/start-podman.sh
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  .venv/bin/pip install -q -e ".[dev,modal]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import mcp_sandboxes" && touch "$stamp"
fi
echo "setup: python environment done at ${SECONDS}s"
step scripts/install-agent-clis.sh
# The newest Claude Code beside the pins (one e2e test); a registry hiccup must not stop the setup.
scripts/install-latest-claude.sh || echo "warning: the newest Claude Code could not be installed" >&2
step scripts/build-images.sh
step scripts/import-images.sh
