#!/usr/bin/env bash
# Starts dockerd detached (no init system here) on a host with no bridge network, and waits
# for it. Registers gVisor's runsc as the runtime "runsc" (in /etc/docker/daemon.json) when it
# is installed. Idempotent: an engine that already answers is kept; if it lacks runsc, it is
# told to reload its configuration (SIGHUP reloads `runtimes` without stopping any container).
set -euo pipefail
log_dir="${MCP_SANDBOXES_LOG_DIR:-/tmp/mcp-sandboxes-logs}"
mkdir -p "$log_dir"
daemon_json=/etc/docker/daemon.json
# runsc's own network stack refuses to start in Docker's network namespaces here ("cannot run
# with network enabled in root network namespace"), so gVisor uses the namespace's host stack
# (--network=host): only lo with network none, the host's with network host. Shared file access,
# so files put through the engine's archive API are seen inside (exclusive caches them stale).
# --host-uds=open: a sandbox may connect to a host unix socket bind-mounted into it (network
# "model" reaches its egress proxy that way; gVisor refuses with EPERM otherwise).
runsc_args='["--network=host", "--file-access=shared", "--host-uds=open"]'
has_runsc() { docker info --format '{{json .Runtimes.runsc}}' 2>/dev/null | grep -q -- '--host-uds=open'; }
if command -v runsc >/dev/null 2>&1; then
  mkdir -p /etc/docker
  # Merge into an existing daemon.json rather than replace it. (Not `--add-runtime`: dockerd
  # refuses a runtime that is both a flag and in daemon.json.)
  python3 - "$daemon_json" "$(command -v runsc)" "$runsc_args" <<'PY'
import json, os, sys
path, runsc, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = json.load(open(path)) if os.path.exists(path) else {}
wanted = {"path": runsc, "runtimeArgs": args}
if config.get("runtimes", {}).get("runsc") != wanted:
    config.setdefault("runtimes", {})["runsc"] = wanted
    with open(path + ".tmp", "w") as out:
        json.dump(config, out, indent=2)
    os.replace(path + ".tmp", path)
PY
fi
if docker version >/dev/null 2>&1; then
  if command -v runsc >/dev/null 2>&1 && ! has_runsc && [[ -f /var/run/docker.pid ]]; then
    kill -HUP "$(cat /var/run/docker.pid)"
    for _ in $(seq 1 40); do has_runsc && break; sleep 0.25; done
    has_runsc || { echo "dockerd did not pick up runsc from $daemon_json after SIGHUP" >&2; exit 1; }
    echo "dockerd already running; runsc registered"
    exit 0
  fi
  echo "dockerd already running"
  exit 0
fi
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
