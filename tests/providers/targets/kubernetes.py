"""Kubernetes against its loopback stand-in (tests/contract_servers/kubernetes.py): the real provider
code, the published API paths and the v5.channel.k8s.io exec protocol, real commands behind it.

With MCP_SANDBOXES_K8S_KUBECONFIG naming a kubeconfig, the same target runs against that cluster
instead (MCP_SANDBOXES_K8S_CONTEXT, MCP_SANDBOXES_K8S_NAMESPACE and MCP_SANDBOXES_K8S_IMAGE,
default busybox:1.36, choose where and what); the cluster's pods need /bin/sh.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

from mcp_sandboxes.providers.base import Provider, SandboxSpec
from mcp_sandboxes.providers.remote.kubernetes import KubernetesProvider
from tests.contract_servers.kubernetes import kubeconfig_text, kubernetes_server
from tests.contract_servers.sandbox_host import bwrap_available
from tests.providers.targets import ConformanceTarget

TOKEN = "k8s-token-" + "0123456789abcdef" * 2
REAL_KUBECONFIG = os.environ.get("MCP_SANDBOXES_K8S_KUBECONFIG")


@asynccontextmanager
async def open_kubernetes() -> AsyncIterator[Provider]:
    if REAL_KUBECONFIG:
        settings = {
            "kubeconfig": REAL_KUBECONFIG,
            "context": os.environ.get("MCP_SANDBOXES_K8S_CONTEXT") or None,
            "namespace": os.environ.get("MCP_SANDBOXES_K8S_NAMESPACE") or "default",
        }
        async with aclosing(KubernetesProvider(settings)) as provider:
            yield provider
        return
    async with kubernetes_server(TOKEN) as (server, _stand_in):
        with tempfile.TemporaryDirectory(prefix="mcp-sbx-kubeconfig-") as directory:
            path = Path(directory) / "config"
            path.write_text(kubeconfig_text(server.url, TOKEN))
            async with aclosing(KubernetesProvider({"kubeconfig": str(path)})) as provider:
                yield provider


TARGETS = [
    ConformanceTarget(
        name="kubernetes",
        open_provider=open_kubernetes,
        spec=SandboxSpec(
            image=os.environ.get("MCP_SANDBOXES_K8S_IMAGE", "busybox:1.36") if REAL_KUBECONFIG else "busybox"
        ),
        available=(lambda: None) if REAL_KUBECONFIG else bwrap_available,
    )
]
