"""Pieces shared by the providers that drive a sandbox service we do not run ourselves
(E2B, Daytona, Modal, Apple `container`): error translation, `check()` of a keyed API,
environment prefixes for wrapped commands.

Secrets (API keys, tokens) come from the provider settings or an environment variable
(`_remote_http.setting_or_env`), never from tool arguments, and every message built here
is scrubbed of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

import httpx

from mcp_sandboxes.errors import InvalidInputError, ProviderError, ProviderUnavailableError
from mcp_sandboxes.providers._spec_support import refuse_unsupported
from mcp_sandboxes.providers.base import Availability, SandboxSpec
from mcp_sandboxes.redaction import redact_values as redact

# Control-plane calls (create, list, delete) and data-plane calls (files, signals).
CONTROL_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 15.0
# How long cleanup (kill, delete) may take when a caller leaves a stream or is cancelled.
CLEANUP_TIMEOUT_S = 15.0
# Where wrapper scripts keep per-process state (pid, stdin FIFO) inside a sandbox.
STATE_DIR = "/tmp/.mcp-sandboxes"

ROOT_USERS = frozenset({"0", "root"})


def refuse_mounts(spec: SandboxSpec, provider: str) -> None:
    """The vendor runs the sandbox on its own machines: host paths cannot be mounted there."""
    refuse_unsupported(spec, provider)
    if spec.mounts:
        raise InvalidInputError("mounts", f"{provider} sandboxes cannot mount host paths; copy files in with put_file")


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


async def api_key_availability(
    provider: str,
    vendor: str,
    *,
    api_key: str | None,
    env_var: str,
    api_url: str,
    probe: Callable[[], Awaitable[httpx.Response]],
) -> Availability:
    """`check()` of a provider whose API takes one key: is the key set, does `probe` (a
    cheap authenticated call) reach the API, and does the API accept the key."""
    setting = f"providers.{provider}.api_key"
    if not api_key:
        return Availability(
            provider=provider,
            available=False,
            reason=f"{env_var} is not set",
            fix=f"export {env_var}=<your key> or set {setting} in the config file",
        )
    try:
        response = await probe()
    except ProviderError as exc:
        return Availability(provider=provider, available=False, reason=str(exc), fix=f"check {api_url}")
    if response.status_code in (401, 403):
        return Availability(
            provider=provider,
            available=False,
            reason=f"the {vendor} API rejected the API key ({response.status_code})",
            fix=f"set a valid key in {env_var} or {setting}",
        )
    if response.status_code >= 400:
        return Availability(
            provider=provider, available=False, reason=f"the {vendor} API answered {response.status_code}"
        )
    return Availability(provider=provider, available=True)
