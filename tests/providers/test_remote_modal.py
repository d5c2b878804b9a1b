"""The Modal provider is registered but honest: it reports why it cannot run and refuses work."""

from __future__ import annotations

import pytest

from mcp_sandboxes.errors import ProviderUnavailableError
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.providers.registry import build_provider


async def test_modal_reports_unavailable_with_reason_and_fix() -> None:
    provider = build_provider("modal", {})
    availability = await provider.check()
    assert not availability.available
    assert "gRPC" in (availability.reason or "") and availability.fix
    with pytest.raises(ProviderUnavailableError, match="modal"):
        await provider.create(SandboxSpec(image="debian:bookworm"))
    assert await provider.list_owned() == []
    await provider.aclose()


async def test_apple_is_unavailable_off_macos_with_the_reason() -> None:
    provider = build_provider("apple", {})
    availability = await provider.check()
    assert not availability.available
    assert "macOS" in (availability.reason or "")
    await provider.aclose()
