"""Files the server keeps for its operator alone (the data directory, the operator token)."""

from __future__ import annotations

from pathlib import Path


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700: the data directory is the operator's alone."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
