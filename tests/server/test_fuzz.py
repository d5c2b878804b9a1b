"""Every tool called with random and hostile values (huge integers, 1e-300, NUL bytes, very long
strings, wrong types, unknown keys, nested junk) through the real server and the SDK's client.
For each call: an error is a tool error that names a field (never the SDK's bare "Error
executing tool", never pydantic's raw text), the server keeps answering, and a refused call
leaves nothing behind (no environment or session row, no sandbox directory, no container).

Bounded and stable for CI: derandomized (hypothesis derives its examples from the test), a
fixed number of examples per tool, no deadline, every wait inside a call capped at 1 s."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_sandboxes.server.schemas import (
    CreateEnvironmentInput,
    DeleteEnvironmentInput,
    ListSessionsInput,
    NoInput,
    ReadEventsInput,
    SendMessageInput,
    SessionRefInput,
    SpawnAgentInput,
    WaitForInput,
)
from tests.conftest import BASE_IMAGE
from tests.server.harness import (
    ServerUnderTest,
    assert_clear,
    error_text,
    owned_containers,
    running_server,
    short,
    without_prefix,
)

EXAMPLES_PER_TOOL = 60
FUZZ = settings(
    max_examples=EXAMPLES_PER_TOOL,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

LONG = ["x" * 200_000, "é" * 40_000, "a" * 1_000_001, "\x00" * 64]
HOSTILE_STRINGS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20).map(lambda s: s + "\x00"),
    st.sampled_from(["", " ", "-", "--permission-mode", "--foo=bar", "-p", "\x00", "\n", "../../etc", "ses_x", *LONG]),
)
# Integers that are out of every range here, or 0 (never 1..600: a valid wait would only be slow).
HOSTILE_INTS = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400]),
    st.integers(min_value=2**62, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-1),
)
HOSTILE_FLOATS = st.sampled_from([1e-300, 5e-324, -0.0, 1e300, -1e300, 0.001, 1e-9, 2.5e-8])
SCALARS = st.one_of(st.none(), st.booleans(), HOSTILE_INTS, HOSTILE_FLOATS, HOSTILE_STRINGS)
_OMIT = object()
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def tool_arguments(model: type[Any], valid: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Each field of `model` left out, given a plausible value (from `valid`), or junk; plus,
    sometimes, keys the tool does not take."""
    fields = {name: st.one_of(st.just(_OMIT), valid.get(name, JUNK), JUNK) for name in model.model_fields}
    known = st.fixed_dictionaries(fields).map(lambda drawn: {k: v for k, v in drawn.items() if v is not _OMIT})
    unknown = st.dictionaries(
        st.sampled_from(["memory", "bogus", "", "session", "__class__", "k" * 1_000_000]), JUNK, max_size=2
    )
    return st.tuples(known, st.one_of(st.just({}), unknown)).map(lambda pair: {**pair[1], **pair[0]})


SMALL_WAIT = st.sampled_from([0, 0.01])


