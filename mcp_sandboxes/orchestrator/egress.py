"""Network mode "model" for sessions: the proxy socket each such session's sandbox gets, the
forwarder mounted beside it, and the session's backend built from placeholders and local URLs.

Per session, on the host: `<data_dir>/egress/<session id>/proxy.sock`, served by the one
`EgressProxy` of this server with the session's policy (its model routes, this server's agent
listener, its environment's allowed hosts). In the sandbox, that directory is mounted read-only
at SANDBOX_EGRESS_DIR and the forwarder at SANDBOX_FORWARDER; every turn's command runs under the
forwarder (`forward PORT SOCKET argv...`), which keeps the command's pid and serves the socket on
127.0.0.1:PORT in the sandbox's own network namespace for as long as the command lives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import anyio

from mcp_sandboxes.backends import build_backend, model_urls
from mcp_sandboxes.backends.base import AgentSpec, Backend, Command, Translator, Turn
from mcp_sandboxes.config import Settings
from mcp_sandboxes.egress.forwarder import configured_forwarder
from mcp_sandboxes.egress.plan import (
    SANDBOX_EGRESS_DIR,
    SANDBOX_FORWARDER,
    SANDBOX_PORT,
    SANDBOX_SOCKET,
    SANDBOX_URL,
    SOCKET_NAME,
    EgressPlan,
    plan_egress,
    proxy_environment,
)
from mcp_sandboxes.egress.proxy import EgressProxy, RefusedRequest
from mcp_sandboxes.errors import InvalidInputError, ProviderError
from mcp_sandboxes.events import NetworkRefused
from mcp_sandboxes.files import make_private_dir
from mcp_sandboxes.orchestrator.clis import with_host_cli
from mcp_sandboxes.specs import Mount, NetworkMode, SandboxSetup, SandboxSpec

logger = logging.getLogger(__name__)

# Providers whose sandboxes get a network namespace of their own and host bind mounts: the two
# things mode "model" is made of. Remote sandboxes mount nothing from this host; `process` has
# no namespace to keep the agent in.
EGRESS_PROVIDERS = frozenset({"docker", "podman", "containerd", "bubblewrap"})

Emit = Callable[[str, list[NetworkRefused]], Awaitable[None]]


def supports_model_network(provider: str) -> bool:
    return provider in EGRESS_PROVIDERS


def provider_network(spec: SandboxSpec) -> NetworkMode:
    """What the provider is asked for: a "model" sandbox is a "none" one plus the proxy's mounts."""
    return "none" if spec.network == "model" else spec.network


def refuse_model_network(provider: str) -> None:
    if not supports_model_network(provider):
        raise InvalidInputError(
            "network",
            f"mode 'model' needs a local container provider ({', '.join(sorted(EGRESS_PROVIDERS))});"
            f" {provider!r} cannot mount the proxy socket. Use network 'none', or 'host' where the provider allows it",
        )


class EgressBackend:
    """A backend whose every turn runs under the forwarder, with the proxy variables set."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.executable = inner.executable

    def command(self, turn: Turn) -> Command:
        command = self.inner.command(turn)
        return command.model_copy(
            update={
                "argv": [SANDBOX_FORWARDER, str(SANDBOX_PORT), SANDBOX_SOCKET, *command.argv],
                "env": {**proxy_environment(), **command.env},
            }
        )

    def translator(self) -> Translator:
        return self.inner.translator()

    def mounts(self) -> list[Mount]:
        return self.inner.mounts()

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        return self.inner.setup(agent, home=home)


class SessionEgress:
    """One session's egress while served."""

    def __init__(self, session_id: str, key: str, plan: EgressPlan, *, agent_endpoint: bool) -> None:
        self.session_id = session_id
        self.key = key
        self.plan = plan
        # Whether /agent/ reaches this server (sub-agents, permission prompts).
        self.agent_endpoint = agent_endpoint


