"""One provider instance per name, built on first use and closed with the orchestrator."""

from __future__ import annotations

import time
from typing import Any

import anyio

from mcp_sandboxes.config import Settings
from mcp_sandboxes.providers.base import Availability, Provider, SandboxSpec
from mcp_sandboxes.providers.registry import build_provider, provider_names

AVAILABILITY_TTL_S = 10.0
CHECK_TIMEOUT_S = 10.0
# Providers whose sandboxes are directories on this host (`state_dir` in their settings).
STATE_DIR_PROVIDERS = frozenset({"process", "bubblewrap"})


class ProviderPool:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._providers: dict[str, Provider] = {}
        self._availability: dict[str, tuple[float, Availability]] = {}
        self._lock = anyio.Lock()

    async def get(self, name: str) -> Provider:
        async with self._lock:
            if name not in self._providers:
                self._providers[name] = build_provider(name, self._config(name))
            return self._providers[name]

    def _config(self, name: str) -> dict[str, Any]:
        """The provider's settings; providers that keep sandboxes on disk keep them under this
        server's data directory unless told otherwise (not under some other default)."""
        config = dict(self._settings.provider(name))
        if name in STATE_DIR_PROVIDERS and not config.get("state_dir"):
            config["state_dir"] = str(self._settings.server.data_dir.expanduser() / "sandboxes" / name)
        return config

    async def availability(self, name: str) -> Availability:
        cached = self._availability.get(name)
        if cached and time.monotonic() - cached[0] < AVAILABILITY_TTL_S:
            return cached[1]
        try:
            provider = await self.get(name)
            with anyio.fail_after(CHECK_TIMEOUT_S):
                result = await provider.check()
        except TimeoutError:
            result = Availability(provider=name, available=False, reason=f"check timed out after {CHECK_TIMEOUT_S}s")
        except Exception as exc:  # a broken provider must not break listing the others
            result = Availability(provider=name, available=False, reason=str(exc))
        self._availability[name] = (time.monotonic(), result)
        return result

    async def validate_spec(self, name: str, spec: SandboxSpec) -> None:
        """Providers that can check a spec cheaply (e.g. the image exists) expose `validate_spec`."""
        provider = await self.get(name)
        validate = getattr(provider, "validate_spec", None)
        if validate is not None:
            await validate(spec)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for provider in self._providers.values():
                with anyio.move_on_after(CHECK_TIMEOUT_S):
                    await provider.aclose()
        self._providers.clear()


__all__ = ["STATE_DIR_PROVIDERS", "ProviderPool", "provider_names"]
