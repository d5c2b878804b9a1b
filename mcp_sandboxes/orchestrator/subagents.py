"""Sub-agents that spawn sub-agents: who may call this server back, and what they may reach.

An agent spawned with `subagents=true` gets this server as an MCP server named "sandboxes",
with a bearer token of its own. The token is random; only its SHA-256 is stored (in the
session row), and the token itself lives only in the agent's MCP config inside its sandbox.
A call made with it acts as that session: what it spawns becomes its child, and it reaches
only its own descendants. Depth is counted along parent links, so it needs no column of its own.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from mcp_sandboxes.errors import NotFoundError
from mcp_sandboxes.store import Database

SERVER_NAME = "sandboxes"
TOKEN_BYTES = 32
# What the stored agent spec shows in place of the token: the real one is in the sandbox only.
REDACTED_AUTHORIZATION = "Bearer <redacted>"
# Parent links are walked at most this far: deeper than any allowed depth, and a bound if a
# row were ever to point at itself.
MAX_WALK = 64


@dataclass(frozen=True)
class Caller:
    """Who is calling a tool: the operator (`session_id` None) or an agent acting as a session."""

    session_id: str | None = None
    # 'full': this server's tools within its subtree; 'permissions': only its permission prompts.
    scope: str = "full"

    @property
    def is_agent(self) -> bool:
        return self.session_id is not None


OPERATOR = Caller()


def new_token() -> tuple[str, str]:
    """A fresh bearer token and the hash that is stored for it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, token_sha256(token)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def callback_server(url: str, authorization: str) -> dict[str, Any]:
    """This server as an entry of an agent's `mcpServers` (streamable HTTP)."""
    return {"type": "http", "url": url, "headers": {"Authorization": authorization}}


class Lineage:
    """Parent/child links between sessions, read from the store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def ancestry(self, session_id: str) -> list[str]:
        """The session, its parent, and so on up to its tree's top session."""
        current = await self._db.get_session(session_id)
        chain = [current.id]
        while current.parent_session_id is not None and len(chain) <= MAX_WALK:
            current = await self._db.get_session(current.parent_session_id)
            chain.append(current.id)
        return chain

    async def depth(self, session_id: str) -> int:
        """0 for a top-level session, 1 for its child, and so on."""
        return len(await self.ancestry(session_id)) - 1

    async def root(self, session_id: str) -> str:
        """The top session of the tree `session_id` belongs to."""
        return (await self.ancestry(session_id))[-1]

    async def descendants(self, session_id: str) -> list[str]:
        """Every session below `session_id`, parents before their children."""
        found: list[str] = []
        frontier = [session_id]
        for _ in range(MAX_WALK):
            if not frontier:
                break
            children = [child.id for parent in frontier for child in await self._db.child_sessions(parent)]
            found.extend(children)
            frontier = children
        return found

    async def caller_for_token(self, token: str) -> Caller | None:
        session = await self._db.find_session_by_token(token_sha256(token))
        if session is None:
            return None
        return Caller(session.id, scope=session.token_scope or "full")

    async def check_reach(self, caller: Caller, session_id: str) -> None:
        """An agent reaches only its own descendants; anything else looks like an unknown id."""
        if caller.session_id is None:
            return
        if session_id not in await self.descendants(caller.session_id):
            raise NotFoundError(
                f"session_id: no session {session_id!r} among your sub-agents;"
                " list_sessions shows the ones you can reach"
            )
