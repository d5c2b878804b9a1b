"""Files the server keeps for its operator alone (the data directory, the operator token, the
instance id)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from mcp_sandboxes.errors import McpSandboxesError

# What an instance id looks like (16 hex digits as made here; a longer hand-made one is fine).
INSTANCE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{7,62}$")


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700: the data directory is the operator's alone."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def load_or_create_instance_id(path: Path) -> str:
    """This server's instance id, kept at `path` (0600 in a 0700 directory), made on first use.
    Every sandbox the server makes carries it as a label, so clean-up touches only its own:
    another server with another data directory on the same engine has another id."""
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        value = path.read_text("utf-8").strip()
        if INSTANCE_ID_PATTERN.match(value):
            return value
        raise McpSandboxesError(
            f"{path}: the instance id file does not hold an id; delete it and restart (sandboxes labelled with"
            " the old id are then no longer cleaned up by this server)"
        ) from None
    value = secrets.token_hex(8)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(value + "\n")
    return value
