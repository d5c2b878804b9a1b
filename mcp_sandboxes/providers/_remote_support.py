"""Pieces shared by the providers that drive a sandbox service we do not run ourselves
(E2B, Daytona, Modal, Apple `container`): secrets handling, error translation, shell
quoting for wrapper scripts.

Secrets (API keys, tokens) come from the provider settings or an environment variable,
never from tool arguments, and every message built here is scrubbed of them.
"""

from __future__ import annotations

import os
import shlex
import signal as _signal
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from mcp_sandboxes.errors import ProviderError, ProviderUnavailableError

# Control-plane calls (create, list, delete) and data-plane calls (files, signals).
CONTROL_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 15.0
# How long cleanup (kill, delete) may take when a caller leaves a stream or is cancelled.
CLEANUP_TIMEOUT_S = 15.0
# Where wrapper scripts keep per-process state (pid, stdin FIFO) inside a sandbox.
STATE_DIR = "/tmp/.mcp-sandboxes"

ROOT_USERS = frozenset({"0", "root"})


def setting_or_env(settings: Mapping[str, Any], key: str, env_var: str) -> str | None:
    """A secret or option from the provider settings first, then the environment."""
    value = settings.get(key)
    if isinstance(value, str) and value:
        return value
    env_value = os.environ.get(env_var, "")
    return env_value or None


def redact(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def http_timeout(read: float | None = CONTROL_TIMEOUT_S) -> httpx.Timeout:
    return httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=read, write=CONTROL_TIMEOUT_S, pool=CONNECT_TIMEOUT_S)


def vendor_message(response: httpx.Response) -> str:
    """The human part of a vendor error body (`message`, `error`, `detail`), or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return str(value["message"])
    return str(body)[:500]


def status_error(
    provider: str, action: str, response: httpx.Response, secrets: Iterable[str | None], *, key_hint: str
) -> ProviderError:
    """Translate a failed vendor response into our error, naming what to fix."""
    message = redact(vendor_message(response), secrets)
    status = response.status_code
    if status in (401, 403):
        return ProviderUnavailableError(f"{provider}: {action} was refused ({status} {message}); check {key_hint}")
    return ProviderError(f"{provider}: {action} failed ({status} {message})")


def transport_error(provider: str, action: str, exc: Exception, secrets: Iterable[str | None]) -> ProviderError:
    detail = redact(f"{type(exc).__name__}: {exc}", secrets)
    return ProviderUnavailableError(f"{provider}: {action} could not reach the service ({detail})")


def quote(argv: Iterable[str]) -> str:
    return " ".join(shlex.quote(part) for part in argv)


def env_prefix(env: Mapping[str, str] | None) -> list[str]:
    """`env -- K=V ...` so a command gets exactly these variables added, whatever shell runs it."""
    if not env:
        return []
    for key in env:
        if not key or "=" in key:
            raise ProviderError(f"environment variable name {key!r} is not valid: names must be non-empty without '='")
    return ["env", "--", *(f"{key}={value}" for key, value in env.items())]


def signal_exit_code(signum: int) -> int:
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return str(signum)
