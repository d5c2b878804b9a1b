"""What a session in network mode "model" gets: its CLI's view of the world (base URLs that
point at the in-sandbox forwarder, placeholder keys) and the proxy's view (routes to the real
upstreams, with the real keys to swap in).

Pure data in, data out: no sockets, no sandbox. The orchestrator (orchestrator/egress.py)
serves the policy and builds the session's backend from the rewritten settings and environment.

Which variables are what:
- A `pass_env` variable named `*_BASE_URL` that is set on the host becomes a route: the CLI gets
  `http://127.0.0.1:<port>/m/<VAR>`, the proxy forwards there to the host's value.
- A backend's model base URL variables (`BackendEntry.model_urls` in backends/registry.py) get
  a route to the vendor's public API even when the host does not set them, so a CLI that would
  otherwise go straight to its vendor goes through the proxy.
- A `pass_env` variable that is a credential (named in the backend's `api_key_env`, or with a
  credential-like name) gets a placeholder; the proxy swaps the real value in on model routes.
- In the backend's own settings (e.g. Factory's BYOK `customModels`), `baseUrl`-like keys with an
  http(s) URL become routes and `apiKey`-like keys become placeholders the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.egress.proxy import EgressPolicy, ModelRoute
from mcp_sandboxes.redaction import looks_like_secret_name

# Inside the sandbox: where the socket directory and the forwarder are mounted, and the loopback
# port the forwarder serves (the sandbox has a network namespace of its own, so no clash).
SANDBOX_EGRESS_DIR = "/run/mcp-sandboxes/egress"
SANDBOX_SOCKET = f"{SANDBOX_EGRESS_DIR}/proxy.sock"
SANDBOX_FORWARDER = "/opt/mcp-sandboxes/egress/forward"
SANDBOX_PORT = 18080
SANDBOX_URL = f"http://127.0.0.1:{SANDBOX_PORT}"
SOCKET_NAME = "proxy.sock"

PLACEHOLDER_PREFIX = "mcp-sandboxes-placeholder-"
_ROUTE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_URL_KEY = re.compile(r"^base_?url$", re.IGNORECASE)
_KEY_KEY = re.compile(r"^api_?key$", re.IGNORECASE)


def placeholder(name: str) -> str:
    """What the sandbox holds instead of the credential `name` (stable: a restarted server and
    a resumed CLI agree on it)."""
    return PLACEHOLDER_PREFIX + _ROUTE_NAME.sub("-", name)


def route_url(route: str) -> str:
    return f"{SANDBOX_URL}/m/{route}"


def proxy_environment() -> dict[str, str]:
    """Variables every command of a "model" session gets: plain HTTP(S) clients (curl, pip, npm,
    git over https) go through the proxy, which lets only the environment's allowed hosts pass;
    loopback stays direct (the base URLs above point there)."""
    proxy = SANDBOX_URL
    no_proxy = "127.0.0.1,localhost,::1"
    return {
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "https_proxy": proxy,
        "http_proxy": proxy,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


class EgressPlan(BaseModel):
    """A session's egress: `environ` and `settings` are what its backend is built from (so every
    file and variable the CLI sees carries placeholders and local URLs), `policy` what the proxy
    serves on its socket."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environ: dict[str, str]
    settings: BackendSettings
    policy: EgressPolicy
    credentials: dict[str, str] = Field(
        default_factory=dict, description="placeholder -> real value, for redaction and the routes."
    )


def is_credential(name: str, settings: BackendSettings) -> bool:
    return name in settings.api_key_env or looks_like_secret_name(name)


def plan_egress(
    *,
    session_id: str,
    settings: BackendSettings,
    environ: Mapping[str, str],
    model_urls: Mapping[str, str],
    allowed_hosts: Iterable[str] = (),
    agent_upstream: str | None = None,
) -> EgressPlan:
    """The egress of one session whose backend has `settings`, on a host with `environ`."""
    sandbox_environ = {key: value for key, value in environ.items() if key not in settings.pass_env}
    credentials: dict[str, str] = {}
    upstreams: dict[str, str] = {}
    for name in settings.pass_env:
        value = environ.get(name)
        if not value:
            continue
        if name.endswith("_BASE_URL") and value.startswith(("http://", "https://")):
            upstreams[name] = value
            sandbox_environ[name] = route_url(name)
        elif is_credential(name, settings):
            credentials[placeholder(name)] = value
            sandbox_environ[name] = placeholder(name)
        else:
            sandbox_environ[name] = value
    for name, default in model_urls.items():
        if name not in upstreams and default:
            upstreams[name] = default
            sandbox_environ[name] = route_url(name)
    # Tables set from the environment arrive as JSON text (MCP_SANDBOXES_BACKENDS__FACTORY__DROID_SETTINGS).
    extras = {key: _json_table(value) for key, value in (settings.model_extra or {}).items()}
    extra = _rewrite_settings(extras, "settings", upstreams, credentials)
    rewritten = (
        BackendSettings.model_validate({**settings.model_dump(), **extra})
        if extra != (settings.model_extra or {})
        else settings
    )
    # The fixed `env` table is the operator's; a credential or base URL there is treated alike.
    env = dict(settings.env)
    for name, value in settings.env.items():
        if name.endswith("_BASE_URL") and value.startswith(("http://", "https://")):
            upstreams[name] = value
            env[name] = route_url(name)
        elif is_credential(name, settings) and value:
            credentials[placeholder(name)] = value
            env[name] = placeholder(name)
    if env != settings.env:
        rewritten = rewritten.model_copy(update={"env": env})
    routes = [
        ModelRoute(name=name, upstream=upstream, credentials=credentials)
        for name, upstream in sorted(upstreams.items())
    ]
    policy = EgressPolicy(
        session_id=session_id,
        routes=routes,
        agent_upstream=agent_upstream,
        allowed_hosts=list(allowed_hosts),
    )
    return EgressPlan(environ=sandbox_environ, settings=rewritten, policy=policy, credentials=credentials)


def _json_table(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _rewrite_settings(node: Any, path: str, upstreams: dict[str, str], credentials: dict[str, str]) -> Any:
    """`node` with URL-valued `baseUrl` keys turned into routes and `apiKey` values into
    placeholders (named by where they sit, e.g. settings.droid_settings.customModels.0.apiKey)."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            where = f"{path}.{key}"
            if isinstance(value, str) and _URL_KEY.match(key) and value.startswith(("http://", "https://")):
                name = _ROUTE_NAME.sub("-", where)
                upstreams[name] = value
                out[key] = route_url(name)
            elif isinstance(value, str) and _KEY_KEY.match(key) and value and not value.startswith("{env:"):
                credentials[placeholder(where)] = value
                out[key] = placeholder(where)
            else:
                out[key] = _rewrite_settings(value, where, upstreams, credentials)
        return out
    if isinstance(node, list):
        return [_rewrite_settings(item, f"{path}.{index}", upstreams, credentials) for index, item in enumerate(node)]
    return node
