"""The host's CLI installations as sandboxes get them (npm trees made by the test with real ELF
files), the per-turn launcher (image first, run by a real /bin/sh), which providers get our
mounts, and the API-key check before a spawn (in process, on a real Orchestrator)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.backends.base import AgentSpec, Turn
from mcp_sandboxes.backends.registry import build_backend
from mcp_sandboxes.config import BackendSettings, load_settings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.orchestrator.clis import (
    TOOLS_BIN,
    TOOLS_DIR,
    HostCliBackend,
    check_api_key,
    elf_interpreter,
    find_host_cli,
    mounts_for,
    with_host_cli,
)
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.specs import Mount
from tests.orchestrator.spine import orchestrator_of, spine_settings

DYNAMIC_ELF = Path("/usr/bin/true")  # glibc: it names /lib64/ld-linux-x86-64.so.2
STATIC_ELF = Path("/bin/busybox")  # Debian's busybox-static


def _file(path: Path, source: Path | None = None, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copyfile(source, path)
    else:
        path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _bin_link(modules: Path, name: str, target: str) -> Path:
    link = modules / ".bin" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return modules / ".bin"


def test_a_native_cli_is_found_through_npm_s_bin_link_and_mounted_as_the_real_file(tmp_path: Path) -> None:
    modules = tmp_path / "node_modules"
    binary = _file(modules / "@anthropic-ai/claude-code/bin/claude.exe", DYNAMIC_ELF)
    _file(modules / "@anthropic-ai/claude-code/package.json", text="{}")
    search = (tmp_path / "empty", _bin_link(modules, "claude", "../@anthropic-ai/claude-code/bin/claude.exe"))

    cli = find_host_cli("claude", search)

    assert cli is not None and cli.kind == "binary"
    assert cli.mounts == (Mount(source=str(binary.resolve()), target=f"{TOOLS_BIN}/claude", read_only=True),)
    assert cli.launch == (f"{TOOLS_BIN}/claude",)
    assert cli.interpreter == "/lib64/ld-linux-x86-64.so.2"


def test_codex_s_node_launcher_leads_to_its_static_native_binary_and_its_helper_directory(tmp_path: Path) -> None:
    modules = tmp_path / "node_modules"
    _file(modules / "@openai/codex/bin/codex.js", text="#!/usr/bin/env node\n")
    _file(modules / "@openai/codex/package.json", text="{}")
    platform_dir = modules / "@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl"
    _file(platform_dir / "bin/codex", STATIC_ELF)
    _file(platform_dir / "codex-path/rg", STATIC_ELF)

    cli = find_host_cli("codex", (_bin_link(modules, "codex", "../@openai/codex/bin/codex.js"),))

    assert cli is not None and cli.kind == "binary" and cli.interpreter is None
    assert cli.mounts == (Mount(source=str(platform_dir.resolve()), target=f"{TOOLS_DIR}/codex"),)
    assert cli.launch == (f"{TOOLS_DIR}/codex/bin/codex",)


def test_a_node_script_cli_brings_its_package_and_the_host_s_node(tmp_path: Path) -> None:
    modules = tmp_path / "node_modules"
    _file(modules / "@google/gemini-cli/bundle/gemini.js", text="#!/usr/bin/env node\n")
    _file(modules / "@google/gemini-cli/package.json", text=json.dumps({"name": "@google/gemini-cli"}))

    cli = find_host_cli("gemini", (_bin_link(modules, "gemini", "../@google/gemini-cli/bundle/gemini.js"),))

    node = shutil.which("node")
    assert node is not None, "the test machine has node (scripts/setup.sh installs it)"
    assert cli is not None and cli.kind == "node"
    assert cli.launch == ("node", f"{TOOLS_DIR}/gemini-cli/bundle/gemini.js")
    assert Mount(source=str((modules / "@google/gemini-cli").resolve()), target=f"{TOOLS_DIR}/gemini-cli") in cli.mounts
    assert Mount(source=str(Path(node).resolve()), target=f"{TOOLS_BIN}/node") in cli.mounts


def test_no_installation_or_a_configured_cli_path_leaves_the_backend_as_it_is(tmp_path: Path) -> None:
    assert find_host_cli("claude", (tmp_path,)) is None
    plain = build_backend("claude", BackendSettings(), {})
    assert with_host_cli(plain, BackendSettings(), (tmp_path,)) is plain
    configured = BackendSettings(cli_path=str(DYNAMIC_ELF))
    assert with_host_cli(plain, configured, (tmp_path,)) is plain


def test_elf_interpreters_are_read_from_the_program_headers(tmp_path: Path) -> None:
    assert elf_interpreter(DYNAMIC_ELF) == "/lib64/ld-linux-x86-64.so.2"
    assert elf_interpreter(STATIC_ELF) == ""
    assert elf_interpreter(_file(tmp_path / "script", text="#!/bin/sh\n")) is None


async def test_each_turn_runs_the_image_s_own_cli_first_and_ours_only_without_one(tmp_path: Path) -> None:
    modules = tmp_path / "node_modules"
    _file(modules / "@anthropic-ai/claude-code/bin/claude.exe", DYNAMIC_ELF)
    backend = with_host_cli(
        build_backend("claude", BackendSettings(), {}),
        BackendSettings(),
        (_bin_link(modules, "claude", "../@anthropic-ai/claude-code/bin/claude.exe"),),
    )
    assert isinstance(backend, HostCliBackend)
    turn = Turn(session_id="s", index=0, prompt="hi", agent=AgentSpec(backend="claude"))
    argv = backend.command(turn).argv
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3] == "claude"
    # An "image" whose PATH has its own claude: the launcher runs that one, with the arguments.
    image_bin = tmp_path / "image-bin"
    _file(image_bin / "claude", text='#!/bin/sh\necho "image claude $*"\n')
    ran = await anyio.run_process(argv, env={"PATH": f"{image_bin}:/usr/bin:/bin"}, check=False)
    assert ran.stdout.decode().startswith("image claude -p --output-format stream-json"), ran
    # Without one, it goes for ours (not mounted on this host, so the shell says which path).
    ran = await anyio.run_process(argv, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert ran.returncode == 127 and f"{TOOLS_BIN}/claude" in ran.stderr.decode(), ran


def test_only_providers_that_mount_host_paths_get_our_cli_mounts() -> None:
    ours = Mount(source="/x/claude", target=f"{TOOLS_BIN}/claude")
    configured = Mount(source="/x/claude", target="/usr/local/bin/claude")
    assert mounts_for("docker", [configured, ours]) == [configured, ours]
    assert mounts_for("bubblewrap", [ours]) == [ours]
    assert mounts_for("e2b", [configured, ours]) == [configured]


def test_a_missing_api_key_names_the_variables_and_where_they_go() -> None:
    claude = load_settings(environ={}).backend("claude")
    with pytest.raises(InvalidInputError) as refused:
        check_api_key("claude", claude, {})
    assert str(refused.value) == (
        "backend: backend claude: no API key: set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN in the server's"
        " environment (it is passed to the CLI through backends.claude.pass_env)"
    )
    check_api_key("claude", claude, {"ANTHROPIC_AUTH_TOKEN": "t"})
    check_api_key("claude", claude.model_copy(update={"env": {"ANTHROPIC_API_KEY": "k"}}), {})
    check_api_key("custom", load_settings(environ={}).backend("custom"), {})
    factory = BackendSettings.model_validate({"api_key_env": ["FACTORY_API_KEY"]})
    with pytest.raises(InvalidInputError, match="set FACTORY_API_KEY in the server's environment"):
        check_api_key("factory", factory, {})
    byok = BackendSettings.model_validate(
        {"api_key_env": ["FACTORY_API_KEY"], "droid_settings": {"customModels": [{"model": "m"}]}}
    )
    check_api_key("factory", byok, {})


async def test_spawn_refuses_up_front_when_the_server_has_no_api_key(tmp_path: Path) -> None:
    async with orchestrator_of(spine_settings(tmp_path)).running() as orchestrator:
        await orchestrator.create_environment(EnvironmentRequest(name="host", provider="process", image="host"))
        with pytest.raises(InvalidInputError, match="set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN in the server"):
            await orchestrator.spawn_agent(environment="host", agent=AgentSpec(backend="claude"), prompt="hi")
        assert await orchestrator.list_sessions() == []
