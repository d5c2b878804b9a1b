"""Modal sandboxes: not usable from this package yet, and `check()` says so.

Modal documents no REST API for sandboxes. Its public interface is the `modal` SDK
(https://modal.com/docs/reference/modal.Sandbox: `Sandbox.create`, `exec`, `filesystem`,
`terminate`, `list(tags=...)`), which talks gRPC to api.modal.com (modal-labs/modal-client
`modal_proto/api.proto`; exec I/O goes through a per-task "command router" gRPC service).
There is no `modal sandbox` CLI command to shell out to either. Driving Modal therefore
means importing the SDK, and testing it here means a stand-in that speaks Modal's gRPC
protocol: that stand-in has not been written, so rather than ship untested code this
provider reports itself unavailable with the reason and does nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcp_sandboxes.errors import ProviderUnavailableError
from mcp_sandboxes.providers.base import Availability, Sandbox, SandboxSpec

REASON = (
    "the modal provider is not implemented: Modal offers no REST API for sandboxes (only its gRPC-based "
    "Python SDK), and no loopback stand-in of that protocol exists yet to test a client against"
)
FIX = "use the e2b, daytona, fly, vercel or sprites provider for remote sandboxes"


class ModalProvider:
    name = "modal"

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = dict(settings)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ModalProvider:
        return cls(settings)

    async def check(self) -> Availability:
        return Availability(provider=self.name, available=False, reason=REASON, fix=FIX)

    def _unavailable(self) -> ProviderUnavailableError:
        return ProviderUnavailableError(f"modal: {REASON}; {FIX}")

    async def create(self, spec: SandboxSpec) -> Sandbox:
        raise self._unavailable()

    async def attach(self, sandbox_id: str) -> Sandbox | None:
        raise self._unavailable()

    async def destroy(self, sandbox_id: str) -> None:
        raise self._unavailable()

    async def list_owned(self) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None
