"""Modal against its loopback stand-in (tests/contract_servers/modal.py): the real provider
code and the real `modal` SDK, Modal's published gRPC protocol, real commands in a
bubblewrap sandbox behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.modal import ModalProvider
from tests.contract_servers.modal import modal_server
from tests.contract_servers.sandbox_host import bwrap_available
from tests.providers.targets import ConformanceTarget

TOKEN_ID = "ak-" + "conformance0123456789"
TOKEN_SECRET = "as-" + "0123456789abcdef" * 2


@asynccontextmanager
async def open_modal() -> AsyncIterator[Provider]:
    async with (
        modal_server(TOKEN_ID, TOKEN_SECRET) as (server, _stand_in),
        aclosing(
            ModalProvider.from_settings({"token_id": TOKEN_ID, "token_secret": TOKEN_SECRET, "server_url": server.url})
        ) as provider,
    ):
        yield provider


TARGETS = [
    ConformanceTarget(
        name="modal",
        open_provider=open_modal,
        spec=SandboxSpec(image="debian:bookworm"),
        available=bwrap_available,
    )
]
