"""What is Modal-specific, against the loopback stand-in of Modal's gRPC protocol
(tests/contract_servers/modal.py) driven by the real `modal` SDK."""

from __future__ import annotations

from mcp_sandboxes.providers.registry import build_provider


async def test_apple_is_unavailable_off_macos_with_the_reason() -> None:
    provider = build_provider("apple", {})
    availability = await provider.check()
    assert not availability.available
    assert "macOS" in (availability.reason or "")
    await provider.aclose()
