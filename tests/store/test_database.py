"""The store on real SQLite files: migrations, WAL, sequence numbers, atomic writes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from mcp_sandboxes.backends.base import AgentSpec
from mcp_sandboxes.errors import ConflictError, NotFoundError
from mcp_sandboxes.events import AgentMessage, SessionStatusIdle, StopReason, TextBlock, Usage, parse_event
from mcp_sandboxes.providers.base import SandboxSpec
from mcp_sandboxes.store import Database, EnvironmentRecord, SessionRecord
from mcp_sandboxes.store.database import utc_now
from mcp_sandboxes.store.migrations import MIGRATIONS


def _environment(name: str = "env-a") -> EnvironmentRecord:
    return EnvironmentRecord(
        id=f"env_{name}", name=name, provider="docker", spec=SandboxSpec(image="img"), created_at=utc_now()
    )


def _session(session_id: str, env_id: str = "env_env-a") -> SessionRecord:
    now = utc_now()
    return SessionRecord(
        id=session_id,
        environment_id=env_id,
        backend="claude",
        agent=AgentSpec(backend="claude", model="m"),
        status="starting",
        created_at=now,
        updated_at=now,
    )


async def test_a_new_file_is_migrated_to_the_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with Database(path) as db:
        assert await db.schema_version() == MIGRATIONS[-1][0]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"environments", "sessions", "turns", "events", "schema_migrations"} <= tables


async def test_reopening_applies_no_migration_twice(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with Database(path) as db:
        await db.insert_environment(_environment())
    async with Database(path) as db:
        assert [e.name for e in await db.list_environments()] == ["env-a"]
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)


async def test_duplicate_environment_names_conflict_and_leave_one_row(tmp_path: Path) -> None:
    async with Database(tmp_path / "db.sqlite3") as db:
        await db.insert_environment(_environment())
        duplicate = _environment().model_copy(update={"id": "env_other"})
        with pytest.raises(ConflictError, match="already exists"):
            await db.insert_environment(duplicate)
        assert await db.count_rows("environments") == 1


async def test_events_get_consecutive_seq_per_session_and_round_trip(tmp_path: Path) -> None:
    async with Database(tmp_path / "db.sqlite3") as db:
        await db.insert_environment(_environment())
        await db.insert_session(_session("s1"), "hello")
        await db.insert_session(_session("s2"), "hello")
        first = await db.append_events("s1", [AgentMessage(content=[TextBlock(text="a")])])
        second = await db.append_events(
            "s1",
            [AgentMessage(content=[TextBlock(text="b")]), SessionStatusIdle(stop_reason=StopReason(type="end_turn"))],
        )
        other = await db.append_events("s2", [AgentMessage(content=[TextBlock(text="c")])])
        assert [r.seq for r in first + second] == [1, 2, 3]
        assert [r.seq for r in other] == [1]
        page = await db.read_events("s1", after=1, limit=10)
        assert [r.seq for r in page] == [2, 3]
        restored = parse_event(page[1].data)
        assert isinstance(restored, SessionStatusIdle) and restored.stop_reason.type == "end_turn"
        only_messages = await db.read_events("s1", types=["agent.message"])
        assert [r.seq for r in only_messages] == [1, 2]


async def test_concurrent_appends_never_share_a_seq(tmp_path: Path) -> None:
    async with Database(tmp_path / "db.sqlite3") as db:
        await db.insert_environment(_environment())
        await db.insert_session(_session("s1"), "hello")

        async def writer(tag: str) -> None:
            for index in range(20):
                await db.append_events("s1", [AgentMessage(content=[TextBlock(text=f"{tag}{index}")])])

        async with anyio.create_task_group() as tg:
            for tag in "abc":
                tg.start_soon(writer, tag)
        records = await db.read_events("s1", limit=1000)
        assert [r.seq for r in records] == list(range(1, 61))


async def test_a_session_row_and_its_first_turn_are_written_together(tmp_path: Path) -> None:
    async with Database(tmp_path / "db.sqlite3") as db:
        await db.insert_environment(_environment())
        # A session pointing at a missing environment violates the foreign key: no row at all stays.
        with pytest.raises(sqlite3.IntegrityError):
            await db.insert_session(_session("s1", env_id="env_missing"), "hello")
        assert await db.count_rows("sessions") == 0
        assert await db.count_rows("turns") == 0


async def test_turns_queue_in_order_and_record_their_outcome(tmp_path: Path) -> None:
    async with Database(tmp_path / "db.sqlite3") as db:
        await db.insert_environment(_environment())
        await db.insert_session(_session("s1"), "first")
        second = await db.enqueue_turn("s1", "second")
        assert second.idx == 1
        await db.start_turn("s1", 0)
        await db.finish_turn(
            "s1", 0, status="done", stop_reason="end_turn", final_text="ok", error=None, usage=Usage(input_tokens=3)
        )
        queued = await db.list_turns("s1", "queued")
        assert [t.prompt for t in queued] == ["second"]
        done = await db.get_turn("s1", 0)
        assert done.final_text == "ok" and done.usage is not None and done.usage.input_tokens == 3


async def test_session_updates_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with Database(path) as db:
        await db.insert_environment(_environment())
        await db.insert_session(_session("s1"), "first")
        await db.update_session(
            "s1", status="idle", native_session_id="abc", usage=Usage(output_tokens=7, cost_usd=0.5)
        )
    async with Database(path) as db:
        session = await db.get_session("s1")
        assert (session.status, session.native_session_id) == ("idle", "abc")
        assert session.usage.output_tokens == 7 and session.usage.cost_usd == 0.5
        with pytest.raises(NotFoundError, match="list_sessions"):
            await db.get_session("nope")


async def test_a_write_cancelled_while_it_begins_leaves_no_transaction_open(tmp_path: Path) -> None:
    """A cancelled caller (a tool call answered early) must not leave BEGIN without COMMIT: writes
    cut off at every point of their first few hundred microseconds, then one that must succeed."""
    async with Database(tmp_path / "db.sqlite3") as db:
        for attempt in range(200):
            with anyio.move_on_after(attempt * 0.00001):
                await db.insert_environment(
                    EnvironmentRecord(
                        id=f"env_{attempt}",
                        name=f"e{attempt}",
                        provider="docker",
                        spec=SandboxSpec(image="x"),
                        created_at="2026-01-01T00:00:00Z",
                    )
                )
        with anyio.fail_after(10):
            await db.insert_environment(
                EnvironmentRecord(
                    id="env_last", name="last", provider="docker", spec=SandboxSpec(image="x"), created_at="2026-01-01"
                )
            )
        assert "last" in [e.name for e in await db.list_environments()]
