"""The labels a provider stores with each sandbox it creates.

Every sandbox carries OWNER_LABEL (so `list_owned` finds ours and nothing else) and, when
it has a name, SANDBOX_NAME_LABEL. Vendors whose API keeps nothing else about a sandbox
(Fly, Vercel) also keep its workdir and user there, so `attach` after a restart runs
commands where and as `create` did.
"""

from __future__ import annotations

from mcp_sandboxes.providers.base import OWNER_LABEL, SANDBOX_NAME_LABEL, SandboxSpec

WORKDIR_LABEL = "io.mcp-sandboxes.workdir"
USER_LABEL = "io.mcp-sandboxes.user"


def owner_labels(spec: SandboxSpec, default_name: str | None = None) -> dict[str, str]:
    """spec.labels plus ours; the name label is spec.name, else `default_name`, else absent."""
    labels = {**spec.labels, OWNER_LABEL: "true"}
    name = spec.name or default_name
    if name:
        labels[SANDBOX_NAME_LABEL] = name
    return labels


def restorable_labels(spec: SandboxSpec, default_name: str) -> dict[str, str]:
    """`owner_labels` plus the workdir and user that `attach` restores."""
    labels = {**owner_labels(spec, default_name), WORKDIR_LABEL: spec.workdir}
    if spec.user:
        labels[USER_LABEL] = spec.user
    return labels
