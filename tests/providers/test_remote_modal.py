"""What is Modal-specific, against the loopback stand-in of Modal's gRPC protocol
(tests/contract_servers/modal.py) driven by the real `modal` SDK: where the token travels
(and where it never shows up), what a SandboxSpec becomes on the wire, attach after a
restart, tag filtering, sandboxes that vanish, calls the service refuses, lazy import."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import anyio.to_thread
import pytest
from grpclib import Status
from modal_proto import api_pb2

from mcp_sandboxes.errors import (
    InvalidInputError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)
from mcp_sandboxes.providers.base import OWNER_LABEL, SANDBOX_NAME_LABEL, Mount, ResourceLimits, SandboxSpec
from mcp_sandboxes.providers.registry import build_provider
from mcp_sandboxes.providers.remote.modal import ModalProvider
from tests.contract_servers.modal import ModalServer, ModalStandIn, modal_server
from tests.contract_servers.sandbox_host import require_bwrap

TOKEN_ID = "ak-" + "tokenidforthetests01"
TOKEN_SECRET = "as-" + "fedcba9876543210" * 2
SDK_LOGGERS = ("", "modal-utils", "modal-client", "modal", "grpclib", "h2", "hpack")


@pytest.fixture
async def served() -> AsyncIterator[tuple[ModalServer, ModalStandIn]]:
    require_bwrap()
    async with modal_server(TOKEN_ID, TOKEN_SECRET) as (server, stand_in):
        yield server, stand_in
        # The provider must only use RPCs the stand-in speaks (anything else is UNIMPLEMENTED).
        assert stand_in.unimplemented == []


def settings(url: str, **extra: object) -> dict[str, object]:
    return {"token_id": TOKEN_ID, "token_secret": TOKEN_SECRET, "server_url": url, **extra}


@pytest.fixture
async def modal(served: tuple[ModalServer, ModalStandIn]) -> AsyncIterator[ModalProvider]:
    async with aclosing(ModalProvider.from_settings(settings(served[0].url))) as provider:
        yield provider


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[Captured]:
    """Every log line of ours, the SDK's and grpclib's, at DEBUG."""
    handler = Captured()
    loggers = [logging.getLogger(name) for name in SDK_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- the token ------------------------------------------------------------------------------


async def test_the_token_travels_as_modal_metadata_and_appears_in_no_repr_error_or_log(
    served: tuple[ModalServer, ModalStandIn], modal: ModalProvider, logs: Captured
) -> None:
    server, stand_in = served
    sandbox = await modal.create(SandboxSpec(image="debian:bookworm"))
    assert (await sandbox.exec(["echo", "hi"])).stdout == b"hi\n"
    await modal.destroy(sandbox.id)

    control = [c for c in stand_in.calls if not c.method.startswith("Task")]
    router = [c for c in stand_in.calls if c.method.startswith("Task")]
    assert {"AppGetOrCreate", "AuthTokenGet", "SandboxCreateV2", "SandboxTerminateV2"} <= {c.method for c in control}
    assert all(c.metadata.get("x-modal-token-id") == TOKEN_ID for c in control)
    assert all(c.metadata.get("x-modal-token-secret") == TOKEN_SECRET for c in control)
    # Sandbox calls also carry the short-lived JWT the SDK got from AuthTokenGet.
    assert all(c.metadata.get("x-modal-auth-token") for c in control if c.method.startswith("Sandbox"))
    # The command router gets the per-task JWT, never the account token.
    assert router and all(c.metadata.get("authorization", "").startswith("Bearer ") for c in router)
    assert all(TOKEN_SECRET not in str(c.metadata) and TOKEN_ID not in str(c.metadata) for c in router)

    wrong = "as-" + "0" * 32
    async with aclosing(ModalProvider.from_settings(settings(server.url, token_secret=wrong))) as rejected:
        with pytest.raises(ProviderUnavailableError) as caught:
            await rejected.create(SandboxSpec(image="debian:bookworm"))
        availability = await rejected.check()
    message = str(caught.value)
    assert "MODAL_TOKEN_ID" in message and "MODAL_TOKEN_SECRET" in message and "modal token new" in message
    assert not availability.available and "not accepted" in (availability.reason or "")
    seen = [message, availability.model_dump_json(), repr(modal), repr(sandbox), repr(modal.settings), *logs.lines]
    for text in seen:
        assert TOKEN_SECRET not in text and wrong not in text, text
        assert TOKEN_ID not in text, text


async def test_without_a_token_check_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    async with aclosing(ModalProvider.from_settings({"server_url": "http://127.0.0.1:9"})) as provider:
        availability = await provider.check()
        with pytest.raises(ProviderError, match="MODAL_TOKEN_ID"):
            await provider.list_owned()
    assert not availability.available
    assert availability.reason == "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are not set"
    assert "providers.modal.token_id" in (availability.fix or "") and "modal token new" in (availability.fix or "")


async def test_the_token_can_come_from_the_environment(
    served: tuple[ModalServer, ModalStandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, stand_in = served
    monkeypatch.setenv("MODAL_TOKEN_ID", TOKEN_ID)
    monkeypatch.setenv("MODAL_TOKEN_SECRET", TOKEN_SECRET)
    async with aclosing(ModalProvider.from_settings({"server_url": server.url})) as provider:
        assert (await provider.check()).available
    assert stand_in.calls_of("ClientHello")[-1].metadata["x-modal-token-secret"] == TOKEN_SECRET


async def test_an_unreachable_server_is_unavailable_naming_the_setting() -> None:
    started = time.monotonic()
    config = settings("http://127.0.0.1:9", connect_timeout_s=1.5)
    async with aclosing(ModalProvider.from_settings(config)) as provider:
        availability = await provider.check()
    assert not availability.available
    assert "providers.modal.server_url" in (availability.reason or "")
    assert time.monotonic() - started < 10  # bounded by connect_timeout_s, not the SDK's minute of retries


# -- what create sends -------------------------------------------------------------------------


async def test_create_maps_the_spec_onto_the_request_fields(
    served: tuple[ModalServer, ModalStandIn],
) -> None:
    server, stand_in = served
    config = settings(server.url, app_name="agents", environment="staging", timeout_s=900)
    spec = SandboxSpec(
        image="python:3.12-slim",
        name="reviewer",
        env={"GREETING": "hello there", "EMPTY": ""},
        workdir="/workspace/project",
        network="none",
        limits=ResourceLimits(cpus=1.5, memory_mb=768),
        labels={"team": "search"},
    )
    async with aclosing(ModalProvider.from_settings(config)) as provider:
        sandbox = await provider.create(spec)
        inside = await sandbox.exec(["sh", "-c", 'echo "$GREETING"; pwd'])
        open_one = await provider.create(SandboxSpec(image="python:3.12-slim", network="host"))

    app = stand_in.calls_of("AppGetOrCreate")[0].request
    assert (app.app_name, app.environment_name) == ("agents", "staging")
    image = stand_in.calls_of("ImageGetOrCreate")[0].request
    assert image.image.dockerfile_commands[0] == "FROM python:3.12-slim"
    first, second = (call.request for call in stand_in.calls_of("SandboxCreateV2"))
    definition = first.definition
    assert definition.workdir == "/workspace/project"
    assert definition.timeout_secs == 900
    assert definition.network_access.network_access_type == api_pb2.NetworkAccess.NetworkAccessType.BLOCKED
    assert second.definition.network_access.network_access_type == api_pb2.NetworkAccess.NetworkAccessType.OPEN
    resources = definition.resources
    assert (resources.milli_cpu, resources.milli_cpu_max) == (1500, 1500)
    assert (resources.memory_mb, resources.memory_mb_max) == (768, 768)
    env = {k: v for source in first.secret_sources for k, v in source.env.contents.items()}
    assert env == {"GREETING": "hello there", "EMPTY": ""}
    tags = {tag.tag_name: tag.tag_value for tag in first.tags}
    assert tags["team"] == "search"
    assert tags[OWNER_LABEL] == "true"
    assert tags[SANDBOX_NAME_LABEL] == "reviewer"
    assert first.app_id == second.app_id == stand_in.apps[("staging", "agents")]
    # And the sandbox behind it got what was asked for.
    assert inside.stdout == b"hello there\n/workspace/project\n"
    assert stand_in.sandboxes[sandbox.id].machine.network is False
    assert stand_in.sandboxes[open_one.id].machine.network is True


async def test_an_image_modal_cannot_build_names_the_image_field(modal: ModalProvider) -> None:
    with pytest.raises(InvalidInputError, match=r"(?s)^image: .*no-such/image:1") as caught:
        await modal.create(SandboxSpec(image="no-such/image:1"))
    assert "debian:bookworm" in str(caught.value)
    assert await modal.list_owned() == []


async def test_host_mounts_are_refused_before_anything_is_created(
    served: tuple[ModalServer, ModalStandIn], modal: ModalProvider
) -> None:
    spec = SandboxSpec(image="debian:bookworm", mounts=[Mount(source="/etc", target="/mnt/etc")])
    with pytest.raises(InvalidInputError, match="mounts"):
        await modal.create(spec)
    assert served[1].calls_of("SandboxCreateV2") == []


# -- attach, list, vanish ---------------------------------------------------------------------


async def test_attach_after_a_provider_restart_runs_where_and_as_create_did(
    served: tuple[ModalServer, ModalStandIn],
) -> None:
    server, stand_in = served
    spec = SandboxSpec(image="debian:bookworm", workdir="/workspace/restored", env={"KEPT": "yes"})
    async with aclosing(ModalProvider.from_settings(settings(server.url))) as first:
        created = await first.create(spec)
        await created.put_file("/workspace/restored/note.txt", b"from before the restart")
    async with aclosing(ModalProvider.from_settings(settings(server.url))) as second:
        attached = await second.attach(created.id)
        assert attached is not None
        result = await attached.exec(["sh", "-c", 'pwd; cat note.txt; echo; echo "$KEPT"'])
        owned = await second.list_owned()
    assert result.stdout == b"/workspace/restored\nfrom before the restart\nyes\n"
    assert created.id in owned
    # The fresh handle found its task through the control plane, not a cached one.
    assert stand_in.calls_of("SandboxGetTaskIdV2") and stand_in.calls_of("SandboxGetCommandRouterAccess")


async def test_list_owned_filters_by_our_tag_and_follows_pages(
    served: tuple[ModalServer, ModalStandIn], modal: ModalProvider
) -> None:
    _, stand_in = served
    ours = [await modal.create(SandboxSpec(image="debian:bookworm")) for _ in range(3)]
    foreign = await modal.create(SandboxSpec(image="debian:bookworm"))
    stand_in.sandboxes[foreign.id].tags.pop(OWNER_LABEL)  # someone else's sandbox in the same app
    owned = await modal.list_owned()
    assert sorted(owned) == sorted(s.id for s in ours)  # the stand-in pages by 2: three need two pages
    listed = stand_in.calls_of("SandboxListV2")
    assert all({t.tag_name: t.tag_value for t in c.request.tags} == {OWNER_LABEL: "true"} for c in listed)
    assert len(listed) >= 2
    assert await modal.attach(foreign.id) is None


async def test_a_sandbox_that_vanished_raises_sandbox_gone(
    served: tuple[ModalServer, ModalStandIn], modal: ModalProvider
) -> None:
    server, _ = served
    sandbox = await modal.create(SandboxSpec(image="debian:bookworm"))
    await anyio.to_thread.run_sync(server.vanish, sandbox.id)
    with pytest.raises(SandboxGoneError, match=sandbox.id):
        await sandbox.exec(["true"])
    with pytest.raises(SandboxGoneError):
        await sandbox.get_file("/etc/hostname")
    assert await modal.attach(sandbox.id) is None
    assert sandbox.id not in await modal.list_owned()
    await modal.destroy(sandbox.id)  # harmless
    await modal.destroy("sb-doesnotexist0000000000")


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (Status.RESOURCE_EXHAUSTED, r"limit was reached .*wait, or raise the limit"),
        (Status.PERMISSION_DENIED, r"permission denied .*token of the workspace"),
        (Status.INVALID_ARGUMENT, r"rejected as invalid .*fix the sandbox settings"),
    ],
)
async def test_a_refused_create_is_a_clear_error_naming_the_fix(
    served: tuple[ModalServer, ModalStandIn], modal: ModalProvider, status: Status, expected: str
) -> None:
    _, stand_in = served
    stand_in.refuse["SandboxCreateV2"] = (status, "the stand-in says no")
    with pytest.raises(ProviderError, match=expected) as caught:
        await modal.create(SandboxSpec(image="debian:bookworm"))
    assert "the stand-in says no" in str(caught.value)
    assert not isinstance(caught.value, SandboxGoneError)
    assert stand_in.sandboxes == {}


async def test_a_create_that_fails_after_the_sandbox_exists_terminates_it(
    served: tuple[ModalServer, ModalStandIn], modal: ModalProvider
) -> None:
    _, stand_in = served
    stand_in.refuse["TaskExecStart"] = (Status.PERMISSION_DENIED, "exec refused")  # the workdir setup fails
    with pytest.raises(ProviderError, match="exec refused"):
        await modal.create(SandboxSpec(image="debian:bookworm"))
    assert await modal.list_owned() == []
    assert [s.running for s in stand_in.sandboxes.values()] == [False]
    assert len(stand_in.calls_of("SandboxTerminateV2")) == 1


# -- settings and import ------------------------------------------------------------------------


def test_settings_are_validated_naming_the_field() -> None:
    with pytest.raises(InvalidInputError, match=r"providers\.modal\.timeout_s"):
        ModalProvider.from_settings({"timeout_s": 5})
    with pytest.raises(InvalidInputError, match=r"providers\.modal\.api_key"):
        ModalProvider.from_settings({"api_key": "x"})


def test_building_the_provider_does_not_import_the_sdk() -> None:
    script = (
        "import sys\n"
        "from mcp_sandboxes.providers.registry import build_provider\n"
        "build_provider('modal', {'token_id': 'ak-x', 'token_secret': 'as-y'})\n"
        "assert 'modal' not in sys.modules and 'grpclib' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


async def test_apple_is_unavailable_off_macos_with_the_reason() -> None:
    provider = build_provider("apple", {})
    availability = await provider.check()
    assert not availability.available
    assert "macOS" in (availability.reason or "")
    await provider.aclose()
