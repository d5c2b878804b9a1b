"""Kubernetes sandboxes on the kubernetes-sigs/agent-sandbox API, or plain Pods without it.

Modes (API discovery decides; `check()` says which):
- `sandbox`: a `Sandbox` (agents.x-k8s.io/v1beta1) per sandbox; its controller runs the pod.
- `claim`: with `warm_pool` set, a `SandboxClaim` (extensions.agents.x-k8s.io/v1beta1) on that
  `SandboxWarmPool`; the controller hands over a pre-started pod (the pool's SandboxTemplate
  decides image, limits and runtime).
- `pod`: the agent-sandbox CRDs are not installed: a plain Pod per sandbox.

Every object carries the label io.mcp-sandboxes.managed=true (list_owned) and
io.mcp-sandboxes.sandbox=<id>; network "none" adds a NetworkPolicy that denies all ingress and
egress of the pod (created first, so the pod never runs unprotected). The sandbox id is the
name of the Sandbox, SandboxClaim or Pod.

Commands run through the pod exec API over a WebSocket speaking `v5.channel.k8s.io`: binary
messages whose first byte is the channel (0 stdin, 1 stdout, 2 stderr, 3 the status as a
`metav1.Status` JSON with the exit code, 4 resize); v5 adds channel 255, whose message [255, 0]
closes stdin. Each command runs under `/bin/sh -c` that records its pid in /tmp, because the
exec API has no signal call and closing its socket does not end the process: `signal` and the
kill on leaving a stream are `kill` commands of their own. Files move through exec (`cat`).
"""

from __future__ import annotations

import json
import secrets
import signal as _signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal

import aiohttp
import anyio
from pydantic import BaseModel, ConfigDict, Field

from mcp_sandboxes.errors import (
    InvalidInputError,
    McpSandboxesError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)
from mcp_sandboxes.providers._cleanup import removed_on_failure
from mcp_sandboxes.providers._labels import USER_LABEL, WORKDIR_LABEL
from mcp_sandboxes.providers._settings import validated
from mcp_sandboxes.providers.base import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_FILE_TIMEOUT_S,
    OWNER_LABEL,
    Availability,
    ExecResult,
    ExecStream,
    ProviderLifecycle,
    Sandbox,
    SandboxSpec,
    check_exec_args,
)
from mcp_sandboxes.providers.remote import _k8s_manifests as manifests
from mcp_sandboxes.providers.remote._k8s_api import V5_PROTOCOL, KubeApi
from mcp_sandboxes.providers.remote._remote_shell import as_user, inner_script, q, run_as, wait_until
from mcp_sandboxes.providers.remote._remote_stream import QueuedStream, followed, sole_exception

PROVIDER_NAME = "kubernetes"
Mode = Literal["sandbox", "claim", "pod"]

STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
STDIN_FRAME_BYTES = 256 * 1024
CLEANUP_TIMEOUT_S = 15.0
HELPER_TIMEOUT_S = 30.0
PID_PREFIX = "/tmp/.mcp-sandboxes-"
# Before each command: forget the pid files of commands that have ended (a file is written by
# the command's own shell, so an empty one belongs to a command that is just starting).
PRUNE = f'for f in {PID_PREFIX}*.pid; do [ -s "$f" ] && [ ! -d "/proc/$(cat "$f")" ] && rm -f "$f"; done 2>/dev/null; '
MISSING_FILE_EXIT = 66


class KubernetesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kubeconfig: str | None = Field(
        default=None, description="Kubeconfig file; default $KUBECONFIG, ~/.kube/config, else in-cluster config."
    )
    context: str | None = Field(default=None, description="Kubeconfig context; default its current-context.")
    namespace: str = Field(default="default", min_length=1, max_length=63)
    warm_pool: str | None = Field(default=None, description="A SandboxWarmPool to claim sandboxes from.")
    runtime_class: str | None = Field(default=None, description="RuntimeClass when the spec names none, e.g. gvisor.")
    mode: Literal["auto", "sandbox", "pod"] = Field(
        default="auto", description="auto: Sandbox objects where the agent-sandbox CRDs are installed, else Pods."
    )
    request_timeout_s: float = Field(default=30.0, gt=0, le=600, description="One API request.")
    create_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Creating the objects of a sandbox.")
    ready_timeout_s: float = Field(
        default=300.0, gt=0, le=3600, description="Waiting for a new sandbox to be Ready (image pulls)."
    )


