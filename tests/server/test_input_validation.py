"""Bad input is refused at the door, through the real MCP server and the SDK's client, with a
message that names the field and the fix, and nothing is created for it. Each case here once
passed the schema and failed later (at spawn, in SQLite, in execve) or came back as pydantic's
raw text or the SDK's bare "Error executing tool"."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ValidationError

from mcp_sandboxes.backends.base import AgentSpec, Turn
from mcp_sandboxes.backends.claude import ClaudeBackend
from mcp_sandboxes.backends.codex import CodexBackend
from mcp_sandboxes.backends.custom import CustomBackend
from mcp_sandboxes.backends.gemini import GeminiBackend
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import ResourceLimits
from mcp_sandboxes.server.registration import describe_validation_error, register_tool
from mcp_sandboxes.server.schemas import CreateEnvironmentInput, ReadEventsInput, SendMessageInput
from tests.conftest import BASE_IMAGE
from tests.server.harness import (
    OPAQUE,
    ServerUnderTest,
    assert_clear,
    docker_cpu_count,
    running_server,
    without_prefix,
)

pytestmark = pytest.mark.anyio

MIB = 1_000_000


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerUnderTest]:
    async with running_server(tmp_path) as running:
        await running.call("create_environment", {"name": "env"})
        yield running


async def a_session(server: ServerUnderTest) -> str:
    outcome = await server.call("spawn_agent", {"environment": "env", "prompt": "hi", "backend": "custom"})
    session_id: str = outcome["session"]["session_id"]
    return session_id


async def test_memory_above_the_providers_bound_is_refused_naming_the_bound(server: ServerUnderTest) -> None:
    bound = ResourceLimits.model_fields["memory_mb"].metadata[-1].le
    message = await server.refused("create_environment", {"name": "big", "memory_mb": bound + 1})
    assert message.startswith("invalid arguments: memory_mb: must be at most 1048576"), message
    assert server.rows("environments") == 1
    # The bound itself is fine.
    await server.call("create_environment", {"name": "edge", "memory_mb": bound})


async def test_a_cursor_beyond_sqlites_integers_is_refused_by_name(server: ServerUnderTest) -> None:
    session_id = await a_session(server)
    for after in (2**63, 10**30):
        message = await server.refused("read_events", {"session_id": session_id, "after": after})
        assert message.startswith("invalid arguments: after: must be at most 9223372036854775807"), message
    page = await server.call("read_events", {"session_id": session_id, "after": 2**63 - 1})
    assert page["events"] == []


@pytest.mark.parametrize("cpus", [1e-300, 5e-324, 0.001, 0, -1, 257, 1e308])
async def test_cpus_out_of_what_any_engine_can_do_is_refused_at_create(server: ServerUnderTest, cpus: float) -> None:
    message = await server.refused("create_environment", {"name": "cpu", "cpus": cpus})
    assert message.startswith("invalid arguments: cpus: must be"), message
    assert server.rows("environments") == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_by_the_schema(value: float) -> None:
    # The SDK's client turns NaN and infinity into null on the way out; a client that sends
    # them as JSON's non-standard literals meets this check.
    cases: list[tuple[type[BaseModel], str]] = [
        (CreateEnvironmentInput, "cpus"),
        (ReadEventsInput, "wait_s"),
        (SendMessageInput, "timeout_s"),
    ]
    for model, field in cases:
        arguments = {"name": "n", "session_id": "s", "text": "t", field: value}
        with pytest.raises(ValidationError) as caught:
            model.model_validate({key: v for key, v in arguments.items() if key in model.model_fields})
        assert describe_validation_error(caught.value) == f"invalid arguments: {field}: must be a finite number" + (
            " (not NaN or infinity)"
        )


async def test_the_smallest_cpu_share_docker_can_express_is_accepted(server: ServerUnderTest) -> None:
    view = await server.call("create_environment", {"name": "tiny", "cpus": 0.01})
    assert view["limits"]["cpus"] == 0.01


@pytest.mark.docker
@pytest.mark.usefixtures("docker_available")
async def test_cpus_above_the_engines_count_are_refused_at_create_on_docker(tmp_path: Path) -> None:
    cpus = docker_cpu_count()
    async with running_server(tmp_path, {"MCP_SANDBOXES_DEFAULT_PROVIDER": "docker"}) as server:
        message = await server.refused("create_environment", {"name": "hog", "image": BASE_IMAGE, "cpus": cpus + 1})
        assert message == f"cpus: {cpus + 1} asked, but the Docker engine has {cpus}; use at most {cpus}", message
        assert server.rows("environments") == 0
        await server.call("create_environment", {"name": "fits", "image": BASE_IMAGE, "cpus": cpus})


HOSTILE_TEXT: list[tuple[str, dict[str, Any], str]] = [
    # (tool, arguments, what the refusal must say)
    ("create_environment", {"name": "a\x00b"}, "name: has characters that are not allowed"),
    ("create_environment", {"name": "x" * MIB}, "name: is too long: at most 63 characters"),
    ("create_environment", {"name": "n", "image": "img\x00"}, "image: contains control characters"),
    ("create_environment", {"name": "n", "image": "i" * MIB}, "image: is too long: at most 512 characters"),
    ("create_environment", {"name": "n", "image": "--privileged"}, "image: must not start with '-'"),
    ("create_environment", {"name": "n", "env": {"K": "v\x00"}}, "env.K: contains a NUL character"),
    ("create_environment", {"name": "n", "env": {"K": "v" * MIB}}, "env.K: is too long: at most 32,000 characters"),
    (
        "create_environment",
        {"name": "n", "env": {f"K{i}": "v" * 30_000 for i in range(4)}},
        "env: more than 100,000 characters in all",
    ),
    ("create_environment", {"name": "n", "setup_commands": ["true\x00"]}, "setup_commands[0]: contains a NUL"),
    (
        "create_environment",
        {"name": "n", "setup_commands": ["true", "x" * MIB]},
        "setup_commands[1]: is too long: at most 32,000 characters",
    ),
    ("create_environment", {"name": "n", "workdir": "/w\x00"}, "workdir: contains control characters"),
    ("create_environment", {"name": "n", "workdir": "/" + "w" * MIB}, "workdir: is too long: at most 1,024"),
    ("spawn_agent", {"environment": "env", "prompt": "hi\x00"}, "prompt: contains a NUL character"),
    ("spawn_agent", {"environment": "env", "prompt": "p" * 1_000_001}, "prompt: is too long: at most 1,000,000"),
    ("spawn_agent", {"environment": "env", "prompt": "hi", "model": "m\x00"}, "model: has characters that are not"),
    ("spawn_agent", {"environment": "env", "prompt": "hi", "model": "m" * MIB}, "model: is too long: at most 200"),
    ("spawn_agent", {"environment": "env", "prompt": "hi", "system_prompt": "s\x00"}, "system_prompt: contains a NUL"),
    (
        "spawn_agent",
        {"environment": "env", "prompt": "hi", "system_prompt": "s" * MIB},
        "system_prompt: is too long: at most 32,000 characters",
    ),
    (
        "spawn_agent",
        {"environment": "env", "prompt": "hi", "allowed_tools": ["Bash", "R\x00ead"]},
        "allowed_tools[1]: has characters that are not allowed",
    ),
    (
        "spawn_agent",
        {"environment": "env", "prompt": "hi", "allowed_tools": ["t" * MIB]},
        "allowed_tools[0]: is too long: at most 256",
    ),
    ("spawn_agent", {"environment": "e" * MIB, "prompt": "hi"}, "environment: is too long: at most 128"),
    ("spawn_agent", {"environment": "env", "prompt": "hi", "backend": "c\x00"}, "backend: contains control"),
    ("send_message", {"session_id": "ses_x", "text": "t\x00"}, "text: contains a NUL character"),
    ("send_message", {"session_id": "ses_x", "text": "t" * 1_000_001}, "text: is too long: at most 1,000,000"),
    ("get_session", {"session_id": "s" * MIB}, "session_id: is too long: at most 128"),
]


@pytest.mark.parametrize(("tool", "arguments", "expected"), HOSTILE_TEXT, ids=[e for _, _, e in HOSTILE_TEXT])
async def test_nul_bytes_and_huge_strings_are_refused_by_field_without_an_echo(
    server: ServerUnderTest, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    message = await server.refused(tool, arguments)
    assert message.startswith("invalid arguments: " + expected), message
    assert len(message) < 500, f"the value was echoed: {len(message)} characters"
    assert server.rows("environments") == 1 and server.rows("sessions") == 0


async def test_a_long_prompt_on_stdin_is_accepted(server: ServerUnderTest) -> None:
    outcome = await server.call("spawn_agent", {"environment": "env", "prompt": "p" * 500_000, "backend": "custom"})
    assert outcome["session"]["status"] in ("starting", "running", "idle")


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"allowed_tools": ["Bash", "--permission-mode", "bypassPermissions"]}, "allowed_tools[1]: must not start"),
        ({"allowed_tools": ["-p"]}, "allowed_tools[0]: must not start with '-'"),
        ({"model": "--foo"}, "model: must not start with '-'"),
        ({"model": "-m"}, "model: must not start with '-'"),
        ({"system_prompt": "--dangerously-skip-permissions"}, "system_prompt: must not start with '-'"),
        ({"backend": "--help"}, "backend: must not start with '-'"),
    ],
)
async def test_values_that_would_become_cli_options_are_refused(
    server: ServerUnderTest, arguments: dict[str, Any], expected: str
) -> None:
    message = await server.refused("spawn_agent", {"environment": "env", "prompt": "hi", **arguments})
    assert message.startswith("invalid arguments: " + expected), message
    assert server.rows("sessions") == 0


async def test_claude_tool_rules_and_real_model_names_still_pass(server: ServerUnderTest) -> None:
    rules = ["Bash", "Bash(git diff:*)", "Bash(git *)", "Read(~/src/**)", "mcp__calc__add", "WebFetch(domain:a.io)"]
    for model in ("claude-sonnet-4-5", "anthropic/claude-sonnet-4-5", "opus[1m]", "us.anthropic.claude-v2:0"):
        outcome = await server.call(
            "spawn_agent",
            {"environment": "env", "prompt": "hi", "backend": "custom", "model": model, "allowed_tools": rules},
        )
        assert outcome["session"]["model"] == model


def turn_of(agent: AgentSpec, prompt: str = "hi", resume_id: str | None = None) -> Turn:
    return Turn(session_id="ses_1", index=0, prompt=prompt, agent=agent, resume_id=resume_id)


@pytest.mark.parametrize(
    ("backend", "agent", "field"),
    [
        (ClaudeBackend(), AgentSpec(backend="claude", allowed_tools=["Bash", "--permission-mode"]), "allowed_tools"),
        (ClaudeBackend(), AgentSpec(backend="claude", model="--foo"), "model"),
        (ClaudeBackend(), AgentSpec(backend="claude", system_prompt="--x"), "system_prompt"),
        (CodexBackend(), AgentSpec(backend="codex", model="-c"), "model"),
        (GeminiBackend(), AgentSpec(backend="gemini", model="--yolo"), "model"),
    ],
)
def test_backends_never_put_a_caller_value_where_it_reads_as_an_option(
    backend: ClaudeBackend | CodexBackend | GeminiBackend, agent: AgentSpec, field: str
) -> None:
    # The second lock, behind the schema: a caller that reaches a backend some other way.
    with pytest.raises(InvalidInputError) as caught:
        backend.command(turn_of(agent))
    assert caught.value.field == field


def test_a_resume_id_that_looks_like_an_option_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="resume_id"):
        ClaudeBackend().command(turn_of(AgentSpec(backend="claude"), resume_id="--dangerously-skip-permissions"))


def test_a_custom_command_refuses_a_prompt_too_long_for_one_argument() -> None:
    backend = CustomBackend.from_settings(BackendSettings.model_validate({"argv": ["agent", "{prompt}"]}), {})
    assert backend.command(turn_of(AgentSpec(backend="custom"), prompt="p" * 100_000)).argv[1] == "p" * 100_000
    with pytest.raises(InvalidInputError, match=r'prompt: .*prompt_via = "stdin"'):
        backend.command(turn_of(AgentSpec(backend="custom"), prompt="p" * 200_000))


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("create_environment", {"name": "x", "cpus": "abc"}, "invalid arguments: cpus: must be a number"),
        ("create_environment", {"name": "x", "memory_mb": 1.5}, "invalid arguments: memory_mb: must be a whole number"),
        ("create_environment", {"name": "x", "network": "bridge"}, "invalid arguments: network: must be one of"),
        ("create_environment", {}, "invalid arguments: name: is required; give it a value"),
        ("create_environment", {"name": "x", "memroy_mb": 64}, "invalid arguments: memroy_mb: is not an argument"),
        ("read_events", {"session_id": "s", "wait_s": 600}, "invalid arguments: wait_s: must be at most 60"),
        ("read_events", {"session_id": "s", "after": None}, "invalid arguments: after: must be an integer"),
        ("send_message", {"session_id": "s", "text": "t", "timeout_s": 601}, "invalid arguments: timeout_s: must be"),
        ("spawn_agent", {"environment": "env", "prompt": ["a"]}, "invalid arguments: prompt: must be a string"),
        ("spawn_agent", {"environment": "env", "prompt": "p", "wait": "maybe"}, "invalid arguments: wait: must be"),
        ("list_environments", {"verbose": True}, "invalid arguments: verbose: is not an argument of this tool"),
        ("wait_for", {"session_ids": []}, "invalid arguments: session_ids: needs at least 1 item"),
    ],
)
async def test_schema_errors_say_field_problem_and_fix_without_pydantic_text(
    server: ServerUnderTest, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    message = await server.refused(tool, arguments)
    assert message.startswith(expected), message
    assert not OPAQUE.search(message), message
    assert_clear(tool, message, list(arguments))


async def test_an_unknown_argument_lists_the_ones_the_tool_takes(server: ServerUnderTest) -> None:
    message = await server.refused("get_session", {"session_id": "s", "sessionid": "s"})
    assert message == "invalid arguments: sessionid: is not an argument of this tool; remove it (it takes: session_id)"


async def test_json_in_a_string_still_works_for_lists(server: ServerUnderTest) -> None:
    # Some clients send lists as JSON text; the SDK's unpacking of those is kept.
    view = await server.call("create_environment", {"name": "listy", "setup_commands": '["true"]'})
    assert view["setup_commands"] == ["true"]


class Nothing(BaseModel):
    pass


async def test_an_unexpected_exception_becomes_a_clear_error_and_its_traceback_is_logged(
    server: ServerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Nothing) -> Nothing:
        raise KeyError("secret-internal-detail")

    mcp_server = server.client.server
    assert isinstance(mcp_server, MCPServer)
    register_tool(
        mcp_server,
        name="broken",
        description="fails",
        input_model=Nothing,
        output_model=Nothing,
        handler=broken,
        annotations=ToolAnnotations(),
    )
    with caplog.at_level(logging.ERROR, logger="mcp_sandboxes.server.registration"):
        result = await server.raw_call("broken", {})
    assert result.is_error
    text = " ".join(getattr(block, "text", "") for block in result.content)
    body = without_prefix("broken", text)
    assert body.startswith("broken: the server failed unexpectedly (KeyError); this is a bug in mcp-sandboxes"), body
    assert "secret-internal-detail" not in body
    logged = [record for record in caplog.records if record.name == "mcp_sandboxes.server.registration"]
    assert logged and logged[0].exc_info is not None and "secret-internal-detail" in str(logged[0].exc_info[1])
    # The server goes on answering.
    assert (await server.call("list_environments", {}))["environments"]
