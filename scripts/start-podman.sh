#!/usr/bin/env bash
# Starts Podman's Docker-compatible API service detached (no init system here) and waits for
# its socket. Idempotent: does nothing when the service already answers.
#
# Podman's default ulimits (nofile and nproc 1048576) are above this machine's hard limits,
# and without CAP_SYS_RESOURCE runc cannot raise them ("error setting rlimit type 6/7:
# operation not permitted"). So the service gets its own containers.conf whose default_ulimits
# equal the hard limits the service itself runs with; both are set here, so they agree.
# Podman lowers its own RLIMIT_NPROC further, to kernel.pid_max (seen here: 96365 -> 32768),
# hence the cap below; the check after the start catches any other mismatch.
set -euo pipefail
run_dir="${MCP_SANDBOXES_RUN_DIR:-/run/mcp-sandboxes}"
sock="$run_dir/podman.sock"
conf="$run_dir/podman-containers.conf"
log_dir="${MCP_SANDBOXES_LOG_DIR:-/tmp/mcp-sandboxes-logs}"
mkdir -p "$run_dir" "$log_dir"

answers() { curl -sf --max-time 3 --unix-socket "$sock" http://d/_ping >/dev/null 2>&1; }

if ! command -v podman >/dev/null 2>&1; then
  echo "podman is not installed: run scripts/setup-system.sh" >&2
  exit 1
fi
if answers; then echo "podman service already running"; exit 0; fi

limit() { # the hard limit of kind $1 (n = open files, u = processes), capped at $2
  local hard
  hard="$(ulimit -H"$1")"
  if [[ "$hard" == unlimited || "$hard" -gt "$2" ]]; then echo "$2"; else echo "$hard"; fi
}
nofile="$(limit n 1048576)"
nproc="$(limit u "$(cat /proc/sys/kernel/pid_max)")"
cat >"$conf" <<EOF
# Written by scripts/start-podman.sh; the service runs with exactly these hard limits.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
# After an exec ends, its conmon (two processes, ~1.6 MB each) stays this long so the exit
# code can be inspected; the default 300 s kept hundreds of them alive under a busy agent.
# Clients inspect within milliseconds of the end.
exit_command_delay = 30
EOF

rm -f "$sock"
(
  # From /, so the service (and every conmon it starts) never runs in a directory that may be
  # deleted under it, such as a CI checkout: seen here as "write child: broken pipe" on start.
  cd /
  ulimit -n "$nofile"
  ulimit -u "$nproc"
  CONTAINERS_CONF="$conf" nohup podman system service --time=0 "unix://$sock" >"$log_dir/podman.log" 2>&1 &
  echo $! >"$run_dir/podman.pid"
)
pid="$(cat "$run_dir/podman.pid")"
for _ in $(seq 1 60); do
  if answers; then
    have_nproc="$(awk '/^Max processes/ {print $4}' "/proc/$pid/limits")"
    if [[ "$have_nproc" != "$nproc" ]]; then
      echo "podman service runs with RLIMIT_NPROC $have_nproc, not $nproc as $conf says: containers would fail" >&2
      exit 1
    fi
    echo "podman service up at $sock"
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.5
done
echo "podman service did not come up within 30 s; last log lines:" >&2
tail -n 30 "$log_dir/podman.log" >&2
exit 1
