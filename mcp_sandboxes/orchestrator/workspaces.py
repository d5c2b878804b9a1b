"""Workspaces: the user's code brought into a sandbox, and the agent's work read back out.

In (at environment creation and at spawn):
- a host directory, only under `workspaces.allowed_roots`: bind-mounted at the workdir ('ro',
  'rw') or copied in ('copy', a tar stream the sandbox user unpacks);
- a git repository (a host path under the allowed roots, or a URL): cloned ON THE HOST into a
  temporary bare repository, the starting commit given a branch of the session's own
  (`mcp-sandboxes/<session id>`), and that branch handed in as a git bundle, so the sandbox needs
  no network and never sees the host path. A copied directory is made a repository too (its own
  if it has one, else a fresh one with everything as the first commit), so every copied or cloned
  workspace has a starting commit, recorded on the session, that diffs and exports are against.

Out (the workspace tools): read, write and list files, the session's diff against its starting
commit (uncommitted and untracked work included), and its commits exported as a branch of the host
repository or as a bundle/patch. Every path is confined to the workspace: `..` and absolute paths
outside it are refused before anything runs, and what is left is resolved IN the sandbox with
`realpath`, so a symlink the agent planted cannot point a read or write outside it. Every command
runs in the sandbox as the sandbox user (never as root), with git's hooks and the agent's git
config unable to touch the host: the host only ever fetches a bundle into its repository.
"""

from __future__ import annotations

import base64
import io
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import anyio

from mcp_sandboxes.config import WorkspaceSettings
from mcp_sandboxes.errors import ConflictError, InvalidInputError, NotFoundError
from mcp_sandboxes.providers.base import Mount, Sandbox
from mcp_sandboxes.store import DirectoryWorkspace, GitWorkspace, SessionRecord, WorkspaceSpec

BRANCH_PREFIX = "mcp-sandboxes/"
# Git in the sandbox: the workdir may belong to another uid (a bind mount), paths come back raw.
SANDBOX_GIT = "git -c safe.directory='*' -c core.quotepath=false -c commit.gpgsign=false"
IDENTITY = "-c user.name=mcp-sandboxes -c user.email=mcp-sandboxes@localhost"
# One git or file command in the sandbox.
SANDBOX_COMMAND_TIMEOUT_S = 120.0
# One git command on the host (a clone has its own, configurable bound).
HOST_GIT_TIMEOUT_S = 120.0
BUNDLE_NAME = "mcp-sandboxes-workspace.bundle"
COPY_TAR_NAME = ".mcp-sandboxes-copy.tar"
# URL forms git may clone on the host; never `ext::` (runs a command) or other transports.
URL_PATTERN = re.compile(r"^(https?|ssh|git)://[^\s]+$|^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:[^\s]+$")
REF_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@{}^~+-]{0,199}$")
MAX_LIST_DEPTH = 8


# -- host side: what an environment may name --------------------------------------------------


def is_host_path(url: str) -> bool:
    return url.startswith(("/", "~", "file://"))


def host_path_of(url: str) -> str:
    return os.path.expanduser(url[len("file://") :] if url.startswith("file://") else url)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_host_directory(path: str, settings: WorkspaceSettings, *, field: str) -> str:
    """The real path of a host directory a workspace names, once it is under an allowed root."""
    roots = [os.path.realpath(os.path.expanduser(root)) for root in settings.allowed_roots]
    if not roots:
        raise InvalidInputError(
            field,
            "this server allows no host directories as workspaces; the operator lists the directories"
            " under which they may be in the setting workspaces.allowed_roots",
        )
    if not path.startswith("/"):
        raise InvalidInputError(field, f"{path!r} is not an absolute host path; give one, e.g. /home/me/src/project")
    real = os.path.realpath(path)
    if not any(_under(real, root) for root in roots):
        raise InvalidInputError(
            field,
            f"{path!r} is not under the directories this server allows ({', '.join(roots)});"
            " use one under them, or have the operator add its root to workspaces.allowed_roots",
        )
    if not os.path.isdir(real):
        raise InvalidInputError(field, f"{path!r} is not an existing directory on the host")
    return real