class Fuzzed:
    """A server shared by the examples of one test, driven from hypothesis' (sync) examples
    through a blocking portal, with the ids that let calls get past the first lookups."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, server: ServerUnderTest) -> None:
        self.portal = portal
        self.server = server
        self.session_id = ""

    def call(self, name: str, arguments: dict[str, Any]) -> tuple[bool, str]:
        before = self.state()
        result = self.portal.call(self.server.raw_call, name, arguments)
        if result.is_error:
            body = without_prefix(name, error_text(result))
            fields = list(TOOLS[name][0].model_fields)
            assert_clear(name, body, fields)
            assert self.state() == before, f"{name} refused {short(arguments)} ({body[:200]}) but left something"
        # The server keeps answering.
        assert not self.portal.call(self.server.raw_call, "list_sessions", {}).is_error
        return result.is_error, error_text(result)

    def state(self) -> tuple[int, int, frozenset[str], frozenset[str]]:
        return (
            self.server.rows("environments"),
            self.server.rows("sessions"),
            frozenset(self.server.sandbox_dirs()),
            frozenset(ours(owned_containers())) if self.with_docker else frozenset(),
        )

    with_docker = False


MARK = f"fuzz-{uuid.uuid4().hex[:12]}"


def ours(containers: set[str]) -> set[str]:
    """Containers made for this module's environments (they carry its mark in their env);
    other tests running at the same time make theirs."""
    if not containers:
        return set()
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{.Id}} {{json .Config.Env}}", *containers],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return {line.split()[0] for line in out.splitlines() if MARK in line}


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[Fuzzed]:
    with (
        anyio.from_thread.start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(running_server(tmp_path)) as server,
    ):
        fuzz = Fuzzed(portal, server)
        portal.call(server.call, "create_environment", {"name": "env", "env": {"FUZZ_MARK": MARK}})
        outcome = portal.call(server.call, "spawn_agent", {"environment": "env", "prompt": "hi", "backend": "custom"})
        fuzz.session_id = outcome["session"]["session_id"]
        yield fuzz


def valid_values(fuzz_session: str) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    session = st.sampled_from([fuzz_session, "ses_nope"])
    return {
        "create_environment": {
            "name": st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True),
            "provider": st.sampled_from(["process", "nosuch"]),
            "image": st.sampled_from(["host", "busybox"]),
            "env": st.dictionaries(
                st.one_of(st.from_regex(r"[A-Z_]{1,8}", fullmatch=True), st.sampled_from(["K" * 1_000_000, "A=B"])),
                st.text(max_size=20),
                max_size=3,
            ),
            "workdir": st.sampled_from(["/workspace", "/tmp/w", "relative"]),
            "network": st.sampled_from(["none", "host"]),
            "cpus": st.sampled_from([0.01, 1, 2]),
            "memory_mb": st.sampled_from([16, 512, 1_048_576]),
            "pids_limit": st.sampled_from([8, 1000]),
            "setup_commands": st.lists(st.sampled_from(["true", "exit 3", " "]), max_size=2),
        },
        "delete_environment": {"environment": st.sampled_from(["nope", "env_0"]), "force": st.booleans()},
        "spawn_agent": {
            "environment": st.sampled_from(["env", "nope"]),
            "prompt": st.sampled_from(["hi", "p" * 300_000, "- a list"]),
            "backend": st.sampled_from(["custom", "nosuch"]),
            "model": st.sampled_from(["claude-sonnet-4-5", "a/b"]),
            "allowed_tools": st.lists(st.sampled_from(["Bash", "Bash(git diff:*)", "mcp__a__b"]), max_size=3),
            "permission_mode": st.sampled_from(["default", "plan"]),
            "max_turns": st.sampled_from([1, 10_000]),
            "subagents": st.booleans(),
            "wait": st.booleans(),
            "timeout_s": SMALL_WAIT,
        },
        "send_message": {"session_id": session, "text": st.sampled_from(["next", ""]), "timeout_s": SMALL_WAIT},
        "read_events": {
            "session_id": session,
            "after": st.sampled_from([0, 2**63 - 1]),
            "limit": st.sampled_from([1, 1000]),
            "wait_s": SMALL_WAIT,
            "types": st.lists(st.sampled_from(["agent.message", "user.message"]), max_size=2),
        },
        "get_session": {"session_id": session},
        "interrupt_session": {"session_id": session},
        "stop_session": {"session_id": st.just("ses_nope")},
        "list_sessions": {"status": st.lists(st.sampled_from(["idle", "running"]), max_size=2)},
        "wait_for": {
            "session_ids": st.lists(session, min_size=1, max_size=3),
            "mode": st.sampled_from(["all", "any"]),
            "timeout_s": SMALL_WAIT,
        },
    }


TOOLS: dict[str, tuple[type[Any], bool]] = {
    # name: (input model, needs a session)
    "create_environment": (CreateEnvironmentInput, False),
    "list_environments": (NoInput, False),
    "delete_environment": (DeleteEnvironmentInput, False),
    "spawn_agent": (SpawnAgentInput, False),
    "send_message": (SendMessageInput, True),
    "read_events": (ReadEventsInput, True),
    "get_session": (SessionRefInput, True),
    "interrupt_session": (SessionRefInput, True),
    "stop_session": (SessionRefInput, True),
    "list_sessions": (ListSessionsInput, False),
    "wait_for": (WaitForInput, True),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_refuses_hostile_input_clearly_and_leaves_nothing_behind(fuzzed: Fuzzed, tool: str) -> None:
    model, _ = TOOLS[tool]
    strategy = tool_arguments(model, valid_values(fuzzed.session_id).get(tool, {}))
    refusals: list[str] = []

    @FUZZ
    @given(arguments=strategy)
    def check(arguments: dict[str, Any]) -> None:
        refused, text = fuzzed.call(tool, arguments)
        if refused:
            refusals.append(text)

    check()
    # The fuzz reached the tool's checks: most examples are refused, each for a stated reason.
    assert refusals, f"{tool}: no example was refused"


@pytest.mark.docker
@pytest.mark.usefixtures("docker_available")
def test_hostile_spawns_on_docker_leave_no_container(tmp_path: Path) -> None:
    environ = {"MCP_SANDBOXES_DEFAULT_PROVIDER": "docker", "MCP_SANDBOXES_DEFAULT_IMAGE": BASE_IMAGE}
    with (
        anyio.from_thread.start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(running_server(tmp_path, environ)) as server,
    ):
        fuzz = Fuzzed(portal, server)
        fuzz.with_docker = True
        # Docker prepares the recipe once, in the background (a container of its own while it runs):
        # waited for, so every spawn below meets an environment that failed to prepare (exit 3).
        portal.call(
            server.call,
            "create_environment",
            {"name": "env", "env": {"FUZZ_MARK": MARK}, "setup_commands": ["exit 3"], "wait": True},
        )
        values = valid_values("ses_nope")["spawn_agent"]
        values["backend"] = st.just("custom")

        @settings(FUZZ, max_examples=30)
        @given(arguments=tool_arguments(SpawnAgentInput, values))
        def check(arguments: dict[str, Any]) -> None:
            fuzz.call("spawn_agent", arguments)

        check()
        assert not ours(owned_containers())
