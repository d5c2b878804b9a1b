"""Providers registered by name. Each is imported only when first used, so a missing
optional dependency of one provider never breaks the others."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import Provider

# name -> "module:factory". A factory takes the provider's settings dict and returns a Provider.
_FACTORIES: dict[str, str] = {
    "docker": "mcp_sandboxes.providers.local.docker:DockerProvider.from_settings",
    "podman": "mcp_sandboxes.providers.local.podman:PodmanProvider.from_settings",
    "containerd": "mcp_sandboxes.providers.local.containerd:ContainerdProvider.from_settings",
    "bubblewrap": "mcp_sandboxes.providers.local.bubblewrap:BubblewrapProvider.from_settings",
    "process": "mcp_sandboxes.providers.local.process:ProcessProvider.from_settings",
    "fly": "mcp_sandboxes.providers.remote.fly:FlyProvider.from_settings",
    "vercel": "mcp_sandboxes.providers.remote.vercel:VercelProvider.from_settings",
    "sprites": "mcp_sandboxes.providers.remote.sprites:SpritesProvider.from_settings",
    "e2b": "mcp_sandboxes.providers.remote.e2b:E2BProvider.from_settings",
    "daytona": "mcp_sandboxes.providers.remote.daytona:DaytonaProvider.from_settings",
    "modal": "mcp_sandboxes.providers.remote.modal:ModalProvider.from_settings",
    "apple": "mcp_sandboxes.providers.remote.apple:AppleContainerProvider.from_settings",
    "kubernetes": "mcp_sandboxes.providers.remote.kubernetes:KubernetesProvider.from_settings",
}


def register(name: str, target: str) -> None:
    _FACTORIES[name] = target


def provider_names() -> list[str]:
    return sorted(_FACTORIES)


def _resolve(target: str) -> Callable[[dict[str, Any]], Provider]:
    module_name, _, attr_path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    factory: Callable[[dict[str, Any]], Provider] = obj
    return factory


def build_provider(name: str, settings: dict[str, Any]) -> Provider:
    if name not in _FACTORIES:
        raise InvalidInputError("provider", f"unknown provider {name!r}; use one of: {', '.join(provider_names())}")
    return _resolve(_FACTORIES[name])(settings)
