"""One end-to-end case per agent backend, discovered by tests/e2e/test_backends.py.

Each module `backend_cases/<name>.py` defines `CASES: list[BackendCase]`. The shared test scripts
the same two turns for every backend: turn 1 runs a shell command through the CLI's own shell tool
(writing a proof file in the container), turn 2 resumes the conversation."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from tests.support.model_server import ToolCall

AGENT_IMAGE = "mcp-sandboxes/agent:latest"


@dataclass(frozen=True)
class BackendCase:
    backend: str
    # Model-server vendor modules (each exposes routes(script, recorder)) the CLI talks to.
    vendors: Sequence[ModuleType]
    # Environment variables for OUR server process, given the model server's URL
    # (e.g. OPENAI_BASE_URL); the backend's pass_env hands them to the CLI.
    server_env: Callable[[str], dict[str, str]]
    # The CLI's own shell tool, as the model would call it, running `command`.
    shell_call: Callable[[str], ToolCall]
    spawn_args: dict[str, Any] = field(default_factory=dict)
    image: str = AGENT_IMAGE
    # Text that must appear in the second turn's model request to prove the history came along.
    history_probe: Callable[[Any], str] = str


def discover_cases() -> list[BackendCase]:
    cases: list[BackendCase] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cases.extend(getattr(module, "CASES", []))
    return cases