def _status_message(body: Mapping[str, Any]) -> str:
    return str(body.get("message") or body.get("reason") or body)[:300]


def exit_code_of(status: Mapping[str, Any]) -> int:
    """The exit code in the status channel's metav1.Status: Success is 0; NonZeroExitCode names
    it in details.causes[reason=ExitCode]; any other failure is the server's (ProviderError)."""
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message"))
            except (TypeError, ValueError):
                break
    raise ProviderError(f"kubernetes: the command could not run ({_status_message(status)})")


class KubernetesProvider(ProviderLifecycle):
    name = PROVIDER_NAME

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = validated(KubernetesSettings, settings, PROVIDER_NAME)
        self.namespace = self.settings.namespace
        self._api: KubeApi | None = None
        self._mode: Mode | None = None
        self._lock = anyio.Lock()
        self._destroyed: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> KubernetesProvider:
        return cls(settings)

    # -- connection ---------------------------------------------------------------------

    async def api(self) -> KubeApi:
        async with self._lock:
            if self._api is None:
                self._api = await KubeApi.connect(
                    kubeconfig=self.settings.kubeconfig,
                    context=self.settings.context or None,
                    request_timeout_s=self.settings.request_timeout_s,
                )
            return self._api

    async def mode(self) -> Mode:
        """Which objects this provider creates, from the API server's discovery (/apis)."""
        if self._mode is not None:
            return self._mode
        api = await self.api()
        status, body = await api.request("GET", "/apis", "discovering the API groups")
        if status in (401, 403):
            raise ProviderUnavailableError(
                f"kubernetes: the API server refused our credentials ({status} {_status_message(body)}); "
                "check the kubeconfig's user"
            )
        if status != 200:
            raise ProviderUnavailableError(f"kubernetes: API discovery failed ({status} {_status_message(body)})")
        served = {
            group.get("name"): {version.get("version") for version in group.get("versions") or []}
            for group in body.get("groups") or []
        }
        has_sandbox = manifests.API_VERSION in served.get(manifests.SANDBOX_GROUP, set())
        has_extensions = manifests.API_VERSION in served.get(manifests.EXTENSIONS_GROUP, set())
        if self.settings.warm_pool:
            if not (has_sandbox and has_extensions):
                raise ProviderUnavailableError(
                    f"kubernetes: warm_pool {self.settings.warm_pool!r} needs the agent-sandbox extensions "
                    f"({manifests.EXTENSIONS_API}), which this cluster does not serve; install agent-sandbox with "
                    "its extensions, or remove providers.kubernetes.warm_pool"
                )
            mode: Mode = "claim"
        elif self.settings.mode == "pod":
            mode = "pod"
        elif has_sandbox:
            mode = "sandbox"
        elif self.settings.mode == "sandbox":
            raise ProviderUnavailableError(
                f"kubernetes: mode 'sandbox' needs the agent-sandbox CRDs ({manifests.SANDBOX_API}), which this "
                "cluster does not serve; install agent-sandbox, or set providers.kubernetes.mode = 'auto'"
            )
        else:
            mode = "pod"
        self._mode = mode
        return mode

    def _path(self, kind: str, name: str | None = None) -> str:
        ns = self.namespace
        base = {
            "sandbox": f"/apis/{manifests.SANDBOX_API}/namespaces/{ns}/sandboxes",
            "claim": f"/apis/{manifests.EXTENSIONS_API}/namespaces/{ns}/sandboxclaims",
            "pod": f"/api/v1/namespaces/{ns}/pods",
            "policy": f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
        }[kind]
        return base if name is None else f"{base}/{name}"

    async def _get(self, kind: str, name: str, action: str) -> dict[str, Any] | None:
        api = await self.api()
        status, body = await api.request("GET", self._path(kind, name), action)
        if status == 404:
            return None
        if status != 200:
            raise self._failed(action, status, body)
        return body

    async def _create(self, kind: str, manifest: dict[str, Any], action: str) -> dict[str, Any]:
        api = await self.api()
        status, body = await api.request("POST", self._path(kind), action, body=manifest)
        if status not in (200, 201, 202):
            raise self._failed(action, status, body)
        return body

    def _failed(self, action: str, status: int, body: Mapping[str, Any]) -> McpSandboxesError:
        message = _status_message(body)
        if status in (401, 403):
            return ProviderUnavailableError(
                f"kubernetes: {action} was refused ({status} {message}); the kubeconfig's user needs RBAC for "
                f"sandboxes, sandboxclaims, pods, pods/exec and networkpolicies in namespace {self.namespace}"
            )
        if status == 422 or status == 400:
            return InvalidInputError("spec", f"the API server rejected {action} ({status} {message})")
        return ProviderError(f"kubernetes: {action} failed ({status} {message})")

    # -- Provider -----------------------------------------------------------------------

    async def check(self) -> Availability:
        try:
            mode = await self.mode()
        except ProviderError as exc:
            return Availability(provider=self.name, available=False, reason=str(exc).removeprefix("kubernetes: "))
        api = await self.api()
        described = {
            "sandbox": f"mode sandbox: {manifests.SANDBOX_API} Sandbox objects",
            "claim": f"mode claim: SandboxClaims on the warm pool {self.settings.warm_pool!r}",
            "pod": "mode pod: plain Pods (the agent-sandbox CRDs are not installed)",
        }[mode]
        if mode == "claim":
            pool_path = (
                f"/apis/{manifests.EXTENSIONS_API}/namespaces/{self.namespace}/sandboxwarmpools/"
                f"{self.settings.warm_pool}"
            )
            status, _body = await api.request("GET", pool_path, "looking up the warm pool")
            if status != 200:
                return Availability(
                    provider=self.name,
                    available=False,
                    reason=f"the SandboxWarmPool {self.settings.warm_pool!r} was not found in namespace "
                    f"{self.namespace} ({status})",
                    fix="create it, or fix providers.kubernetes.warm_pool / namespace",
                )
        return Availability(
            provider=self.name, available=True, reason=f"{described} in namespace {self.namespace} at {api.host}"
        )

    async def create(self, spec: SandboxSpec) -> Sandbox:
        manifests.refuse_unsupported(spec, warm_pool=self.settings.warm_pool)
        mode = await self.mode()
        sandbox_id = f"mcp-{secrets.token_hex(6)}"
        runtime_class = self.settings.runtime_class
        async with removed_on_failure(partial(self.destroy, sandbox_id), cleanup_timeout_s=CLEANUP_TIMEOUT_S):
            with anyio.fail_after(self.settings.create_timeout_s):
                if spec.network == "none":
                    await self._create(
                        "policy", manifests.deny_all_policy(sandbox_id, spec), "creating a NetworkPolicy"
                    )
                if mode == "claim":
                    assert self.settings.warm_pool is not None
                    manifest = manifests.claim_manifest(sandbox_id, spec, warm_pool=self.settings.warm_pool)
                    await self._create("claim", manifest, "creating a SandboxClaim")
                elif mode == "sandbox":
                    manifest = manifests.sandbox_manifest(sandbox_id, spec, runtime_class=runtime_class)
                    await self._create("sandbox", manifest, "creating a Sandbox")
                else:
                    manifest = manifests.pod_manifest(sandbox_id, spec, runtime_class=runtime_class)
                    await self._create("pod", manifest, "creating a Pod")
            try:
                with anyio.fail_after(self.settings.ready_timeout_s):
                    ready = await self._wait_ready(mode, sandbox_id)
            except TimeoutError:
                problem = await self._pod_problem(mode, sandbox_id)
                raise ProviderError(
                    f"kubernetes: sandbox {sandbox_id} was not Ready within {self.settings.ready_timeout_s:g} s"
                    f"{f' ({problem})' if problem else ''}; it was removed"
                ) from None
            pod = await self._pod_name(mode, sandbox_id, ready)
            sandbox = KubernetesSandbox(self, sandbox_id, pod, spec.workdir, spec.user)
            if mode == "claim":
                # The pool's template chose the pod's working directory; make ours exist.
                result = await sandbox.exec(["mkdir", "-p", spec.workdir], cwd="/", timeout=HELPER_TIMEOUT_S)
                if not result.ok:
                    raise ProviderError(
                        f"kubernetes: could not create {spec.workdir}: {result.stderr.decode(errors='replace')}"
                    )
        return sandbox

    async def _wait_ready(self, mode: Mode, sandbox_id: str) -> dict[str, Any]:
        """The object once Ready (a claim: once it names its Sandbox too), by watching it."""
        api = await self.api()
        kind = {"sandbox": "sandbox", "claim": "claim", "pod": "pod"}[mode]
        params = {"fieldSelector": f"metadata.name={sandbox_id}", "timeoutSeconds": "60"}
        while True:
            async with api.watch(self._path(kind), "waiting for the sandbox", params) as events:
                async for event in events:
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise ProviderError(f"kubernetes: watching {sandbox_id} failed ({_status_message(obj)})")
                    if event.get("type") == "DELETED":
                        raise ProviderError(f"kubernetes: {sandbox_id} was deleted while it started")
                    if mode == "pod":
                        problem = pod_problem(obj)
                        if problem:
                            raise ProviderError(f"kubernetes: pod {sandbox_id} cannot start: {problem}")
                    if manifests.condition_true(obj) and (
                        mode != "claim" or ((obj.get("status") or {}).get("sandbox") or {}).get("name")
                    ):
                        return dict(obj)

    async def _pod_problem(self, mode: Mode, sandbox_id: str) -> str:
        """Why a sandbox is not Ready, from its pod (image pull errors and the like), best effort."""
        try:
            with anyio.move_on_after(self.settings.request_timeout_s):
                name = sandbox_id
                if mode != "pod":
                    obj = await self._get("claim" if mode == "claim" else "sandbox", sandbox_id, "looking up")
                    if obj is None:
                        return "its object is gone"
                    if mode == "claim":
                        name = ((obj.get("status") or {}).get("sandbox") or {}).get("name") or ""
                        if not name:
                            return f"the claim has no sandbox yet: {manifests.condition_message(obj)}"
                        obj = await self._get("sandbox", name, "looking up") or {}
                    name = (obj.get("metadata", {}).get("annotations") or {}).get(manifests.POD_NAME_ANNOTATION) or name
                pod = await self._get("pod", name, "looking up the pod")
                return "no pod was created" if pod is None else pod_problem(pod) or "its pod is not ready"
        except ProviderError as exc:
            return str(exc)
        return ""

    async def _pod_name(self, mode: Mode, sandbox_id: str, ready: dict[str, Any]) -> str:
        if mode == "pod":
            return sandbox_id
        sandbox_obj = ready
        if mode == "claim":
            name = str(((ready.get("status") or {}).get("sandbox") or {}).get("name"))
            found = await self._get("sandbox", name, "looking up the claimed Sandbox")
            if found is None:
                raise SandboxGoneError(f"kubernetes: the Sandbox {name} of claim {sandbox_id} is gone")
            sandbox_obj = found
        metadata = sandbox_obj.get("metadata") or {}
        return str((metadata.get("annotations") or {}).get(manifests.POD_NAME_ANNOTATION) or metadata.get("name"))

    def _kind(self, mode: Mode) -> str:
        return {"sandbox": "sandbox", "claim": "claim", "pod": "pod"}[mode]

    async def attach(self, sandbox_id: str) -> Sandbox | None:
        mode = await self.mode()
        obj = await self._get(self._kind(mode), sandbox_id, "looking up a sandbox")
        metadata = (obj or {}).get("metadata") or {}
        if (
            obj is None
            or (metadata.get("labels") or {}).get(OWNER_LABEL) != "true"
            or metadata.get("deletionTimestamp")
        ):
            return None
        if not manifests.condition_true(obj):
            return None
        try:
            pod = await self._pod_name(mode, sandbox_id, obj)
        except SandboxGoneError:
            return None
        if mode != "pod" and await self._get("pod", pod, "looking up the pod") is None:
            return None
        annotations = metadata.get("annotations") or {}
        return KubernetesSandbox(self, sandbox_id, pod, annotations.get(WORKDIR_LABEL), annotations.get(USER_LABEL))

    async def destroy(self, sandbox_id: str) -> None:
        self._destroyed.add(sandbox_id)
        mode = await self.mode()
        api = await self.api()
        # Background propagation: the Sandbox's (or claim's) pod goes with it.
        for kind in (self._kind(mode), "policy"):
            status, body = await api.request(
                "DELETE", self._path(kind, sandbox_id), "deleting a sandbox", params={"propagationPolicy": "Background"}
            )
            if status not in (200, 202, 404):
                raise self._failed("deleting a sandbox", status, body)

    async def list_owned(self) -> list[str]:
        mode = await self.mode()
        api = await self.api()
        ids: list[str] = []
        token = ""
        for _ in range(1000):
            params = {"labelSelector": f"{OWNER_LABEL}=true", "limit": "500"}
            if token:
                params["continue"] = token
            status, body = await api.request("GET", self._path(self._kind(mode)), "listing sandboxes", params=params)
            if status != 200:
                raise self._failed("listing sandboxes", status, body)
            for item in body.get("items") or []:
                metadata = item.get("metadata") or {}
                if not metadata.get("deletionTimestamp"):
                    ids.append(str(metadata.get("name")))
            token = str((body.get("metadata") or {}).get("continue") or "")
            if not token:
                break
        return ids

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    def gone(self, sandbox_id: str) -> bool:
        return sandbox_id in self._destroyed


