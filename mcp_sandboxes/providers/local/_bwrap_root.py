"""The root file system of a bubblewrap sandbox: which host directory stands in for an image,
who the users are, and the bwrap arguments that build `/` from it.

The sandbox's `/` is a fresh tmpfs. Each top-level entry of the root directory is bound
read-only onto it (symlinks are recreated), then `/` itself is made read-only. A bind whose
target does not exist in the read-only tree (say /home/agent when the root has an empty
/home) needs a mount point bwrap cannot create there, so such a directory is rebuilt on the
tmpfs instead: an empty directory with each of its children bound one by one, recursively
along the target's path. Everything here is pure or blocking file-system work.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from mcp_sandboxes.errors import ImageNotFoundError, InvalidInputError

HOST_IMAGE = "host"
# With the host as the root, only what programs need to run; never /home, /root, /var, /work...
HOST_ENTRIES = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
# Mounted fresh in every sandbox (proc, dev) or replaced by the sandbox's own directory (tmp).
_SKIPPED = frozenset({"proc", "dev", "sys", "tmp"})


@dataclass(frozen=True, slots=True)
class RootFs:
    """A host directory that is the sandbox's `/`, limited to `entries` when given."""

    path: str
    entries: tuple[str, ...] | None = None

    @property
    def is_host(self) -> bool:
        return self.entries is not None

    def etc_file(self, name: str) -> Path:
        return Path(self.path) / "etc" / name


def resolve_image(image: str, *, default_rootfs: str, images: dict[str, str]) -> RootFs:
    """`host`, an absolute path to a root directory, a name from the `images` table, or
    anything else: the provider's default `rootfs` (the host when that is empty)."""
    if image == HOST_IMAGE:
        return RootFs(path="/", entries=HOST_ENTRIES)
    if image.startswith("/"):
        return _root_directory(image, field="image")
    if image in images:
        target = images[image]
        if target in ("", HOST_IMAGE):
            return RootFs(path="/", entries=HOST_ENTRIES)
        return _root_directory(target, field=f"providers.bubblewrap.images[{image!r}]")
    if not default_rootfs or default_rootfs == HOST_IMAGE:
        return RootFs(path="/", entries=HOST_ENTRIES)
    return _root_directory(default_rootfs, field="providers.bubblewrap.rootfs")


def _root_directory(path: str, *, field: str) -> RootFs:
    root = Path(path).expanduser()
    if not root.is_absolute():
        raise InvalidInputError(field, f"{path!r} is not an absolute path; give the root directory's full path")
    if not root.is_dir():
        raise ImageNotFoundError(
            f"{field}: root file system {root} does not exist or is not a directory; build one"
            " (scripts/build-images.sh makes .cache/rootfs-bookworm with debootstrap) or use image 'host'"
        )
    if not (root / "bin").exists() and not (root / "usr" / "bin").exists():
        raise ImageNotFoundError(f"{field}: {root} has no bin/ or usr/bin/; it is not a root file system")
    return RootFs(path=str(root.resolve()))


# -- users -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserEntry:
    name: str
    uid: int
    gid: int
    home: str


def parse_passwd(text: str) -> list[UserEntry]:
    users: list[UserEntry] = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        users.append(UserEntry(name=fields[0], uid=int(fields[2]), gid=int(fields[3]), home=fields[5] or "/"))
    return users


def read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return ""


def lookup_user(users: list[UserEntry], user: str | None) -> UserEntry | None:
    """A name, a uid, or `uid:gid`; None when a name is not in the list."""
    if user is None or user in ("", "root"):
        return next((u for u in users if u.uid == 0), UserEntry("root", 0, 0, "/root"))
    uid_text, _, gid_text = user.partition(":")
    if uid_text.isdigit():
        uid = int(uid_text)
        known = next((u for u in users if u.uid == uid), None)
        gid = int(gid_text) if gid_text.isdigit() else (known.gid if known else uid)
        if known is not None:
            return UserEntry(known.name, uid, gid, known.home)
        return UserEntry(str(uid), uid, gid, "/root" if uid == 0 else "/")
    return next((u for u in users if u.name == uid_text), None)


