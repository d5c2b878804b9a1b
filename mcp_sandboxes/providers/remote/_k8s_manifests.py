"""What the kubernetes provider sends to the API server, built from a SandboxSpec: pure data.

Followed (kubernetes-sigs/agent-sandbox, api/v1beta1/sandbox_types.go and
extensions/api/v1beta1/sandboxclaim_types.go; the Kubernetes core/v1 Pod and
networking.k8s.io/v1 NetworkPolicy references):
- `Sandbox` (agents.x-k8s.io/v1beta1): spec.podTemplate {metadata {labels, annotations}, spec
  <PodSpec>}; status.conditions[type=Ready]; the pod is named like the Sandbox unless the
  annotation `agents.x-k8s.io/pod-name` names an adopted warm-pool pod.
- `SandboxClaim` (extensions.agents.x-k8s.io/v1beta1): spec.warmPoolRef.name, spec.env
  [{name, value}], spec.additionalPodMetadata {labels, annotations}; status.sandbox.name and
  status.conditions[type=Ready] (forwarded from the Sandbox).
- A NetworkPolicy with both policy types and no rules denies all ingress and egress of the pods
  it selects (enforced by the cluster's network plugin).
"""

from __future__ import annotations

import re
from typing import Any

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers._labels import USER_LABEL, WORKDIR_LABEL
from mcp_sandboxes.providers.base import OWNER_LABEL, SANDBOX_NAME_LABEL, SandboxSpec

SANDBOX_GROUP = "agents.x-k8s.io"
EXTENSIONS_GROUP = "extensions.agents.x-k8s.io"
API_VERSION = "v1beta1"
SANDBOX_API = f"{SANDBOX_GROUP}/{API_VERSION}"
EXTENSIONS_API = f"{EXTENSIONS_GROUP}/{API_VERSION}"
POD_NAME_ANNOTATION = "agents.x-k8s.io/pod-name"
# Selects the pod of one of our sandboxes (the NetworkPolicy's podSelector, list_owned).
SANDBOX_ID_LABEL = "io.mcp-sandboxes.sandbox"
CONTAINER = "sandbox"
ROOT_USERS = frozenset({"0", "root"})
# PID 1 of the container: waits forever, ends at once on SIGTERM (a plain `sleep` as PID 1
# ignores it, so every delete would wait out the grace period).
KEEP_ALIVE = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]

_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def refuse_unsupported(spec: SandboxSpec, *, warm_pool: str | None) -> None:
    """What a pod on a cluster cannot honour, refused with what to do instead."""
    if spec.network == "host":
        raise InvalidInputError(
            "network",
            "kubernetes pods run on cluster nodes and cannot share this server's host network; "
            "use network 'none' (a deny-all NetworkPolicy) or another provider",
        )
    if spec.mounts:
        raise InvalidInputError(
            "mounts",
            "kubernetes pods run on cluster nodes, where this server's host paths do not exist; "
            "remove the mounts and copy files in with put_file",
        )
    if spec.limits.pids is not None:
        raise InvalidInputError(
            "limits.pids",
            "Kubernetes sets the process limit per node (the kubelet's podPidsLimit), not per pod; "
            "remove it and set podPidsLimit on the cluster",
        )
    if warm_pool:
        for field, asked in (
            ("runtime", spec.runtime is not None),
            ("read_only_root", spec.read_only_root),
            ("limits", spec.limits.cpus is not None or spec.limits.memory_mb is not None),
        ):
            if asked:
                raise InvalidInputError(
                    field,
                    f"sandboxes from the warm pool {warm_pool!r} take it from the pool's SandboxTemplate; "
                    "remove it here, or set it in the template",
                )


def label_value(value: str) -> str | None:
    return value if len(value) <= 63 and _LABEL_VALUE.match(value) else None


