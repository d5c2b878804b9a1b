"""A loopback stand-in for Modal: the `modal.client.ModalClient` control plane and the
per-task `modal.task_command_router.TaskCommandRouter`, served by grpclib on 127.0.0.1.

Followed: Modal's published protocol, the .proto files shipped in the `modal` wheel
(modal_proto/api.proto and task_command_router.proto, compiled into modal_proto/*_pb2 and
the grpclib bases in modal_proto/*_grpc.py), and the calls modal==1.6.4 makes with them:

- Every control-plane call carries `x-modal-token-id` / `x-modal-token-secret`; a wrong
  pair is UNAUTHENTICATED. `AuthTokenGet` hands out a short-lived JWT (with `exp`) that
  the sandbox calls also carry as `x-modal-auth-token`.
- `ClientHello`, `AppGetOrCreate` (app by name and environment), `EnvironmentGetOrCreate`
  (its `image_builder_version` setting), `ImageGetOrCreate` (an image definition whose
  Dockerfile starts `FROM <tag>`; only tags in `images` exist, others fail the build the
  way a registry pull does), `ImageJoinStreaming` (never needed: builds finish at once).
- V2 sandboxes: `SandboxCreateV2` (definition: image, workdir, resources, network access,
  timeout; env as inline secret sources; tags), `SandboxGetTaskIdV2`, `SandboxWaitV2`
  (`timeout=0` is a lookup; NOT_FOUND for an unknown id), `SandboxListV2` (running ones,
  filtered by app and by tags, paginated by `before_timestamp`), `SandboxTagsGetV2`,
  `SandboxTerminateV2`, `SandboxGetCommandRouterAccess`; `SandboxWait` (V1 lookup: NOT_FOUND,
  only V2 sandboxes exist here) (the router URL, plain http on
  loopback as the SDK allows only for localhost, and a per-task JWT).
- TaskCommandRouter (`authorization: Bearer <task JWT>`): `TaskExecStart`,
  `TaskExecStdioRead` (server stream from a byte offset until the stream's end),
  `TaskExecStdinWrite` (offset-checked, `eof` closes), `TaskExecStdinStatus`,
  `TaskExecPoll`, `TaskExecWait` (exit `code`, or `signal` when the process was killed).
  A task that no longer runs answers NOT_FOUND, as Modal's router does.

Any other RPC answers UNIMPLEMENTED and is recorded in `unimplemented`, so a client that
starts using more of the protocol fails loudly. Commands run for real, in a
`sandbox_host.LocalMachine` per sandbox (bubblewrap), as the other stand-ins do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from grpclib import GRPCError, Status
from grpclib.server import Server, Stream
from modal_proto import api_grpc, api_pb2, task_command_router_grpc
from modal_proto import task_command_router_pb2 as tcr_pb2

from tests.contract_servers.sandbox_host import LocalMachine, LocalProcess

DEFAULT_IMAGES = frozenset({"debian:bookworm", "python:3.12-slim"})
IMAGE_BUILDER_VERSION = "2025.06"
OUTPUT_CHUNK_BYTES = 64 * 1024
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 15.0
JWT_LIFETIME_S = 3600


def _jwt(claims: Mapping[str, Any]) -> str:
    def part(value: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.{secrets.token_urlsafe(16)}"


@dataclass
class Recorded:
    method: str
    metadata: dict[str, str]
    request: Any


class OutputBuffer:
    """All bytes a process wrote to one stream, readable from any offset (the router's
    reads resume by offset), and whether the stream has ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self._changed = asyncio.Condition()

    async def append(self, chunk: bytes) -> None:
        async with self._changed:
            self.data.extend(chunk)
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    def _readable(self, offset: int) -> bool:
        return self.closed or len(self.data) > offset

    async def read_from(self, offset: int) -> AsyncIterator[bytes]:
        while True:
            async with self._changed:
                await self._changed.wait_for(partial(self._readable, offset))
                chunk = bytes(self.data[offset : offset + OUTPUT_CHUNK_BYTES])
                done = self.closed and not chunk
            if done:
                return
            offset += len(chunk)
            yield chunk


