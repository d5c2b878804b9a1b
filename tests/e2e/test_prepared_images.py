"""Prepared images on the real Docker engine, through a real MCP client: an environment's setup
commands run once, into an image that every spawn (and every environment with the same recipe)
starts from; a failing recipe fails the environment, with the step and its tail, and leaves no
container behind.

Package installs cannot reach a registry here (the network is loopback only), so these recipes
are setup commands; the package managers' argv is tested in tests/orchestrator/test_preparation.py."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import BASE_IMAGE
from tests.e2e.harness import ToolCallError, docker_exec, docker_json, mcp_server, owned_containers, server_environment

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

# A random value per run of the command, and a line per run: three sandboxes that show the same
# value and one line saw the command run once. (Run at each spawn, as before, each would differ.)
MARK = "head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /opt/prepared-marker && echo run >> /opt/prepared-runs"
AGENT = ["sh", "-c", 'echo \'{"type":"agent.message","content":[{"type":"text","text":"ok"}]}\'', "sh", "{prompt}"]
PREPARE_BUDGET_S = 120.0


def _environment(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text(f'[backends.custom]\nargv = {json.dumps(AGENT)}\noutput = "jsonl"\n')
    env = server_environment(tmp_path / "data", "http://127.0.0.1:9", Path("/nonexistent"))
    env["MCP_SANDBOXES_CONFIG"] = str(config)
    return env


def _image_labels(image: str) -> dict[str, str]:
    return dict(docker_json("image", "inspect", image)[0]["Config"]["Labels"] or {})


def _remove_image(image: str) -> None:
    subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, timeout=60)


async def test_the_recipe_runs_once_and_every_spawn_and_same_recipe_environment_reuses_its_image(
    tmp_path: Path,
) -> None:
    # A recipe of its own (a fresh hash): no earlier run's image can stand in for this one.
    recipe = [MARK, f"echo {uuid.uuid4().hex} > /opt/recipe-id"]
    async with mcp_server("stdio", _environment(tmp_path)) as mcp:
        first = await mcp.call(
            "create_environment",
            {"name": "prep-a", "image": BASE_IMAGE, "network": "none", "setup_commands": recipe, "wait": True},
        )
        image = first["prepared_image"]
        try:
            assert first["state"] == "ready", first
            assert image.startswith("mcp-sandboxes/prepared:") and len(image.rpartition(":")[2]) == 16
            labels = _image_labels(image)
            assert labels["io.mcp-sandboxes.managed"] == "true"
            assert labels["io.mcp-sandboxes.recipe"] == image.rpartition(":")[2]

            # The same recipe in another environment: the image is there, nothing runs again.
            second = await mcp.call(
                "create_environment",
                {"name": "prep-b", "image": BASE_IMAGE, "network": "none", "setup_commands": recipe, "wait": True},
            )
            assert second["state"] == "ready" and second["prepared_image"] == image
            listed = {e["name"]: e for e in (await mcp.call("list_environments"))["environments"]}
            assert listed["prep-a"]["state"] == listed["prep-b"]["state"] == "ready"

            sandboxes: list[str] = []
            for environment in ("prep-a", "prep-a", "prep-b"):
                spawned = await mcp.call(
                    "spawn_agent", {"environment": environment, "backend": "custom", "prompt": "look"}
                )
                sandboxes.append(spawned["session"]["sandbox_id"])
            markers = {docker_exec(sandbox, "cat", "/opt/prepared-marker") for sandbox in sandboxes}
            runs = {docker_exec(sandbox, "cat", "/opt/prepared-runs") for sandbox in sandboxes}
            assert len(markers) == 1 and len(next(iter(markers))) == 16, markers
            assert runs == {"run\n"}, runs
            for sandbox in sandboxes:
                assert docker_json("inspect", sandbox)[0]["Config"]["Image"] == image
        finally:
            _remove_image(image)


async def test_a_failing_recipe_fails_the_environment_and_its_spawns_and_leaves_no_container(tmp_path: Path) -> None:
    before = owned_containers()
    async with mcp_server("stdio", _environment(tmp_path)) as mcp:
        failed = await mcp.call(
            "create_environment",
            {
                "name": "prep-bad",
                "image": BASE_IMAGE,
                "network": "none",
                "setup_commands": ["true", f"echo broken-{uuid.uuid4().hex[:6]} >&2; exit 3"],
                "wait": True,
            },
        )
        assert failed["state"] == "failed", failed
        assert failed["state_detail"].startswith("setup_commands[1]: exited with code 3: broken-"), failed
        with pytest.raises(ToolCallError) as caught:
            await mcp.call("spawn_agent", {"environment": "prep-bad", "backend": "custom", "prompt": "hi"})
        message = str(caught.value)
        for fragment in ("'prep-bad' failed to prepare", "setup_commands[1]", "broken-", "delete_environment"):
            assert fragment in message, message
        assert owned_containers() == before
        assert not await _exists("image", failed["prepared_image"])


async def test_a_preparation_cut_off_by_a_restart_starts_again_and_ends_ready(tmp_path: Path) -> None:
    # The command waits for a file the test puts into the preparation sandbox.
    recipe = [f"until [ -e /tmp/go ]; do sleep 0.05; done; echo {uuid.uuid4().hex} > /opt/resumed"]
    environ = _environment(tmp_path)
    async with mcp_server("stdio", environ) as mcp:
        view = await mcp.call(
            "create_environment", {"name": "prep-r", "image": BASE_IMAGE, "network": "none", "setup_commands": recipe}
        )
        assert view["state"] == "preparing", view
        preparing = f"mcp-sandboxes-prepare-{view['id']}"
        await _until_running(preparing)
    # The server stopped mid-way: its preparation sandbox went with it.
    assert not await _exists("container", preparing)
    image = view["prepared_image"]
    try:
        async with mcp_server("stdio", environ) as mcp:
            listed = (await mcp.call("list_environments"))["environments"]
            assert listed[0]["state"] == "preparing", listed
            await _until_running(preparing)
            docker_exec(preparing, "touch", "/tmp/go")
            ready: dict[str, Any] = await mcp.call(
                "create_environment",
                {"name": "prep-r2", "image": BASE_IMAGE, "network": "none", "setup_commands": recipe, "wait": True},
            )
            assert ready["state"] == "ready" and ready["prepared_image"] == image
            listed = (await mcp.call("list_environments"))["environments"]
            assert {e["state"] for e in listed} == {"ready"}, listed
    finally:
        _remove_image(image)


async def _until_running(container: str) -> None:
    with anyio.fail_after(PREPARE_BUDGET_S):
        while True:
            found = await anyio.run_process(["docker", "inspect", "-f", "{{.State.Running}}", container], check=False)
            if found.stdout.decode().strip() == "true":
                return
            await anyio.sleep(0.1)


async def _exists(kind: str, name: str) -> bool:
    return (await anyio.run_process(["docker", kind, "inspect", name], check=False)).returncode == 0


async def test_a_prepared_image_goes_with_the_last_environment_that_uses_it(tmp_path: Path) -> None:
    recipe = [f"echo {uuid.uuid4().hex} > /opt/recipe-id"]
    arguments = {"image": BASE_IMAGE, "network": "none", "setup_commands": recipe, "wait": True}
    async with mcp_server("stdio", _environment(tmp_path)) as mcp:
        first = await mcp.call("create_environment", {"name": "gc-a", **arguments})
        image = first["prepared_image"]
        try:
            await mcp.call("create_environment", {"name": "gc-b", **arguments})
            await mcp.call("delete_environment", {"environment": "gc-a"})
            assert await _exists("image", image), "removed while gc-b still uses it"
            await mcp.call("delete_environment", {"environment": "gc-b"})
            assert not await _exists("image", image)
        finally:
            _remove_image(image)
