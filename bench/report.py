"""Keeps docs/benchmarks.md as named sections, so each benchmark replaces only its own table."""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from pathlib import Path


def write_section(path: Path, key: str, title: str, body: str) -> None:
    text = path.read_text("utf-8") if path.exists() else "# Benchmarks\n\nRatios against a baseline run side by side.\n"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- bench:{key} -->\n## {title}\n\n_Measured {stamp} on {platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}._\n\n{body}\n<!-- /bench:{key} -->\n"
    )
    pattern = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
