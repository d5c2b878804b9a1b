#!/usr/bin/env bash
# Installs the NEWEST Claude Code from npm into tools/agent-clis-latest (beside the pinned CLIs in
# tools/agent-clis), for the one e2e test that checks this server against the current release.
# Never pinned: each run asks npm for @latest and installs it when it differs from what is there.
# Idempotent; prints the version it has.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/tools/agent-clis-latest"
mkdir -p "$dir"
installed() {
  node -p "require('$dir/node_modules/@anthropic-ai/claude-code/package.json').version" 2>/dev/null || true
}
latest="$(npm view @anthropic-ai/claude-code@latest version --loglevel=error)"
if [[ "$(installed)" != "$latest" ]]; then
  # --no-save: nothing here records a version; the next run asks npm again.
  npm install --prefix "$dir" --no-save --no-package-lock --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$latest" >/dev/null
fi
echo "newest Claude Code: $(installed)"
