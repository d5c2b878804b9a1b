"""Resource limits for bubblewrap sandboxes. bwrap has no cgroups of its own, so we pick the
best of what this host allows, once, and say exactly what it enforces:

- cgroup v2 (a unified hierarchy whose memory, pids and cpu controllers we may enable) or
  cgroup v1 (writable memory, pids and cpu hierarchies, as on this project's machines):
  one cgroup per sandbox, shared by all its commands, so the limits hold for the sandbox
  as a whole, as in a container. Enforces memory (the OOM killer ends a process over the
  limit; swap is limited to the same total), pids (fork fails) and cpus (CFS quota).
  Every command joins the cgroup through a tiny `sh` wrapper that writes its own pid to
  cgroup.procs before it execs bwrap, so the sandboxed process and all its children are
  inside from their first instruction. Destroy kills whatever is left in the cgroup.
- rlimit (`prlimit`): memory only, as RLIMIT_AS, per process (virtual address space: a
  Node-based CLI reserves far more than it uses, so give it room). RLIMIT_NPROC is not used:
  it counts every process of the host user (and root ignores it), which is not a sandbox
  limit. cpus cannot be expressed as an rlimit.
- none: nothing is enforced.

systemd-run is not used: it needs a running systemd, which these machines do not have; on
a systemd host with a delegated cgroup v2 subtree, point `cgroup_parent` at it instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mcp_sandboxes.providers.base import ResourceLimits

logger = logging.getLogger(__name__)

LimitsMethod = Literal["auto", "cgroup", "rlimit", "none"]
CGROUP_DIR_NAME = "mcp-sandboxes"
CFS_PERIOD_US = 100_000
# Destroy: how long to keep killing what is left in a sandbox's cgroup before giving up.
CGROUP_DRAIN_S = 5.0
_V1_CONTROLLERS = ("memory", "pids", "cpu")
_V2_CONTROLLERS = ("memory", "pids", "cpu")
# $1... are cgroup.procs files up to "--"; the rest is the command. Exit 125: could not join.
_JOIN_SCRIPT = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


@dataclass(frozen=True)
class Limiter:
    """How limits are applied on this host, and which of them hold."""

    method: Literal["cgroup-v2", "cgroup-v1", "rlimit", "none"]
    enforces: frozenset[str]
    # controller -> the directory under which sandbox cgroups are made (v2: one entry, "").
    parents: dict[str, str] = field(default_factory=dict)
    detail: str = ""

    def create(self, sandbox_id: str, limits: ResourceLimits) -> list[tuple[str, str]]:
        """Make the sandbox's cgroups and set its limits; returns (controller, directory)
        pairs (controller "" for the v2 hierarchy)."""
        if self.method == "cgroup-v1":
            return _create_v1(self.parents, sandbox_id, limits)
        if self.method == "cgroup-v2":
            return _create_v2(self.parents[""], sandbox_id, limits)
        return []

    def wrap(self, argv: list[str], cgroups: list[str], limits: ResourceLimits) -> list[str]:
        """`argv` started inside the sandbox's cgroups, or under its rlimits."""
        if cgroups:
            procs = [str(Path(d) / "cgroup.procs") for d in cgroups]
            return ["/bin/sh", "-c", _JOIN_SCRIPT, "mcp-sandboxes-join", *procs, "--", *argv]
        if self.method == "rlimit" and limits.memory_mb is not None:
            size = limits.memory_mb * 1024 * 1024
            return ["prlimit", f"--as={size}:{size}", "--", *argv]
        return argv

    def unenforced(self, limits: ResourceLimits) -> list[str]:
        asked = {"memory": limits.memory_mb, "cpus": limits.cpus, "pids": limits.pids}
        return sorted(name for name, value in asked.items() if value is not None and name not in self.enforces)


def remove_cgroups(cgroups: list[str]) -> None:
    """Kill every process left in the sandbox's cgroups, then remove them (bounded)."""
    deadline = time.monotonic() + CGROUP_DRAIN_S
    for directory in cgroups:
        path = Path(directory)
        while path.exists():
            _kill_members(path)
            try:
                path.rmdir()
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    logger.warning("cgroup %s still busy after %ss; leaving it", path, CGROUP_DRAIN_S)
                    break
                time.sleep(0.01)


