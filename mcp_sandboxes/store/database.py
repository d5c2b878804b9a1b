"""The one SQLite database: WAL, foreign keys, numbered migrations, a single writer.

aiosqlite runs one connection on its own thread; a transaction spans several awaits, so
every write goes through `_transaction()`, which holds a lock for its whole length.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import anyio

from mcp_sandboxes.errors import ConflictError, McpSandboxesError, NotFoundError
from mcp_sandboxes.events import EVENT_ADAPTER, Event, Usage
from mcp_sandboxes.files import make_private_dir
from mcp_sandboxes.specs import AgentSpec, SandboxSpec
from mcp_sandboxes.store.migrations import MIGRATIONS
from mcp_sandboxes.store.records import (
    LIVE_STATUSES,
    WORKSPACE_ADAPTER,
    EnvironmentRecord,
    EventRecord,
    Packages,
    PrepState,
    SessionRecord,
    SessionStatus,
    TurnRecord,
    TurnStatus,
)

BUSY_TIMEOUT_MS = 10_000


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StoreError(McpSandboxesError):
    pass


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        if self._conn is not None:
            raise StoreError("database already open")
        make_private_dir(self.path.parent)
        # The database holds prompts, transcripts and token hashes: readable by its owner only,
        # including the WAL and shared-memory files SQLite creates beside it.
        old_umask = os.umask(0o077)
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}; check the data_dir setting") from exc
        finally:
            os.umask(old_umask)
        conn.row_factory = aiosqlite.Row
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        self._conn = conn
        # Migrations that rebuild a table run with foreign keys off (they cannot be switched
        # inside a transaction), and are checked before the keys go back on.
        await conn.execute("PRAGMA foreign_keys = OFF")
        await self._migrate()
        broken = list(await conn.execute_fetchall("PRAGMA foreign_key_check"))
        if broken:
            raise StoreError(f"database {self.path} has broken references after migrating: {broken[:3]}")
        await conn.execute("PRAGMA foreign_keys = ON")
        for suffix in ("", "-wal", "-shm"):
            sidecar = self.path.with_name(self.path.name + suffix)
            if sidecar.exists():
                sidecar.chmod(0o600)

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with anyio.CancelScope(shield=True):
                await conn.close()

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError("database is not open")
        return self._conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            conn = self.conn
            # Shielded: a caller cancelled while BEGIN runs in aiosqlite's thread would otherwise
            # leave the transaction open, and every later BEGIN would fail.
            with anyio.CancelScope(shield=True):
                await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.execute("ROLLBACK")
                raise
            else:
                with anyio.CancelScope(shield=True):
                    await conn.execute("COMMIT")

    async def _migrate(self) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
            )
            rows = await conn.execute_fetchall("SELECT version FROM schema_migrations")
            applied = {row[0] for row in rows}
            for version, sql in MIGRATIONS:
                if version in applied:
                    continue
                for statement in (part.strip() for part in sql.split(";")):
                    if statement:
                        await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version, utc_now())
                )

    async def schema_version(self) -> int:
        rows = list(await self.conn.execute_fetchall("SELECT MAX(version) FROM schema_migrations"))
        return int(rows[0][0] or 0)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        return list(await self.conn.execute_fetchall(sql, params))

    # -- environments ----------------------------------------------------------------

    async def insert_environment(self, env: EnvironmentRecord) -> None:
        try:
            async with self._transaction() as conn:
                await conn.execute(
                    "INSERT INTO environments (id, name, provider, spec_json, setup_commands_json, created_at,"
                    " created_by_session, workspace_json, packages_json, prep_state, prep_detail, prepared_image)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        env.id,
                        env.name,
                        env.provider,
                        env.spec.model_dump_json(),
                        json.dumps(env.setup_commands),
                        env.created_at,
                        env.created_by_session,
                        None if env.workspace is None else env.workspace.model_dump_json(),
                        None if env.packages.empty() else env.packages.model_dump_json(),
                        env.prep_state,
                        env.prep_detail,
                        env.prepared_image,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise ConflictError(
                f"name: an environment named {env.name!r} already exists; pick another name or delete it first"
            ) from exc

    @staticmethod
    def _environment(row: aiosqlite.Row) -> EnvironmentRecord:
        return EnvironmentRecord(
            id=row["id"],
            name=row["name"],
            provider=row["provider"],
            spec=SandboxSpec.model_validate_json(row["spec_json"]),
            setup_commands=json.loads(row["setup_commands_json"]),
            created_at=row["created_at"],
            created_by_session=row["created_by_session"],
            deleted_at=row["deleted_at"],
            workspace=WORKSPACE_ADAPTER.validate_json(row["workspace_json"]) if row["workspace_json"] else None,
            packages=Packages.model_validate_json(row["packages_json"]) if row["packages_json"] else Packages(),
            prep_state=row["prep_state"],
            prep_detail=row["prep_detail"],
            prepared_image=row["prepared_image"],
        )

    async def set_preparation(
        self, env_id: str, state: PrepState, *, detail: str | None = None, prepared_image: str | None = None
    ) -> None:
        """Where an environment's image preparation stands (its image, once made)."""
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE environments SET prep_state = ?, prep_detail = ?,"
                " prepared_image = COALESCE(?, prepared_image) WHERE id = ?",
                (state, detail, prepared_image, env_id),
            )

    async def environments_preparing(self) -> list[EnvironmentRecord]:
        rows = await self._fetchall(
            "SELECT * FROM environments WHERE prep_state = 'preparing' AND deleted_at IS NULL ORDER BY created_at, id"
        )
        return [self._environment(row) for row in rows]

    async def find_environment(self, id_or_name: str) -> EnvironmentRecord | None:
        """By id, also a deleted one (its sessions' history still names it); by name, only a
        live one (a deleted environment's name is free again)."""
        rows = await self._fetchall(
            "SELECT * FROM environments WHERE id = ? OR (name = ? AND deleted_at IS NULL)"
            " ORDER BY deleted_at IS NULL DESC",
            (id_or_name, id_or_name),
        )
        return self._environment(rows[0]) if rows else None

    async def list_environments(self) -> list[EnvironmentRecord]:
        rows = await self._fetchall("SELECT * FROM environments WHERE deleted_at IS NULL ORDER BY created_at, id")
        return [self._environment(row) for row in rows]

    async def set_warm_pool(self, env_id: str, size: int) -> None:
        async with self._transaction() as conn:
            await conn.execute("UPDATE environments SET warm_pool = ? WHERE id = ?", (size, env_id))

    async def warm_pools(self) -> dict[str, int]:
        """Live environments' warm pool sizes, those above 0."""
        rows = await self._fetchall("SELECT id, warm_pool FROM environments WHERE deleted_at IS NULL AND warm_pool > 0")
        return {str(row[0]): int(row[1]) for row in rows}

    async def environment_providers(self) -> list[str]:
        """Every provider an environment ever used, deleted ones' too (their sandboxes may linger)."""
        rows = await self._fetchall("SELECT DISTINCT provider FROM environments ORDER BY provider")
        return [str(row[0]) for row in rows]

    async def delete_environment(self, env_id: str, *, purge: bool = False) -> None:
        """Mark the environment deleted; its sessions, turns and events stay readable. With
        `purge`, remove those sessions and their history too (sub-agents they spawned in other
        environments stay, as top-level sessions). Callers stop live sessions first."""
        async with self._transaction() as conn:
            if not purge:
                await conn.execute(
                    "UPDATE environments SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL", (utc_now(), env_id)
                )
                return
            await conn.execute(
                "UPDATE sessions SET parent_session_id = NULL WHERE environment_id != ? AND parent_session_id IN"
                " (SELECT id FROM sessions WHERE environment_id = ?)",
                (env_id, env_id),
            )
            # Turns and events go with their sessions (ON DELETE CASCADE).
            await conn.execute("DELETE FROM sessions WHERE environment_id = ?", (env_id,))
            await conn.execute("DELETE FROM environments WHERE id = ?", (env_id,))

    # -- sessions --------------------------------------------------------------------

    @staticmethod
    def _session(row: aiosqlite.Row) -> SessionRecord:
        return SessionRecord(
            id=row["id"],
            environment_id=row["environment_id"],
            parent_session_id=row["parent_session_id"],
            backend=row["backend"],
            agent=AgentSpec.model_validate_json(row["agent_json"]),
            status=row["status"],
            sandbox_id=row["sandbox_id"],
            native_session_id=row["native_session_id"],
            stop_reason=row["stop_reason"],
            last_error=row["last_error"],
            usage=Usage.model_validate_json(row["usage_json"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            token_sha256=row["token_sha256"],
            token_scope=row["token_scope"],
            workspace_base=row["workspace_base"],
            workspace_branch=row["workspace_branch"],
        )

    async def insert_session(self, session: SessionRecord, first_prompt: str) -> None:
        """The session row and its first queued turn are written together or not at all."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO sessions (id, environment_id, parent_session_id, backend, agent_json, status,"
                " sandbox_id, native_session_id, stop_reason, last_error, usage_json, created_at, updated_at,"
                " token_sha256, token_scope, workspace_base, workspace_branch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session.id,
                    session.environment_id,
                    session.parent_session_id,
                    session.backend,
                    session.agent.model_dump_json(),
                    session.status,
                    session.sandbox_id,
                    session.native_session_id,
                    session.stop_reason,
                    session.last_error,
                    session.usage.model_dump_json(),
                    session.created_at,
                    session.updated_at,
                    session.token_sha256,
                    session.token_scope,
                    session.workspace_base,
                    session.workspace_branch,
                ),
            )
            await conn.execute(
                "INSERT INTO turns (session_id, idx, prompt, status, created_at) VALUES (?, 0, ?, 'queued', ?)",
                (session.id, first_prompt, session.created_at),
            )

    async def get_session(self, session_id: str) -> SessionRecord:
        rows = await self._fetchall("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            raise NotFoundError(f"session_id: no session {session_id!r}; list_sessions shows the ids that exist")
        return self._session(rows[0])

    async def find_session_by_token(self, token_sha256: str) -> SessionRecord | None:
        """The live session a sub-agent token belongs to: a token dies with its session."""
        live = ", ".join(f"'{status}'" for status in sorted(LIVE_STATUSES))
        rows = await self._fetchall(
            f"SELECT * FROM sessions WHERE token_sha256 = ? AND status IN ({live})", (token_sha256,)
        )
        return self._session(rows[0]) if rows else None

    async def child_sessions(self, parent_session_id: str) -> list[SessionRecord]:
        rows = await self._fetchall(
            "SELECT * FROM sessions WHERE parent_session_id = ? ORDER BY created_at, id", (parent_session_id,)
        )
        return [self._session(row) for row in rows]

    async def list_sessions(
        self, statuses: Iterable[SessionStatus] | None = None, environment_id: str | None = None
    ) -> list[SessionRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if statuses is not None:
            wanted = list(statuses)
            clauses.append(f"status IN ({', '.join('?' for _ in wanted)})")
            params.extend(wanted)
        if environment_id is not None:
            clauses.append("environment_id = ?")
            params.append(environment_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._fetchall(f"SELECT * FROM sessions{where} ORDER BY created_at, id", params)
        return [self._session(row) for row in rows]

    _SESSION_COLUMNS = frozenset(
        {"status", "sandbox_id", "native_session_id", "stop_reason", "last_error", "usage_json"}
    )

    async def update_session(self, session_id: str, **fields: Any) -> None:
        if "usage" in fields:
            fields["usage_json"] = fields.pop("usage").model_dump_json()
        unknown = set(fields) - self._SESSION_COLUMNS
        if unknown:
            raise StoreError(f"not session columns: {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        async with self._transaction() as conn:
            await conn.execute(
                f"UPDATE sessions SET {assignments}, updated_at = ? WHERE id = ?",
                (*fields.values(), utc_now(), session_id),
            )

    # -- turns ---------------------------------------------------------------------------

    @staticmethod
    def _turn(row: aiosqlite.Row) -> TurnRecord:
        return TurnRecord(
            session_id=row["session_id"],
            idx=row["idx"],
            prompt=row["prompt"],
            status=row["status"],
            stop_reason=row["stop_reason"],
            final_text=row["final_text"],
            error=row["error"],
            usage=Usage.model_validate_json(row["usage_json"]) if row["usage_json"] else None,
            denials=json.loads(row["denials_json"]) if row["denials_json"] else [],
            created_at=row["created_at"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
        )

    async def enqueue_turn(self, session_id: str, prompt: str) -> TurnRecord:
        async with self._transaction() as conn:
            rows = list(
                await conn.execute_fetchall(
                    "SELECT COALESCE(MAX(idx), -1) + 1 FROM turns WHERE session_id = ?", (session_id,)
                )
            )
            idx = int(rows[0][0])
            now = utc_now()
            await conn.execute(
                "INSERT INTO turns (session_id, idx, prompt, status, created_at) VALUES (?, ?, ?, 'queued', ?)",
                (session_id, idx, prompt, now),
            )
        return TurnRecord(session_id=session_id, idx=idx, prompt=prompt, status="queued", created_at=now)

    async def list_turns(self, session_id: str, status: TurnStatus | None = None) -> list[TurnRecord]:
        if status is None:
            rows = await self._fetchall("SELECT * FROM turns WHERE session_id = ? ORDER BY idx", (session_id,))
        else:
            rows = await self._fetchall(
                "SELECT * FROM turns WHERE session_id = ? AND status = ? ORDER BY idx", (session_id, status)
            )
        return [self._turn(row) for row in rows]

    async def get_turn(self, session_id: str, idx: int) -> TurnRecord:
        rows = await self._fetchall("SELECT * FROM turns WHERE session_id = ? AND idx = ?", (session_id, idx))
        if not rows:
            raise NotFoundError(f"no turn {idx} in session {session_id!r}")
        return self._turn(rows[0])

    async def start_turn(self, session_id: str, idx: int) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE turns SET status = 'running', started_at = ? WHERE session_id = ? AND idx = ?",
                (utc_now(), session_id, idx),
            )

    async def finish_turn(
        self,
        session_id: str,
        idx: int,
        *,
        status: TurnStatus,
        stop_reason: str | None,
        final_text: str | None,
        error: str | None,
        usage: Usage | None,
        denials: Sequence[str] = (),
    ) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE turns SET status = ?, stop_reason = ?, final_text = ?, error = ?, usage_json = ?,"
                " denials_json = ?, ended_at = ? WHERE session_id = ? AND idx = ?",
                (
                    status,
                    stop_reason,
                    final_text,
                    error,
                    usage.model_dump_json() if usage else None,
                    json.dumps(list(denials)) if denials else None,
                    utc_now(),
                    session_id,
                    idx,
                ),
            )

    # -- events ----------------------------------------------------------------------------

    async def append_events(self, session_id: str, events: Sequence[Event]) -> list[EventRecord]:
        """Persist events with the next sequence numbers; committed before this returns."""
        if not events:
            return []
        records: list[EventRecord] = []
        async with self._transaction() as conn:
            rows = list(
                await conn.execute_fetchall(
                    "SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = ?", (session_id,)
                )
            )
            seq = int(rows[0][0])
            now = utc_now()
            for event in events:
                seq += 1
                data = event.model_dump(mode="json")
                await conn.execute(
                    "INSERT INTO events (session_id, seq, type, data_json, created_at) VALUES (?, ?, ?, ?, ?)",
                    (session_id, seq, event.type, json.dumps(data), now),
                )
                records.append(EventRecord(session_id=session_id, seq=seq, type=event.type, created_at=now, data=data))
        return records

    async def read_events(
        self, session_id: str, *, after: int = 0, limit: int = 100, types: Sequence[str] | None = None
    ) -> list[EventRecord]:
        sql = "SELECT * FROM events WHERE session_id = ? AND seq > ?"
        params: list[Any] = [session_id, after]
        if types:
            sql += f" AND type IN ({', '.join('?' for _ in types)})"
            params.extend(types)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        rows = await self._fetchall(sql, params)
        return [
            EventRecord(
                session_id=row["session_id"],
                seq=row["seq"],
                type=row["type"],
                created_at=row["created_at"],
                data=json.loads(row["data_json"]),
            )
            for row in rows
        ]

    async def last_seq(self, session_id: str) -> int:
        rows = await self._fetchall("SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = ?", (session_id,))
        return int(rows[0][0])

    async def count_rows(self, table: str) -> int:
        if table not in {"environments", "sessions", "turns", "events"}:
            raise StoreError(f"unknown table {table!r}")
        rows = await self._fetchall(f"SELECT COUNT(*) FROM {table}")
        return int(rows[0][0])


def parse_stored_event(record: EventRecord) -> Event:
    return EVENT_ADAPTER.validate_python(record.data)
