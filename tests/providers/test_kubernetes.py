"""The kubernetes provider against its loopback stand-in (tests/contract_servers/kubernetes.py):
what it asks the API server for, the warm pool and CRD-less modes, attach after a restart,
ownership, the v5 exec protocol, and how it fails."""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from mcp_sandboxes.errors import InvalidInputError, ProviderError, SandboxGoneError
from mcp_sandboxes.providers.base import OWNER_LABEL, ResourceLimits, SandboxSpec
from mcp_sandboxes.providers.registry import build_provider
from mcp_sandboxes.providers.remote.kubernetes import KubernetesProvider, KubernetesSandbox, exit_code_of
from tests.contract_servers.kubernetes import KubernetesStandIn, kubeconfig_text, kubernetes_server
from tests.contract_servers.sandbox_host import require_bwrap

TOKEN = "k8s-test-token-0123456789abcdef"
STEP_S = 30.0
SANDBOXES = "/apis/agents.x-k8s.io/v1beta1/namespaces/default/sandboxes"
CLAIMS = "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/default/sandboxclaims"
EXTENSIONS = "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/default"
PODS = "/api/v1/namespaces/default/pods"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"
SPEC = SandboxSpec(image="busybox")


class Cluster:
    def __init__(self, url: str, stand_in: KubernetesStandIn, kubeconfig: Path) -> None:
        self.url = url
        self.stand_in = stand_in
        self.kubeconfig = kubeconfig
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=STEP_S)

    def provider(self, **settings: Any) -> KubernetesProvider:
        return KubernetesProvider({"kubeconfig": str(self.kubeconfig), **settings})

    async def get(self, path: str) -> dict[str, Any] | None:
        response = await self.http.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def names(self, path: str) -> list[str]:
        body = await self.get(path)
        assert body is not None
        return [str(item["metadata"]["name"]) for item in body["items"]]

    async def post(self, path: str, body: dict[str, Any]) -> None:
        (await self.http.post(path, json=body)).raise_for_status()

    def posted(self) -> list[str]:
        return [r.path for r in self.stand_in.requests if r.method == "POST"]


@asynccontextmanager
async def cluster(*, crds: bool = True) -> AsyncIterator[Cluster]:
    require_bwrap()
    async with kubernetes_server(TOKEN, crds=crds) as (server, stand_in):
        with tempfile.TemporaryDirectory(prefix="mcp-sbx-kubeconfig-") as directory:
            path = Path(directory) / "config"
            path.write_text(kubeconfig_text(server.url, TOKEN))
            state = Cluster(server.url, stand_in, path)
            async with state.http:
                yield state


@asynccontextmanager
async def provider_on(state: Cluster, **settings: Any) -> AsyncIterator[KubernetesProvider]:
    async with aclosing(state.provider(**settings)) as provider:
        yield provider


# -- what the provider asks for ------------------------------------------------------------


@pytest.mark.anyio
async def test_the_sandbox_manifest_carries_the_hardening_limits_runtime_and_a_deny_all_policy() -> None:
    spec = SandboxSpec(
        image="busybox",
        user="1000",
        env={"A": "1"},
        workdir="/workspace/proj",
        read_only_root=True,
        runtime="gvisor",
        limits=ResourceLimits(cpus=0.5, memory_mb=64),
        labels={"team": "infra", "odd label": "kept as an annotation"},
        name="my-sandbox",
    )
    async with cluster() as state, provider_on(state) as provider:
        with anyio.fail_after(STEP_S):
            sandbox = await provider.create(spec)
            manifest = await state.get(f"{SANDBOXES}/{sandbox.id}")
            policy = await state.get(f"{POLICIES}/{sandbox.id}")
            pod = await state.get(f"{PODS}/{sandbox.id}")
        assert manifest is not None and policy is not None and pod is not None
        template = manifest["spec"]["podTemplate"]
        pod_spec = template["spec"]
        container = pod_spec["containers"][0]
        assert container["image"] == "busybox"
        assert container["workingDir"] == "/workspace/proj"
        assert container["env"] == [{"name": "A", "value": "1"}]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsUser": 1000,
            "runAsNonRoot": True,
        }
        assert container["resources"]["limits"] == {"cpu": "500m", "memory": "64Mi"}
        assert pod_spec["runtimeClassName"] == "gvisor"
        assert pod_spec["automountServiceAccountToken"] is False
        assert sorted(m["mountPath"] for m in container["volumeMounts"]) == ["/home", "/tmp", "/workspace/proj"]
        assert all("emptyDir" in v for v in pod_spec["volumes"])
        labels = template["metadata"]["labels"]
        assert labels[OWNER_LABEL] == "true" and labels["team"] == "infra"
        assert template["metadata"]["annotations"]["odd label"] == "kept as an annotation"
        # The policy selects exactly this sandbox's pod, and with no rules denies both ways.
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
        assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]
        # The policy exists before the pod can start.
        posted = state.posted()
        assert posted.index(POLICIES) < posted.index(SANDBOXES)
        with anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)
            assert await state.get(f"{POLICIES}/{sandbox.id}") is None
            assert await state.get(f"{PODS}/{sandbox.id}") is None


