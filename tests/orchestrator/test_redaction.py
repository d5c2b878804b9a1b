"""Redaction as the second line: a credential value the server hands to a CLI never shows in
an event, a transcript, the database or a log record, even when the agent prints it."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.orchestrator.environments import EnvironmentRequest
from mcp_sandboxes.redaction import MARKER, RedactingFilter
from tests.orchestrator.spine import events_until_idle, spine_settings, texts

REAL_KEY = "sk-proof-real-credential-0123456789"


async def test_a_credential_the_agent_prints_is_redacted_in_events_transcript_and_database(tmp_path: Path) -> None:
    settings = spine_settings(tmp_path)
    custom = settings.backend("custom").model_copy(update={"pass_env": ["PROOF_API_KEY"]})
    settings = settings.model_copy(update={"backends": {**settings.backends, "custom": custom}})
    orchestrator = Orchestrator(settings, environ={"PROOF_API_KEY": REAL_KEY})
    async with orchestrator.running():
        await orchestrator.create_environment(EnvironmentRequest(name="r", provider="process", image="host"))
        # The agent prints the key it was handed.
        session = await orchestrator.spawn_agent(
            environment="r", agent=AgentSpec(backend="custom"), prompt="PRINTENV PROOF_API_KEY"
        )
        events = await events_until_idle(orchestrator, session.session_id)
        assert f"PROOF_API_KEY={MARKER}" in texts(events), texts(events)
        assert REAL_KEY not in str([event.model_dump() for event in events])
        assert REAL_KEY not in await orchestrator.transcript(session.session_id)
        await orchestrator.stop_session(session.session_id)
    stored = b"".join(path.read_bytes() for path in (tmp_path / "data").glob("mcp-sandboxes.sqlite3*"))
    assert REAL_KEY.encode() not in stored and b"PROOF_API_KEY=" in stored


def test_log_records_carry_no_known_credential_not_even_in_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    handler = logging.FileHandler(path)
    handler.addFilter(RedactingFilter(lambda: [REAL_KEY]))
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("calling with %s", REAL_KEY)
        try:
            raise RuntimeError(f"upstream refused {REAL_KEY}")
        except RuntimeError:
            logger.exception("the call failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    written = path.read_text()
    assert REAL_KEY not in written
    assert f"calling with {MARKER}" in written and f"RuntimeError: upstream refused {MARKER}" in written


async def test_redaction_leaves_events_without_credentials_alone(tmp_path: Path) -> None:
    orchestrator = Orchestrator(spine_settings(tmp_path), environ={})
    async with orchestrator.running():
        await orchestrator.create_environment(EnvironmentRequest(name="n", provider="process", image="host"))
        session = await orchestrator.spawn_agent(
            environment="n", agent=AgentSpec(backend="custom"), prompt="sk-looks-like-a-key-but-is-code-000000"
        )
        with anyio.fail_after(30):
            events = await events_until_idle(orchestrator, session.session_id)
        # Only known values are replaced: code an agent writes may hold secret-shaped strings.
        assert "sk-looks-like-a-key-but-is-code-000000" in texts(events)[0]
        await orchestrator.stop_session(session.session_id)
