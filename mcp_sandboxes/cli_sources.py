"""Where the terminal commands (`sessions`, `logs`, `transcript`, `stop`, `shell`, `envs`) get
their data: a running server over streamable HTTP (the `mcp` SDK's client, with the operator
token), or, when no server is named, the data directory's SQLite file opened read-only.

Both hand out plain dicts in the shape of the tools' structured output (SessionView,
EnvironmentView, EventView), so the commands render one shape whatever the source."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from mcp_sandboxes.errors import ConflictError, McpSandboxesError, NotFoundError
from mcp_sandboxes.orchestrator import WorkspaceView, render_transcript
from mcp_sandboxes.store import WORKSPACE_ADAPTER, EventRecord, SessionRecord

# A tool call that is not a long-poll; the long-polls add their own wait to it.
CALL_TIMEOUT_S = 60.0
TRANSCRIPT_URI = "sandboxes://sessions/{session_id}/transcript"
FINAL_STATUSES = ("stopped", "failed")


class Source(Protocol):
    where: str

    async def sessions(self) -> list[dict[str, Any]]: ...
    async def session(self, session_id: str) -> dict[str, Any]: ...
    async def environments(self) -> list[dict[str, Any]]: ...
    async def events(self, session_id: str, after: int, wait_s: float) -> tuple[list[dict[str, Any]], str]:
        """Events after `after` (waiting up to `wait_s` for some) and the session's status."""
        ...

    async def transcript(self, session_id: str) -> str: ...
    async def stop(self, session_id: str) -> dict[str, Any]: ...


class ServerSource:
    """A running server, called as its operator."""

    def __init__(self, client: Client, url: str) -> None:
        self._client = client
        self.where = url

    async def _call(self, tool: str, arguments: dict[str, Any], extra_s: float = 0.0) -> dict[str, Any]:
        with anyio.fail_after(CALL_TIMEOUT_S + extra_s):
            result: CallToolResult = await self._client.call_tool(tool, arguments)
        if result.is_error:
            text = " ".join(block.text for block in result.content if isinstance(block, TextContent))
            if "not found" in text.lower() or "no session" in text.lower():
                raise NotFoundError(text)
            raise McpSandboxesError(text or f"{tool} failed")
        if not isinstance(result.structured_content, dict):
            raise McpSandboxesError(f"{tool}: the server returned no structured content")
        return result.structured_content

    async def sessions(self) -> list[dict[str, Any]]:
        return list((await self._call("list_sessions", {}))["sessions"])

    async def session(self, session_id: str) -> dict[str, Any]:
        return await self._call("get_session", {"session_id": session_id})

    async def environments(self) -> list[dict[str, Any]]:
        return list((await self._call("list_environments", {}))["environments"])

    async def events(self, session_id: str, after: int, wait_s: float) -> tuple[list[dict[str, Any]], str]:
        arguments = {"session_id": session_id, "after": after, "limit": 500, "wait_s": wait_s}
        page = await self._call("read_events", arguments, extra_s=wait_s)
        return list(page["events"]), str(page["session_status"])

    async def transcript(self, session_id: str) -> str:
        with anyio.fail_after(CALL_TIMEOUT_S):
            result = await self._client.read_resource(TRANSCRIPT_URI.format(session_id=session_id))
        text = getattr(result.contents[0], "text", None) if result.contents else None
        if not isinstance(text, str):
            raise McpSandboxesError(f"session {session_id}: the server returned no transcript text")
        return text

    async def stop(self, session_id: str) -> dict[str, Any]:
        return await self._call("stop_session", {"session_id": session_id})


@asynccontextmanager
async def server_source(url: str, token: str) -> AsyncIterator[ServerSource]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=CALL_TIMEOUT_S) as http:
        # One plain request first: the SDK's client reports a refused token or an unreachable
        # server only as a bare "error response", so these two are named here.
        try:
            probe = await http.get(url, headers={"Accept": "text/event-stream"})
        except httpx2.TransportError as exc:
            raise McpSandboxesError(
                f"--url {url}: cannot reach the server ({exc}); is `mcp-sandboxes serve --transport http` running?"
            ) from None
        if probe.status_code == 401:
            raise McpSandboxesError(
                f"--url {url}: the server refused the operator token; set MCP_SANDBOXES_AUTH_TOKEN to the token"
                " `mcp-sandboxes token` prints on the server's machine"
            )
        if probe.status_code == 404:
            raise McpSandboxesError(f"--url {url}: no MCP endpoint there; the path is usually /mcp")
        async with Client(streamable_http_client(url, http_client=http)) as client:
            yield ServerSource(client, url)