@pytest.mark.anyio
async def test_the_settings_runtime_class_applies_when_the_spec_names_none() -> None:
    async with cluster() as state, provider_on(state, runtime_class="kata") as provider:
        with anyio.fail_after(STEP_S):
            sandbox = await provider.create(SPEC.model_copy(update={"network": "none"}))
            manifest = await state.get(f"{SANDBOXES}/{sandbox.id}")
            await provider.destroy(sandbox.id)
    assert manifest is not None
    assert manifest["spec"]["podTemplate"]["spec"]["runtimeClassName"] == "kata"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"network": "host"}, "network"),
        ({"limits": ResourceLimits(pids=64)}, "limits.pids"),
        ({"mounts": [{"source": "/srv", "target": "/srv"}]}, "mounts"),
    ],
)
async def test_what_a_pod_cannot_honour_is_refused_before_anything_is_created(
    update: dict[str, Any], field: str
) -> None:
    spec = SandboxSpec.model_validate({**SPEC.model_dump(), **update})
    async with cluster() as state, provider_on(state) as provider:
        with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError) as raised:
            await provider.create(spec)
        assert raised.value.field == field
        assert state.posted() == []


# -- modes -----------------------------------------------------------------------------------


async def make_warm_pool(state: Cluster, name: str) -> None:
    template_spec = {"containers": [{"name": "sandbox", "image": "busybox", "workingDir": "/workspace"}]}
    await state.post(
        f"{EXTENSIONS}/sandboxtemplates",
        {"metadata": {"name": f"{name}-template"}, "spec": {"podTemplate": {"spec": template_spec}}},
    )
    await state.post(
        f"{EXTENSIONS}/sandboxwarmpools",
        {"metadata": {"name": name}, "spec": {"replicas": 1, "sandboxTemplateRef": {"name": f"{name}-template"}}},
    )


@pytest.mark.anyio
async def test_a_warm_pool_sandbox_is_a_claim_on_an_adopted_pod() -> None:
    async with cluster() as state, provider_on(state, warm_pool="fast") as provider:
        with anyio.fail_after(STEP_S):
            await make_warm_pool(state, "fast")
            availability = await provider.check()
            sandbox = await provider.create(SPEC.model_copy(update={"env": {"FROM_CLAIM": "yes"}}))
            claim = await state.get(f"{CLAIMS}/{sandbox.id}")
            result = await sandbox.exec(["sh", "-c", 'echo "$FROM_CLAIM"; pwd'])
        assert availability.available and "claim" in (availability.reason or ""), availability
        assert claim is not None
        assert claim["spec"]["warmPoolRef"] == {"name": "fast"}
        assert claim["spec"]["env"] == [{"name": "FROM_CLAIM", "value": "yes"}]
        assert result.stdout == b"yes\n/workspace\n", result
        assert isinstance(sandbox, KubernetesSandbox)
        # The pool's pod was adopted: named by the Sandbox's agents.x-k8s.io/pod-name annotation.
        adopted = claim["status"]["sandbox"]["name"]
        assert sandbox.pod.startswith("fast-pod-") and sandbox.pod != adopted
        pod = await state.get(f"{PODS}/{sandbox.pod}")
        assert pod is not None and pod["metadata"]["labels"][OWNER_LABEL] == "true"
        assert sandbox.id in await provider.list_owned()
        with anyio.fail_after(STEP_S):
            await provider.destroy(sandbox.id)
            assert await state.get(f"{CLAIMS}/{sandbox.id}") is None
            assert await state.get(f"{SANDBOXES}/{adopted}") is None
            assert await state.get(f"{PODS}/{sandbox.pod}") is None


