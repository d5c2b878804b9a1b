"""Each room of the package (orchestrator, server, store, providers, backends) has a public
surface, its `__all__`; the other rooms use nothing else of it. A name a room needs from another
is added to that room's `__all__` on purpose, not reached for in passing.

The ground floor (events.py, specs.py, errors.py, redaction.py) sits under every room: any room
imports it freely, and it imports no module of the package but the ground floor's own.

Scanned: every module of mcp_sandboxes (the rooms and the top-level modules such as cli.py and
doctor.py), with `ast`, imports inside functions included. Not scanned: tests, bench and
examples, which may reach into a room to test or measure it."""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

PACKAGE = "mcp_sandboxes"
ROOMS = ("orchestrator", "server", "store", "providers", "backends")
# The ground floor: modules every room may import (the shared vocabulary: events, specs, errors),
# because they import no room themselves, so an import of one never drags a room along.
GROUND_FLOOR = ("errors", "events", "redaction", "specs")


@dataclass(frozen=True)
class Violation:
    where: str  # file:line
    room: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what} (not in mcp_sandboxes.{self.room}.__all__)"


def room_of(module: str) -> str | None:
    """The room a dotted module name belongs to, e.g. mcp_sandboxes.providers.local.docker -> providers."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == PACKAGE and parts[1] in ROOMS:
        return parts[1]
    return None


def public_names(room: str) -> set[str]:
    exported = getattr(importlib.import_module(f"{PACKAGE}.{room}"), "__all__", None)
    assert exported is not None, f"mcp_sandboxes.{room} has no __all__"
    return set(exported)


def violations(source: str, own_room: str | None, where: str, surfaces: dict[str, set[str]]) -> list[Violation]:
    """Imports in `source` (a module of `own_room`, None outside the rooms) that use another
    room's names outside its `surfaces` entry."""
    found: list[Violation] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            room = room_of(node.module)
            if room is None or room == own_room:
                continue
            for alias in node.names:
                if alias.name not in surfaces[room]:
                    found.append(Violation(f"{where}:{node.lineno}", room, f"from {node.module} import {alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                room = room_of(alias.name)
                if room is not None and room != own_room:
                    # `import mcp_sandboxes.room.module` reaches every name of the module.
                    found.append(Violation(f"{where}:{node.lineno}", room, f"import {alias.name}"))
    # ast.walk goes breadth first: put them back in the order of the source.
    return sorted(found, key=lambda violation: int(violation.where.rsplit(":", 1)[1]))


def package_modules() -> list[tuple[Path, str | None]]:
    base = ROOT / PACKAGE
    modules: list[tuple[Path, str | None]] = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(base).parts
        modules.append((path, parts[0] if len(parts) > 1 else None))
    return modules


@pytest.fixture(scope="module")
def surfaces() -> dict[str, set[str]]:
    return {room: public_names(room) for room in ROOMS}


@pytest.mark.parametrize("room", ROOMS)
def test_each_rooms_all_names_only_things_that_exist_once(room: str) -> None:
    package: ModuleType = importlib.import_module(f"{PACKAGE}.{room}")
    exported = getattr(package, "__all__", None)
    assert isinstance(exported, list) and exported, f"mcp_sandboxes.{room} needs a non-empty __all__ list"
    assert all(isinstance(name, str) for name in exported)
    assert len(exported) == len(set(exported)), f"mcp_sandboxes.{room}.__all__ repeats a name"
    missing = [name for name in exported if not hasattr(package, name)]
    assert not missing, f"mcp_sandboxes.{room}.__all__ names what it does not define: {missing}"


def test_other_rooms_import_only_names_in_a_rooms_all(surfaces: dict[str, set[str]]) -> None:
    found: list[Violation] = []
    scanned = 0
    for path, own_room in package_modules():
        scanned += 1
        found += violations(path.read_text("utf-8"), own_room, str(path.relative_to(ROOT)), surfaces)
    assert scanned > 50, f"only {scanned} modules found under {ROOT / PACKAGE}"
    assert not found, "imports past a room's public surface; add the name to that room's __all__ (and its" + (
        " __init__) if it is meant to be public, or use one that is:\n" + "\n".join(map(str, found))
    )


def test_the_scan_catches_reaching_past_a_surface(surfaces: dict[str, set[str]]) -> None:
    source = (
        "from mcp_sandboxes.providers.base import SandboxSpec\n"  # public
        "from mcp_sandboxes.providers import Sandbox\n"  # public, through the package
        "from mcp_sandboxes.orchestrator.core import DESTROY_TIMEOUT_S\n"  # its own room: allowed
        "def lazy():\n"
        "    from mcp_sandboxes.providers.local.docker import DockerProvider\n"
        "import mcp_sandboxes.store.database\n"
        "from . import sibling\n"
    )
    found = violations(source, "orchestrator", "x.py", surfaces)
    assert [(v.room, v.what) for v in found] == [
        ("providers", "from mcp_sandboxes.providers.local.docker import DockerProvider"),
        ("store", "import mcp_sandboxes.store.database"),
    ]
    assert "x.py:5" in str(found[0])


def package_imports(source: str) -> list[str]:
    """The modules of mcp_sandboxes that `source` imports, imports inside functions included."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name == PACKAGE or name.startswith(f"{PACKAGE}.")]


@pytest.mark.parametrize("module", GROUND_FLOOR)
def test_the_ground_floor_imports_nothing_of_the_package_above_it(module: str) -> None:
    path = ROOT / PACKAGE / f"{module}.py"
    floor = {f"{PACKAGE}.{name}" for name in GROUND_FLOOR}
    upward = [name for name in package_imports(path.read_text("utf-8")) if name not in floor]
    assert not upward, f"mcp_sandboxes.{module} is ground floor and must import no room or top-level module: {upward}"


def test_the_shared_specs_are_defined_on_the_ground_floor_and_the_rooms_hand_on_the_same_classes() -> None:
    import mcp_sandboxes.backends as backends
    import mcp_sandboxes.providers as providers
    import mcp_sandboxes.specs as specs

    for name in ("SandboxSpec", "Mount", "ResourceLimits", "AgentSpec"):
        assert getattr(specs, name).__module__ == "mcp_sandboxes.specs", name
    for name in ("SandboxSpec", "Mount", "ResourceLimits", "NetworkMode"):
        assert getattr(providers, name) is getattr(specs, name), name
    assert backends.AgentSpec is specs.AgentSpec


def test_store_and_server_take_the_shared_specs_from_the_ground_floor() -> None:
    """store/ and server/ hold specs (sessions, environments) but need no backend or provider to
    do so: where they import a spec name, it comes from mcp_sandboxes.specs."""
    spec_names = {"AgentSpec", "SandboxSpec", "Mount", "ResourceLimits", "NetworkMode"}
    found: list[str] = []
    for path, room in package_modules():
        if room not in ("store", "server", "backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and room_of(node.module) in ("providers", "backends"):
                names = {alias.name for alias in node.names} & spec_names
                if names and room_of(node.module) != room:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {sorted(names)} from {node.module}")
    assert not found, "import these from mcp_sandboxes.specs:\n" + "\n".join(found)