def add_user(passwd: str, group: str, name: str, uid_from: int) -> tuple[str, str, UserEntry]:
    """Append a user the root file system does not know (e.g. `agent` on the host's /etc),
    with the first free uid from `uid_from` and a same-named group, so that `whoami`, `~`
    and getpwuid work for it inside the sandbox."""
    if not name or any(c in name for c in ":\n/") or name.startswith("-"):
        raise InvalidInputError("user", f"{name!r} is not a valid user name; use e.g. agent or a uid like 1000")
    taken = {u.uid for u in parse_passwd(passwd)}
    taken_gids = {int(f[2]) for f in (line.split(":") for line in group.splitlines()) if len(f) > 2 and f[2].isdigit()}
    uid = uid_from
    while uid in taken or uid in taken_gids:
        uid += 1
    entry = UserEntry(name=name, uid=uid, gid=uid, home=f"/home/{name}")
    passwd = _with_line(passwd, f"{name}:x:{uid}:{uid}::{entry.home}:/bin/sh")
    group = _with_line(group, f"{name}:x:{uid}:")
    return passwd, group, entry


def _with_line(text: str, line: str) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + line + "\n"


# -- the mount plan ----------------------------------------------------------------------------


def root_args(root: RootFs, targets: list[str]) -> list[str]:
    """bwrap arguments that build `/` from `root` so that every path in `targets` can be a
    mount point afterwards."""
    args = ["--tmpfs", "/"]
    names = root.entries if root.entries is not None else tuple(sorted(os.listdir(root.path)))
    wanted = [posixpath.normpath(t) for t in targets]
    for name in names:
        if name in _SKIPPED:
            continue
        args += _entry_args(Path(root.path) / name, "/" + name, wanted)
    if root.is_host:
        args += _mask_args(_private_host_paths(Path(root.path) / "etc"), root.path)
    return args


def _private_host_paths(top: Path) -> list[Path]:
    """What the host keeps from other users under `top` (not world-readable: /etc/shadow,
    /etc/ssl/private, a daemon's key file). The sandbox's one uid may be the server's, even
    root, and would otherwise read them as their owner; the sandbox is "other"."""
    hidden: list[Path] = []
    for directory, subdirectories, files in os.walk(top):
        kept: list[str] = []
        for name in subdirectories:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            if _private(path, directory=True):
                hidden.append(path)
            else:
                kept.append(name)
        subdirectories[:] = kept  # nothing below a hidden directory needs a mask of its own
        hidden.extend(Path(directory) / name for name in files if _private(Path(directory) / name, directory=False))
    return sorted(hidden)


def _private(path: Path, *, directory: bool) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    if stat.S_ISLNK(info.st_mode):
        return False
    needed = stat.S_IROTH | (stat.S_IXOTH if directory else 0)
    return info.st_mode & needed != needed


def _mask_args(paths: list[Path], root: str) -> list[str]:
    """An empty read-only tmpfs over each hidden directory, /dev/null (unopenable: binds are
    nodev) over each hidden file."""
    args: list[str] = []
    for path in paths:
        inside = "/" + str(path.relative_to(root)).lstrip("/")
        if path.is_dir():
            args += ["--perms", "0000", "--tmpfs", inside, "--remount-ro", inside]
        else:
            args += ["--ro-bind", "/dev/null", inside]
    return args


def _entry_args(source: Path, dest: str, targets: list[str]) -> list[str]:
    try:
        info = source.lstat()
    except FileNotFoundError:
        return []
    if stat.S_ISLNK(info.st_mode):
        return ["--symlink", os.readlink(source), dest]
    if not stat.S_ISDIR(info.st_mode):
        return ["--ro-bind", str(source), dest]
    if not any(_needs_split(source, dest, target) for target in targets):
        return ["--ro-bind", str(source), dest]
    args = ["--dir", dest]
    for child in sorted(os.listdir(source)):
        args += _entry_args(source / child, posixpath.join(dest, child), targets)
    return args


def _needs_split(source: Path, dest: str, target: str) -> bool:
    """True when `target` lies below `dest` and some part of it is missing in `source`."""
    if not target.startswith(dest + "/"):
        return False
    current = source
    for part in target[len(dest) + 1 :].split("/"):
        current = current / part
        try:
            if stat.S_ISLNK(current.lstat().st_mode):
                return False  # resolved inside the sandbox; bwrap follows it there
        except FileNotFoundError:
            return True
    return False
