"""Translator throughput per backend (not a test): every recorded transcript of the backend
(tests/fixtures/<backend>/*.jsonl) concatenated and repeated to about --lines lines, fed through a
fresh translator per repetition. The baseline is `json.loads` of the same lines: the ratio says
how much the translation costs on top of merely parsing.

Run: .venv/bin/python -m bench.bench_translators [--lines 100000] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import load_settings
from tests.conftest import ROOT

SECTION = "translators"


def transcript(backend: str) -> list[str]:
    lines: list[str] = []
    for path in sorted((ROOT / "tests" / "fixtures" / backend).glob("*.jsonl")):
        lines.extend(line for line in path.read_text("utf-8").splitlines() if line.strip())
    return lines


def measure(backend_name: str, lines: list[str], target: int) -> tuple[int, float, float]:
    settings = load_settings(None, environ={})
    backend = build_backend(backend_name, settings.backend(backend_name), os.environ)
    repeats = max(1, target // max(1, len(lines)))
    fed = 0
    started = time.perf_counter()
    for _ in range(repeats):
        translator = backend.translator()
        for line in lines:
            translator.feed(line)
        translator.finish(0, "")
        fed += len(lines)
    translate_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeats):
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                pass
    parse_s = time.perf_counter() - started
    return fed, translate_s, parse_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = [
        "| backend | recorded lines | lines fed | translator lines/s | json.loads lines/s (baseline) | cost vs parse |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in backend_names():
        lines = transcript(name)
        if not lines:
            rows.append(f"| {name} | 0 | - | - | - | no recordings |")
            continue
        fed, translate_s, parse_s = measure(name, lines, args.lines)
        rows.append(
            f"| {name} | {len(lines)} | {fed} | {fed / translate_s:,.0f} | {fed / parse_s:,.0f}"
            f" | {translate_s / parse_s:.1f}x |"
        )
    table = "\n".join(rows)
    print(table)
    if args.write:
        from bench.report import write_section

        write_section(ROOT / "docs" / "benchmarks.md", SECTION, "Translator throughput", table)


if __name__ == "__main__":
    main()
