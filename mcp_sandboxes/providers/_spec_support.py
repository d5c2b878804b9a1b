"""Refusals for SandboxSpec options a provider cannot honour, worded the same everywhere."""

from __future__ import annotations

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import SandboxSpec


def refuse_unsupported(
    spec: SandboxSpec, provider: str, *, read_only_root: bool = False, runtime: bool = False
) -> None:
    """Raise for an option `spec` asks for that `provider` does not support (the keyword
    arguments say which it does); a silently ignored hardening option would be a lie."""
    if spec.runtime is not None and not runtime:
        raise InvalidInputError(
            "runtime",
            f"the {provider} provider cannot choose an OCI runtime; remove it, or use the docker or containerd"
            " provider",
        )
    if spec.read_only_root and not read_only_root:
        raise InvalidInputError(
            "read_only_root",
            f"the {provider} provider cannot make the root filesystem read-only; remove it,"
            " or use the docker, podman or containerd provider",
        )
