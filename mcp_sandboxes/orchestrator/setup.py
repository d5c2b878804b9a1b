"""Applying a backend's `SandboxSetup` to a sandbox: the one place that creates an agent's
HOME and config directories and writes its config files, for every backend.

One shell script makes the directories (as root when a user is named: HOME may not exist yet
and only root can create it and hand it over) and reports which of the files already exist;
then each file goes in with `put_file`, owned by the user. A `JsonMerge` reads the file that is
there first (as root too: the image may have made it root-only) and writes the merge.
"""

from __future__ import annotations

from mcp_sandboxes.errors import BackendError, McpSandboxesError, SandboxGoneError
from mcp_sandboxes.providers import Sandbox
from mcp_sandboxes.specs import JsonMerge, SandboxSetup, WriteFile

# One limit for each command the setup runs in the sandbox (the directory script, a read).
BACKEND_SETUP_TIMEOUT_S = 30.0

# argv after the script: the user ("" for the sandbox's default), HOME, further directories,
# "--", then the files whose existence matters (paths are absolute, so none is "--"). Prints
# the failing directory and exits 3 when one cannot be made or handed over; otherwise one
# character per file, 1 when it exists.
_DIRECTORIES_SCRIPT = """\
user="$1"; shift
while [ "$1" != "--" ]; do
  if ! mkdir -p "$1" || { [ -n "$user" ] && ! chown "$user" "$1"; }; then printf '%s' "$1"; exit 3; fi
  shift
done
shift
for path; do if [ -e "$path" ]; then printf 1; else printf 0; fi; done
"""


async def apply_setup(sandbox: Sandbox, setup: SandboxSetup, *, user: str | None) -> None:
    """Make `setup`'s directories and files in `sandbox`, owned by `user` (None: the sandbox's
    default user, e.g. the server's own for the process provider). Idempotent. A step that
    fails raises BackendError naming the backend and the path."""
    as_root = "0" if user else None
    probed = [file.path for file in setup.files if isinstance(file, JsonMerge) or file.keep_existing]
    argv = ["sh", "-c", _DIRECTORIES_SCRIPT, "sh", user or "", setup.home, *setup.directories, "--", *probed]
    result = await sandbox.exec(argv, user=as_root, timeout=BACKEND_SETUP_TIMEOUT_S)
    if not result.ok:
        failed = result.stdout.decode("utf-8", "replace") if result.exit_code == 3 else ""
        what = "HOME" if failed in ("", setup.home) else "directory"
        detail = result.stderr.decode("utf-8", "replace").strip()
        raise BackendError(
            f"{setup.backend}: could not create {what} {failed or setup.home} for user {user or '(default)'}: {detail}"
        )
    existing = {path for path, flag in zip(probed, result.stdout.decode(), strict=False) if flag == "1"}
    for file in setup.files:
        if isinstance(file, WriteFile):
            if not (file.keep_existing and file.path in existing):
                await _put(sandbox, setup.backend, file.path, file.data, file.mode, user)
        else:
            current = await _read(sandbox, setup.backend, file.path, as_root) if file.path in existing else None
            await _put(sandbox, setup.backend, file.path, file.merged(current), file.mode, user)


async def _read(sandbox: Sandbox, backend: str, path: str, user: str | None) -> bytes:
    result = await sandbox.exec(["cat", path], user=user, timeout=BACKEND_SETUP_TIMEOUT_S)
    if not result.ok:
        detail = result.stderr.decode("utf-8", "replace").strip()
        raise BackendError(f"{backend}: could not read {path} to merge into it: {detail}")
    return result.stdout


async def _put(sandbox: Sandbox, backend: str, path: str, data: bytes, mode: int, user: str | None) -> None:
    try:
        await sandbox.put_file(path, data, mode=mode, user=user)
    except SandboxGoneError:
        raise  # not the backend's doing: the sandbox went away
    except McpSandboxesError as exc:  # e.g. a directory where the file goes: no fault of the caller's input
        raise BackendError(f"{backend}: could not write {path} for user {user or '(default)'}: {exc}") from exc
