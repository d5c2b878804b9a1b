"""Backends registered by name. Each is imported only when first used, so one backend's
import problem never breaks the others."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from mcp_sandboxes.backends.base import Backend
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import InvalidInputError

BackendFactory = Callable[[BackendSettings, Mapping[str, str]], Backend]

# name -> "module:factory". A factory takes the backend's settings and the host environment
# (for `pass_env`) and returns a Backend.
_FACTORIES: dict[str, str] = {
    "claude": "mcp_sandboxes.backends.claude:ClaudeBackend.from_settings",
    "codex": "mcp_sandboxes.backends.codex:CodexBackend.from_settings",
    "gemini": "mcp_sandboxes.backends.gemini:GeminiBackend.from_settings",
    "opencode": "mcp_sandboxes.backends.opencode:OpencodeBackend.from_settings",
    "factory": "mcp_sandboxes.backends.factory:FactoryBackend.from_settings",
    "custom": "mcp_sandboxes.backends.custom:CustomBackend.from_settings",
}


def register(name: str, target: str) -> None:
    _FACTORIES[name] = target


def backend_names() -> list[str]:
    return sorted(_FACTORIES)


def _resolve(target: str) -> BackendFactory:
    module_name, _, attr_path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    factory: BackendFactory = obj
    return factory


def build_backend(name: str, settings: BackendSettings, environ: Mapping[str, str]) -> Backend:
    if name not in _FACTORIES:
        raise InvalidInputError("backend", f"unknown backend {name!r}; use one of: {', '.join(backend_names())}")
    return _resolve(_FACTORIES[name])(settings, environ)
