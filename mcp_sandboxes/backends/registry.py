"""Backends registered by name. Each is imported only when first used, so one backend's
import problem never breaks the others.

Adding a backend: its module, one line in `_BACKENDS`, its `[backends.NAME]` table in
configs/default.toml and a contract case in tests/backends/contract_cases/. Everything that
lists backends (the spawn_agent schema, `doctor`, error messages) asks this module."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcp_sandboxes.backends.base import Backend
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import InvalidInputError

BackendFactory = Callable[[BackendSettings, Mapping[str, str]], Backend]


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend's factory is ("module:attr.path"; it takes the backend's settings and the
    host environment, for `pass_env`) and what it runs, in a few words for tool descriptions."""

    target: str
    label: str = ""
    # The variables that point the CLI at its model API, with the vendor's public base URL: in
    # network mode "model" they are set to the in-sandbox proxy even when the host leaves them
    # unset, so the CLI never goes to its vendor directly (an empty default: only when set).
    model_urls: Mapping[str, str] = field(default_factory=dict)


_BACKENDS: dict[str, BackendEntry] = {
    "claude": BackendEntry(
        "mcp_sandboxes.backends.claude:ClaudeBackend.from_settings",
        "Claude Code",
        {"ANTHROPIC_BASE_URL": "https://api.anthropic.com"},
    ),
    "codex": BackendEntry(
        "mcp_sandboxes.backends.codex:CodexBackend.from_settings",
        "OpenAI Codex",
        {"OPENAI_BASE_URL": "https://api.openai.com/v1"},
    ),
    "gemini": BackendEntry(
        "mcp_sandboxes.backends.gemini:GeminiBackend.from_settings",
        "Gemini CLI",
        {"GOOGLE_GEMINI_BASE_URL": "https://generativelanguage.googleapis.com"},
    ),
    "opencode": BackendEntry("mcp_sandboxes.backends.opencode:OpencodeBackend.from_settings", "OpenCode"),
    "factory": BackendEntry("mcp_sandboxes.backends.factory:FactoryBackend.from_settings", "Factory Droid"),
    "custom": BackendEntry("mcp_sandboxes.backends.custom:CustomBackend.from_settings", "a command from the config"),
}


def register(name: str, target: str, label: str = "") -> None:
    _BACKENDS[name] = BackendEntry(target, label)


def model_urls(name: str) -> Mapping[str, str]:
    """The backend's model base URL variables and their vendor defaults (see BackendEntry)."""
    entry = _BACKENDS.get(name)
    return entry.model_urls if entry is not None else {}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def describe_backends() -> str:
    """The registered backends for a tool description: "'claude' (Claude Code), ..."."""
    return ", ".join(
        f"'{name}' ({entry.label})" if entry.label else f"'{name}'" for name, entry in sorted(_BACKENDS.items())
    )


def _resolve(target: str) -> BackendFactory:
    module_name, _, attr_path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    factory: BackendFactory = obj
    return factory


def build_backend(name: str, settings: BackendSettings, environ: Mapping[str, str]) -> Backend:
    if name not in _BACKENDS:
        raise InvalidInputError("backend", f"unknown backend {name!r}; use one of: {', '.join(backend_names())}")
    return _resolve(_BACKENDS[name].target)(settings, environ)