@pytest.mark.anyio
async def test_a_warm_pool_refuses_what_its_template_decides() -> None:
    async with cluster() as state, provider_on(state, warm_pool="fast") as provider:
        with anyio.fail_after(STEP_S), pytest.raises(InvalidInputError, match="SandboxTemplate") as raised:
            await provider.create(SPEC.model_copy(update={"runtime": "gvisor"}))
    assert raised.value.field == "runtime"


@pytest.mark.anyio
async def test_without_the_crds_it_falls_back_to_plain_pods_and_says_so() -> None:
    async with cluster(crds=False) as state, provider_on(state) as provider:
        with anyio.fail_after(STEP_S):
            availability = await provider.check()
            sandbox = await provider.create(SPEC)
            result = await sandbox.exec(["echo", "in a pod"])
            pod = await state.get(f"{PODS}/{sandbox.id}")
            owned = await provider.list_owned()
            await provider.destroy(sandbox.id)
            gone = await state.get(f"{PODS}/{sandbox.id}")
    assert availability.available and "mode pod" in (availability.reason or ""), availability
    assert result.stdout == b"in a pod\n"
    assert pod is not None and pod["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert owned == [sandbox.id]
    assert gone is None
    assert not any("agents.x-k8s.io" in path for path in state.posted())


@pytest.mark.anyio
async def test_an_unknown_image_fails_create_with_the_pull_error_and_leaves_nothing() -> None:
    async with cluster(crds=False) as state, provider_on(state) as provider:
        with anyio.fail_after(STEP_S), pytest.raises(ProviderError, match="ErrImagePull"):
            await provider.create(SPEC.model_copy(update={"image": "no-such-image"}))
        assert await state.names(PODS) == []
        assert await state.names(POLICIES) == []
    async with cluster() as state, provider_on(state, ready_timeout_s=1.0) as provider:
        with anyio.fail_after(STEP_S), pytest.raises(ProviderError, match=r"not Ready within 1 s .*ErrImagePull"):
            await provider.create(SPEC.model_copy(update={"image": "no-such-image"}))
        assert await state.names(SANDBOXES) == []
        assert await state.names(PODS) == []


# -- lifecycle and ownership ---------------------------------------------------------------


@pytest.mark.anyio
async def test_attach_after_a_restart_finds_the_pod_workdir_and_files() -> None:
    spec = SPEC.model_copy(update={"workdir": "/workspace/proj"})
    async with cluster() as state:
        async with provider_on(state) as first:
            with anyio.fail_after(STEP_S):
                sandbox = await first.create(spec)
                await sandbox.put_file("/workspace/proj/note.txt", b"kept")
        async with provider_on(state) as second:
            with anyio.fail_after(STEP_S):
                attached = await second.attach(sandbox.id)
                assert attached is not None
                result = await attached.exec(["sh", "-c", "pwd; cat note.txt"])
                await second.destroy(sandbox.id)
    assert result.stdout == b"/workspace/proj\nkept", result


@pytest.mark.anyio
async def test_list_owned_and_attach_see_only_our_labelled_sandboxes() -> None:
    foreign = {
        "metadata": {"name": "someone-elses"},
        "spec": {"podTemplate": {"spec": {"containers": [{"name": "sandbox", "image": "busybox"}]}}},
    }
    async with cluster() as state, provider_on(state) as provider:
        with anyio.fail_after(STEP_S):
            await state.post(SANDBOXES, foreign)
            sandbox = await provider.create(SPEC)
            owned = await provider.list_owned()
            attached_foreign = await provider.attach("someone-elses")
            await provider.destroy(sandbox.id)
            listed = [r.query for r in state.stand_in.requests if r.method == "GET" and r.path == SANDBOXES]
    assert owned == [sandbox.id]
    assert attached_foreign is None
    assert any("labelSelector=io.mcp-sandboxes.managed%3Dtrue" in query for query in listed), listed


# -- exec over v5.channel.k8s.io ------------------------------------------------------------


@pytest.mark.anyio
async def test_exec_speaks_v5_and_closing_stdin_ends_input_with_the_exit_code_kept() -> None:
    async with cluster() as state, provider_on(state) as provider:
        with anyio.fail_after(STEP_S):
            sandbox = await provider.create(SPEC)
            async with sandbox.stream(["sh", "-c", "cat; echo got-eof >&2; exit 5"]) as process:
                await process.send_stdin(b"line one\n")
                await process.close_stdin()
                out, err = b"", b""
                async for chunk in process:
                    if chunk.stream == "stdout":
                        out += chunk.data
                    else:
                        err += chunk.data
                code = await process.wait()
            async with sandbox.stream(["sleep", "600"]) as sleeper:
                await sleeper.signal(signal.SIGTERM)
                killed = await sleeper.wait()
            await provider.destroy(sandbox.id)
    assert (out, err, code) == (b"line one\n", b"got-eof\n", 5)
    assert killed == 128 + signal.SIGTERM
    assert set(state.stand_in.exec_protocols) == {"v5.channel.k8s.io"}


def test_the_status_channel_gives_the_exit_code_or_the_servers_error() -> None:
    assert exit_code_of({"metadata": {}, "status": "Success"}) == 0
    failure = {
        "status": "Failure",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "42"}]},
    }
    assert exit_code_of(failure) == 42
    with pytest.raises(ProviderError, match="container not found"):
        exit_code_of({"status": "Failure", "reason": "InternalError", "message": 'container not found ("sandbox")'})


