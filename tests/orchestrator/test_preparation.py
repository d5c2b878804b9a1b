"""Prepared images, the parts that need no engine: package names are checked by field, each
manager's argv is built from them (never a shell string), the recipe hash changes with what goes
into the image, and a provider that cannot commit images refuses packages and says that its setup
commands run at each spawn. The real preparation runs in tests/e2e/test_prepared_images.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.orchestrator import EnvironmentRequest, Packages
from mcp_sandboxes.orchestrator.preparation import check_packages, prepared_tag, recipe_hash, recipe_steps
from mcp_sandboxes.specs import SandboxSpec
from tests.orchestrator.spine import orchestrator_of, spine_settings

pytestmark = pytest.mark.anyio


def test_plain_names_and_versions_pass_for_every_manager() -> None:
    check_packages(
        Packages(
            apt=["git", "ripgrep", "libssl3=3.0.15-1~deb12u1", "gcc:amd64", "g++"],
            pip=["requests", "ruff==0.6.9", "uvicorn[standard]>=0.30,<1", "zope.interface"],
            npm=["typescript", "@anthropic-ai/claude-code@2.1.3", "left-pad@^1.3.0"],
        )
    )


@pytest.mark.parametrize(
    ("packages", "field"),
    [
        (Packages(apt=["git", "--allow-unauthenticated"]), "packages.apt[1]"),
        (Packages(apt=["git; rm -rf /"]), "packages.apt[0]"),
        (Packages(apt=["$(id)"]), "packages.apt[0]"),
        (Packages(pip=["-e", "."]), "packages.pip[0]"),
        (Packages(pip=["git+https://example.com/x.git"]), "packages.pip[0]"),
        (Packages(pip=["requests", "../local.whl"]), "packages.pip[1]"),
        (Packages(pip=["a b"]), "packages.pip[0]"),
        (Packages(npm=["--prefix=/etc"]), "packages.npm[0]"),
        (Packages(npm=["evil`id`"]), "packages.npm[0]"),
        (Packages(npm=["file:/etc"]), "packages.npm[0]"),
        (Packages(apt=["x"] * 201), "packages.apt"),
    ],
)
def test_options_paths_urls_and_shell_text_are_refused_by_field(packages: Packages, field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_packages(packages)
    assert str(caught.value).startswith(f"{field}: "), str(caught.value)


def test_each_manager_gets_its_own_argv_then_the_setup_commands_in_order() -> None:
    steps = recipe_steps(
        Packages(apt=["git", "jq"], pip=["ruff==0.6.9"], npm=["typescript"]), ["make install", "echo done"]
    )
    assert [(step.label, step.argv) for step in steps] == [
        ("packages.apt (apt-get update)", ["apt-get", "update"]),
        ("packages.apt", ["apt-get", "install", "-y", "--no-install-recommends", "git", "jq"]),
        (
            "packages.pip",
            ["python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", "ruff==0.6.9"],
        ),
        ("packages.npm", ["npm", "install", "--global", "--no-fund", "--no-audit", "typescript"]),
        ("setup_commands[0]", ["sh", "-c", "make install"]),
        ("setup_commands[1]", ["sh", "-c", "echo done"]),
    ]
    assert steps[0].env == {"DEBIAN_FRONTEND": "noninteractive"}
    assert steps[2].env["PIP_BREAK_SYSTEM_PACKAGES"] == "1"
    assert recipe_steps(Packages(), []) == []


def test_the_recipe_hash_follows_everything_that_shapes_the_image() -> None:
    spec = SandboxSpec(image="base", env={"A": "1"})
    packages = Packages(apt=["git"])
    digest = recipe_hash("docker", "sha256:1", spec, packages, ["true"])
    assert digest == recipe_hash("docker", "sha256:1", spec.model_copy(), Packages(apt=["git"]), ["true"])
    others = {
        recipe_hash("podman", "sha256:1", spec, packages, ["true"]),
        recipe_hash("docker", "sha256:2", spec, packages, ["true"]),
        recipe_hash("docker", "sha256:1", spec.model_copy(update={"env": {"A": "2"}}), packages, ["true"]),
        recipe_hash("docker", "sha256:1", spec.model_copy(update={"workdir": "/src"}), packages, ["true"]),
        recipe_hash("docker", "sha256:1", spec, Packages(apt=["git", "jq"]), ["true"]),
        recipe_hash("docker", "sha256:1", spec, packages, ["true", "true"]),
    }
    assert digest not in others and len(others) == 6
    # What the spawn-time network or limits are does not change the image.
    assert digest == recipe_hash("docker", "sha256:1", spec.model_copy(update={"network": "host"}), packages, ["true"])
    assert prepared_tag(digest) == f"mcp-sandboxes/prepared:{digest[:16]}"


async def test_a_provider_that_cannot_commit_refuses_packages_and_runs_setup_at_each_spawn(tmp_path: Path) -> None:
    orchestrator = orchestrator_of(spine_settings(tmp_path))
    async with orchestrator.running():
        with pytest.raises(InvalidInputError) as caught:
            await orchestrator.create_environment(
                EnvironmentRequest(name="pk", provider="process", image="host", packages=Packages(pip=["requests"]))
            )
        assert str(caught.value).startswith("packages: the process provider cannot save prepared images")
        with pytest.raises(InvalidInputError) as caught:
            await orchestrator.create_environment(
                EnvironmentRequest(name="pk", provider="process", image="host", packages=Packages(pip=["-r", "x"]))
            )
        assert str(caught.value).startswith("packages.pip[0]: ")
        view = await orchestrator.create_environment(
            EnvironmentRequest(name="setup", provider="process", image="host", setup_commands=["true"])
        )
        assert view.state == "ready" and view.prepared_image is None
        assert view.state_detail == "setup runs at each spawn: process cannot commit images"
        assert [e.name for e in await orchestrator.list_environments()] == ["setup"]
