"""`mcp-sandboxes doctor`: which providers and backends are usable here, and what to fix."""

from __future__ import annotations

import os

import anyio
from pydantic import BaseModel

from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import Settings
from mcp_sandboxes.providers.base import Availability
from mcp_sandboxes.providers.registry import build_provider, provider_names

CHECK_TIMEOUT_S = 15.0


class BackendReport(BaseModel):
    backend: str
    usable: bool
    cli: str
    missing_env: list[str]
    detail: str | None = None


class DoctorReport(BaseModel):
    providers: list[Availability]
    backends: list[BackendReport]

    @property
    def ok(self) -> bool:
        return any(p.available for p in self.providers)


async def _check_provider(name: str, settings: Settings) -> Availability:
    try:
        provider = build_provider(name, settings.provider(name))
    except Exception as exc:
        return Availability(provider=name, available=False, reason=str(exc))
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S):
            return await provider.check()
    except TimeoutError:
        return Availability(provider=name, available=False, reason=f"check timed out after {CHECK_TIMEOUT_S}s")
    except Exception as exc:
        return Availability(provider=name, available=False, reason=str(exc))
    finally:
        with anyio.CancelScope(shield=True):
            await provider.aclose()


def _check_backend(name: str, settings: Settings) -> BackendReport:
    backend_settings = settings.backend(name)
    missing = [key for key in backend_settings.pass_env if not os.environ.get(key)]
    cli = backend_settings.cli_path or "(from the image's PATH)"
    try:
        backend = build_backend(name, backend_settings, os.environ)
        backend.mounts()
    except Exception as exc:
        return BackendReport(backend=name, usable=False, cli=cli, missing_env=missing, detail=str(exc))
    return BackendReport(backend=name, usable=True, cli=cli, missing_env=missing)


async def diagnose(settings: Settings) -> DoctorReport:
    providers = [await _check_provider(name, settings) for name in provider_names()]
    backends = [_check_backend(name, settings) for name in backend_names()]
    return DoctorReport(providers=providers, backends=backends)


def format_report(report: DoctorReport) -> str:
    lines = ["Providers:"]
    for p in report.providers:
        mark = "ok " if p.available else "-- "
        detail = "" if p.available else f": {p.reason}" + (f" (fix: {p.fix})" if p.fix else "")
        lines.append(f"  {mark}{p.provider}{detail}")
    lines.append("Backends:")
    for b in report.backends:
        mark = "ok " if b.usable else "-- "
        extra = f" cli={b.cli}"
        if b.missing_env:
            extra += f"; unset: {', '.join(b.missing_env)}"
        if b.detail:
            extra += f"; {b.detail}"
        lines.append(f"  {mark}{b.backend}{extra}")
    return "\n".join(lines) + "\n"
