"""The plan of a "model" session: what its CLI sees (placeholders, local URLs) and what the
proxy serves (real upstreams, real keys), for each backend's real settings (default.toml)."""

from __future__ import annotations

from mcp_sandboxes.backends.base import AgentSpec, Turn
from mcp_sandboxes.backends.registry import build_backend, model_urls
from mcp_sandboxes.config import BackendSettings, load_settings
from mcp_sandboxes.egress.plan import SANDBOX_URL, placeholder, plan_egress, route_url
from mcp_sandboxes.orchestrator.egress import EgressBackend

REAL_KEY = "sk-ant-real-key-0123456789abcdef"
HOST = {"ANTHROPIC_API_KEY": REAL_KEY, "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/anthropic", "LANG": "C"}


def _settings(backend: str) -> BackendSettings:
    return load_settings(environ={}).backend(backend)


def test_claude_gets_a_placeholder_and_a_local_base_url_and_the_proxy_gets_the_real_ones() -> None:
    plan = plan_egress(session_id="ses_1", settings=_settings("claude"), environ=HOST, model_urls=model_urls("claude"))
    assert plan.environ["ANTHROPIC_API_KEY"] == placeholder("ANTHROPIC_API_KEY") != REAL_KEY
    assert plan.environ["ANTHROPIC_BASE_URL"] == route_url("ANTHROPIC_BASE_URL")
    assert plan.environ["ANTHROPIC_BASE_URL"].startswith(SANDBOX_URL)
    (route,) = plan.policy.routes
    assert route.upstream == "http://127.0.0.1:9/anthropic"
    assert route.credentials == {placeholder("ANTHROPIC_API_KEY"): REAL_KEY}
    assert plan.credentials == route.credentials
    # Built from the plan, the CLI's environment carries no real key anywhere.
    backend = EgressBackend(build_backend("claude", plan.settings, plan.environ))
    command = backend.command(Turn(session_id="ses_1", index=0, prompt="hi", agent=AgentSpec(backend="claude")))
    assert REAL_KEY not in repr(command)
    assert command.env["ANTHROPIC_API_KEY"] == placeholder("ANTHROPIC_API_KEY")
    assert command.argv[:3] == ["/opt/mcp-sandboxes/egress/forward", "18080", "/run/mcp-sandboxes/egress/proxy.sock"]
    assert command.env["HTTPS_PROXY"] == SANDBOX_URL and "127.0.0.1" in command.env["NO_PROXY"]


def test_a_vendor_url_the_host_leaves_unset_is_routed_to_the_vendor() -> None:
    plan = plan_egress(
        session_id="s",
        settings=_settings("claude"),
        environ={"ANTHROPIC_API_KEY": REAL_KEY},
        model_urls=model_urls("claude"),
    )
    assert [r.upstream for r in plan.policy.routes] == ["https://api.anthropic.com"]
    assert plan.environ["ANTHROPIC_BASE_URL"] == route_url("ANTHROPIC_BASE_URL")


def test_codex_profile_points_at_the_proxy_and_names_no_real_key() -> None:
    host = {"OPENAI_API_KEY": "sk-openai-real-000000000000", "OPENAI_BASE_URL": "http://127.0.0.1:7/v1"}
    plan = plan_egress(session_id="s", settings=_settings("codex"), environ=host, model_urls=model_urls("codex"))
    backend = build_backend("codex", plan.settings, plan.environ)
    setup = backend.setup(AgentSpec(backend="codex"), home="/home/agent")
    written = b"".join(getattr(f, "data", b"") for f in setup.files).decode()
    assert route_url("OPENAI_BASE_URL") in written
    assert "127.0.0.1:7" not in written and "sk-openai-real" not in written


def test_byok_settings_get_routes_and_placeholders() -> None:
    settings = BackendSettings.model_validate(
        {
            "pass_env": [],
            "droid_settings": {
                "customModels": [{"model": "m", "baseUrl": "https://api.example.com/v1", "apiKey": "byok-real-secret"}]
            },
        }
    )
    plan = plan_egress(session_id="s", settings=settings, environ={}, model_urls={})
    model = (plan.settings.model_extra or {})["droid_settings"]["customModels"][0]
    assert model["baseUrl"].startswith(f"{SANDBOX_URL}/m/") and model["apiKey"].startswith("mcp-sandboxes-placeholder-")
    (route,) = plan.policy.routes
    assert route.upstream == "https://api.example.com/v1"
    assert route.credentials == {model["apiKey"]: "byok-real-secret"}


def test_templates_and_plain_variables_pass_unchanged_and_unknown_host_variables_stay_out() -> None:
    settings = BackendSettings(
        pass_env=["LANG", "OPENAI_COMPATIBLE_API_KEY"], api_key_env=["OPENAI_COMPATIBLE_API_KEY"]
    )
    settings = BackendSettings.model_validate({**settings.model_dump(), "config": {"apiKey": "{env:X}"}})
    plan = plan_egress(
        session_id="s",
        settings=settings,
        environ={"LANG": "C", "OPENAI_COMPATIBLE_API_KEY": "real-compat-key-123"},
        model_urls={},
        allowed_hosts=["pypi.org"],
    )
    assert plan.environ["LANG"] == "C"
    assert plan.environ["OPENAI_COMPATIBLE_API_KEY"] == placeholder("OPENAI_COMPATIBLE_API_KEY")
    assert (plan.settings.model_extra or {})["config"] == {"apiKey": "{env:X}"}
    assert plan.policy.allowed_hosts == ["pypi.org"] and plan.policy.routes == []
