"""A loopback stand-in for a Kubernetes API server with the agent-sandbox controllers, one Starlette app.

No kube-apiserver or kubelet can run on these machines, so this follows the published API
instead (Kubernetes API concepts: resource paths, list/watch with labelSelector, fieldSelector
metadata.name, resourceVersion and timeoutSeconds, metav1.Status errors; the pod exec
subresource over WebSocket with `v5.channel.k8s.io`; kubernetes-sigs/agent-sandbox
api/v1beta1 and extensions/api/v1beta1 for Sandbox, SandboxClaim, SandboxTemplate,
SandboxWarmPool):
- discovery: `/api`, `/apis` (the agent-sandbox groups only when `crds=True`);
- `pods`, `networkpolicies`, `sandboxes`, `sandboxclaims`, `sandboxtemplates`,
  `sandboxwarmpools`: POST (201, 409 AlreadyExists), GET, list (labelSelector with `k=v` / `k`,
  fieldSelector `metadata.name=`), `watch=true` (newline-delimited {type, object}; without a
  resourceVersion it starts with ADDED for what exists), DELETE (the object goes at once;
  dependents by ownerReferences go with it);
- `pods/{name}/exec` (WebSocket, v5.channel.k8s.io only): the command runs for real in a
  bubblewrap sandbox (sandbox_host.LocalMachine, one per pod, network unshared); channel 0
  feeds stdin, [255, 0] closes it, 1/2 carry output, 3 the metav1.Status with the exit code.
  As with a real kubelet, a closed socket does not end the command.
- a controller loop: a Sandbox gets a pod (named like it, from its podTemplate) that becomes
  Running/Ready, then Ready=True on the Sandbox; a SandboxWarmPool keeps `replicas` ready
  Sandboxes from its SandboxTemplate (their pods named `<pool>-pod-<hex>`, recorded in the
  `agents.x-k8s.io/pod-name` annotation); a SandboxClaim adopts one of them (its
  additionalPodMetadata labels and env go to the pod) and reports status.sandbox.name and
  Ready; a plain Pod becomes Ready. An image not in `images` leaves the pod waiting in
  ErrImagePull. A pod deleted behind a Sandbox's back is not recreated (its Sandbox turns
  not Ready).

Not modelled: scheduling, resource limits, runtime classes, security contexts and NetworkPolicy
enforcement (every pod here has no network at all); they are checked as manifest fields.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.contract_servers.sandbox_host import LocalMachine, LocalProcess, LoopbackServer

V5 = "v5.channel.k8s.io"
SANDBOX_GROUP = "agents.x-k8s.io"
EXTENSIONS_GROUP = "extensions.agents.x-k8s.io"
POD_NAME_ANNOTATION = "agents.x-k8s.io/pod-name"
WARM_POOL_LABEL = "agents.x-k8s.io/warm-pool-sandbox"
# (group/version, plural) -> kind
RESOURCES: dict[tuple[str, str], str] = {
    ("v1", "pods"): "Pod",
    ("networking.k8s.io/v1", "networkpolicies"): "NetworkPolicy",
    (f"{SANDBOX_GROUP}/v1beta1", "sandboxes"): "Sandbox",
    (f"{EXTENSIONS_GROUP}/v1beta1", "sandboxclaims"): "SandboxClaim",
    (f"{EXTENSIONS_GROUP}/v1beta1", "sandboxtemplates"): "SandboxTemplate",
    (f"{EXTENSIONS_GROUP}/v1beta1", "sandboxwarmpools"): "SandboxWarmPool",
}
AGENT_GROUPS = (SANDBOX_GROUP, EXTENSIONS_GROUP)
WATCH_DEFAULT_S = 300.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> JSONResponse:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return JSONResponse(body, status_code=code)


def _ready(status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}


@dataclass
class Event:
    rv: int
    kind: str  # ADDED, MODIFIED, DELETED
    resource: tuple[str, str]
    namespace: str
    obj: dict[str, Any]


@dataclass
class Recorded:
    method: str
    path: str
    query: str


@dataclass
class PodRuntime:
    machine: LocalMachine
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"


class KubernetesStandIn:
    def __init__(self, token: str, *, crds: bool = True, images: frozenset[str] = frozenset({"busybox"})) -> None:
        self.token = token
        self.crds = crds
        self.images = images
        self.objects: dict[tuple[tuple[str, str], str, str], dict[str, Any]] = {}
        self.events: list[Event] = []
        self.rv = 1
        self.pods: dict[tuple[str, str], PodRuntime] = {}
        self.requests: list[Recorded] = []
        self.exec_protocols: list[str] = []
        self._changed: asyncio.Condition | None = None
        self._reconciling: asyncio.Lock | None = None
        routes: list[Any] = [
            Route("/api", self.core_versions, methods=["GET"]),
            Route("/apis", self.groups, methods=["GET"]),
            WebSocketRoute("/api/v1/namespaces/{ns}/pods/{name}/exec", self.exec_socket),
            Route("/api/v1/namespaces/{ns}/{plural}", self.collection, methods=["GET", "POST"]),
            Route("/api/v1/namespaces/{ns}/{plural}/{name}", self.item, methods=["GET", "DELETE"]),
            Route("/apis/{group}/{version}/namespaces/{ns}/{plural}", self.collection, methods=["GET", "POST"]),
            Route("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", self.item, methods=["GET", "DELETE"]),
        ]
        self.app = Starlette(routes=routes)

    # -- plumbing --------------------------------------------------------------------------

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _authorized(self, connection: HTTPConnection) -> bool:
        method = getattr(connection, "method", "WS")
        self.requests.append(Recorded(method, connection.url.path, connection.url.query))
        return connection.headers.get("authorization") == f"Bearer {self.token}"

    def _resource(self, request: HTTPConnection) -> tuple[str, str] | None:
        params = request.path_params
        group_version = f"{params['group']}/{params['version']}" if "group" in params else "v1"
        resource = (group_version, str(params["plural"]))
        if resource not in RESOURCES:
            return None
        if not self.crds and group_version.split("/")[0] in AGENT_GROUPS:
            return None
        return resource

    async def _emit(self, kind: str, resource: tuple[str, str], namespace: str, obj: dict[str, Any]) -> None:
        self.events.append(Event(self.rv, kind, resource, namespace, json.loads(json.dumps(obj))))
        condition = self._condition()
        async with condition:
            condition.notify_all()

    async def put(self, resource: tuple[str, str], namespace: str, obj: dict[str, Any], *, new: bool) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[(resource, namespace, obj["metadata"]["name"])] = obj
        await self._emit("ADDED" if new else "MODIFIED", resource, namespace, obj)

    async def remove(self, resource: tuple[str, str], namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.pop((resource, namespace, name), None)
        if obj is None:
            return None
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        await self._emit("DELETED", resource, namespace, obj)
        if resource == ("v1", "pods"):
            runtime = self.pods.pop((namespace, name), None)
            if runtime is not None:
                await runtime.machine.destroy()
        uid = obj["metadata"].get("uid")
        for (dep_resource, dep_ns, dep_name), dep in list(self.objects.items()):
            owners = dep["metadata"].get("ownerReferences") or []
            if dep_ns == namespace and any(owner.get("uid") == uid for owner in owners):
                await self.remove(dep_resource, dep_ns, dep_name)
        return obj

    def _kick(self) -> None:
        asyncio.get_running_loop().create_task(self.reconcile())

    # -- discovery ---------------------------------------------------------------------------

    async def core_versions(self, request: Request) -> Response:
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        return JSONResponse({"kind": "APIVersions", "versions": ["v1"]})

    async def groups(self, request: Request) -> Response:
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        names = ["networking.k8s.io"] + (list(AGENT_GROUPS) if self.crds else [])
        versions = {"networking.k8s.io": "v1"}
        groups = [
            {
                "name": name,
                "versions": [
                    {
                        "groupVersion": f"{name}/{versions.get(name, 'v1beta1')}",
                        "version": versions.get(name, "v1beta1"),
                    }
                ],
                "preferredVersion": {
                    "groupVersion": f"{name}/{versions.get(name, 'v1beta1')}",
                    "version": versions.get(name, "v1beta1"),
                },
            }
            for name in names
        ]
        return JSONResponse({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    # -- resources ---------------------------------------------------------------------------

    async def collection(self, request: Request) -> Response:
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        resource = self._resource(request)
        if resource is None:
            return _status(404, "NotFound", "the server could not find the requested resource")
        namespace = request.path_params["ns"]
        if request.method == "POST":
            obj = await request.json()
            return await self.create(resource, namespace, obj)
        selectors = _selectors(
            request.query_params.get("labelSelector", ""), request.query_params.get("fieldSelector", "")
        )
        if request.query_params.get("watch") in ("true", "1"):
            timeout = float(request.query_params.get("timeoutSeconds") or WATCH_DEFAULT_S)
            since = request.query_params.get("resourceVersion") or ""
            return StreamingResponse(
                self._watch(resource, namespace, selectors, since, timeout), media_type="application/json"
            )
        items = [
            obj
            for (res, ns, _name), obj in sorted(self.objects.items())
            if res == resource and ns == namespace and selectors(obj)
        ]
        return JSONResponse(
            {
                "kind": f"{RESOURCES[resource]}List",
                "apiVersion": resource[0],
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def create(self, resource: tuple[str, str], namespace: str, obj: dict[str, Any]) -> Response:
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name")
        if not name:
            return _status(422, "Invalid", "metadata.name: Required value")
        if (resource, namespace, name) in self.objects:
            return _status(409, "AlreadyExists", f'{resource[1]} "{name}" already exists')
        metadata.update(namespace=namespace, uid=secrets.token_hex(16), creationTimestamp=_now())
        obj.setdefault("apiVersion", resource[0])
        obj.setdefault("kind", RESOURCES[resource])
        await self.put(resource, namespace, obj, new=True)
        self._kick()
        return JSONResponse(obj, status_code=201)

    async def item(self, request: Request) -> Response:
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        resource = self._resource(request)
        if resource is None:
            return _status(404, "NotFound", "the server could not find the requested resource")
        key = (resource, request.path_params["ns"], request.path_params["name"])
        if request.method == "DELETE":
            removed = await self.remove(*key)
            if removed is None:
                return _status(404, "NotFound", f'{resource[1]} "{key[2]}" not found')
            self._kick()
            return JSONResponse(removed)
        obj = self.objects.get(key)
        if obj is None:
            return _status(404, "NotFound", f'{resource[1]} "{key[2]}" not found')
        return JSONResponse(obj)

    async def _watch(
        self,
        resource: tuple[str, str],
        namespace: str,
        selectors: Callable[[dict[str, Any]], bool],
        since: str,
        limit_s: float,
    ) -> AsyncIterator[bytes]:
        def line(kind: str, obj: dict[str, Any]) -> bytes:
            return (json.dumps({"type": kind, "object": obj}) + "\n").encode()

        if since in ("", "0"):
            start = self.rv
            for (res, ns, _name), obj in sorted(self.objects.items()):
                if res == resource and ns == namespace and selectors(obj):
                    yield line("ADDED", obj)
        else:
            start = int(since)
        condition = self._condition()
        with anyio.move_on_after(limit_s):
            while True:
                for event in [e for e in self.events if e.rv > start]:
                    start = event.rv
                    if event.resource == resource and event.namespace == namespace and selectors(event.obj):
                        yield line(event.kind, event.obj)
                async with condition:
                    if not any(e.rv > start for e in self.events[-50:]):
                        await condition.wait()

    # -- controller --------------------------------------------------------------------------

    async def reconcile(self) -> None:
        if self._reconciling is None:
            self._reconciling = asyncio.Lock()
        async with self._reconciling:
            for (resource, ns, name), obj in list(self.objects.items()):
                if (resource, ns, name) not in self.objects:
                    continue
                kind = RESOURCES[resource]
                if kind == "SandboxWarmPool":
                    await self._fill_pool(ns, obj)
                elif kind == "SandboxClaim" and not (obj.get("status") or {}).get("sandbox"):
                    await self._bind_claim(ns, obj)
                elif kind == "Sandbox":
                    await self._run_sandbox(ns, obj)
                elif kind == "Pod" and not obj.get("status"):
                    await self._start_pod(ns, obj)

    async def _start_pod(self, ns: str, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        if container.get("image") not in self.images:
            pod["status"] = {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": container.get("name"),
                        "ready": False,
                        "state": {
                            "waiting": {
                                "reason": "ErrImagePull",
                                "message": f'failed to pull image "{container.get("image")}": not found',
                            }
                        },
                    }
                ],
                "conditions": [_ready("False", "ContainersNotReady")],
            }
            await self.put(("v1", "pods"), ns, pod, new=False)
            return
        machine = LocalMachine(network=False)
        workdir = container.get("workingDir") or "/"
        if machine.writable(workdir):
            # As a container runtime does: the working directory is created when missing.
            machine.resolve(workdir).mkdir(parents=True, exist_ok=True)
        env = {item["name"]: item.get("value", "") for item in container.get("env") or []}
        self.pods[(ns, pod["metadata"]["name"])] = PodRuntime(machine, env, container.get("workingDir") or "/")
        pod["status"] = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [_ready("True", "")],
            "containerStatuses": [{"name": container.get("name"), "ready": True, "state": {"running": {}}}],
        }
        await self.put(("v1", "pods"), ns, pod, new=False)

    def _owned_by(self, owner: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
        }

    async def _run_sandbox(self, ns: str, sandbox: dict[str, Any]) -> None:
        metadata = sandbox["metadata"]
        pod_name = (metadata.get("annotations") or {}).get(POD_NAME_ANNOTATION) or metadata["name"]
        pod_key = (("v1", "pods"), ns, pod_name)
        pod = self.objects.get(pod_key)
        was_ready = any(c.get("status") == "True" for c in (sandbox.get("status") or {}).get("conditions") or [])
        if pod is None:
            if was_ready:
                # The pod went behind the controller's back: not recreated here.
                sandbox["status"]["conditions"] = [_ready("False", "DependenciesNotReady", "Pod not found")]
                await self.put(pod_key[0], ns, sandbox, new=False)
                return
            template = sandbox["spec"]["podTemplate"]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": ns,
                    "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                    "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                    "uid": secrets.token_hex(16),
                    "creationTimestamp": _now(),
                    "ownerReferences": [self._owned_by(sandbox)],
                },
                "spec": json.loads(json.dumps(template["spec"])),
            }
            await self.put(("v1", "pods"), ns, pod, new=True)
        if not pod.get("status"):
            await self._start_pod(ns, pod)
        ready = any(c.get("status") == "True" for c in pod["status"].get("conditions") or [])
        if ready != was_ready or not sandbox.get("status"):
            sandbox["status"] = {
                "conditions": [
                    _ready("True", "DependenciesReady") if ready else _ready("False", "DependenciesNotReady")
                ],
                "selector": ",".join(f"{k}={v}" for k, v in sorted(pod["metadata"]["labels"].items())),
            }
            await self.put(((f"{SANDBOX_GROUP}/v1beta1", "sandboxes")), ns, sandbox, new=False)

    async def _fill_pool(self, ns: str, pool: dict[str, Any]) -> None:
        name = pool["metadata"]["name"]
        template_name = pool["spec"]["sandboxTemplateRef"]["name"]
        template = self.objects.get(((f"{EXTENSIONS_GROUP}/v1beta1", "sandboxtemplates"), ns, template_name))
        if template is None:
            return
        members = [
            obj
            for (res, res_ns, _), obj in self.objects.items()
            if res[1] == "sandboxes"
            and res_ns == ns
            and (obj["metadata"].get("labels") or {}).get(WARM_POOL_LABEL) == name
        ]
        for _ in range(int(pool["spec"].get("replicas", 1)) - len(members)):
            sandbox_name = f"{name}-{secrets.token_hex(3)}"
            sandbox = {
                "apiVersion": f"{SANDBOX_GROUP}/v1beta1",
                "kind": "Sandbox",
                "metadata": {
                    "name": sandbox_name,
                    "namespace": ns,
                    "uid": secrets.token_hex(16),
                    "creationTimestamp": _now(),
                    "labels": {WARM_POOL_LABEL: name},
                    "annotations": {POD_NAME_ANNOTATION: f"{name}-pod-{secrets.token_hex(3)}"},
                    "ownerReferences": [self._owned_by(pool)],
                },
                "spec": {"podTemplate": json.loads(json.dumps(template["spec"]["podTemplate"]))},
            }
            await self.put((f"{SANDBOX_GROUP}/v1beta1", "sandboxes"), ns, sandbox, new=True)
            await self._run_sandbox(ns, sandbox)

    async def _bind_claim(self, ns: str, claim: dict[str, Any]) -> None:
        pool_name = claim["spec"]["warmPoolRef"]["name"]
        pool = self.objects.get(((f"{EXTENSIONS_GROUP}/v1beta1", "sandboxwarmpools"), ns, pool_name))
        if pool is None:
            return
        await self._fill_pool(ns, pool)
        for (res, res_ns, _), sandbox in list(self.objects.items()):
            labels = sandbox["metadata"].get("labels") or {}
            if res[1] != "sandboxes" or res_ns != ns or labels.get(WARM_POOL_LABEL) != pool_name:
                continue
            if not any(c.get("status") == "True" for c in (sandbox.get("status") or {}).get("conditions") or []):
                continue
            # Adopt: the claim owns the Sandbox now; the pool makes a new one.
            del labels[WARM_POOL_LABEL]
            sandbox["metadata"]["ownerReferences"] = [self._owned_by(claim)]
            await self.put(res, ns, sandbox, new=False)
            pod_name = sandbox["metadata"]["annotations"][POD_NAME_ANNOTATION]
            pod = self.objects[(("v1", "pods"), ns, pod_name)]
            extra = (claim["spec"].get("additionalPodMetadata") or {}).get("labels") or {}
            pod["metadata"]["labels"].update(extra)
            await self.put(("v1", "pods"), ns, pod, new=False)
            runtime = self.pods[(ns, pod_name)]
            runtime.env.update({item["name"]: item.get("value", "") for item in claim["spec"].get("env") or []})
            claim["status"] = {
                "sandbox": {"name": sandbox["metadata"]["name"]},
                "conditions": [_ready("True", "SandboxReady")],
            }
            await self.put((f"{EXTENSIONS_GROUP}/v1beta1", "sandboxclaims"), ns, claim, new=False)
            await self._fill_pool(ns, pool)
            return

    # -- exec -----------------------------------------------------------------------------------

    async def exec_socket(self, websocket: WebSocket) -> None:
        if not self._authorized(websocket):
            await websocket.send_denial_response(_status(401, "Unauthorized", "Unauthorized"))
            return
        ns, name = websocket.path_params["ns"], websocket.path_params["name"]
        runtime = self.pods.get((ns, name))
        if runtime is None:
            await websocket.send_denial_response(_status(404, "NotFound", f'pods "{name}" not found'))
            return
        offered = list(websocket.scope.get("subprotocols") or [])
        self.exec_protocols.extend(offered)
        if V5 not in offered:
            await websocket.send_denial_response(_status(400, "BadRequest", f"this stand-in speaks only {V5}"))
            return
        command = websocket.query_params.getlist("command")
        if not command:
            await websocket.send_denial_response(_status(400, "BadRequest", "you must specify at least 1 command"))
            return
        await websocket.accept(subprotocol=V5)
        cwd = runtime.workdir if runtime.machine.resolve(runtime.workdir).is_dir() else "/"
        try:
            local = await runtime.machine.spawn(command, env=runtime.env, cwd=cwd)
        except OSError as exc:
            await websocket.send_bytes(b"\x03" + json.dumps(_failure(str(exc))).encode())
            await websocket.close()
            return
        await _relay(websocket, local)


def _failure(message: str) -> dict[str, Any]:
    return {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"}


async def _relay(websocket: WebSocket, local: LocalProcess) -> None:
    process = local.process
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    stdin, stdout, stderr = process.stdin, process.stdout, process.stderr
    connected = True

    async def pump(stream: anyio.abc.ByteReceiveStream, channel: int) -> None:
        nonlocal connected
        async for data in stream:
            if connected:
                try:
                    await websocket.send_bytes(bytes([channel]) + data)
                except (WebSocketDisconnect, RuntimeError, OSError):
                    connected = False

    async def feed() -> None:
        nonlocal connected
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes") or b""
                if data[:1] == b"\x00" and len(data) > 1:
                    try:
                        await stdin.send(data[1:])
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                elif data == b"\xff\x00":
                    await stdin.aclose()
        finally:
            connected = False
            # As a kubelet does: the command goes on; only its stdin ends with the connection.
            with anyio.CancelScope(shield=True):
                await stdin.aclose()

    async with anyio.create_task_group() as outer:
        outer.start_soon(feed)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, stdout, 1)
            tg.start_soon(pump, stderr, 2)
        code = await process.wait()
        if connected:
            status = (
                {"metadata": {}, "status": "Success"}
                if code == 0
                else {
                    "metadata": {},
                    "status": "Failure",
                    "message": f"command terminated with non-zero exit code: exit code {code}",
                    "reason": "NonZeroExitCode",
                    "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
                }
            )
            try:
                await websocket.send_bytes(b"\x03" + json.dumps(status).encode())
                await websocket.close()
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass
        outer.cancel_scope.cancel()


def _selectors(labels: str, fields: str) -> Callable[[dict[str, Any]], bool]:
    wanted: list[tuple[str, str | None]] = []
    for part in filter(None, (p.strip() for p in labels.split(","))):
        key, _, value = part.partition("=")
        wanted.append((key.strip(), value.strip() if _ else None))
    name = None
    for part in filter(None, (p.strip() for p in fields.split(","))):
        key, _, value = part.partition("=")
        if key == "metadata.name":
            name = value

    def matches(obj: dict[str, Any]) -> bool:
        metadata = obj.get("metadata") or {}
        if name is not None and metadata.get("name") != name:
            return False
        have = metadata.get("labels") or {}
        return all(key in have and (value is None or have[key] == value) for key, value in wanted)

    return matches


def kubeconfig_text(server_url: str, token: str, namespace: str = "default") -> str:
    """A kubeconfig naming the stand-in, as kubectl writes one (JSON is YAML)."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": server_url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [
                {"name": "stand-in", "context": {"cluster": "stand-in", "user": "tester", "namespace": namespace}}
            ],
            "current-context": "stand-in",
        }
    )


def _kill_all(stand_in: KubernetesStandIn) -> None:
    """After the server's loop has stopped: end every command and remove every pod's files."""
    for runtime in stand_in.pods.values():
        for local in runtime.machine.processes:
            local.send_signal(signal.SIGKILL)
            try:
                os.kill(local.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(runtime.machine.root, ignore_errors=True)
    stand_in.pods.clear()


@asynccontextmanager
async def kubernetes_server(
    token: str, *, crds: bool = True, images: frozenset[str] = frozenset({"busybox"})
) -> AsyncIterator[tuple[LoopbackServer, KubernetesStandIn]]:
    """The stand-in on loopback; its pods end with it."""
    stand_in = KubernetesStandIn(token, crds=crds, images=images)
    try:
        async with LoopbackServer(stand_in.app, "kubernetes-stand-in") as server:
            yield server, stand_in
    finally:
        await anyio.to_thread.run_sync(_kill_all, stand_in)


__all__ = ["KubernetesStandIn", "kubeconfig_text", "kubernetes_server"]
