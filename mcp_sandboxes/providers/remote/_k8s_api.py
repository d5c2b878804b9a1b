"""The kubernetes provider's connection to an API server: kubeconfig or in-cluster config loaded
by `kubernetes_asyncio`, JSON requests and watches, and the pod exec WebSocket.

`kubernetes_asyncio` loads the configuration the way Kubernetes users expect (a kubeconfig
file, `$KUBECONFIG`, `~/.kube/config`, its contexts, client certificates, exec and OIDC auth
plugins with their token refresh, or the service account of a pod) and owns the HTTP session
(its TLS context). The requests themselves go through that session as plain JSON: the custom
resources of agent-sandbox have no generated models, and its `WsApiClient` speaks
`v4.channel.k8s.io`, which cannot close stdin; the exec here asks for `v5.channel.k8s.io`.

The package is imported only here, and only when a kubernetes provider first connects, so
mcp_sandboxes imports without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio.to_thread

from mcp_sandboxes.errors import ProviderUnavailableError

V5_PROTOCOL = "v5.channel.k8s.io"
PACKAGE = "kubernetes_asyncio"
INSTALL_HINT = "pip install kubernetes_asyncio (or the package's kubernetes extra)"


def default_kubeconfig() -> str | None:
    """$KUBECONFIG (a list of files, as kubectl reads it) or ~/.kube/config when it exists."""
    from_env = os.environ.get("KUBECONFIG")
    if from_env:
        return from_env
    home = Path.home() / ".kube" / "config"
    return str(home) if home.exists() else None


def in_cluster() -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    )


class KubeApi:
    """One API server, reached with one configuration's credentials."""

    def __init__(self, api_client: Any, configuration: Any, request_timeout_s: float) -> None:
        self._api_client = api_client
        self._configuration = configuration
        self.host = str(configuration.host).rstrip("/")
        self._request_timeout_s = request_timeout_s

    @classmethod
    async def connect(cls, *, kubeconfig: str | None, context: str | None, request_timeout_s: float) -> KubeApi:
        try:
            from kubernetes_asyncio import client, config
        except ImportError:
            raise ProviderUnavailableError(
                f"kubernetes: the {PACKAGE} package is not installed; {INSTALL_HINT}"
            ) from None
        configuration = client.Configuration()
        path = kubeconfig or default_kubeconfig()
        if path:
            path = await anyio.to_thread.run_sync(os.path.expanduser, path)
        try:
            if path:
                await config.load_kube_config(
                    config_file=path,
                    context=context,
                    client_configuration=configuration,
                    persist_config=False,
                )
            elif in_cluster():
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                raise ProviderUnavailableError(
                    "kubernetes: no kubeconfig found ($KUBECONFIG unset, no ~/.kube/config) and not running in a "
                    "pod; set providers.kubernetes.kubeconfig or KUBECONFIG"
                )
        except ProviderUnavailableError:
            raise
        except (config.ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
            where = path or "the in-cluster service account"
            raise ProviderUnavailableError(
                f"kubernetes: could not load the configuration from {where} ({type(exc).__name__}: {exc}); "
                "fix providers.kubernetes.kubeconfig / context"
            ) from None
        return cls(client.ApiClient(configuration), configuration, request_timeout_s)

    async def aclose(self) -> None:
        await self._api_client.close()

    @property
    def _session(self) -> aiohttp.ClientSession:
        session: aiohttp.ClientSession = self._api_client.rest_client.pool_manager
        return session

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        server_hostname = getattr(self._configuration, "tls_server_name", None)
        if server_hostname:
            extra["server_hostname"] = server_hostname
        if getattr(self._configuration, "proxy", None):
            extra["proxy"] = self._configuration.proxy
        return extra

    async def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {"Accept": "application/json"}
        # Runs the configuration's refresh hook (exec plugins, in-cluster token rotation).
        await self._api_client.update_params_for_auth(headers, [], ["BearerToken"])
        if "authorization" not in {key.lower() for key in headers}:
            basic = self._configuration.get_basic_auth_token() if self._configuration.username else None
            if basic:
                headers["Authorization"] = basic
        return headers

    def _unreachable(self, action: str, exc: BaseException) -> ProviderUnavailableError:
        return ProviderUnavailableError(
            f"kubernetes: {action} could not reach the API server at {self.host} ({type(exc).__name__}: {exc}); "
            "check the kubeconfig's server and that the cluster is up"
        )

    async def request(
        self,
        method: str,
        path: str,
        action: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body or {})."""
        headers = await self._headers()
        try:
            async with self._session.request(
                method,
                f"{self.host}{path}",
                params=dict(params or {}),
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._request_timeout_s),
                **self._extra(),
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(action, exc) from None
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"message": raw[:300].decode("utf-8", errors="replace")}
        return status, data if isinstance(data, dict) else {"items": data}

    @asynccontextmanager
    async def watch(
        self, path: str, action: str, params: Mapping[str, str]
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The watch events ({type, object}) of a list `path`, as the server streams them."""
        headers = await self._headers()
        try:
            async with self._session.get(
                f"{self.host}{path}",
                params={**params, "watch": "true"},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._request_timeout_s, sock_read=None),
                **self._extra(),
            ) as response:
                if response.status != 200:
                    text = (await response.read())[:300].decode("utf-8", errors="replace")
                    raise ProviderUnavailableError(f"kubernetes: {action} failed ({response.status} {text})")
                async with aclosing(_events(response)) as events:
                    yield events
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(action, exc) from None

    async def exec_socket(self, path: str, query: Sequence[tuple[str, str]]) -> aiohttp.ClientWebSocketResponse:
        """Open the exec WebSocket (the caller closes it). Raises aiohttp.WSServerHandshakeError
        when the server refuses the upgrade (404: no such pod)."""
        parts = urlsplit(f"{self.host}{path}")
        scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
        url = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
        headers = await self._headers()
        try:
            socket: aiohttp.ClientWebSocketResponse = await self._session.ws_connect(
                url,
                params=list(query),
                protocols=(V5_PROTOCOL,),
                headers=headers,
                max_msg_size=0,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                **self._extra(),
            )
        except aiohttp.WSServerHandshakeError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable("running a command", exc) from None
        return socket


async def _events(response: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any]]:
    async for line in response.content:
        if line.strip():
            event = json.loads(line)
            if isinstance(event, dict):
                yield event
