"""The rules every backend's translator keeps, run over one case per backend
(tests/backends/contract_cases/<backend>.py). A backend in the registry without a case, or a
case without a backend, fails here: adding a backend means adding its case.

The rules: an init/result pair ends the turn (end_turn, the CLI's id kept for the next turn); a
line that is not JSON is one session.error of type parse_error carrying the line verbatim, and the
turn goes on; JSON that is not an object and an object of a type the translator does not know are
kept as agent.raw, whole; a run that exits non-zero before its result is one session.error whose
message ends with the tail of stderr, and the turn stops with "error"; SIGINT/SIGTERM exit codes
stop the turn as "interrupted", with or without a result line first, and a result already read is
kept. Every event survives the event store's round trip."""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable

import pytest

from mcp_sandboxes.backends import _kit
from mcp_sandboxes.backends.base import Translator, TurnResult
from mcp_sandboxes.backends.registry import backend_names, build_backend, describe_backends
from mcp_sandboxes.config import BackendSettings, load_settings
from mcp_sandboxes.events import AgentRaw, Event, SessionError, parse_event
from mcp_sandboxes.server.schemas import SpawnAgentInput
from tests.backends import contract_cases
from tests.backends.contract_cases import ContractCase


def load_cases() -> dict[str, ContractCase]:
    cases: dict[str, ContractCase] = {}
    for module in pkgutil.iter_modules(contract_cases.__path__):
        case = importlib.import_module(f"{contract_cases.__name__}.{module.name}").CASE
        assert isinstance(case, ContractCase) and case.backend == module.name, module.name
        cases[module.name] = case
    return cases


CASES = load_cases()
SIGNAL_EXITS = sorted(_kit.SIGNAL_EXIT_CODES)
CRASH_EXITS = [1, 2, 137]
CRASH_STDERR = "starting up\nSegmentation fault (core dumped)\n"
MALFORMED = [
    '{"type": "result", "subtype": "success", "result": "cut off here',
    "Error: something printed this on stdout, ünïcode and all",
    "  {broken json} with a long tail " + "x" * 500 + " END-OF-LINE",
]
NON_OBJECTS = ["[1, 2]", '"just a string"', "42", "null", "true"]
UNKNOWN = [
    {"type": "contract.never_heard_of_it", "payload": {"nested": [1, {"a": None}]}},
    {"no_type_at_all": ["x"]},
]


def translator_for(case: ContractCase) -> Callable[[], Translator]:
    """A fresh backend per translator (Codex's usage ledger is per backend), built through the
    registry from the backend's default.toml table with the case's settings over it."""
    defaults = load_settings(environ={}).backend(case.backend).model_dump()
    settings = BackendSettings.model_validate({**defaults, **case.settings})

    def make() -> Translator:
        translator = build_backend(case.backend, settings, {}).translator()
        assert isinstance(translator, Translator)
        return translator

    return make


def run(case: ContractCase, lines: list[str], exit_code: int, stderr: str = "") -> tuple[list[Event], TurnResult]:
    translator = translator_for(case)()
    events: list[Event] = []
    for line in lines:
        events.extend(translator.feed(line))
    events.extend(translator.finish(exit_code, stderr))
    for event in events:  # what the store writes, it reads back equal
        assert parse_event(event.model_dump()) == event
    return events, translator.result


def errors(events: list[Event]) -> list[SessionError]:
    return [event for event in events if isinstance(event, SessionError)]


cases = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def test_every_registered_backend_has_a_case_a_default_table_and_an_executable() -> None:
    assert sorted(CASES) == backend_names()
    defaults = load_settings(environ={})
    for name, case in CASES.items():
        assert name in defaults.backends, f"configs/default.toml has no [backends.{name}] table"
        settings = BackendSettings.model_validate({**defaults.backend(name).model_dump(), **case.settings})
        backend = build_backend(name, settings, {})
        assert backend.name == name
        assert isinstance(backend.executable, str) and backend.executable and "/" not in backend.executable


