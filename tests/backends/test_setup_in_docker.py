"""Every backend's `setup()` applied by the orchestrator's `apply_setup` in a real container, as
a spawn does it: the sandbox user `agent`, a HOME that does not exist yet under the root-owned
/home (so root must make it and hand it over), and for Gemini a root-only settings file the
image already holds, which is merged into rather than overwritten."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Any

import anyio
import pytest

from mcp_sandboxes.backends.base import Backend
from mcp_sandboxes.backends.custom import CustomBackend
from mcp_sandboxes.backends.registry import backend_names, build_backend
from mcp_sandboxes.config import BackendSettings, load_settings
from mcp_sandboxes.orchestrator.setup import apply_setup
from mcp_sandboxes.providers.base import Sandbox
from mcp_sandboxes.providers.local.docker import DockerProvider
from mcp_sandboxes.specs import AgentSpec, JsonMerge, SandboxSpec, WriteFile
from tests.conftest import BASE_IMAGE

STEP_S = 60.0
USER = "agent"
SERVERS: dict[str, Any] = {"calc": {"command": "calc-server", "env": {"TOKEN": "t"}}}


def backend_of(name: str) -> Backend:
    if name == "custom":
        return CustomBackend.from_settings(BackendSettings.model_validate({"argv": ["my-agent", "{prompt}"]}), {})
    settings = load_settings(None, environ={}).backend(name)
    if name == "factory":  # its settings file is written only when there are droid settings
        settings = BackendSettings.model_validate({**settings.model_dump(), "droid_settings": {"customModels": []}})
    return build_backend(name, settings, {})


@pytest.fixture
async def sandbox(docker_available: None) -> AsyncIterator[Sandbox]:
    provider = DockerProvider.from_settings({})
    try:
        with anyio.fail_after(STEP_S):
            created = await provider.create(SandboxSpec(image=BASE_IMAGE, user=USER))
        try:
            yield created
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(STEP_S):
                await provider.destroy(created.id)
    finally:
        await provider.aclose()


async def owners_and_modes(sandbox: Sandbox, paths: list[str]) -> dict[str, tuple[str, int]]:
    result = await sandbox.exec(["stat", "-c", "%n %U %a", *paths], user="0")
    assert result.ok, result.stderr
    found: dict[str, tuple[str, int]] = {}
    for line in result.stdout.decode().splitlines():
        path, owner, mode = line.rsplit(" ", 2)
        found[path] = (owner, int(mode, 8))
    return found


async def test_every_backends_setup_gives_the_sandbox_user_its_home_directories_and_private_files(
    sandbox: Sandbox,
) -> None:
    assert set(backend_names()) == {"claude", "codex", "gemini", "opencode", "factory", "custom"}
    agent_of = {"custom": "custom"}
    for name in backend_names():
        backend = backend_of(name)
        home = f"/home/{name}-agent"
        agent = AgentSpec(backend=agent_of.get(name, name), mcp_servers=SERVERS, system_prompt="SYS", max_turns=3)
        setup = backend.setup(agent, home=home)
        assert setup.backend == name and setup.home == home
        with anyio.fail_after(STEP_S):
            for _ in range(2):  # idempotent
                await apply_setup(sandbox, setup, user=USER)
        found = await owners_and_modes(sandbox, [home, *setup.directories, *(file.path for file in setup.files)])
        for path in [home, *setup.directories]:
            assert found[path][0] == USER, (name, path, found[path])
        for file in setup.files:
            assert found[file.path] == (USER, file.mode), (name, file.path)
            content = await sandbox.get_file(file.path)
            if isinstance(file, WriteFile):
                assert content == file.data, (name, file.path)
            else:
                assert json.loads(content) == file.document, (name, file.path)
        assert any(file.mode == 0o600 for file in setup.files), f"{name} writes no private config"


async def test_gemini_merges_into_a_root_only_settings_file_the_image_holds(sandbox: Sandbox) -> None:
    home = "/home/gemini-image"
    settings = str(PurePosixPath(home) / ".gemini" / "settings.json")
    image_settings = {"ui": {"theme": "Dracula"}, "mcpServers": {"calc": {"url": "http://127.0.0.1:9/sse", "x": 1}}}
    script = 'mkdir -p "$(dirname "$1")" && printf "%s" "$2" > "$1" && chmod 600 "$1"'
    made = await sandbox.exec(["sh", "-c", script, "sh", settings, json.dumps(image_settings)], user="0")
    assert made.ok, made.stderr
    unreadable = await sandbox.exec(["cat", settings], user=USER)
    assert not unreadable.ok  # the user alone could not have read it to merge

    setup = backend_of("gemini").setup(AgentSpec(backend="gemini", mcp_servers=SERVERS), home=home)
    [merge] = [file for file in setup.files if isinstance(file, JsonMerge)]
    assert merge.path == settings
    with anyio.fail_after(STEP_S):
        await apply_setup(sandbox, setup, user=USER)
    document = json.loads(await sandbox.get_file(settings))
    assert document["ui"] == {"theme": "Dracula"}
    assert document["mcpServers"] == SERVERS  # ours whole: no `url` of the image's beside our command
    assert document["security"]["auth"]["selectedType"] == "gemini-api-key"
    assert (await owners_and_modes(sandbox, [settings]))[settings] == (USER, 0o600)