def ownership(sandbox_id: str, spec: SandboxSpec) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) of everything created for one sandbox. Label values are limited
    (63 characters, a small alphabet), so the caller's labels that do not fit, the name, the
    workdir and the user are annotations; attach reads the workdir and user back."""
    labels = {OWNER_LABEL: "true", SANDBOX_ID_LABEL: sandbox_id}
    annotations: dict[str, str] = {WORKDIR_LABEL: spec.workdir}
    for key, value in spec.labels.items():
        if _LABEL_KEY.match(key) and label_value(value) is not None and key not in labels:
            labels[key] = value
        else:
            annotations[key] = value
    if spec.name:
        annotations[SANDBOX_NAME_LABEL] = spec.name
        if label_value(spec.name):
            labels[SANDBOX_NAME_LABEL] = spec.name
    if spec.user:
        annotations[USER_LABEL] = spec.user
    return labels, annotations


def _quantity_cpu(cpus: float) -> str:
    return f"{max(1, round(cpus * 1000))}m"


def security_context(spec: SandboxSpec) -> dict[str, Any]:
    context: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": spec.read_only_root,
    }
    if spec.user and spec.user.isdigit() and spec.user not in ROOT_USERS:
        context["runAsUser"] = int(spec.user)
        context["runAsNonRoot"] = True
    return context


def writable_paths(spec: SandboxSpec) -> list[str]:
    """With a read-only root: the workdir, HOME (/home, and /root for root) and /tmp."""
    paths = [spec.workdir, "/tmp", "/home"]
    if spec.user is None or spec.user in ROOT_USERS:
        paths.append("/root")
    unique: list[str] = []
    for path in paths:
        if path not in unique:
            unique.append(path)
    return unique


def pod_spec(spec: SandboxSpec, *, runtime_class: str | None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": KEEP_ALIVE,
        "workingDir": spec.workdir,
        "env": [{"name": key, "value": value} for key, value in spec.env.items()],
        "securityContext": security_context(spec),
    }
    limits: dict[str, str] = {}
    if spec.limits.cpus is not None:
        limits["cpu"] = _quantity_cpu(spec.limits.cpus)
    if spec.limits.memory_mb is not None:
        limits["memory"] = f"{spec.limits.memory_mb}Mi"
    if limits:
        # Requests equal to limits: the pod is scheduled where it fits (Guaranteed QoS).
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    volumes: list[dict[str, Any]] = []
    if spec.read_only_root:
        mounts = []
        for index, path in enumerate(writable_paths(spec)):
            name = f"writable-{index}"
            volumes.append({"name": name, "emptyDir": {}})
            mounts.append({"name": name, "mountPath": path})
        container["volumeMounts"] = mounts
    body: dict[str, Any] = {
        "containers": [container],
        # The sandbox must not reach the API server with a token of its namespace.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 5,
    }
    if volumes:
        body["volumes"] = volumes
    runtime = spec.runtime or runtime_class
    if runtime:
        body["runtimeClassName"] = runtime
    return body


def sandbox_manifest(sandbox_id: str, spec: SandboxSpec, *, runtime_class: str | None) -> dict[str, Any]:
    labels, annotations = ownership(sandbox_id, spec)
    return {
        "apiVersion": SANDBOX_API,
        "kind": "Sandbox",
        "metadata": {"name": sandbox_id, "labels": labels, "annotations": annotations},
        "spec": {
            "podTemplate": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec(spec, runtime_class=runtime_class),
            }
        },
    }


def claim_manifest(sandbox_id: str, spec: SandboxSpec, *, warm_pool: str) -> dict[str, Any]:
    labels, annotations = ownership(sandbox_id, spec)
    return {
        "apiVersion": EXTENSIONS_API,
        "kind": "SandboxClaim",
        "metadata": {"name": sandbox_id, "labels": labels, "annotations": annotations},
        "spec": {
            "warmPoolRef": {"name": warm_pool},
            "env": [{"name": key, "value": value} for key, value in spec.env.items()],
            "additionalPodMetadata": {"labels": labels},
        },
    }


def pod_manifest(sandbox_id: str, spec: SandboxSpec, *, runtime_class: str | None) -> dict[str, Any]:
    labels, annotations = ownership(sandbox_id, spec)
    body = pod_spec(spec, runtime_class=runtime_class)
    body["restartPolicy"] = "Always"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": sandbox_id, "labels": labels, "annotations": annotations},
        "spec": body,
    }


def deny_all_policy(sandbox_id: str, spec: SandboxSpec) -> dict[str, Any]:
    labels, annotations = ownership(sandbox_id, spec)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": sandbox_id, "labels": labels, "annotations": annotations},
        "spec": {"podSelector": {"matchLabels": {SANDBOX_ID_LABEL: sandbox_id}}, "policyTypes": ["Ingress", "Egress"]},
    }


def condition_true(obj: dict[str, Any], kind: str = "Ready") -> bool:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return str(condition.get("status")) == "True"
    return False


def condition_message(obj: dict[str, Any], kind: str = "Ready") -> str:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return f"{condition.get('reason') or ''} {condition.get('message') or ''}".strip()
    return ""