def _kill_members(path: Path) -> None:
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
        return
    try:
        pids = [int(line) for line in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- probing ----------------------------------------------------------------------------------


def probe_limiter(method: LimitsMethod = "auto", cgroup_parent: str = "") -> Limiter:
    """Which way of limiting works here. Blocking (it reads /proc and tries a mkdir)."""
    reasons: list[str] = []
    if method in ("auto", "cgroup"):
        for attempt in (_probe_v2, _probe_v1):
            limiter = attempt(cgroup_parent, reasons)
            if limiter is not None:
                return limiter
        if method == "cgroup":
            logger.warning("bubblewrap: no usable cgroup hierarchy (%s); limits are not enforced", "; ".join(reasons))
            return Limiter("none", frozenset(), detail="; ".join(reasons))
    if method in ("auto", "rlimit") and shutil.which("prlimit"):
        return Limiter("rlimit", frozenset({"memory"}), detail="; ".join(reasons))
    reasons.append("prlimit not found")
    return Limiter("none", frozenset(), detail="; ".join(reasons))


@dataclass(frozen=True)
class _Mount:
    point: str
    root: str
    fstype: str
    options: frozenset[str]


def _cgroup_mounts() -> list[_Mount]:
    mounts: list[_Mount] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(_Mount(point=fields[4], root=fields[3], fstype=tail[0], options=frozenset(tail[2].split(","))))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path in that hierarchy."""
    own: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return own
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            own[controller] = parts[2]
    return own


def _directory(mount: _Mount, cgroup_path: str) -> Path:
    relative = cgroup_path
    if mount.root != "/" and relative.startswith(mount.root):
        relative = relative[len(mount.root) :]
    return Path(mount.point) / relative.lstrip("/")


def _parent_for(mount: _Mount, own: str, cgroup_parent: str) -> Path:
    base = Path(mount.point) / cgroup_parent.lstrip("/") if cgroup_parent else _directory(mount, own)
    return base / CGROUP_DIR_NAME


def _try_mkdir(parent: Path, reasons: list[str]) -> bool:
    probe = parent / f"probe-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(exist_ok=True)
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError as exc:
        reasons.append(f"cannot create cgroups under {parent}: {exc.strerror or exc}")
        return False


def _probe_v1(cgroup_parent: str, reasons: list[str]) -> Limiter | None:
    mounts = {c: m for m in _cgroup_mounts() if m.fstype == "cgroup" for c in _V1_CONTROLLERS if c in m.options}
    if "memory" not in mounts or "pids" not in mounts:
        reasons.append("no cgroup v1 memory and pids hierarchies")
        return None
    own = _own_cgroups()
    parents: dict[str, str] = {}
    for controller, mount in mounts.items():
        parent = _parent_for(mount, own.get(controller, "/"), cgroup_parent)
        if not _try_mkdir(parent, reasons):
            if controller == "cpu":
                continue  # memory and pids still hold without it
            return None
        parents[controller] = str(parent)
    enforces = {"memory", "pids"} | ({"cpus"} if "cpu" in parents and _has_cfs(Path(parents["cpu"])) else set())
    return Limiter("cgroup-v1", frozenset(enforces), parents=parents)


def _has_cfs(parent: Path) -> bool:
    return (parent / "cpu.cfs_quota_us").exists()


def _probe_v2(cgroup_parent: str, reasons: list[str]) -> Limiter | None:
    mount = next((m for m in _cgroup_mounts() if m.fstype == "cgroup2"), None)
    if mount is None:
        reasons.append("no cgroup v2 hierarchy")
        return None
    available = set((Path(mount.point) / "cgroup.controllers").read_text().split())
    wanted = [c for c in _V2_CONTROLLERS if c in available]
    if "memory" not in wanted or "pids" not in wanted:
        reasons.append(f"cgroup v2 at {mount.point} lacks the memory and pids controllers (they may be bound to v1)")
        return None
    parent = _parent_for(mount, _own_cgroups().get("", "/"), cgroup_parent)
    if not _try_mkdir(parent, reasons):
        return None
    # A controller reaches the sandbox cgroups only if every ancestor enables it for its children.
    for directory in (parent.parent, parent):
        try:
            (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
        except OSError as exc:
            reasons.append(
                f"cannot enable {', '.join(wanted)} in {directory} ({exc.strerror or exc});"
                " set providers.bubblewrap.cgroup_parent to a delegated cgroup without processes of its own"
            )
            return None
    enforces = {"memory", "pids"} | ({"cpus"} if "cpu" in wanted else set())
    return Limiter("cgroup-v2", frozenset(enforces), parents={"": str(parent)})


# -- per-sandbox cgroups ----------------------------------------------------------------------------


def _create_v1(parents: dict[str, str], sandbox_id: str, limits: ResourceLimits) -> list[tuple[str, str]]:
    made: list[tuple[str, str]] = []
    try:
        for controller, parent in parents.items():
            directory = Path(parent) / sandbox_id
            directory.mkdir()
            made.append((controller, str(directory)))
            if controller == "memory" and limits.memory_mb is not None:
                size = str(limits.memory_mb * 1024 * 1024)
                (directory / "memory.limit_in_bytes").write_text(size)
                swap = directory / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(size)  # memory+swap: no swapping past the limit
            if controller == "pids" and limits.pids is not None:
                (directory / "pids.max").write_text(str(limits.pids))
            if controller == "cpu" and limits.cpus is not None:
                (directory / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (directory / "cpu.cfs_quota_us").write_text(str(int(limits.cpus * CFS_PERIOD_US)))
    except BaseException:
        remove_cgroups([directory for _, directory in made])
        raise
    return made


def _create_v2(parent: str, sandbox_id: str, limits: ResourceLimits) -> list[tuple[str, str]]:
    directory = Path(parent) / sandbox_id
    directory.mkdir()
    try:
        if limits.memory_mb is not None:
            (directory / "memory.max").write_text(str(limits.memory_mb * 1024 * 1024))
            swap = directory / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        if limits.pids is not None:
            (directory / "pids.max").write_text(str(limits.pids))
        if limits.cpus is not None:
            (directory / "cpu.max").write_text(f"{int(limits.cpus * CFS_PERIOD_US)} {CFS_PERIOD_US}")
    except BaseException:
        remove_cgroups([str(directory)])
        raise
    return [("", str(directory))]