def test_the_spawn_agent_schema_lists_the_registry() -> None:
    description = SpawnAgentInput.model_fields["backend"].description
    assert description == f"Agent CLI, one of: {describe_backends()}."
    assert all(f"'{name}' (" in description for name in backend_names())


@cases
def test_an_init_and_a_result_line_end_the_turn_and_name_the_next_turns_id(case: ContractCase) -> None:
    events, result = run(case, [case.init, case.result], 0)
    assert errors(events) == []
    assert not any(isinstance(event, AgentRaw) for event in events)
    assert result.stop_reason == "end_turn" and result.error is None
    assert result.native_session_id == case.native_id


@cases
@pytest.mark.parametrize("line", MALFORMED, ids=["truncated", "text", "long"])
def test_a_line_that_is_not_json_is_one_parse_error_kept_verbatim_and_the_turn_goes_on(
    case: ContractCase, line: str
) -> None:
    translator = translator_for(case)()
    translator.feed(case.init)
    (event,) = translator.feed(line)
    assert isinstance(event, SessionError) and event.error.type == "parse_error"
    assert event.error.message.endswith(line)
    assert parse_event(event.model_dump()) == event
    translator.feed(case.result)
    assert translator.finish(0, "") == []
    assert translator.result.stop_reason == "end_turn" and translator.result.native_session_id == case.native_id


@cases
def test_json_that_is_not_an_object_is_kept_as_agent_raw(case: ContractCase) -> None:
    translator = translator_for(case)()
    translator.feed(case.init)
    for line in NON_OBJECTS:
        assert translator.feed(line) == [AgentRaw(source=case.backend, data=json.loads(line))], line


@cases
def test_a_line_of_an_unknown_type_is_kept_whole_as_agent_raw_never_dropped(case: ContractCase) -> None:
    translator = translator_for(case)()
    translator.feed(case.init)
    for data in UNKNOWN:
        assert translator.feed(json.dumps(data)) == [AgentRaw(source=case.backend, data=data)]
    translator.feed(case.result)
    translator.finish(0, "")
    assert translator.result.stop_reason == "end_turn"


@cases
@pytest.mark.parametrize("exit_code", CRASH_EXITS)
def test_a_crash_before_the_result_is_one_error_carrying_the_stderr_tail(case: ContractCase, exit_code: int) -> None:
    events, result = run(case, [case.init], exit_code, CRASH_STDERR)
    (error,) = errors(events)
    assert error.error.message.endswith("; stderr: starting up\nSegmentation fault (core dumped)")
    assert str(exit_code) in error.error.message
    assert result.stop_reason == "error" and result.error is not None and "Segmentation fault" in result.error


@cases
def test_a_crash_keeps_only_the_end_of_a_huge_stderr(case: ContractCase) -> None:
    stderr = "HEAD-OF-STDERR " + "y" * 50_000 + " THE-END\n"
    events, _ = run(case, [case.init], 137, stderr)
    (error,) = errors(events)
    message = error.error.message
    assert message.endswith(" THE-END") and "HEAD-OF-STDERR" not in message
    assert len(message) <= _kit.MAX_ERROR_TAIL + 200


@cases
@pytest.mark.parametrize("exit_code", SIGNAL_EXITS)
def test_a_signal_after_the_result_reads_interrupted_and_keeps_the_result(case: ContractCase, exit_code: int) -> None:
    _, completed = run(case, [case.init, case.result], 0)
    events, stopped = run(case, [case.init, case.result], exit_code)
    assert errors(events) == []
    assert stopped.stop_reason == "interrupted" and stopped.error is None
    assert stopped.model_copy(update={"stop_reason": completed.stop_reason}) == completed


@cases
@pytest.mark.parametrize("exit_code", SIGNAL_EXITS)
def test_a_signal_before_the_result_reads_interrupted_not_crashed(case: ContractCase, exit_code: int) -> None:
    events, result = run(case, [case.init], exit_code, "received a signal\n")
    assert errors(events) == []
    assert result.stop_reason == "interrupted" and result.error is None
    assert result.native_session_id == case.native_id
