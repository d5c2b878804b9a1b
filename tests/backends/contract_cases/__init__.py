"""One case per backend for tests/backends/test_translator_contract.py: what the shared rules need
to know about a backend and nothing more. A case module is named after the backend it covers and
holds `CASE`: the registry name, settings over its default.toml table (only where the defaults
cannot run, as for custom), and a valid init/result line pair, taken from a recorded transcript
where the backend has one, with the id its init line names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


@dataclass(frozen=True)
class ContractCase:
    backend: str
    init: str = field(repr=False)
    result: str = field(repr=False)
    native_id: str | None
    settings: dict[str, Any] = field(default_factory=dict)


def fixture_line(backend: str, recording: str, **match: Any) -> str:
    """The first line of tests/fixtures/<backend>/<recording>.jsonl whose object has every
    key/value of `match`, as recorded (not re-serialized)."""
    path = FIXTURES / backend / f"{recording}.jsonl"
    for line in path.read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            if all(data.get(key) == value for key, value in match.items()):
                return line
    raise LookupError(f"{path} has no line with {match}")
