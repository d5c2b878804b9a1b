#!/usr/bin/env bash
# Builds the local images the project and its tests use. No registry is reachable here, so the
# root filesystem comes from debootstrap and is imported; later layers use apt over the host network.
#   mcp-sandboxes/debian:bookworm   debootstrap minbase, imported
#   mcp-sandboxes/base:latest       + agent user, /workspace, git, procps (configs/images/base)
#   mcp-sandboxes/busybox:latest    static busybox only (fast provider tests)
#   mcp-sandboxes/agent:latest      + node and the five pinned agent CLIs (configs/images/agent)
# Idempotent: an image that exists is kept unless FORCE=1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${MCP_SANDBOXES_CACHE:-$root/.cache}"
mkdir -p "$cache"
have() { [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$1" >/dev/null 2>&1; }

rootfs="$cache/rootfs-bookworm"
# The rootfs tree is needed on its own too (the bubblewrap provider runs on it), so it is made
# even when the image exists: exported from the image when it can be, debootstrapped otherwise.
if [[ ! -f "$rootfs/.complete" ]]; then
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  if docker image inspect mcp-sandboxes/debian:bookworm >/dev/null 2>&1; then
    cid="$(docker create mcp-sandboxes/debian:bookworm /bin/true)"
    docker export "$cid" | tar -C "$rootfs" -x
    docker rm "$cid" >/dev/null
  else
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
      || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
  fi
  touch "$rootfs/.complete"
fi
if ! have mcp-sandboxes/debian:bookworm; then
  tar -C "$rootfs" --exclude=./.complete -c . | docker import - mcp-sandboxes/debian:bookworm >/dev/null
  echo "imported mcp-sandboxes/debian:bookworm"
fi

if ! have mcp-sandboxes/base:latest; then
  docker build --network host -q -t mcp-sandboxes/base:latest "$root/configs/images/base" >/dev/null
  echo "built mcp-sandboxes/base:latest"
fi

# An image built by an earlier version of this script could be empty (the binary overwritten by
# its own applet link), so the busybox image must also actually run a shell.
if ! have mcp-sandboxes/busybox:latest \
  || ! docker run --rm --network none mcp-sandboxes/busybox:latest sh -c true >/dev/null 2>&1; then
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/bin" "$tmp/tmp" "$tmp/workspace" "$tmp/etc"
  cp "$(command -v busybox)" "$tmp/bin/busybox"
  # `--list` names `busybox` itself; linking that would replace the binary with a self-link.
  for applet in $("$tmp/bin/busybox" --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$tmp/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$tmp/etc/passwd"
  echo 'agent:x:1000:1000:agent:/workspace:/bin/sh' >>"$tmp/etc/passwd"
  chmod 1777 "$tmp/tmp"
  tar -C "$tmp" -c . | docker import -c 'ENV PATH=/bin' - mcp-sandboxes/busybox:latest >/dev/null
  rm -rf "$tmp"
  echo "imported mcp-sandboxes/busybox:latest"
fi
agent_stamp="$(sha256sum "$root/tools/agent-clis/package.json" "$root/configs/images/agent/Dockerfile" | sha256sum | cut -c1-12)"
if ! have "mcp-sandboxes/agent:$agent_stamp"; then
  [[ -d "$root/tools/agent-clis/node_modules" ]] || "$root/scripts/install-agent-clis.sh"
  ctx="$(mktemp -d)"
  cp "$(command -v node)" "$ctx/node"
  # Hard links keep the 1 GB of CLIs from being copied twice on disk.
  cp -al "$root/tools/agent-clis/node_modules" "$ctx/node_modules" 2>/dev/null || cp -a "$root/tools/agent-clis/node_modules" "$ctx/node_modules"
  cp "$root/configs/images/agent/Dockerfile" "$ctx/Dockerfile"
  docker build -q -t "mcp-sandboxes/agent:$agent_stamp" -t mcp-sandboxes/agent:latest "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "built mcp-sandboxes/agent:latest ($agent_stamp)"
fi
echo "images ok"
