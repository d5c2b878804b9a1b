"""The sandbox user, made where the image lacks it: any image runs agents unprivileged.

Run once per new container, as root, before anything else uses the user: when the image has no
such user, one is added with a uid of its own (useradd where the image has it, else lines
appended to /etc/passwd and /etc/group, which is all any shell-bearing image needs), a HOME of its
own (/home/<name>), and the workdir if the engine made it for the container (root's and empty)
handed to it. A numeric user (a uid, `uid:gid`) is taken as it is: nothing to make.
"""

from __future__ import annotations

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import Sandbox

USER_SETUP_TIMEOUT_S = 60.0
# Exit codes of the script below that mean something to the caller.
CANNOT_CREATE = 65
NOT_A_NAME = 66

ENSURE_USER_SCRIPT = r"""
name="$1"; workdir="$2"
if id -u "$name" >/dev/null 2>&1; then exit 0; fi
case "$name" in [a-z_]*) ;; *) exit 66 ;; esac
case "$name" in *[!a-z0-9_-]*) exit 66 ;; esac
home="/home/$name"
if command -v useradd >/dev/null 2>&1; then
  useradd --create-home --home-dir "$home" --shell /bin/sh --user-group "$name" || exit 65
else
  uid=1000
  while cut -d: -f3 /etc/passwd /etc/group | grep -qx "$uid"; do uid=$((uid + 1)); done
  printf '%s:x:%s:%s::%s:/bin/sh\n' "$name" "$uid" "$uid" "$home" >> /etc/passwd || exit 65
  printf '%s:x:%s:\n' "$name" "$uid" >> /etc/group || exit 65
  mkdir -p "$home" && chown "$uid:$uid" "$home" && chmod 0750 "$home" || exit 65
fi
ids="$(id -u "$name"):$(id -g "$name")"
if [ -d "$workdir" ] && [ "$(stat -c %u "$workdir")" = 0 ] && [ -z "$(ls -A "$workdir")" ]; then
  chown "$ids" "$workdir" || exit 65
fi
echo made
"""


async def ensure_user(sandbox: Sandbox, user: str, *, image: str, workdir: str) -> bool:
    """Make `user` in the sandbox if its image lacks it; True when it was made."""
    name = user.partition(":")[0]
    if name.isdigit():
        return False
    result = await sandbox.exec(
        ["sh", "-c", ENSURE_USER_SCRIPT, "ensure-user", name, workdir], user="0", timeout=USER_SETUP_TIMEOUT_S
    )
    if result.ok:
        return result.stdout.strip() == b"made"
    detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-300:]
    if result.exit_code == NOT_A_NAME:
        raise InvalidInputError(
            "user",
            f"{image!r} has no user {name!r}, and that is not a name the server creates; use lowercase letters,"
            " digits, '_' or '-' (starting with a letter or '_'), or an image that has the user",
        )
    if result.exit_code == CANNOT_CREATE:
        raise InvalidInputError(
            "image",
            f"{image!r} has no user {name!r} and it could not be added ({detail}); with read_only_root the"
            " image must have it already: add it to the image, or drop read_only_root",
        )
    raise InvalidInputError(
        "image",
        f"{image!r} cannot run commands as the sandbox user {name!r}: the image needs a POSIX shell (sh) to add"
        f" it ({detail or f'exit code {result.exit_code}'}); use an image with a shell or one that has the user",
    )