def check_workspace(workspace: WorkspaceSpec, settings: WorkspaceSettings) -> WorkspaceSpec:
    """Validate what an environment names; host paths come back resolved (symlinks followed)."""
    if isinstance(workspace, DirectoryWorkspace):
        real = check_host_directory(workspace.path, settings, field="workspace.path")
        return workspace.model_copy(update={"path": real})
    if workspace.ref is not None and (not REF_PATTERN.match(workspace.ref) or ".." in workspace.ref):
        raise InvalidInputError(
            "workspace.ref", "is not a branch, tag or commit name; use e.g. 'main', 'v1.2' or a commit hash"
        )
    if is_host_path(workspace.url):
        real = check_host_directory(host_path_of(workspace.url), settings, field="workspace.url")
        return workspace.model_copy(update={"url": real})
    if not URL_PATTERN.match(workspace.url):
        raise InvalidInputError(
            "workspace.url",
            "is neither an absolute host path nor a git URL (https://, ssh://, git:// or user@host:path)",
        )
    return workspace


def workspace_mounts(workspace: WorkspaceSpec | None, workdir: str) -> list[Mount]:
    """A 'ro' or 'rw' directory is the workdir itself; everything else is brought in at spawn."""
    if isinstance(workspace, DirectoryWorkspace) and workspace.mode in ("ro", "rw"):
        return [Mount(source=workspace.path, target=workdir, read_only=workspace.mode == "ro")]
    return []


def host_directories(workspace: WorkspaceSpec | None) -> list[tuple[str, str]]:
    """The host directories a workspace reaches, with how: 'ro', 'rw' or 'copy' (a clone from a
    host path only reads it)."""
    if isinstance(workspace, DirectoryWorkspace):
        return [(workspace.path, workspace.mode)]
    if isinstance(workspace, GitWorkspace) and is_host_path(workspace.url):
        return [(host_path_of(workspace.url), "copy")]
    return []


def within(path: str, directory: str) -> bool:
    return _under(os.path.realpath(path), os.path.realpath(directory))


async def _host_git(
    argv: list[str], *, cwd: str | None = None, limit_s: float = HOST_GIT_TIMEOUT_S, field: str = "workspace"
) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "LC_ALL": "C"}
    with anyio.fail_after(limit_s):
        result = await anyio.run_process(
            ["git", "-c", "protocol.ext.allow=never", *argv], cwd=cwd, env=env, check=False
        )
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip()[-600:]
        raise InvalidInputError(field, f"git {argv[0]} failed: {detail}")
    return result.stdout.decode("utf-8", "replace").strip()


async def bundle_of(workspace: GitWorkspace, branch: str, *, limit_s: float) -> tuple[bytes, str]:
    """Clone the repository on the host and return a bundle of `branch` at the starting commit
    (with its history), and that commit."""
    scratch = await anyio.to_thread.run_sync(tempfile.mkdtemp, "", "mcp-sandboxes-clone-")
    try:
        repo = os.path.join(scratch, "repo.git")
        url = host_path_of(workspace.url) if is_host_path(workspace.url) else workspace.url
        try:
            await _host_git(["clone", "--quiet", "--bare", "--", url, repo], limit_s=limit_s, field="workspace.url")
        except TimeoutError:
            raise InvalidInputError(
                "workspace.url", f"cloning took longer than {limit_s:g}s (workspaces.clone_timeout_s)"
            ) from None
        ref = workspace.ref or "HEAD"
        try:
            commit = await _host_git(
                ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"], cwd=repo
            )
        except InvalidInputError:
            raise InvalidInputError(
                "workspace.ref", f"{ref!r} is not a branch, tag or commit of {workspace.url}; name one it has"
            ) from None
        await _host_git(["branch", "--", branch, commit], cwd=repo)
        bundle = os.path.join(scratch, BUNDLE_NAME)
        await _host_git(["bundle", "create", "--quiet", bundle, f"refs/heads/{branch}"], cwd=repo)
        return await anyio.Path(bundle).read_bytes(), commit
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)


