"""`mcp-sandboxes doctor`: which providers and backends are usable here, and what to fix."""

from __future__ import annotations

import os

import anyio
from pydantic import BaseModel, Field

from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import Settings
from mcp_sandboxes.egress.forwarder import configured_forwarder
from mcp_sandboxes.errors import McpSandboxesError
from mcp_sandboxes.orchestrator import EGRESS_PROVIDERS
from mcp_sandboxes.providers.base import Availability, SandboxSpec
from mcp_sandboxes.providers.registry import build_provider, provider_names

CHECK_TIMEOUT_S = 15.0


class BackendReport(BaseModel):
    backend: str
    usable: bool
    cli: str
    executable: str | None = Field(
        default=None, description="The program the backend runs when no cli_path is set (None: it could not be built)."
    )
    missing_env: list[str] = Field(description="API key variables of which none is set (any one would do).")
    detail: str | None = None


class ImageReport(BaseModel):
    image: str
    provider: str
    cli_found: dict[str, bool]
    detail: str | None = None


class DoctorReport(BaseModel):
    providers: list[Availability]
    backends: list[BackendReport]
    images: list[ImageReport] = []
    default_provider: str = Field(default="docker", description="server.default_provider.")
    configured_backends: list[str] = Field(
        default_factory=list, description="Backends the config points at a CLI for (cli_path set)."
    )
    egress_forwarder: str | None = Field(
        default=None, description="Network 'model': the in-sandbox forwarder's path on the host (None: unusable)."
    )
    egress_problem: str | None = Field(
        default=None, description="Why network 'model' (the default on the default provider) cannot work."
    )

    @property
    def problems(self) -> list[str]:
        """What stops the server working as configured (doctor exits non-zero on any)."""
        found: list[str] = []
        default = next((p for p in self.providers if p.provider == self.default_provider), None)
        if default is None or not default.available:
            reason = default.reason if default is not None else "it is not a provider this server knows"
            found.append(f"the default provider {self.default_provider!r} cannot work: {reason}")
        if self.egress_problem is not None:
            found.append(self.egress_problem)
        for backend in self.backends:
            if backend.backend in self.configured_backends and not backend.usable:
                found.append(f"backend {backend.backend!r} is configured but cannot work: {backend.detail}")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems


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
    keys = backend_settings.api_key_env
    missing = [] if not keys or any(os.environ.get(key) for key in keys) else list(keys)
    cli = backend_settings.cli_path or "(from the image's PATH)"
    try:
        backend = build_backend(name, backend_settings, os.environ)
        backend.mounts()
    except Exception as exc:
        return BackendReport(backend=name, usable=False, cli=cli, missing_env=missing, detail=str(exc))
    if not backend_settings.cli_path:
        cli = f"{backend.executable} (from the image's PATH)"
    return BackendReport(backend=name, usable=True, cli=cli, executable=backend.executable, missing_env=missing)


STANDARD_AGENT_IMAGE = "mcp-sandboxes/agent:latest"


async def _check_image(image: str, settings: Settings, clis: dict[str, str]) -> ImageReport:
    """Start a throwaway sandbox of the image and look for each backend's executable (`clis`:
    backend -> program) on its PATH."""
    provider_name = settings.server.default_provider
    report = ImageReport(image=image, provider=provider_name, cli_found={})
    try:
        provider = build_provider(provider_name, settings.provider(provider_name))
    except Exception as exc:
        report.detail = str(exc)
        return report
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S * 4):
            sandbox = await provider.create(
                SandboxSpec(image=image, network="none", labels={"io.mcp-sandboxes.doctor": "1"})
            )
            try:
                # The names are arguments, never script text: a custom command's argv[0] comes from config.
                script = 'for c in "$@"; do command -v "$c" >/dev/null && printf "%s\\n" "$c"; done; true'
                result = await sandbox.exec(
                    ["sh", "-c", script, "sh", *sorted(set(clis.values()))], timeout=CHECK_TIMEOUT_S
                )
                found = set(result.stdout.decode("utf-8", "replace").splitlines())
                report.cli_found = {backend: cli in found for backend, cli in clis.items()}
            finally:
                with anyio.CancelScope(shield=True):
                    await provider.destroy(sandbox.id)
    except Exception as exc:
        report.detail = str(exc)
    finally:
        with anyio.CancelScope(shield=True):
            await provider.aclose()
    return report


async def _check_egress(settings: Settings) -> tuple[str | None, str | None]:
    """The forwarder network 'model' needs: (its path, None) or (None, what is wrong), the
    latter only when 'model' is the default network of the default provider."""
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S * 4):
            path = await configured_forwarder(
                settings.egress.forwarder_path, settings.server.data_dir.expanduser() / "egress" / "bin"
            )
    except (McpSandboxesError, TimeoutError) as exc:
        if settings.server.default_provider not in EGRESS_PROVIDERS:
            return None, None
        return None, f"network 'model' (the default for {settings.server.default_provider}) cannot work: {exc}"
    return str(path), None


async def diagnose(settings: Settings, images: list[str] | None = None) -> DoctorReport:
    providers = [await _check_provider(name, settings) for name in provider_names()]
    backends = [_check_backend(name, settings) for name in backend_names()]
    if images is None:
        images = list(dict.fromkeys([settings.server.default_image, STANDARD_AGENT_IMAGE]))
    default_ok = any(p.provider == settings.server.default_provider and p.available for p in providers)
    clis = {b.backend: b.executable for b in backends if b.executable}
    image_reports = [await _check_image(image, settings, clis) for image in images] if default_ok else []
    configured = [name for name in backend_names() if settings.backend(name).cli_path]
    forwarder, egress_problem = await _check_egress(settings)
    return DoctorReport(
        egress_forwarder=forwarder,
        egress_problem=egress_problem,
        providers=providers,
        backends=backends,
        images=image_reports,
        default_provider=settings.server.default_provider,
        configured_backends=configured,
    )


def format_report(report: DoctorReport) -> str:
    lines = ["Providers:"]
    for p in report.providers:
        mark = "ok " if p.available else "-- "
        detail = f": {p.reason}" + (f" (fix: {p.fix})" if p.fix else "")
        if p.available:
            # An available provider's reason is a note on how it works (e.g. kubernetes: its mode).
            detail = f" ({p.reason})" if p.reason else ""
        lines.append(f"  {mark}{p.provider}{detail}")
    lines.append("Backends:")
    for b in report.backends:
        mark = "ok " if b.usable else "-- "
        extra = f" cli={b.cli}"
        if b.missing_env:
            extra += f"; no API key: set one of {', '.join(b.missing_env)}"
        if b.detail:
            extra += f"; {b.detail}"
        lines.append(f"  {mark}{b.backend}{extra}")
    if report.images:
        lines.append("Agent CLIs in images:")
    for image in report.images:
        if image.detail:
            lines.append(f"  -- {image.image} ({image.provider}): {image.detail}")
            continue
        found = ", ".join(f"{b}={'yes' if ok else 'no'}" for b, ok in image.cli_found.items())
        lines.append(f"  {image.image} ({image.provider}): {found}")
    if report.egress_forwarder is not None:
        lines.append(f"Network 'model': ok (forwarder {report.egress_forwarder})")
    if report.problems:
        lines.append("Problems:")
        lines.extend(f"  {problem}" for problem in report.problems)
    return "\n".join(lines) + "\n"