class EgressService:
    def __init__(self, settings: Settings, environ: Mapping[str, str], emit: Emit) -> None:
        self._settings = settings
        self._environ = environ
        self._emit = emit
        self._bin = settings.server.data_dir.expanduser() / "egress" / "bin"
        self._root = sockets_root(settings.server.data_dir.expanduser() / "egress")
        self._proxy: EgressProxy | None = None
        self._open: dict[str, SessionEgress] = {}
        self._agent_upstream: str | None = None
        self._agent_path = "/mcp"
        self._forwarder: Path | None = None
        self._lock = anyio.Lock()
        # (method, target) pairs already reported per session.
        self._refused_seen: dict[str, set[tuple[str, str]]] = {}

    # -- lifecycle (the orchestrator runs the proxy for as long as it runs) ------------------

    def attach(self, proxy: EgressProxy | None) -> None:
        self._proxy = proxy
        if proxy is None:
            self._open.clear()

    async def _on_refused(self, refused: RefusedRequest) -> None:
        # One event per target and session: CLIs retry their vendor's telemetry and update checks
        # (droid: eleven calls to api.factory.ai in one turn), which would drown the stream.
        seen = self._refused_seen.setdefault(refused.session_id, set())
        if (refused.method, refused.target) in seen:
            logger.debug("refused again for %s: %s %s", refused.session_id, refused.method, refused.target)
            return
        seen.add((refused.method, refused.target))
        await self._emit(
            refused.session_id,
            [NetworkRefused(method=refused.method, target=refused.target, reason=refused.reason)],
        )

    def proxy(self) -> EgressProxy:
        return EgressProxy(
            on_refused=self._on_refused,
            refuse_private_addresses=not self._settings.egress.allow_private_addresses,
        )

    # -- what the server tells us once it listens -------------------------------------------

    async def set_agent_url(self, url: str | None) -> None:
        """This server's agent listener moved (it gets a fresh port at each start): every open
        socket now forwards /agent/ there. The URL agents hold (in the sandbox) stays the same."""
        if url is None:
            self._agent_upstream = None
        else:
            parts = urlsplit(url)
            self._agent_upstream = f"{parts.scheme}://{parts.netloc}"
            self._agent_path = parts.path or "/"
        for egress in list(self._open.values()):
            await self._serve(egress)

    def callback_url(self) -> str:
        """The agent endpoint as an agent in a "model" sandbox reaches it."""
        return f"{SANDBOX_URL}/agent{self._agent_path}"

    # -- sessions --------------------------------------------------------------------------

    async def check_available(self) -> None:
        """Raise (at create_environment) when mode "model" cannot work here: no forwarder."""
        await self._forwarder_path()

    async def _forwarder_path(self) -> Path:
        async with self._lock:
            if self._forwarder is None:
                self._forwarder = await configured_forwarder(self._settings.egress.forwarder_path, self._bin)
            return self._forwarder

    async def sandbox_mounts(self, key: str) -> list[Mount]:
        """What a "model" sandbox mounts: its socket directory (made now, `<data_dir>/egress/<key>`;
        `key` names the sandbox, e.g. its name, so a pooled sandbox made before its session has
        one too) and the forwarder. The socket itself appears there when a session opens."""
        forwarder = await self._forwarder_path()
        directory = self._dir(key)
        await anyio.to_thread.run_sync(_make_socket_dir, directory)
        return [
            Mount(source=str(directory), target=SANDBOX_EGRESS_DIR, read_only=True),
            Mount(source=str(forwarder), target=SANDBOX_FORWARDER, read_only=True),
        ]

    def backend_for(self, session_id: str, backend_name: str, allowed_hosts: list[str]) -> tuple[EgressPlan, Backend]:
        """The session's plan and its backend, built from placeholders and local URLs."""
        plan = plan_egress(
            session_id=session_id,
            settings=self._settings.backend(backend_name),
            environ=self._environ,
            model_urls=model_urls(backend_name),
            allowed_hosts=allowed_hosts,
        )
        inner = with_host_cli(build_backend(backend_name, plan.settings, plan.environ), plan.settings)
        return plan, EgressBackend(inner)

    async def open(self, key: str, session_id: str, plan: EgressPlan, *, agent_endpoint: bool) -> None:
        """Serve `session_id`'s egress on the socket of sandbox `key`; listening before this
        returns. A session whose sandbox came from a warm pool (`key` is the pooled sandbox's
        name) finds it under its own id too: `<root>/<session id>` links there."""
        if self._proxy is None:
            raise InvalidInputError("network", "mode 'model' is not running in this server (no egress proxy)")
        egress = SessionEgress(session_id, key, plan, agent_endpoint=agent_endpoint)
        self._open[session_id] = egress
        try:
            await anyio.to_thread.run_sync(_make_socket_dir, self._dir(key))
            if key != session_id:
                await anyio.to_thread.run_sync(_link, self._dir(session_id), self._dir(key).name)
            await self._serve(egress)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close(session_id)
            raise

    async def _serve(self, egress: SessionEgress) -> None:
        if self._proxy is None:
            return
        upstream = self._agent_upstream if egress.agent_endpoint else None
        policy = egress.plan.policy.model_copy(update={"agent_upstream": upstream})
        await self._proxy.serve(self._dir(egress.key) / SOCKET_NAME, policy)

    async def close(self, session_id: str) -> None:
        """Stop serving the session's socket and remove its sandbox's directory (idempotent)."""
        egress = self._open.pop(session_id, None)
        self._refused_seen.pop(session_id, None)
        named = self._dir(session_id)
        served = self._dir(egress.key if egress is not None else session_id) / SOCKET_NAME
        if self._proxy is not None:
            try:
                await self._proxy.stop(served)
            except Exception:  # the socket may be gone already
                logger.debug("stopping the egress socket of %s failed", session_id, exc_info=True)
        directory = self._dir(egress.key if egress is not None else session_id)
        if named.is_symlink():
            directory = self._root / os.readlink(named)
            named.unlink(missing_ok=True)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))

    async def close_ended(self, live: set[str]) -> None:
        """Close the egress of every served session not in `live` (ended without stop_session)."""
        for session_id in [s for s in self._open if s not in live]:
            await self.close(session_id)

    async def discard(self, key: str) -> None:
        """Remove sandbox `key`'s egress directory (a pooled sandbox that was never taken)."""
        directory = self._dir(key)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))

    async def prune(self, sessions: set[str]) -> None:
        """At start-up: remove the egress directories no live session's sandbox uses (those of
        sandboxes removed while the server was down, and of pooled ones, which are not adopted)."""

        def sweep() -> None:
            if not self._root.is_dir():
                return
            named = [self._dir(s) for s in sessions]
            keep = {"bin", *(path.name for path in named)}
            keep |= {os.readlink(path) for path in named if path.is_symlink()}
            for entry in self._root.iterdir():
                if entry.name in keep:
                    continue
                if entry.is_symlink():
                    entry.unlink(missing_ok=True)
                else:
                    shutil.rmtree(entry, ignore_errors=True)

        await anyio.to_thread.run_sync(sweep)

    def _dir(self, key: str) -> Path:
        """Sandbox `key`'s egress directory: named by a short digest, since a unix socket's whole
        path must fit in 107 bytes."""
        return self._root / hashlib.sha256(key.encode()).hexdigest()[:16]

    def credential_values(self) -> list[str]:
        """Every real credential some open session's proxy swaps in (for redaction)."""
        return sorted({value for egress in self._open.values() for value in egress.plan.credentials.values()})


