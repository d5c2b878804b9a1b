"""Network mode "model" with real parts: the real agent CLIs in real containers with no route out
reach the scripted model server only through this server's egress proxy (a unix socket mounted
into the sandbox, served inside by the forwarder), with a placeholder key in the sandbox and the
real one swapped in on the host. From inside, as the agent would, the host's other loopback
ports, the operator endpoint and names off the allow-list are out of reach; refusals are events.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_sandboxes.egress.plan import placeholder
from mcp_sandboxes.redaction import looks_like_secret_name
from tests.conftest import BASE_IMAGE
from tests.e2e.backend_cases import BackendCase, discover_cases
from tests.e2e.harness import McpSession, container_exists, docker_exec, mcp_server, server_environment
from tests.e2e.test_boundary import MCP_CALL_SCRIPT, Answer, call_tool
from tests.e2e.test_subagents import add_family_rules
from tests.support.model_server import Reply, Script, ScriptedModelServer, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.usefixtures("docker_available")]

CASES = discover_cases()
PLACEHOLDER = "mcp-sandboxes-placeholder-"
TEST_KEYS = ("sk-test-not-a-real-key", "test-not-a-real-key")


def with_real_key(env: dict[str, str], real_key: str) -> dict[str, str]:
    """The server's environment with every test key replaced by `real_key` (JSON settings too)."""
    out = {}
    for name, value in env.items():
        for test_key in TEST_KEYS:
            value = value.replace(test_key, real_key)
        out[name] = value
    return out


