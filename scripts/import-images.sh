#!/usr/bin/env bash
# Copies the project's Docker images (scripts/build-images.sh) into the other local engines,
# which keep their own stores:
#   Podman      docker save | podman load                      (named localhost/<name>)
#   containerd  docker save | ctr -n mcp-sandboxes images import -   (dockerd's containerd,
#               our own namespace; named docker.io/<name>)
# Idempotent: an image is copied again only when the engine lacks that Docker image id (Podman
# keeps Docker's id; containerd is stamped, in a per-user state directory rather than the
# checkout, since the engines' stores outlive any one clone). An engine not installed is skipped.
set -euo pipefail
stamps="${MCP_SANDBOXES_ENGINE_STAMPS:-${XDG_STATE_HOME:-$HOME/.local/state}/mcp-sandboxes/engine-images}"
ctr_address="${MCP_SANDBOXES_CONTAINERD_ADDRESS:-/var/run/docker/containerd/containerd.sock}"
ctr_namespace="${MCP_SANDBOXES_CONTAINERD_NAMESPACE:-mcp-sandboxes}"
images=(mcp-sandboxes/busybox:latest mcp-sandboxes/base:latest mcp-sandboxes/agent:latest)
mkdir -p "$stamps"

ctr_() { ctr --address "$ctr_address" --namespace "$ctr_namespace" --connect-timeout 5s "$@"; }
stamped() { [[ -f "$stamps/$1" && "$(cat "$stamps/$1")" == "$2" ]]; }

use_podman=0
if command -v podman >/dev/null 2>&1; then use_podman=1; fi
use_ctr=0
if command -v ctr >/dev/null 2>&1 && [[ -S "$ctr_address" ]]; then use_ctr=1; fi
loaded_podman=0

for image in "${images[@]}"; do
  id="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null)" \
    || { echo "image $image is missing from Docker: run scripts/build-images.sh" >&2; exit 1; }
  key="$(echo "$image" | tr '/:' '__')"
  if ((use_podman)); then
    if [[ "sha256:$(podman image inspect -f '{{.Id}}' "$image" 2>/dev/null)" != "$id" ]]; then
      docker save "$image" | podman load -q >/dev/null
      loaded_podman=1
      echo "podman: loaded $image"
    fi
  fi
  if ((use_ctr)); then
    reference="docker.io/$image"  # every image here is <org>/<name>:<tag> without a registry
    if ! stamped "containerd-$key" "$id" || ! ctr_ images list -q "name==$reference" | grep -qx "$reference"; then
      docker save "$image" | ctr_ images import - >/dev/null
      echo "$id" >"$stamps/containerd-$key"
      echo "containerd: imported $image into namespace $ctr_namespace"
    fi
  fi
done
# A reloaded tag leaves the previous image untagged in Podman's store.
if ((loaded_podman)); then podman image prune -f >/dev/null; fi
echo "engine images ok (podman: $([[ $use_podman == 1 ]] && echo yes || echo skipped)," \
  "containerd: $([[ $use_ctr == 1 ]] && echo yes || echo skipped))"