def _tar_directory(path: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in sorted(os.listdir(path)):
            archive.add(os.path.join(path, name), arcname=name, recursive=True)
    return buffer.getvalue()


# -- sandbox side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Resolved:
    """A path inside the workspace: as the caller should see it (relative to the workdir) and
    as the sandbox resolved it (absolute, symlinks followed)."""

    relative: str
    real: str


@dataclass(frozen=True)
class FileContent:
    path: str
    size: int
    offset: int
    content: str
    encoding: Literal["text", "base64"]
    truncated: bool


@dataclass(frozen=True)
class Entry:
    path: str
    type: Literal["file", "directory", "symlink", "other"]
    size: int


@dataclass(frozen=True)
class Diff:
    base: str
    files: list[tuple[str, str]]  # (status letter, path)
    diff: str
    truncated: bool


@dataclass(frozen=True)
class Export:
    branch: str
    base: str
    commit: str
    commits: int
    committed_now: bool
    host_repository: str | None
    bundle_base64: str | None
    patch: str | None
    truncated: bool


ENTRY_TYPES: dict[str, Literal["file", "directory", "symlink", "other"]] = {
    "f": "file",
    "d": "directory",
    "l": "symlink",
}


@dataclass(frozen=True)
class SandboxWorkspace:
    """The workspace of one sandbox: its workdir, worked on as the sandbox user."""

    sandbox: Sandbox
    workdir: str
    user: str | None

    async def sh(self, script: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> Ran:
        result = await self.sandbox.exec(
            ["sh", "-c", f'git() {{ command {SANDBOX_GIT} "$@"; }}\n{script}', "sh", *args],
            stdin=stdin,
            env=env,
            cwd=self.workdir,
            user=self.user,
            timeout=SANDBOX_COMMAND_TIMEOUT_S,
        )
        return Ran(result.exit_code, result.stdout, result.stderr)

    async def checked(self, what: str, script: str, *args: str, stdin: bytes | None = None) -> bytes:
        result = await self.sh(script, *args, stdin=stdin)
        if not result.ok:
            detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-600:]
            raise ConflictError(f"workspace: {what} failed in the sandbox (exit {result.exit_code}): {detail}")
        return result.stdout

    # -- in -------------------------------------------------------------------------------------

    async def set_up(
        self, workspace: WorkspaceSpec | None, session_id: str, settings: WorkspaceSettings
    ) -> tuple[str | None, str | None]:
        """Bring the workspace in; returns (starting commit, session branch), or Nones when there
        is no repository to work on (no workspace, a read-only mount, a non-repository mount)."""
        if workspace is None:
            return None, None
        branch = f"{BRANCH_PREFIX}{session_id}"
        try:
            with anyio.fail_after(settings.clone_timeout_s):
                return await self._set_up(workspace, branch, settings)
        except TimeoutError:
            raise InvalidInputError(
                "workspace",
                f"bringing it into the sandbox took longer than {settings.clone_timeout_s:g}s"
                " (workspaces.clone_timeout_s); use a smaller workspace or raise the setting",
            ) from None

    async def _set_up(
        self, workspace: WorkspaceSpec, branch: str, settings: WorkspaceSettings
    ) -> tuple[str | None, str | None]:
        has_git = (await self.sh("unset -f git; command -v git >/dev/null")).ok
        if isinstance(workspace, GitWorkspace):
            if not has_git:
                raise InvalidInputError(
                    "workspace",
                    "a git workspace needs git in the sandbox and this environment's image has none; use an image"
                    " with git (e.g. mcp-sandboxes/base:latest) or a directory workspace with mode 'copy'",
                )
            bundle, commit = await bundle_of(workspace, branch, limit_s=settings.clone_timeout_s)
            await self.checked("git init", "git init --quiet")
            await self.sandbox.put_file(
                posixpath.join(self.workdir, ".git", BUNDLE_NAME), bundle, mode=0o600, user=self.user
            )
            await self.checked(
                "unpacking the repository",
                'b=".git/$2" && git fetch --quiet "$b" "refs/heads/$1:refs/heads/$1" && rm -f "$b"'
                ' && git checkout --quiet "$1"',
                branch,
                BUNDLE_NAME,
            )
            return commit, branch
        if workspace.mode == "copy":
            archive = await anyio.to_thread.run_sync(_tar_directory, workspace.path)
            await self.sandbox.put_file(posixpath.join(self.workdir, COPY_TAR_NAME), archive, user=self.user)
            await self.checked("unpacking the copy", 'tar -xf "$1" --no-same-owner && rm -f "$1"', COPY_TAR_NAME)
            if not has_git:
                return None, None  # copied in; without git there is no diff or export
            # A copy is made a repository (its own, or a fresh one of everything) on a branch of its own.
            out = await self.checked(
                "making the session's branch",
                "if ! git rev-parse --verify --quiet HEAD >/dev/null 2>&1; then"
                f" git init --quiet && git add -A && git {IDENTITY} commit --quiet --no-verify --allow-empty"
                ' -m "mcp-sandboxes: starting point"; fi'
                ' && git checkout --quiet -B "$1" && git rev-parse HEAD',
                branch,
            )
            return out.decode().strip(), branch
        if workspace.mode == "rw" and has_git:
            # The host's own working tree: its branch stays the host's; diffs are against its HEAD.
            result = await self.sh("git rev-parse --verify --quiet HEAD")
            return (result.stdout.decode().strip() or None) if result.ok else None, None
        return None, None

    # -- paths ----------------------------------------------------------------------------------

    async def resolve(self, path: str, *, field: str = "path") -> Resolved:
        """Confine `path` (relative to the workdir, or absolute inside it) to the workspace."""
        if "\x00" in path:
            raise InvalidInputError(field, "contains a NUL character; remove it")
        root = posixpath.normpath(self.workdir)
        if path.startswith("/"):
            normal = posixpath.normpath(path)
            if not _under(normal, root):
                raise InvalidInputError(
                    field, f"{path!r} is outside the workspace; give a path inside {root} or relative to it"
                )
            relative = posixpath.relpath(normal, root)
        else:
            relative = posixpath.normpath(path or ".")
            if relative == ".." or relative.startswith("../"):
                raise InvalidInputError(field, f"{path!r} climbs out of the workspace with '..'; give a path inside it")
        out = await self.checked(
            "resolving the path",
            'root=$(pwd -P) && target=$(realpath -m -- "$1") && printf "%s\\0%s" "$root" "$target"',
            f"./{relative}",
        )
        real_root, _, real = out.decode("utf-8", "surrogateescape").partition("\0")
        if not _under(real, real_root):
            raise InvalidInputError(
                field,
                f"{path!r} leads outside the workspace (through a symbolic link); give a path whose target is inside",
            )
        shown = posixpath.relpath(real, real_root)
        return Resolved(relative=shown, real=real)

    async def _kind_and_size(self, resolved: Resolved, field: str) -> tuple[str, int]:
        result = await self.sh('stat -c "%F|%s" -- "$1"', resolved.real)
        if not result.ok:
            raise NotFoundError(f"{field}: {resolved.relative!r} does not exist in the workspace; list_files shows it")
        kind, _, size = result.stdout.decode().strip().rpartition("|")
        return kind, int(size)

    # -- files ----------------------------------------------------------------------------------

    async def read(self, path: str, *, offset: int, max_bytes: int) -> FileContent:
        resolved = await self.resolve(path)
        kind, size = await self._kind_and_size(resolved, "path")
        if not kind.startswith("regular"):
            raise InvalidInputError(
                "path", f"{resolved.relative!r} is a {kind}, not a file; list_files lists a directory"
            )
        data = await self.checked(
            "reading the file", 'tail -c "+$2" -- "$1" | head -c "$3"', resolved.real, str(offset + 1), str(max_bytes)
        )
        try:
            content, encoding = data.decode("utf-8"), "text"
        except UnicodeDecodeError:
            content, encoding = base64.b64encode(data).decode("ascii"), "base64"
        return FileContent(
            path=resolved.relative,
            size=size,
            offset=offset,
            content=content,
            encoding=encoding,  # type: ignore[arg-type]
            truncated=offset + len(data) < size,
        )

    async def write(self, path: str, data: bytes) -> Resolved:
        resolved = await self.resolve(path)
        if resolved.relative == ".":
            raise InvalidInputError("path", "names the workspace itself; give a file's path")
        await self.checked(
            "writing the file", 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"', resolved.real, stdin=data
        )
        return resolved

    async def listing(self, path: str, *, depth: int, limit: int) -> tuple[str, list[Entry], bool]:
        resolved = await self.resolve(path)
        kind, _ = await self._kind_and_size(resolved, "path")
        if kind != "directory":
            raise InvalidInputError("path", f"{resolved.relative!r} is a {kind}; read_file reads a file")
        out = await self.checked(
            "listing the directory",
            'find "$1" -mindepth 1 -maxdepth "$2" -name .git -prune -o -printf "%y|%s|%P\\0" | head -z -n "$3"',
            resolved.real,
            str(depth),
            str(limit + 1),
        )
        entries: list[Entry] = []
        for item in out.decode("utf-8", "replace").split("\0"):
            if not item:
                continue
            letter, size, name = item.split("|", 2)
            prefix = "" if resolved.relative == "." else resolved.relative + "/"
            entries.append(Entry(path=prefix + name, type=ENTRY_TYPES.get(letter, "other"), size=int(size)))
        truncated = len(entries) > limit
        entries = sorted(entries[:limit], key=lambda entry: entry.path)
        return resolved.relative, entries, truncated

    # -- git ------------------------------------------------------------------------------------

    # Work tree against `$1` through a throw-away index: uncommitted and untracked files count,
    # the agent's own index and branch stay as they are.
    _AGAINST_BASE = (
        'scratch=$(mktemp -d) && trap \'rm -rf "$scratch"\' EXIT && export GIT_INDEX_FILE="$scratch/index"'
        ' && git read-tree "$1" && git add -A && '
    )

    async def diff(self, base: str, *, max_bytes: int) -> Diff:
        # One exec: the changed-file list's length on a line, the list, then the diff (each capped).
        out = await self.checked(
            "computing the diff",
            self._AGAINST_BASE
            + 'git diff --cached --no-renames --name-status -z "$1" | head -c "$2" > "$scratch/names"'
            ' && wc -c < "$scratch/names" && cat "$scratch/names"'
            ' && git diff --cached --no-renames --no-ext-diff --no-textconv --binary "$1" | head -c "$2"',
            base,
            str(max_bytes + 1),
        )
        length, _, rest = out.partition(b"\n")
        names, text = rest[: int(length)], rest[int(length) :]
        parts = names[:max_bytes].decode("utf-8", "replace").split("\0")
        files = [(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2) if parts[i]]
        truncated = len(text) > max_bytes or len(names) > max_bytes
        return Diff(base=base, files=files, diff=text[:max_bytes].decode("utf-8", "replace"), truncated=truncated)

    async def export(
        self, base: str, branch: str, session_id: str, *, want: Literal["bundle", "patch"], max_bytes: int
    ) -> tuple[Export, bytes | None]:
        """Commit what is uncommitted (on the session's branch), then hand back the branch's
        commits since `base` as a bundle (bytes, returned apart) or a patch."""
        out = await self.checked(
            "committing the uncommitted work",
            'committed=no; if [ -n "$(git status --porcelain)" ]; then git add -A'
            f' && git {IDENTITY} commit --quiet --no-verify -m "$3" && committed=yes; fi'
            ' && git update-ref "refs/heads/$1" HEAD && printf "%s %s %s" "$committed" "$(git rev-parse HEAD)"'
            ' "$(git rev-list --count "$2..HEAD")"',
            branch,
            base,
            f"Work of mcp-sandboxes session {session_id}",
        )
        committed, commit, count = out.decode().split()
        if commit == base:
            raise ConflictError(
                f"session_id: session {session_id} has changed nothing since its starting commit {base[:12]};"
                " nothing to export"
            )
        bundle: bytes | None = None
        patch: str | None = None
        truncated = False
        if want == "bundle":
            bundle = await self.checked(
                "bundling the commits",
                "scratch=$(mktemp -d) && trap 'rm -rf \"$scratch\"' EXIT"
                ' && git bundle create --quiet "$scratch/b" "refs/heads/$1" "^$2" && cat "$scratch/b"',
                branch,
                base,
            )
        else:
            raw = await self.checked(
                "formatting the patch",
                'git format-patch --stdout --no-ext-diff --binary "$2..refs/heads/$1" | head -c "$3"',
                branch,
                base,
                str(max_bytes + 1),
            )
            truncated = len(raw) > max_bytes
            patch = raw[:max_bytes].decode("utf-8", "replace")
        return (
            Export(
                branch=branch,
                base=base,
                commit=commit,
                commits=int(count),
                committed_now=committed == "yes",
                host_repository=None,
                bundle_base64=None,
                patch=patch,
                truncated=truncated,
            ),
            bundle,
        )


async def fetch_into_host(repository: str, bundle: bytes, branch: str) -> str:
    """Put a bundle's branch into the host repository as the same branch; returns its commit."""
    scratch = await anyio.to_thread.run_sync(tempfile.mkdtemp, "", "mcp-sandboxes-export-")
    try:
        path = Path(scratch) / BUNDLE_NAME
        await anyio.Path(path).write_bytes(bundle)
        # The bundle's objects come from the sandbox: check them as untrusted input.
        await _host_git(
            [
                "-C",
                repository,
                "-c",
                "transfer.fsckObjects=true",
                "fetch",
                "--quiet",
                "--no-write-fetch-head",
                str(path),
                f"+refs/heads/{branch}:refs/heads/{branch}",
            ],
            field="export",
        )
        return await _host_git(["-C", repository, "rev-parse", "--verify", f"refs/heads/{branch}"], field="export")
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)