def network_mode(container: str) -> str:
    return subprocess.run(
        ["docker", "inspect", "-f", "{{.HostConfig.NetworkMode}}", container],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()


def tool_outputs(events: list[dict[str, Any]]) -> str:
    return "\n".join(str(e["data"]["content"]) for e in events if e["type"] == "agent.tool_result")


@pytest.mark.parametrize("case", CASES, ids=[c.backend for c in CASES])
async def test_each_backend_works_through_the_proxy_and_never_holds_the_key(case: BackendCase, tmp_path: Path) -> None:
    real_key = f"sk-real-{case.backend}-{uuid.uuid4().hex}"
    script = Script()
    show = f"echo {case.backend}-proof > proof.txt && cat proof.txt && env | sort"
    script.on(user_contains="MODEL-NET", reply=Reply(tool_calls=[case.shell_call(show)]))
    script.on(tool_result_contains=f"{case.backend}-proof", reply=Reply(text="DONE-MODEL-NET"))
    with ScriptedModelServer(script, vendors=list(case.vendors)) as model:
        env = server_environment(tmp_path / "data", model.url, Path("/nonexistent"))
        env.pop("MCP_SANDBOXES_BACKENDS__CLAUDE__CLI_PATH")
        env.pop("ANTHROPIC_BASE_URL")
        env.update(case.server_env(model.url))
        env = with_real_key(env, real_key)
        async with mcp_server("stdio", env) as mcp:
            # No network given: "model" is the default for a container provider.
            created = await mcp.call("create_environment", {"name": f"mn-{case.backend}", "image": case.image})
            assert created["network"] == "model"
            done = await mcp.call(
                "spawn_agent",
                {
                    "environment": f"mn-{case.backend}",
                    "backend": case.backend,
                    "prompt": "MODEL-NET: show your environment",
                    "wait": True,
                    "timeout_s": 180,
                    **case.spawn_args,
                },
            )
            assert done["completed"] and "DONE-MODEL-NET" in (done["final_message"] or ""), done
            session = done["session"]
            container = session["sandbox_id"]
            assert network_mode(container) == "none"
            events = (await mcp.call("read_events", {"session_id": session["session_id"], "limit": 500}))["events"]
            output = tool_outputs(events)
            assert f"{case.backend}-proof" in output
            # The CLI's environment holds placeholders only; had the real key been there, the
            # journal would show "[redacted]" instead.
            # Droid's BYOK key sits in its settings file, not its environment.
            config = (
                docker_exec(container, "sh", "-c", "cat /home/agent/.mcp-sandboxes/*")
                if case.backend == "factory"
                else ""
            )
            assert PLACEHOLDER in output + config and real_key not in output + config, output + config
            assert "[redacted]" not in output, output
            assert "HTTPS_PROXY=http://127.0.0.1:18080" in output
            # The real key reached the model server (swapped in by the proxy), the placeholder never did.
            assert model.recorder.received_credential(real_key)
            assert not any(model.recorder.received_credential(p) for p in _placeholders(env))
            assert not script.misses, script.misses
            await mcp.call("stop_session", {"session_id": session["session_id"]})
            assert not container_exists(container)
            assert not (tmp_path / "data" / "egress" / session["session_id"]).exists()


def _placeholders(env: dict[str, str]) -> list[str]:
    names = [name for name in env if looks_like_secret_name(name)]
    return [placeholder(name) for name in [*names, "settings.droid_settings.customModels.0.apiKey"]]


ATTACK = """set +e
curl -s -m 5 -o /dev/null http://127.0.0.1:{model_port}/ ; echo "direct-model=$?"
curl -s -m 5 -o /dev/null http://127.0.0.1:{operator_port}/mcp ; echo "direct-operator=$?"
curl -s -m 5 -o /dev/null https://not-allowed.example/ ; echo "name=$?"
echo "proxied-operator=$(curl -s -m 5 -o /dev/null -w '%{{http_code}}' --noproxy '' -x http://127.0.0.1:18080 http://127.0.0.1:{operator_port}/mcp)"
echo "proxied-localhost=$(curl -s -m 5 -o /dev/null -w '%{{http_code}}' --noproxy '' -x http://127.0.0.1:18080 http://localhost:{operator_port}/mcp)"
echo "unknown-route=$(curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://127.0.0.1:18080/nowhere)"
echo "key=$ANTHROPIC_API_KEY"
echo attack-done
"""


async def test_from_inside_only_the_model_api_and_allowed_names_are_reachable(tmp_path: Path, claude_bin: Path) -> None:
    script = Script()
    with ScriptedModelServer(script) as model:
        real_key = f"sk-real-{uuid.uuid4().hex}"
        # "localhost" may be allowed at all only with allow_private_addresses (checked below without it).
        extra = {"ANTHROPIC_API_KEY": real_key, "MCP_SANDBOXES_EGRESS__ALLOW_PRIVATE_ADDRESSES": "true"}
        env = server_environment(tmp_path / "data", model.url, claude_bin, extra)
        async with mcp_server("http", env) as mcp:
            assert mcp.operator_url is not None
            operator_port = int(mcp.operator_url.split(":")[2].split("/")[0])
            attack = ATTACK.format(model_port=model.port, operator_port=operator_port)
            script.on(user_contains="ATTACK", reply=Reply(tool_calls=[ToolCall("Bash", {"command": attack})]))
            script.on(tool_result_contains="attack-done", reply=Reply(text="ATTACK-REPORTED"))
            proxy = "--noproxy '' -x http://127.0.0.1:18080"
            allowed = f"curl -s -m 5 {proxy} http://localhost:{model.port}/v1/models; echo allowed=$?"
            script.on(user_contains="ALLOWED", reply=Reply(tool_calls=[ToolCall("Bash", {"command": allowed})]))
            script.on(tool_result_contains="allowed=", reply=Reply(text="ALLOWED-REPORTED"))

            await mcp.call("create_environment", {"name": "closed", "image": BASE_IMAGE, "network": "model"})
            done = await spawn(mcp, "closed", "ATTACK: probe the network")
            assert done["final_message"] == "ATTACK-REPORTED", done
            session_id = done["session"]["session_id"]
            events = (await mcp.call("read_events", {"session_id": session_id, "limit": 500}))["events"]
            report = tool_outputs(events)
            assert "direct-model=7" in report and "direct-operator=7" in report, report  # no route at all
            assert "name=0" not in report and "name=" in report, report
            assert "proxied-operator=403" in report and "proxied-localhost=403" in report, report
            assert "unknown-route=404" in report, report
            assert f"key={PLACEHOLDER}ANTHROPIC_API_KEY" in report and real_key not in report
            refused = [e["data"] for e in events if e["type"] == "network.refused"]
            targets = " ".join(r["target"] for r in refused)
            assert "not-allowed.example:443" in targets and f"127.0.0.1:{operator_port}" in targets, refused
            assert f"localhost:{operator_port}" in targets and "/nowhere" in targets, refused
            # The agent printing its key shows the placeholder; the real key is nowhere in the database.
            data = tmp_path / "data"
            stored = b"".join(p.read_bytes() for p in data.glob("mcp-sandboxes.sqlite3*"))
            assert real_key.encode() not in stored

            # An allow-list of names opens exactly those (here "localhost", served by the model server).
            await mcp.call(
                "create_environment",
                {"name": "open", "image": BASE_IMAGE, "network": "model", "allowed_hosts": ["localhost"]},
            )
            opened = await spawn(mcp, "open", "ALLOWED: reach an allowed name")
            assert opened["final_message"] == "ALLOWED-REPORTED", opened
            page = await mcp.call("read_events", {"session_id": opened["session"]["session_id"], "limit": 500})
            assert "allowed=0" in tool_outputs(page["events"])
            for spawned in (done, opened):
                await mcp.call("stop_session", {"session_id": spawned["session"]["session_id"]})


async def spawn(mcp: McpSession, environment: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return await mcp.call(
        "spawn_agent",
        {
            "environment": environment,
            "prompt": prompt,
            "permission_mode": "bypassPermissions",
            "wait": True,
            "timeout_s": 180,
            **extra,
        },
    )


async def test_a_sub_agent_spawns_a_sub_agent_through_the_proxy(tmp_path: Path, claude_bin: Path) -> None:
    with ScriptedModelServer(Script()) as model:
        env = server_environment(tmp_path / "data", model.url, claude_bin)
        async with mcp_server("stdio", env) as mcp:
            await mcp.call("create_environment", {"name": "family", "image": BASE_IMAGE})
            add_family_rules(model.script, "family")
            parent = await spawn(mcp, "family", "PARENT-TASK: delegate a greeting", subagents=True, timeout_s=240)
            assert parent["completed"] and parent["final_message"] == "PARENT-DONE: my sub-agent said hello", parent
            container = parent["session"]["sandbox_id"]
            assert network_mode(container) == "none"
            config = json.loads(docker_exec(container, "cat", "/home/agent/.mcp-sandboxes/claude-mcp.json"))
            # The agent reaches this server through its proxy, not the host network.
            assert config["mcpServers"]["sandboxes"]["url"].startswith("http://127.0.0.1:18080/agent/")
            sessions = (await mcp.call("list_sessions"))["sessions"]
            children = [s for s in sessions if s["parent_session_id"] == parent["session"]["session_id"]]
            assert len(children) == 1 and children[0]["last_turn"]["final_message"] == "CHILD-DONE: hello from below"
            await mcp.call("stop_session", {"session_id": parent["session"]["session_id"]})


async def agent_call(container: str, entry: dict[str, Any], tool: str, arguments: dict[str, Any]) -> Answer:
    """One MCP tool call from inside a "model" sandbox as its agent user, the way its shell tool
    would make it during a turn: through the forwarder and the proxy's /agent/ route."""
    wrap = ["/opt/mcp-sandboxes/egress/forward", "18080", "/run/mcp-sandboxes/egress/proxy.sock"]
    argv = ["docker", "exec", "-u", "agent", container, *wrap, "sh", "-c", MCP_CALL_SCRIPT, "attack"]
    params = json.dumps(call_tool(tool, arguments))
    authorization = entry["headers"]["Authorization"]
    with anyio.fail_after(90):
        completed = await anyio.run_process([*argv, entry["url"], authorization, "tools/call", params])
    lines = completed.stdout.decode().splitlines()
    assert lines[0] == "init=200", lines
    return Answer(200, int(lines[1].removeprefix("call=")), "\n".join(lines[2:]))


async def test_an_agent_in_a_model_sandbox_cannot_widen_its_network(tmp_path: Path, claude_bin: Path) -> None:
    with ScriptedModelServer(Script(fallback=Reply(text="ok"))) as model:
        env = server_environment(tmp_path / "data", model.url, claude_bin)
        async with mcp_server("stdio", env) as mcp:
            await mcp.call("create_environment", {"name": "m", "image": BASE_IMAGE, "allowed_hosts": ["pypi.org"]})
            parent = await spawn(mcp, "m", "wait here", subagents=True)
            container = parent["session"]["sandbox_id"]
            config = json.loads(docker_exec(container, "cat", "/home/agent/.mcp-sandboxes/claude-mcp.json"))
            entry = config["mcpServers"]["sandboxes"]
            assert entry["url"] == "http://127.0.0.1:18080/agent/mcp"

            wider = await agent_call(
                container, entry, "create_environment", {"name": "w", "allowed_hosts": ["pypi.org", "evil.example"]}
            )
            assert wider.tool_error().startswith("allowed_hosts: evil.example not in your own environment's")
            host = await agent_call(container, entry, "create_environment", {"name": "h", "network": "host"})
            assert host.tool_error().startswith("network: 'host' reaches further than your own environment's 'model'")
            pooled = await agent_call(container, entry, "create_environment", {"name": "p", "warm_pool": 1})
            assert pooled.tool_error().startswith("warm_pool: only the operator")
            same = await agent_call(
                container, entry, "create_environment", {"name": "s", "allowed_hosts": ["pypi.org"]}
            )
            made = same.result()["result"]["structuredContent"]
            assert made["network"] == "model" and made["allowed_hosts"] == ["pypi.org"], made
            names = [e["name"] for e in (await mcp.call("list_environments"))["environments"]]
            assert sorted(names) == ["m", "s"]
            await mcp.call("stop_session", {"session_id": parent["session"]["session_id"]})


@pytest.mark.parametrize("hardening", [{"runtime": "runsc"}, {"read_only_root": True}], ids=["runsc", "read-only-root"])
async def test_a_hardened_sandbox_reaches_its_model_through_the_proxy(
    hardening: dict[str, Any], tmp_path: Path, claude_bin: Path
) -> None:
    """gVisor refuses host unix sockets unless runsc runs with --host-uds=open (the setup scripts
    register it so); a read-only root still takes the egress mounts."""
    script = Script()
    script.on(user_contains="HARD", reply=Reply(tool_calls=[ToolCall("Bash", {"command": "echo hard-proof"})]))
    script.on(tool_result_contains="hard-proof", reply=Reply(text="HARD-DONE"))
    with ScriptedModelServer(script) as model:
        async with mcp_server("stdio", server_environment(tmp_path / "data", model.url, claude_bin)) as mcp:
            await mcp.call("create_environment", {"name": "hard", "image": BASE_IMAGE, **hardening})
            done = await spawn(mcp, "hard", "HARD: prove it")
            assert done["completed"] and done["final_message"] == "HARD-DONE", done
            assert network_mode(done["session"]["sandbox_id"]) == "none"
            await mcp.call("stop_session", {"session_id": done["session"]["session_id"]})


async def test_after_a_restart_the_proxy_serves_the_same_sandbox_and_reaches_the_new_agent_listener(
    tmp_path: Path, claude_bin: Path
) -> None:
    """Sessions survive a restart: the socket is served again at the same place, and the agent's
    callback URL (in its sandbox) reaches this server's agent listener on its new port."""
    with ScriptedModelServer(Script()) as model:
        env = server_environment(tmp_path / "data", model.url, claude_bin)
        add_family_rules(model.script, "again")
        model.script.on(user_contains="BEFORE", reply=Reply(text="BEFORE-DONE"))
        async with mcp_server("stdio", env) as mcp:
            await mcp.call("create_environment", {"name": "again", "image": BASE_IMAGE})
            first = await spawn(mcp, "again", "BEFORE: say something", subagents=True)
            assert first["final_message"] == "BEFORE-DONE", first
        session_id = first["session"]["session_id"]
        async with mcp_server("stdio", env) as mcp:
            second = await mcp.call(
                "send_message",
                {"session_id": session_id, "text": "PARENT-TASK: delegate a greeting", "wait": True, "timeout_s": 240},
            )
            assert second["completed"] and second["final_message"] == "PARENT-DONE: my sub-agent said hello", second
            children = [
                s for s in (await mcp.call("list_sessions"))["sessions"] if s["parent_session_id"] == session_id
            ]
            assert len(children) == 1
            await mcp.call("stop_session", {"session_id": session_id})