def pod_problem(pod: Mapping[str, Any]) -> str:
    """A reason the pod will not become ready without help (image, config, a failed phase)."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Failed", "Succeeded"):
        return f"the pod ended (phase {status.get('phase')})"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason") or ""
        if reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"):
            return f"{reason}: {waiting.get('message') or ''}".strip().rstrip(":")
    return ""


class KubernetesSandbox:
    provider = PROVIDER_NAME

    def __init__(
        self, owner: KubernetesProvider, sandbox_id: str, pod: str, workdir: str | None, user: str | None
    ) -> None:
        self.id = sandbox_id
        self.owner = owner
        self.pod = pod
        self.workdir = workdir
        self.user = user

    def _command(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None,
        cwd: str | None,
        user: str | None,
        pidfile: str | None,
    ) -> list[str]:
        script = inner_script(argv, cwd=cwd or self.workdir, env=env, pidfile=pidfile)
        return ["/bin/sh", "-c", as_user(PRUNE + script, run_as(self.user, user))]

    async def open_process(self, command: list[str], pidfile: str | None, user: str | None = None) -> KubeProcess:
        if self.owner.gone(self.id):
            raise SandboxGoneError(f"kubernetes: sandbox {self.id} was destroyed")
        api = await self.owner.api()
        query = [("command", part) for part in command]
        query += [("container", manifests.CONTAINER), ("stdin", "true"), ("stdout", "true"), ("stderr", "true")]
        path = f"/api/v1/namespaces/{self.owner.namespace}/pods/{self.pod}/exec"
        try:
            with anyio.fail_after(self.owner.settings.request_timeout_s):
                socket = await api.exec_socket(path, query)
        except TimeoutError:
            raise ProviderUnavailableError(
                f"kubernetes: the exec connection to pod {self.pod} did not open within "
                f"{self.owner.settings.request_timeout_s:g} s"
            ) from None
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                raise SandboxGoneError(
                    f"kubernetes: sandbox {self.id} is gone (its pod {self.pod} was not found)"
                ) from None
            if exc.status in (401, 403):
                raise ProviderUnavailableError(
                    f"kubernetes: exec in pod {self.pod} was refused ({exc.status}); the kubeconfig's user needs "
                    "the pods/exec permission"
                ) from None
            raise ProviderError(f"kubernetes: exec in pod {self.pod} failed ({exc.status} {exc.message})") from None
        if socket.protocol != V5_PROTOCOL:
            await socket.close()
            raise ProviderUnavailableError(
                f"kubernetes: the API server did not accept the {V5_PROTOCOL} exec protocol (it answered "
                f"{socket.protocol!r}); Kubernetes 1.30 or newer is needed to close a command's stdin"
            )
        return KubeProcess(self, socket, pidfile, run_as(self.user, user))

    async def run(
        self, command: list[str], *, stdin: bytes | None, pidfile: str | None = None, user: str | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run one exec to its end: stdin fed (then closed) while the output is read."""
        process = await self.open_process(command, pidfile, user)
        async with process.following():
            return await collect(process, stdin)

    async def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,  # noqa: ASYNC109 - the Sandbox protocol's parameter
    ) -> ExecResult:
        check_exec_args(argv, env, cwd, user)
        if not argv:
            raise InvalidInputError("argv", "the command is empty; pass at least the program name")
        pidfile = f"{PID_PREFIX}{secrets.token_hex(8)}.pid"
        command = self._command(argv, env=env, cwd=cwd, user=user, pidfile=pidfile)
        try:
            with anyio.fail_after(timeout):
                code, out, err = await self.run(command, stdin=stdin, pidfile=pidfile, user=user)
        except TimeoutError:
            raise ProviderError(
                f"kubernetes: {argv[0]} did not finish within {timeout} s (timed out; killed)"
            ) from None
        return ExecResult(exit_code=code, stdout=out, stderr=err)

    @asynccontextmanager
    async def stream(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[ExecStream]:
        check_exec_args(argv, env, cwd, user)
        if not argv:
            raise InvalidInputError("argv", "the command is empty; pass at least the program name")
        pidfile = f"{PID_PREFIX}{secrets.token_hex(8)}.pid"
        command = self._command(argv, env=env, cwd=cwd, user=user, pidfile=pidfile)
        process = await self.open_process(command, pidfile, user)
        try:
            async with process.following():
                yield process
        except BaseExceptionGroup as group:
            raise sole_exception(group) from None

    async def helper(self, script: str, action: str) -> tuple[int, bytes, bytes]:
        with anyio.fail_after(HELPER_TIMEOUT_S):
            try:
                return await self.run(["/bin/sh", "-c", script], stdin=None)
            except TimeoutError:
                raise ProviderError(f"kubernetes: {action} did not finish within {HELPER_TIMEOUT_S:g} s") from None

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, user: str | None = None) -> None:
        if not path.startswith("/"):
            raise InvalidInputError("path", f"{path!r} is not absolute; give an absolute path in the sandbox")
        directory = path.rsplit("/", 1)[0] or "/"
        partial_path = f"{path}.part-{secrets.token_hex(4)}"
        script = (
            f"mkdir -p {q(directory)} && cat > {q(partial_path)} && chmod {mode:o} {q(partial_path)} && "
            f"mv -f {q(partial_path)} {q(path)} || {{ rc=$?; rm -f {q(partial_path)}; exit $rc; }}"
        )
        command = ["/bin/sh", "-c", as_user(script, run_as(self.user, user))]
        with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
            code, _out, err = await self.run(command, stdin=data)
        if code != 0:
            raise ProviderError(f"kubernetes: writing {path} failed ({err.decode(errors='replace').strip()})")

    async def get_file(self, path: str) -> bytes:
        script = f"if [ ! -f {q(path)} ]; then exit {MISSING_FILE_EXIT}; fi; exec cat {q(path)}"
        with anyio.fail_after(DEFAULT_FILE_TIMEOUT_S):
            code, out, err = await self.run(["/bin/sh", "-c", as_user(script, self.user)], stdin=None)
        if code == MISSING_FILE_EXIT:
            raise NotFoundError(f"kubernetes: {path} does not exist in sandbox {self.id} (or is not a file)")
        if code != 0:
            raise ProviderError(f"kubernetes: reading {path} failed ({err.decode(errors='replace').strip()})")
        return out