@dataclass
class Exec:
    local: LocalProcess
    stdout: OutputBuffer
    stderr: OutputBuffer
    stdin_written: int = 0
    stdin_closed: bool = False
    returncode: int | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class StandInSandbox:
    sandbox_id: str
    task_id: str
    app_id: str
    created_at: float
    definition: api_pb2.Sandbox
    env: dict[str, str]
    tags: dict[str, str]
    machine: LocalMachine
    router_jwt: str
    execs: dict[str, Exec] = field(default_factory=dict)
    result: api_pb2.GenericResult | None = None

    @property
    def running(self) -> bool:
        return self.result is None


def _inline_env(sources: Any) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in sources:
        if source.HasField("env"):
            env.update(source.env.contents)
        elif source.secret_id:
            raise GRPCError(Status.NOT_FOUND, f"Secret {source.secret_id} not found")
    return env


class ModalStandIn:
    def __init__(self, token_id: str, token_secret: str, *, images: frozenset[str] = DEFAULT_IMAGES) -> None:
        self.token_id = token_id
        self.token_secret = token_secret
        self.images = images
        self.calls: list[Recorded] = []
        self.unimplemented: list[str] = []
        self.apps: dict[tuple[str, str], str] = {}
        self.image_tags: dict[str, str] = {}
        self.sandboxes: dict[str, StandInSandbox] = {}
        self.auth_tokens: set[str] = set()
        # Test hook: method name -> (status, message) the next call of it is refused with.
        self.refuse: dict[str, tuple[Status, str]] = {}
        self.router_url = ""

    # -- bookkeeping -----------------------------------------------------------------

    def _begin(self, stream: Stream[Any, Any], method: str, request: Any) -> dict[str, str]:
        metadata = {key: str(value) for key, value in (stream.metadata or {}).items()}
        self.calls.append(Recorded(method, metadata, request))
        refused = self.refuse.pop(method, None)
        if refused is not None:
            raise GRPCError(refused[0], refused[1])
        return metadata

    def _control(self, stream: Stream[Any, Any], method: str, request: Any, *, jwt: bool = False) -> None:
        metadata = self._begin(stream, method, request)
        if (
            metadata.get("x-modal-token-id") != self.token_id
            or metadata.get("x-modal-token-secret") != self.token_secret
        ):
            raise GRPCError(Status.UNAUTHENTICATED, "Token ID or secret is invalid")
        if jwt and metadata.get("x-modal-auth-token") not in self.auth_tokens:
            raise GRPCError(Status.UNAUTHENTICATED, "auth token is missing or expired")

    def _sandbox(self, sandbox_id: str) -> StandInSandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sandbox

    def calls_of(self, method: str) -> list[Recorded]:
        return [call for call in self.calls if call.method == method]

    async def close(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            await self.stop_sandbox(sandbox)

    async def stop_sandbox(self, sandbox: StandInSandbox) -> None:
        if sandbox.running:
            sandbox.result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_TERMINATED)
            await sandbox.machine.destroy()

    # -- control plane -----------------------------------------------------------------

    async def ClientHello(self, stream: Stream[Any, api_pb2.ClientHelloResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "ClientHello", request)
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def AuthTokenGet(self, stream: Stream[api_pb2.AuthTokenGetRequest, api_pb2.AuthTokenGetResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "AuthTokenGet", request)
        token = _jwt({"exp": int(time.time()) + JWT_LIFETIME_S, "sub": self.token_id})
        self.auth_tokens.add(token)
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=token))

    async def AppGetOrCreate(
        self, stream: Stream[api_pb2.AppGetOrCreateRequest, api_pb2.AppGetOrCreateResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "AppGetOrCreate", request)
        key = (request.environment_name, request.app_name)
        if key not in self.apps:
            if request.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App '{request.app_name}' not found")
            self.apps[key] = "ap-" + secrets.token_hex(11)
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=self.apps[key]))

    async def EnvironmentGetOrCreate(
        self, stream: Stream[api_pb2.EnvironmentGetOrCreateRequest, api_pb2.EnvironmentGetOrCreateResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "EnvironmentGetOrCreate", request)
        name = request.deployment_name or "main"
        metadata = api_pb2.EnvironmentMetadata(
            name=name, settings=api_pb2.EnvironmentSettings(image_builder_version=IMAGE_BUILDER_VERSION)
        )
        await stream.send_message(
            api_pb2.EnvironmentGetOrCreateResponse(environment_id="en-" + name, metadata=metadata)
        )

    async def ImageGetOrCreate(
        self, stream: Stream[api_pb2.ImageGetOrCreateRequest, api_pb2.ImageGetOrCreateResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "ImageGetOrCreate", request)
        commands = list(request.image.dockerfile_commands)
        tag = commands[0].removeprefix("FROM ").strip() if commands and commands[0].startswith("FROM ") else ""
        image_id = "im-" + secrets.token_hex(11)
        self.image_tags[image_id] = tag
        if tag in self.images:
            result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        else:
            result = api_pb2.GenericResult(
                status=api_pb2.GenericResult.GENERIC_STATUS_FAILURE,
                exception=f"failed to pull image {tag!r}: manifest unknown",
            )
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(image_id=image_id, result=result))

    async def SandboxCreateV2(
        self, stream: Stream[api_pb2.SandboxCreateV2Request, api_pb2.SandboxCreateV2Response]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxCreateV2", request, jwt=True)
        if request.app_id not in self.apps.values():
            raise GRPCError(Status.NOT_FOUND, f"App {request.app_id} not found")
        definition = request.definition
        if self.image_tags.get(definition.image_id) not in self.images:
            raise GRPCError(Status.NOT_FOUND, f"Image {definition.image_id} not found")
        blocked = definition.network_access.network_access_type == api_pb2.NetworkAccess.NetworkAccessType.BLOCKED
        machine = LocalMachine(network=not blocked)
        if definition.workdir and machine.writable(definition.workdir):
            # Like a container runtime's WORKDIR: the directory exists when the sandbox starts.
            machine.resolve(definition.workdir).mkdir(parents=True, exist_ok=True)
        sandbox_id = "sb-" + secrets.token_hex(12)
        task_id = "ta-" + secrets.token_hex(11) + "V"
        sandbox = StandInSandbox(
            sandbox_id=sandbox_id,
            task_id=task_id,
            app_id=request.app_id,
            created_at=time.time(),
            definition=definition,
            env=_inline_env(request.secret_sources),
            tags={tag.tag_name: tag.tag_value for tag in request.tags},
            machine=machine,
            router_jwt=_jwt({"exp": int(time.time()) + JWT_LIFETIME_S, "task_id": task_id}),
        )
        self.sandboxes[sandbox_id] = sandbox
        await stream.send_message(
            api_pb2.SandboxCreateV2Response(
                sandbox_id=sandbox_id,
                task_id=task_id,
                metadata=api_pb2.SandboxHandleMetadata(app_id=request.app_id),
                command_router_access=self._router_access(sandbox),
            )
        )

    def _router_access(self, sandbox: StandInSandbox) -> api_pb2.CommandRouterAccess:
        return api_pb2.CommandRouterAccess(url=self.router_url, jwt=sandbox.router_jwt)

    async def SandboxGetCommandRouterAccess(
        self,
        stream: Stream[api_pb2.SandboxGetCommandRouterAccessRequest, api_pb2.SandboxGetCommandRouterAccessResponse],
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxGetCommandRouterAccess", request, jwt=True)
        matches = [
            s for s in self.sandboxes.values() if s.sandbox_id == request.sandbox_id or s.task_id == request.task_id
        ]
        if not matches or not matches[0].running:
            raise GRPCError(Status.NOT_FOUND, "Sandbox not found or no longer running")
        access = self._router_access(matches[0])
        await stream.send_message(api_pb2.SandboxGetCommandRouterAccessResponse(url=access.url, jwt=access.jwt))

    async def SandboxGetTaskIdV2(
        self, stream: Stream[api_pb2.SandboxGetTaskIdRequest, api_pb2.SandboxGetTaskIdResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxGetTaskIdV2", request, jwt=True)
        sandbox = self._sandbox(request.sandbox_id)
        if sandbox.result is not None:
            await stream.send_message(api_pb2.SandboxGetTaskIdResponse(task_result=sandbox.result))
        else:
            await stream.send_message(api_pb2.SandboxGetTaskIdResponse(task_id=sandbox.task_id))

    async def SandboxWaitV2(self, stream: Stream[api_pb2.SandboxWaitRequest, api_pb2.SandboxWaitResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxWaitV2", request, jwt=True)
        sandbox = self._sandbox(request.sandbox_id)
        response = api_pb2.SandboxWaitResponse(metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id))
        if sandbox.result is not None:
            response.result.CopyFrom(sandbox.result)
        await stream.send_message(response)

    async def SandboxWait(self, stream: Stream[api_pb2.SandboxWaitRequest, api_pb2.SandboxWaitResponse]) -> None:
        """The V1 lookup the SDK uses for ids shaped like V1 ones ("sb-" + 22 characters):
        this stand-in only makes V2 sandboxes, so no V1 sandbox exists."""
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxWait", request)
        raise GRPCError(Status.NOT_FOUND, f"Sandbox {request.sandbox_id} not found")

    async def SandboxListV2(self, stream: Stream[api_pb2.SandboxListRequest, api_pb2.SandboxListResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxListV2", request, jwt=True)
        wanted = {tag.tag_name: tag.tag_value for tag in request.tags}
        page = sorted(
            (
                s
                for s in self.sandboxes.values()
                if (s.running or request.include_finished)
                and (not request.app_id or s.app_id == request.app_id)
                and (not request.before_timestamp or s.created_at < request.before_timestamp)
                and all(s.tags.get(key) == value for key, value in wanted.items())
            ),
            key=lambda s: s.created_at,
            reverse=True,
        )[:2]  # small pages, so a client that does not follow `before_timestamp` misses sandboxes
        infos = [
            api_pb2.SandboxInfo(
                id=s.sandbox_id,
                created_at=s.created_at,
                app_id=s.app_id,
                tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in s.tags.items()],
                task_info=api_pb2.TaskInfo(id=s.task_id, sandbox_id=s.sandbox_id, result=s.result),
                metadata=api_pb2.SandboxHandleMetadata(app_id=s.app_id),
            )
            for s in page
        ]
        await stream.send_message(api_pb2.SandboxListResponse(sandboxes=infos))

    async def SandboxTagsGetV2(
        self, stream: Stream[api_pb2.SandboxTagsGetRequest, api_pb2.SandboxTagsGetResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxTagsGetV2", request, jwt=True)
        sandbox = self._sandbox(request.sandbox_id)
        tags = [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sandbox.tags.items()]
        await stream.send_message(api_pb2.SandboxTagsGetResponse(tags=tags))

    async def SandboxTerminateV2(
        self, stream: Stream[api_pb2.SandboxTerminateRequest, api_pb2.SandboxTerminateResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._control(stream, "SandboxTerminateV2", request, jwt=True)
        await self.stop_sandbox(self._sandbox(request.sandbox_id))
        await stream.send_message(api_pb2.SandboxTerminateResponse())

    # -- task command router ----------------------------------------------------------

    def _task(self, stream: Stream[Any, Any], method: str, request: Any, task_id: str) -> StandInSandbox:
        metadata = self._begin(stream, method, request)
        matches = [s for s in self.sandboxes.values() if s.task_id == task_id]
        if not matches or not matches[0].running:
            raise GRPCError(Status.NOT_FOUND, f"Task {task_id} not found")
        if metadata.get("authorization") != f"Bearer {matches[0].router_jwt}":
            raise GRPCError(Status.UNAUTHENTICATED, "invalid or missing JWT")
        return matches[0]

    def _exec(self, sandbox: StandInSandbox, exec_id: str) -> Exec:
        found = sandbox.execs.get(exec_id)
        if found is None:
            raise GRPCError(Status.NOT_FOUND, f"Exec {exec_id} not found")
        return found

    async def TaskExecStart(self, stream: Stream[tcr_pb2.TaskExecStartRequest, tcr_pb2.TaskExecStartResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        sandbox = self._task(stream, "TaskExecStart", request, request.task_id)
        if request.exec_id in sandbox.execs:  # the exec id doubles as idempotency key
            await stream.send_message(tcr_pb2.TaskExecStartResponse())
            return
        if not request.command_args:
            raise GRPCError(Status.INVALID_ARGUMENT, "command_args must not be empty")
        env = {**sandbox.env, **_inline_env(request.secret_sources), **dict(request.env)}
        cwd = request.workdir if request.HasField("workdir") else (sandbox.definition.workdir or "/")
        try:
            local = await sandbox.machine.spawn(list(request.command_args), env=env, cwd=cwd)
        except FileNotFoundError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        running = Exec(local, OutputBuffer(), OutputBuffer())
        sandbox.execs[request.exec_id] = running
        asyncio.get_running_loop().create_task(_pump(running))
        await stream.send_message(tcr_pb2.TaskExecStartResponse())

    async def TaskExecStdioRead(
        self, stream: Stream[tcr_pb2.TaskExecStdioReadRequest, tcr_pb2.TaskExecStdioReadResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        running = self._exec(self._task(stream, "TaskExecStdioRead", request, request.task_id), request.exec_id)
        if request.file_descriptor == tcr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDOUT:
            buffer = running.stdout
        elif request.file_descriptor == tcr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDERR:
            buffer = running.stderr
        else:
            raise GRPCError(Status.INVALID_ARGUMENT, "file_descriptor must be stdout or stderr")
        async for chunk in buffer.read_from(request.offset):
            await stream.send_message(tcr_pb2.TaskExecStdioReadResponse(data=chunk))

    async def TaskExecStdinWrite(
        self, stream: Stream[tcr_pb2.TaskExecStdinWriteRequest, tcr_pb2.TaskExecStdinWriteResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        running = self._exec(self._task(stream, "TaskExecStdinWrite", request, request.task_id), request.exec_id)
        data = bytes(request.data)
        if request.offset > running.stdin_written:
            raise GRPCError(Status.OUT_OF_RANGE, f"offset {request.offset} is past {running.stdin_written}")
        # A retried write repeats bytes already written: only the new tail goes in.
        fresh = data[running.stdin_written - request.offset :]
        pipe = running.local.process.stdin
        if fresh and not running.stdin_closed and pipe is not None:
            try:
                await pipe.send(fresh)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass  # the process no longer reads; like a pipe whose reader is gone
        running.stdin_written += len(fresh)
        if request.eof and not running.stdin_closed:
            running.stdin_closed = True
            if pipe is not None:
                await pipe.aclose()
        await stream.send_message(tcr_pb2.TaskExecStdinWriteResponse())

    async def TaskExecStdinStatus(
        self, stream: Stream[tcr_pb2.TaskExecStdinStatusRequest, tcr_pb2.TaskExecStdinStatusResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        running = self._exec(self._task(stream, "TaskExecStdinStatus", request, request.task_id), request.exec_id)
        await stream.send_message(
            tcr_pb2.TaskExecStdinStatusResponse(num_bytes_written=running.stdin_written, closed=running.stdin_closed)
        )

    async def TaskExecPoll(self, stream: Stream[tcr_pb2.TaskExecPollRequest, tcr_pb2.TaskExecPollResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        running = self._exec(self._task(stream, "TaskExecPoll", request, request.task_id), request.exec_id)
        await stream.send_message(tcr_pb2.TaskExecPollResponse(**_exit_status(running)))

    async def TaskExecWait(self, stream: Stream[tcr_pb2.TaskExecWaitRequest, tcr_pb2.TaskExecWaitResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        running = self._exec(self._task(stream, "TaskExecWait", request, request.task_id), request.exec_id)
        await running.ended.wait()
        await stream.send_message(tcr_pb2.TaskExecWaitResponse(**_exit_status(running)))


def _exit_status(running: Exec) -> dict[str, int]:
    code = running.returncode
    if code is None:
        return {}
    if code < 0:  # the process itself was killed by a signal
        return {"signal": -code}
    return {"code": code}


async def _pump(running: Exec) -> None:
    process = running.local.process

    async def copy(source: Any, target: OutputBuffer) -> None:
        try:
            async for chunk in source:
                await target.append(chunk)
        finally:
            await target.close()

    await asyncio.gather(copy(process.stdout, running.stdout), copy(process.stderr, running.stderr))
    running.returncode = await process.wait()
    running.ended.set()


def _unimplemented(stand_in: ModalStandIn, name: str) -> Callable[[Any, Stream[Any, Any]], Awaitable[None]]:
    async def handler(_self: Any, stream: Stream[Any, Any]) -> None:
        stand_in.unimplemented.append(name)
        raise GRPCError(Status.UNIMPLEMENTED, f"the Modal stand-in does not implement {name}")

    return handler


def _delegate(
    method: Callable[[Stream[Any, Any]], Awaitable[None]],
) -> Callable[[Any, Stream[Any, Any]], Awaitable[None]]:
    async def handler(_self: Any, stream: Stream[Any, Any]) -> None:
        await method(stream)

    return handler


def _servicer(base: type, stand_in: ModalStandIn) -> Any:
    """An instance of the generated grpclib base `base` whose RPCs are the stand-in's
    methods of the same name, and UNIMPLEMENTED for every other one."""
    methods = {
        name: _delegate(getattr(stand_in, name)) if hasattr(stand_in, name) else _unimplemented(stand_in, name)
        for name in getattr(base, "__abstractmethods__", frozenset())
    }
    return type(f"StandIn{base.__name__}", (base,), methods)()


class ModalServer:
    """The stand-in's grpclib server on 127.0.0.1:<ephemeral>, in a thread with its own event
    loop (so a client in any test reaches it, as with sandbox_host.LoopbackServer)."""

    def __init__(self, stand_in: ModalStandIn) -> None:
        self.stand_in = stand_in
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._ready = threading.Event()
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        server = Server(
            [
                _servicer(api_grpc.ModalClientBase, self.stand_in),
                _servicer(task_command_router_grpc.TaskCommandRouterBase, self.stand_in),
            ]
        )
        self._server = server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = int(sock.getsockname()[1])
        loop.run_until_complete(server.start(sock=sock))
        self.stand_in.router_url = self.url
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.stand_in.close())
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="modal-stand-in")
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the Modal stand-in did not start within {START_TIMEOUT_S} s")

    def vanish(self, sandbox_id: str) -> None:
        """Test hook: the sandbox ends behind the client's back (as when Modal's timeout hits)."""
        if self._loop is None:
            raise RuntimeError("the Modal stand-in is not running")
        sandbox = self.stand_in.sandboxes[sandbox_id]
        stopped = asyncio.run_coroutine_threadsafe(self.stand_in.stop_sandbox(sandbox), self._loop)
        stopped.result(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        self._loop = self._thread = None


@asynccontextmanager
async def modal_server(token_id: str, token_secret: str) -> AsyncIterator[tuple[ModalServer, ModalStandIn]]:
    """The stand-in on loopback (control plane and command router at one URL); its sandboxes end with it."""
    import anyio.to_thread

    stand_in = ModalStandIn(token_id, token_secret)
    server = ModalServer(stand_in)
    await anyio.to_thread.run_sync(server.start)
    try:
        yield server, stand_in
    finally:
        await anyio.to_thread.run_sync(server.stop)


__all__ = ["ModalServer", "ModalStandIn", "modal_server"]
