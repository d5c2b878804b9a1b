#!/usr/bin/env bash
# Starts dockerd detached (no init system here) on a host with no bridge network, and waits
# for it. Idempotent: does nothing when the engine already answers.
set -euo pipefail
log_dir="${MCP_SANDBOXES_LOG_DIR:-/tmp/mcp-sandboxes-logs}"
mkdir -p "$log_dir"
if docker version >/dev/null 2>&1; then echo "dockerd already running"; exit 0; fi
# A dockerd that was killed leaves its pid file behind and then refuses to start.
if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
  rm -f /var/run/docker.pid
fi
ip link delete docker0 >/dev/null 2>&1 || true
# From /, so the daemon never runs in a directory that may be deleted under it (a CI checkout).
(cd / && nohup dockerd --bridge=none --iptables=false --ip6tables=false >"$log_dir/dockerd.log" 2>&1 &)
for _ in $(seq 1 120); do
  if docker version >/dev/null 2>&1; then echo "dockerd up"; exit 0; fi
  sleep 0.5
done
echo "dockerd did not come up within 60 s; last log lines:" >&2
tail -n 30 "$log_dir/dockerd.log" >&2
exit 1
