"""Conformance targets: one module per provider, each defining `TARGETS: list[ConformanceTarget]`.

To run the provider conformance suite against a new provider, add
`tests/providers/targets/<name>.py` with a module-level `TARGETS` list; nothing else needs
to change. `discover_targets()` imports every module in this package and collects them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from mcp_sandboxes.providers.base import Provider, SandboxSpec

LIMIT_NAMES = frozenset({"memory", "cpus", "pids"})


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class ConformanceTarget:
    """One provider configuration the conformance suite runs against.

    name: the pytest id.
    open_provider: yields a ready provider (may start helper servers, e.g. a fake cloud API).
    spec: what create() gets (image etc.).
    enforces: the subset of {"memory", "cpus", "pids"} the engine enforces; each is proven.
    available: returns a reason string when the target cannot run on this machine.
    """

    name: str
    open_provider: Callable[[], AbstractAsyncContextManager[Provider]]
    spec: SandboxSpec
    enforces: frozenset[str] = frozenset()
    available: Callable[[], str | None] = _always_available

    def __post_init__(self) -> None:
        unknown = self.enforces - LIMIT_NAMES
        if unknown:
            raise ValueError(
                f"target {self.name}: enforces has unknown limits {sorted(unknown)}; allowed: {sorted(LIMIT_NAMES)}"
            )


def _broken_module(module_name: str, error: BaseException) -> ConformanceTarget:
    """A target module that fails to import becomes a target whose every test fails with the
    import error, so one broken module neither hides itself nor breaks the other targets."""

    @asynccontextmanager
    async def open_provider() -> AsyncIterator[Provider]:
        raise RuntimeError(f"{module_name} failed to import: {error!r}") from error
        yield  # pragma: no cover - makes this an async generator

    return ConformanceTarget(
        name=f"{module_name.rsplit('.', 1)[-1]}-import-error",
        open_provider=open_provider,
        spec=SandboxSpec(image="unused"),
    )


def discover_targets() -> list[ConformanceTarget]:
    targets: list[ConformanceTarget] = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if module_info.name.startswith("_"):
            continue
        module_name = f"{__name__}.{module_info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            targets.append(_broken_module(module_name, exc))
            continue
        found = getattr(module, "TARGETS", None)
        if not isinstance(found, list) or not all(isinstance(t, ConformanceTarget) for t in found):
            targets.append(_broken_module(module_name, TypeError("TARGETS must be a list[ConformanceTarget]")))
            continue
        targets.extend(found)
    names = [target.name for target in targets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"conformance target names must be unique; duplicated: {duplicates}")
    return targets