def check_read_size(max_bytes: int, settings: WorkspaceSettings) -> None:
    if max_bytes > settings.max_read_bytes:
        raise InvalidInputError(
            "max_bytes",
            f"{max_bytes:,} is above this server's cap of {settings.max_read_bytes:,} bytes a read"
            " (workspaces.max_read_bytes); read the file in pieces with offset",
        )


def decode_content(content: str, encoding: Literal["text", "base64"], settings: WorkspaceSettings) -> bytes:
    if encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except ValueError:
            raise InvalidInputError(
                "content", "is not valid base64; encode the bytes, or use encoding 'text'"
            ) from None
    else:
        data = content.encode("utf-8")
    if len(data) > settings.max_write_bytes:
        raise InvalidInputError(
            "content",
            f"is {len(data):,} bytes, above this server's cap of {settings.max_write_bytes:,}"
            " (workspaces.max_write_bytes); write it in smaller files",
        )
    return data


def workspace_base(session: SessionRecord) -> str:
    if session.workspace_base is None:
        raise ConflictError(
            f"session_id: session {session.id} has no workspace repository to compare against (its environment"
            " has no git workspace, a copied directory or a read-write directory that is a repository);"
            " read_file and list_files still work"
        )
    return session.workspace_base


async def export_session(
    workspace: SandboxWorkspace,
    session: SessionRecord,
    source: WorkspaceSpec | None,
    *,
    format: Literal["auto", "bundle", "patch"],
    to_host: bool,
    settings: WorkspaceSettings,
) -> Export:
    """The session's work out: on a branch of the host repository it was cloned from (`to_host`,
    format 'auto'), else as a bundle or patch."""
    base = workspace_base(session)
    if session.workspace_branch is None:
        raise ConflictError(
            f"session_id: session {session.id} works in the host directory itself (mounted read-write): its"
            " changes are already there; session_diff shows them"
        )
    host_repo = host_path_of(source.url) if isinstance(source, GitWorkspace) and is_host_path(source.url) else None
    into_host = format == "auto" and to_host and host_repo is not None
    want: Literal["bundle", "patch"] = "patch" if format == "patch" else "bundle"
    exported, bundle = await workspace.export(
        base, session.workspace_branch, session.id, want=want, max_bytes=settings.max_diff_bytes
    )
    if bundle is None:
        return exported
    if into_host and host_repo is not None:
        commit = await fetch_into_host(host_repo, bundle, session.workspace_branch)
        return replace(exported, host_repository=host_repo, commit=commit)
    if len(bundle) > settings.max_diff_bytes:
        raise ConflictError(
            f"format: the bundle is {len(bundle):,} bytes, above this server's cap of {settings.max_diff_bytes:,}"
            " (workspaces.max_diff_bytes); ask for format 'patch' (it is cut at the cap) or raise the setting"
        )
    return replace(exported, bundle_base64=base64.b64encode(bundle).decode("ascii"))
