"""Numbered schema migrations. Append only: never edit a migration that has shipped."""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE environments (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            provider TEXT NOT NULL,
            spec_json TEXT NOT NULL,
            setup_commands_json TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            environment_id TEXT NOT NULL REFERENCES environments(id),
            parent_session_id TEXT REFERENCES sessions(id),
            backend TEXT NOT NULL,
            agent_json TEXT NOT NULL,
            status TEXT NOT NULL,
            sandbox_id TEXT,
            native_session_id TEXT,
            stop_reason TEXT,
            last_error TEXT,
            usage_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX sessions_by_status ON sessions(status);
        CREATE INDEX sessions_by_environment ON sessions(environment_id);
        CREATE TABLE turns (
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            status TEXT NOT NULL,
            stop_reason TEXT,
            final_text TEXT,
            error TEXT,
            usage_json TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            ended_at TEXT,
            PRIMARY KEY (session_id, idx)
        );
        CREATE TABLE events (
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            data_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (session_id, seq)
        );
        """,
    ),
    (
        2,
        """
        ALTER TABLE sessions ADD COLUMN token_sha256 TEXT;
        CREATE UNIQUE INDEX sessions_by_token ON sessions(token_sha256) WHERE token_sha256 IS NOT NULL;
        CREATE INDEX sessions_by_parent ON sessions(parent_session_id);
        """,
    ),
    (
        3,
        # Deleting an environment keeps its sessions' history readable: the row stays, marked
        # deleted, and only live environments need a unique name. Who made it (an agent's session,
        # or NULL for the operator) decides how much of a failing setup command's output is shown.
        # SQLite cannot drop a UNIQUE constraint in place, hence the rebuild (run with foreign keys
        # off, then checked, as SQLite's ALTER TABLE documentation prescribes).
        """
        CREATE TABLE environments_v3 (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            provider TEXT NOT NULL,
            spec_json TEXT NOT NULL,
            setup_commands_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by_session TEXT,
            deleted_at TEXT
        );
        INSERT INTO environments_v3 (id, name, provider, spec_json, setup_commands_json, created_at)
            SELECT id, name, provider, spec_json, setup_commands_json, created_at FROM environments;
        DROP TABLE environments;
        ALTER TABLE environments_v3 RENAME TO environments;
        CREATE UNIQUE INDEX environments_live_name ON environments(name) WHERE deleted_at IS NULL;
        """,
    ),
    (
        4,
        # Tool calls the agent's permission mode refused during a turn, so its outcome can say so.
        """
        ALTER TABLE turns ADD COLUMN denials_json TEXT;
        """,
    ),
    (
        5,
        # What a session's token may do: 'full' (this server's tools within its subtree) or
        # 'permissions' (only answer-seeking for its own permission prompts).
        """
        ALTER TABLE sessions ADD COLUMN token_scope TEXT;
        """,
    ),
    (
        6,
        # Workspaces: what an environment brings into each sandbox (a host directory or a git
        # repository, as JSON), and per session the commit its workspace started at and the branch
        # it works on, so diffs and exports are against that starting point.
        """
        ALTER TABLE environments ADD COLUMN workspace_json TEXT;
        ALTER TABLE sessions ADD COLUMN workspace_base TEXT;
        ALTER TABLE sessions ADD COLUMN workspace_branch TEXT;
        """,
    ),
    (
        7,
        # Prepared images: an environment's packages by manager (JSON), where its preparation stands
        # ('preparing', 'ready', 'failed'; NULL for an environment with nothing to prepare, or older
        # rows), what it said last (a failure's step and redacted tail), and the image it made
        # (mcp-sandboxes/prepared:<recipe hash>), which every spawn then starts from.
        """
        ALTER TABLE environments ADD COLUMN packages_json TEXT;
        ALTER TABLE environments ADD COLUMN prep_state TEXT;
        ALTER TABLE environments ADD COLUMN prep_detail TEXT;
        ALTER TABLE environments ADD COLUMN prepared_image TEXT;
        """,
    ),
    (
        8,
        # Warm pools: how many started sandboxes an environment keeps ready for spawns (0: none).
        """
        ALTER TABLE environments ADD COLUMN warm_pool INTEGER NOT NULL DEFAULT 0;
        """,
    ),
]
