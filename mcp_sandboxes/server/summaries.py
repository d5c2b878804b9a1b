"""Short text a model reads well, returned beside each tool's structured output: what state
things are in, the final message, what failed and what to do next. The structured output
carries the details; this is the first thing the calling agent sees."""

from __future__ import annotations

from pydantic import BaseModel

from mcp_sandboxes.events import Usage
from mcp_sandboxes.orchestrator.views import EnvironmentView, EventsPage, SessionView
from mcp_sandboxes.server.schemas import EnvironmentList, SessionList, TurnOutcome, WaitForResult

# A final message longer than this is cut in the summary (the structured output has it whole).
MESSAGE_CHARS = 1500
LISTED = 20


def _usage(usage: Usage | None) -> str:
    if usage is None or not (usage.input_tokens or usage.output_tokens):
        return ""
    cost = f", ${usage.cost_usd:.4f}" if usage.cost_usd is not None else ""
    return f" ({usage.input_tokens} in / {usage.output_tokens} out tokens{cost})"


def _clip(text: str) -> str:
    return (
        text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + f"... [{len(text) - MESSAGE_CHARS} more chars]"
    )


def session_line(session: SessionView) -> str:
    parts = [f"{session.session_id} [{session.backend}] {session.status}"]
    if session.environment_name:
        parts.append(f"in {session.environment_name}")
    if session.parent_session_id:
        parts.append(f"child of {session.parent_session_id}")
    if session.queued_turns:
        parts.append(f"{session.queued_turns} queued")
    return " ".join(parts) + _usage(session.usage)


def _session(session: SessionView) -> str:
    lines = [session_line(session)]
    turn = session.last_turn
    if turn is not None:
        lines.append(f"last turn {turn.index}: {turn.stop_reason or turn.status}")
        if turn.final_message:
            lines.append("final message: " + _clip(turn.final_message))
        if turn.error:
            lines.append("error: " + turn.error)
        if turn.denied_tools:
            lines.append("refused by the permission mode: " + "; ".join(turn.denied_tools))
    if session.status == "failed" and session.last_error:
        lines.append(f"failed: {session.last_error}. Spawn a new agent to go on.")
    return "\n".join(lines)


def _outcome(outcome: TurnOutcome) -> str:
    head = session_line(outcome.session)
    if not outcome.completed:
        nxt = outcome.note or (f"Follow it with read_events or wait_for(session_ids=['{outcome.session.session_id}']).")
        return f"{head}\nturn {outcome.turn_index} started, not finished yet. {nxt}"
    lines = [head, f"turn {outcome.turn_index} ended: {outcome.stop_reason}{_usage(outcome.usage)}"]
    if outcome.final_message:
        lines.append("final message: " + _clip(outcome.final_message))
    if outcome.error:
        lines.append("error: " + outcome.error)
    if outcome.denied_tools:
        lines.append(
            "refused by the permission mode: " + "; ".join(outcome.denied_tools) + ". To allow them, spawn with"
            " permission_mode 'bypassPermissions' or allowed_tools naming them."
        )
    if outcome.stop_reason == "error":
        lines.append("The turn failed; read_events shows why. send_message retries, stop_session ends it.")
    return "\n".join(lines)


def _events(page: EventsPage) -> str:
    kinds: dict[str, int] = {}
    for event in page.events:
        kinds[event.type] = kinds.get(event.type, 0) + 1
    counted = ", ".join(f"{count} {kind}" for kind, count in kinds.items()) or "no new events"
    tail = " (long-poll timed out)" if page.timed_out else ""
    return (
        f"{page.session_id} {page.session_status}: {counted}{tail}; next cursor {page.next_cursor} (pass it as `after`)"
    )


def _wait(result: WaitForResult) -> str:
    lines = [
        f"{len(result.settled)} of {len(result.sessions)} settled"
        + (" (timed out: call again)" if result.timed_out else "")
    ]
    for session in result.sessions[:LISTED]:
        final = session.last_turn.final_message if session.last_turn else None
        lines.append(session_line(session) + (f": {_clip(final)}" if final else ""))
    return "\n".join(lines)


def _environment(env: EnvironmentView) -> str:
    detail = f" ({env.state_detail})" if env.state_detail else ""
    return (
        f"environment {env.name} ({env.id}): {env.provider} {env.image}, network {env.network},"
        f" {env.state}{detail}, {env.live_sessions} live sessions"
    )


def summarize(result: BaseModel) -> str:
    if isinstance(result, TurnOutcome):
        return _outcome(result)
    if isinstance(result, SessionView):
        return _session(result)
    if isinstance(result, EventsPage):
        return _events(result)
    if isinstance(result, WaitForResult):
        return _wait(result)
    if isinstance(result, EnvironmentView):
        return _environment(result)
    if isinstance(result, EnvironmentList):
        shown = [_environment(env) for env in result.environments[:LISTED]]
        return "\n".join(shown) or "no environments; create_environment makes one"
    if isinstance(result, SessionList):
        shown = [session_line(session) for session in result.sessions[:LISTED]]
        more = len(result.sessions) - len(shown)
        return "\n".join(shown + ([f"... and {more} more"] if more > 0 else [])) or "no sessions"
    return type(result).__name__