async def collect(process: KubeProcess, stdin: bytes | None) -> tuple[int, bytes, bytes]:
    stdout = bytearray()
    stderr = bytearray()

    async def feed() -> None:
        if stdin:
            await process.send_stdin(stdin)
        await process.close_stdin()

    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        async for chunk in process:
            (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
    return await process.wait(), bytes(stdout), bytes(stderr)


class KubeProcess(QueuedStream):
    """One exec session on the v5 channel protocol."""

    def __init__(
        self,
        sandbox: KubernetesSandbox,
        socket: aiohttp.ClientWebSocketResponse,
        pidfile: str | None,
        user: str | None,
    ) -> None:
        super().__init__()
        self._user = user  # who runs the command, and so who may signal it
        self._sandbox = sandbox
        self._socket = socket
        self._pidfile = pidfile
        self._stdin_closed = False

    @asynccontextmanager
    async def following(self) -> AsyncIterator[KubeProcess]:
        async with followed(self, self.pump, self.cleanup, cleanup_timeout_s=CLEANUP_TIMEOUT_S) as started:
            yield started

    async def pump(self) -> None:
        code: int | None = None
        error: BaseException | None = None
        try:
            async for message in self._socket:
                if message.type != aiohttp.WSMsgType.BINARY:
                    if message.type == aiohttp.WSMsgType.ERROR:
                        error = ProviderError(f"kubernetes: the exec connection failed ({message.data})")
                        break
                    continue
                data: bytes = message.data
                if not data:
                    continue
                channel, payload = data[0], data[1:]
                if channel == STDOUT:
                    await self.output.put("stdout", payload)
                elif channel == STDERR:
                    await self.output.put("stderr", payload)
                elif channel == STATUS and payload:
                    try:
                        code = exit_code_of(json.loads(payload))
                    except ProviderError as exc:
                        error = exc
                    except ValueError:
                        error = ProviderError(f"kubernetes: unreadable exec status {payload[:200]!r}")
        except aiohttp.ClientError as exc:
            error = ProviderError(f"kubernetes: the exec connection failed ({type(exc).__name__}: {exc})")
        if code is None and error is None:
            error = ProviderError(
                f"kubernetes: the exec connection to pod {self._sandbox.pod} closed without an exit status "
                "(the pod may have been deleted)"
            )
            if self._sandbox.owner.gone(self._sandbox.id):
                error = SandboxGoneError(f"kubernetes: sandbox {self._sandbox.id} was destroyed")
        self.output.finish(code, error)

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise ProviderError("kubernetes: stdin is already closed")
        view = memoryview(data)
        for start in range(0, len(view), STDIN_FRAME_BYTES):
            await self._socket.send_bytes(bytes([STDIN]) + bytes(view[start : start + STDIN_FRAME_BYTES]))

    async def close_stdin(self) -> None:
        if self._stdin_closed or self._socket.closed:
            return
        self._stdin_closed = True
        try:
            await self._socket.send_bytes(bytes([CLOSE, STDIN]))
        except (aiohttp.ClientError, ConnectionError):
            pass  # the command has ended and the socket with it

    async def signal(self, signum: int = _signal.SIGTERM) -> None:
        if self._pidfile is None or self.output.ended:
            return
        pidfile = q(self._pidfile)
        script = wait_until(f"-s {pidfile}") + f'kill -{int(signum)} "$(cat {pidfile})" 2>/dev/null; exit 0'
        await self._sandbox.helper(as_user(script, self._user), "sending a signal")

    async def cleanup(self) -> None:
        """Leaving the stream: a command still running is killed (closing the socket would not)."""
        try:
            if not self.output.ended and self._pidfile is not None:
                pidfile = q(self._pidfile)
                script = wait_until(f"-s {pidfile}", tries=40) + (
                    f'kill -KILL "$(cat {pidfile})" 2>/dev/null; rm -f {pidfile}; exit 0'
                )
                try:
                    await self._sandbox.helper(as_user(script, self._user), "stopping a command")
                except ProviderError:
                    pass  # the sandbox is gone, and the command with it
        finally:
            await self._socket.close()
            # Nobody reads after leaving the stream: release the output buffer now, not at GC.
            self.output.finish(None, ProviderError("kubernetes: the command's stream was left before it ended"))
            self.output._receive.close()


__all__ = ["KubernetesProvider", "KubernetesSandbox", "KubernetesSettings"]
