"""The package without the repository: a wheel built from the tracked files, installed into a
fresh venv outside the checkout, runs `mcp-sandboxes --version` and `images build`, carries the
images' build contexts (the same bytes as configs/images and tools/agent-clis), the web view's
static files and the LICENSE, and names the [modal] extra when the Modal provider is asked for
without it. The images are built from the wheel only when they are missing (a full build takes
minutes; see docs/web-view.md for the measured time); existing images are never removed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import BASE_IMAGE, ROOT

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 120
BUILD_TIMEOUT_S = 1800
CONTEXTS = {
    "_images/base/Dockerfile": ROOT / "configs/images/base/Dockerfile",
    "_images/agent/Dockerfile": ROOT / "configs/images/agent/Dockerfile",
    "_images/agent-clis/package.json": ROOT / "tools/agent-clis/package.json",
    "_images/agent-clis/package-lock.json": ROOT / "tools/agent-clis/package-lock.json",
}


def run(argv: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    # Nothing of the checkout may leak in: no PYTHONPATH, a working directory outside it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MCP_SANDBOXES_", "VIRTUAL_ENV"))}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv's bin directory, with the wheel of the tracked files installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    # The working tree as it is (tracked and new files, not the ignored ones): what a release
    # would be built from.
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=RUN_TIMEOUT_S,
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        origin = ROOT / name.decode()
        if not origin.exists() and not origin.is_symlink():
            continue  # deleted in the working tree, not yet committed
        target = source / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        else:
            shutil.copy2(origin, target)
    # Offline too: no build isolation (it would fetch setuptools), the project venv's setuptools.
    wheel_args = [
        "wheel",
        str(source),
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "-q",
        "-w",
        str(work / "dist"),
    ]
    built = run([sys.executable, "-m", "pip", *wheel_args], work)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("mcp_sandboxes-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for inside, original in CONTEXTS.items():
            assert f"mcp_sandboxes/{inside}" in names
            # Links in the checkout, plain files in the wheel: the same bytes.
            assert archive.read(f"mcp_sandboxes/{inside}") == original.read_bytes()
        assert {f"mcp_sandboxes/server/static/{n}" for n in ("index.html", "session.html", "app.js")} <= names
        # setuptools puts it in the dist-info (under licenses/ from version 77 on)
        assert any(".dist-info/" in n and n.endswith("/LICENSE") for n in names)
    venv = work / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], work)
    assert made.returncode == 0, made.stderr
    # Offline (tests reach loopback only): the wheel alone, its dependencies borrowed from the
    # project's own venv, minus the package itself and the optional modal extra.
    install = run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)], work, INSTALL_TIMEOUT_S
    )
    assert install.returncode == 0, install.stderr[-3000:]
    borrowed = work / "dependencies"
    borrowed.mkdir()
    project_site = Path(next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p))
    for entry in project_site.iterdir():
        lowered = entry.name.lower()
        if lowered.endswith(".pth") or lowered.startswith(("mcp_sandboxes", "__editable__", "modal", "_modal")):
            continue
        (borrowed / entry.name).symlink_to(entry)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "borrowed-dependencies.pth").write_text(f"{borrowed}\n")
    return venv / "bin"


def test_the_installed_command_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    version = run([str(installed / "mcp-sandboxes"), "--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == "mcp-sandboxes 0.1.0"
    helped = run([str(installed / "mcp-sandboxes"), "images", "build", "--help"], tmp_path)
    assert helped.returncode == 0 and "--force" in helped.stdout and "--only" in helped.stdout
    where = run([str(installed / "python"), "-c", "import mcp_sandboxes; print(mcp_sandboxes.__file__)"], tmp_path)
    assert where.stdout.startswith(str(installed.parent)), where.stdout  # not the checkout


def test_the_images_build_from_the_wheel_s_own_files(installed: Path, tmp_path: Path) -> None:
    command = [str(installed / "mcp-sandboxes"), "images", "build"]
    plan = run([*command, "--dry-run"], tmp_path)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    contexts = plan.stdout.split("build contexts:", 1)[1].split()[0]
    assert contexts.startswith(str(installed.parent)) and contexts.endswith("mcp_sandboxes/_images")
    for inside, original in CONTEXTS.items():
        shipped = Path(contexts) / inside.removeprefix("_images/")
        assert not shipped.is_symlink()
        assert hashlib.sha256(shipped.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest()
    if "keep (exists" in plan.stdout.split("base", 1)[1].splitlines()[0]:
        return  # the project's images are here already; never rebuilt or removed by a test
    built = run([*command, "--only", "debian", "--only", "base"], tmp_path, BUILD_TIMEOUT_S)
    assert built.returncode == 0, built.stdout[-3000:]
    inspect = run(["docker", "image", "inspect", BASE_IMAGE], tmp_path)
    assert inspect.returncode == 0


def test_the_modal_provider_names_its_extra_when_modal_is_missing(installed: Path, tmp_path: Path) -> None:
    script = (
        "from mcp_sandboxes.providers.registry import build_provider\n"
        "try:\n    build_provider('modal', {})\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    missing = run([str(installed / "python"), "-c", "import modal"], tmp_path)
    assert missing.returncode != 0  # the wheel does not pull modal in
    refused = run([str(installed / "python"), "-c", script], tmp_path)
    assert refused.stdout.startswith("ProviderUnavailableError")
    assert "pip install 'mcp-sandboxes[modal]'" in refused.stdout


async def test_the_installed_server_runs_a_claude_code_session_end_to_end(installed: Path, tmp_path: Path) -> None:
    """The wheel's own `mcp-sandboxes serve` (stdio), a real MCP client, the real Claude Code in
    Docker against the scripted model: the installed package does the whole job."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    from tests.conftest import CLAUDE_BIN
    from tests.e2e.harness import McpSession, server_environment
    from tests.support.model_server import Reply, Script, ScriptedModelServer

    with ScriptedModelServer(Script(fallback=Reply(text="FROM-THE-WHEEL"))) as model:
        environment = server_environment(tmp_path / "data", model.url, CLAUDE_BIN)
        environment.pop("PYTHONPATH")  # nothing of the checkout
        params = StdioServerParameters(
            command=str(installed / "mcp-sandboxes"),
            args=["serve", "--transport", "stdio"],
            env=environment,
            cwd=str(tmp_path),
        )
        async with Client(params) as client:
            mcp = McpSession(client, "stdio")
            await mcp.call("create_environment", {"name": "wheel", "image": BASE_IMAGE, "network": "host"})
            outcome = await mcp.call("spawn_agent", {"environment": "wheel", "prompt": "hello", "wait": True})
            assert outcome["completed"] and outcome["final_message"] == "FROM-THE-WHEEL", outcome
            await mcp.call("stop_session", {"session_id": outcome["session"]["session_id"]})