class LocalSource:
    """The data directory's SQLite file, read-only: nothing here can change a session."""

    def __init__(self, database: Path) -> None:
        if not database.exists():
            raise McpSandboxesError(
                f"{database}: no database yet; start `mcp-sandboxes serve` once, or give --url of a running server"
            )
        self.where = str(database)
        self._conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self._conn.close()

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self._conn.execute(sql, params).fetchall())

    def _record(self, row: sqlite3.Row) -> SessionRecord:
        data = {key: row[key] for key in row.keys() if key not in ("agent_json", "usage_json")}  # noqa: SIM118
        data["agent"] = json.loads(row["agent_json"])
        data["usage"] = json.loads(row["usage_json"])
        return SessionRecord.model_validate(data)

    def _view(self, row: sqlite3.Row, env_names: dict[str, str]) -> dict[str, Any]:
        record = self._record(row)
        turns = self._rows("SELECT status FROM turns WHERE session_id = ?", (record.id,))
        return {
            "session_id": record.id,
            "environment_id": record.environment_id,
            "environment_name": env_names.get(record.environment_id),
            "parent_session_id": record.parent_session_id,
            "backend": record.backend,
            "model": record.agent.model,
            "status": record.status,
            "stop_reason": record.stop_reason,
            "last_error": record.last_error,
            "sandbox_id": record.sandbox_id,
            "workspace_branch": record.workspace_branch,
            "workspace_base": record.workspace_base,
            "turns": len(turns),
            "queued_turns": sum(1 for turn in turns if turn["status"] == "queued"),
            "usage": record.usage.model_dump(),
            "created_at": record.created_at,
            "updated_at": record.updated_at,
        }

    def _env_names(self) -> dict[str, str]:
        return {row["id"]: row["name"] for row in self._rows("SELECT id, name FROM environments")}

    async def sessions(self) -> list[dict[str, Any]]:
        names = self._env_names()
        return [self._view(row, names) for row in self._rows("SELECT * FROM sessions ORDER BY created_at, id")]

    def _session_row(self, session_id: str) -> sqlite3.Row:
        rows = self._rows("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            raise NotFoundError(f"session_id: no session {session_id!r}; `mcp-sandboxes sessions` lists them")
        return rows[0]

    async def session(self, session_id: str) -> dict[str, Any]:
        return self._view(self._session_row(session_id), self._env_names())

    async def environments(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM environments WHERE deleted_at IS NULL ORDER BY created_at, id")
        live = {
            row["environment_id"]: row["n"]
            for row in self._rows(
                "SELECT environment_id, COUNT(*) AS n FROM sessions"
                " WHERE status IN ('starting', 'running', 'idle') GROUP BY environment_id"
            )
        }
        found = []
        for row in rows:
            spec = json.loads(row["spec_json"])
            found.append(
                {
                    "id": row["id"],
                    "name": row["name"],
                    "provider": row["provider"],
                    "image": spec.get("image", ""),
                    "workdir": spec.get("workdir", ""),
                    "network": spec.get("network", ""),
                    "workspace": _workspace(row["workspace_json"]),
                    "state": "(not checked: no server)",
                    "live_sessions": live.get(row["id"], 0),
                    "created_at": row["created_at"],
                }
            )
        return found

    def _events(self, session_id: str, after: int) -> list[EventRecord]:
        rows = self._rows(
            "SELECT * FROM events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT 500", (session_id, after)
        )
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

    async def events(self, session_id: str, after: int, wait_s: float) -> tuple[list[dict[str, Any]], str]:
        """Polls the file (a reader without the server has no event bus to wait on)."""
        deadline = anyio.current_time() + wait_s
        while True:
            status = str(self._session_row(session_id)["status"])
            records = self._events(session_id, after)
            if records or anyio.current_time() >= deadline or status in FINAL_STATUSES:
                return [r.model_dump(exclude={"session_id"}) for r in records], status
            await anyio.sleep(min(LOCAL_POLL_S, max(deadline - anyio.current_time(), 0)))

    async def transcript(self, session_id: str) -> str:
        record = self._record(self._session_row(session_id))
        events: list[EventRecord] = []
        while batch := self._events(session_id, events[-1].seq if events else 0):
            events.extend(batch)
        return render_transcript(record, events)

    async def stop(self, session_id: str) -> dict[str, Any]:
        raise ConflictError(
            "stop: the data directory is read-only to this command; give --url of the running server"
            " (or set MCP_SANDBOXES_URL) so the server stops the session and its sandbox"
        )


# How often `logs -f` re-reads the file when no server is named.
LOCAL_POLL_S = 0.5


def _workspace(stored: str | None) -> dict[str, Any] | None:
    """An environment's stored workspace as the server's views show it (no credentials in URLs)."""
    view = WorkspaceView.of(WORKSPACE_ADAPTER.validate_json(stored)) if stored else None
    return None if view is None else view.model_dump()
