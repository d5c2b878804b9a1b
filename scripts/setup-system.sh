#!/usr/bin/env bash
# Installs the system packages the project needs: a Docker engine (dockerd, containerd, runc, ctr),
# debootstrap for the local Debian image, bubblewrap, podman and busybox, strace (tests check which
# addresses an agent CLI connects to), gVisor's runsc (the `runtime: runsc` option), chromium (the web
# view's browser tests drive it headless through Playwright). Idempotent.
set -euo pipefail
need=()
for bin in dockerd:docker.io debootstrap:debootstrap bwrap:bubblewrap podman:podman catatonit:catatonit busybox:busybox-static ip:iproute2 strace:strace runsc:runsc chromium:chromium; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || need+=("${bin##*:}")
done
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# containerd runs gVisor through the runc shim (Debian ships no containerd-shim-runsc-v1), which
# passes no runsc flags; this wrapper adds the one network mode Debian's runsc starts with here
# and lets sandboxes connect to bind-mounted host unix sockets (network "model"; see
# scripts/start-dockerd.sh and providers/containerd.py).
wrapper=/usr/local/libexec/mcp-sandboxes/runsc-containerd
wanted=$'#!/bin/sh\nexec /usr/bin/runsc --network=host --host-uds=open "$@"\n'
if [[ "$(cat "$wrapper" 2>/dev/null; echo x)" != "${wanted}x" ]]; then
  mkdir -p "${wrapper%/*}"
  printf '%s' "$wanted" >"$wrapper.tmp" && chmod 0755 "$wrapper.tmp" && mv -f "$wrapper.tmp" "$wrapper"
fi
echo "system packages ok"