# Room a socket path needs below the root: "/" + 16-character directory + "/proxy.sock".
_SOCKET_TAIL = 1 + 16 + 1 + len(SOCKET_NAME)
_UNIX_PATH_MAX = 107


def sockets_root(preferred: Path) -> Path:
    """Where egress directories go: `<data_dir>/egress`, unless that path is too long for a unix
    socket below it; then a private directory under the system's temporary directory."""
    if len(str(preferred)) + _SOCKET_TAIL <= _UNIX_PATH_MAX:
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mcp-sandboxes-egress-{digest}"


def _link(named: Path, key: str) -> None:
    named.unlink(missing_ok=True)
    named.symlink_to(key)  # relative: the data directory may move


def _make_socket_dir(directory: Path) -> None:
    make_private_dir(directory.parent)
    owner = directory.parent.lstat()
    if stat.S_ISLNK(owner.st_mode) or owner.st_uid != os.getuid():
        # The fallback root sits in a shared temporary directory: never one another user made.
        raise ProviderError(f"{directory.parent} is not this server's own directory; remove it and retry")
    directory.mkdir(exist_ok=True)
    # The sandbox's user is another uid: it must reach the socket inside (the socket is 0666;
    # the directory above it, 0700, is not on the sandbox's path: only this one is mounted).
    directory.chmod(0o755)