@pytest.mark.anyio
async def test_a_pod_that_vanished_makes_the_sandbox_gone() -> None:
    async with cluster() as state, provider_on(state) as provider:
        with anyio.fail_after(STEP_S):
            sandbox = await provider.create(SPEC)
            assert isinstance(sandbox, KubernetesSandbox)
            (await state.http.delete(f"{PODS}/{sandbox.pod}")).raise_for_status()
            with pytest.raises(SandboxGoneError, match="not found"):
                await sandbox.exec(["echo", "hi"])
            assert await provider.attach(sandbox.id) is None
            await provider.destroy(sandbox.id)


# -- availability --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_check_names_a_refused_token_a_missing_kubeconfig_and_a_missing_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with cluster() as state:
        bad = tmp_path / "bad-config"
        bad.write_text(kubeconfig_text(state.url, "wrong-token"))
        async with aclosing(KubernetesProvider({"kubeconfig": str(bad)})) as provider:
            with anyio.fail_after(STEP_S):
                refused = await provider.check()
    assert not refused.available and "refused our credentials (401" in (refused.reason or ""), refused

    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    async with aclosing(KubernetesProvider({})) as provider:
        missing = await provider.check()
    assert not missing.available and "no kubeconfig found" in (missing.reason or ""), missing

    monkeypatch.setitem(sys.modules, "kubernetes_asyncio", None)
    async with aclosing(build_provider("kubernetes", {"kubeconfig": str(bad)})) as provider:
        no_package = await provider.check()
    assert not no_package.available and "kubernetes_asyncio package is not installed" in (no_package.reason or "")


def test_settings_are_checked_with_the_field_named() -> None:
    with pytest.raises(InvalidInputError, match=r"providers\.kubernetes\.ready_timeout_s"):
        KubernetesProvider({"ready_timeout_s": 0})
    with pytest.raises(InvalidInputError, match=r"providers\.kubernetes\.kubeconfg"):
        KubernetesProvider({"kubeconfg": "/x"})
