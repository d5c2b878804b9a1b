"""The workspace tools: a session's files read, written and listed, its diff against where it
started, and its work exported. Thin adapters to the orchestrator (orchestrator/workspaces.py
does the work in the sandbox); an agent caller reaches only its own sub-agents' sessions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from mcp_sandboxes.errors import ConflictError
from mcp_sandboxes.orchestrator import Orchestrator
from mcp_sandboxes.server.auth import current_caller
from mcp_sandboxes.server.registration import CallScope, register_tool
from mcp_sandboxes.server.schemas import Ref, SandboxPath, _Input

# The schema's own bounds; the server's configured caps (workspaces.*) are checked below them.
MAX_READ_BYTES = 64 * 1_048_576
MAX_CONTENT_CHARS = 96 * 1_048_576
DEFAULT_READ_BYTES = 65_536
MAX_LIST_DEPTH = 8

READS = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
EXPORTS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

WorkspacePath = SandboxPath
PATH_HELP = (
    "Path relative to the workspace (the environment's workdir), or absolute inside it. '..' out of it,"
    " other absolute paths and symbolic links leading out are refused."
)


class ReadFileInput(_Input):
    session_id: Ref = Field(description="The session whose workspace to read.")
    path: WorkspacePath = Field(description=PATH_HELP)
    offset: int = Field(default=0, ge=0, le=2**62, description="Byte to start at (to read a large file in pieces).")
    max_bytes: int = Field(
        default=DEFAULT_READ_BYTES,
        ge=1,
        le=MAX_READ_BYTES,
        description="Most bytes to return; at most the server's workspaces.max_read_bytes (default 1 MiB).",
    )


class WriteFileInput(_Input):
    session_id: Ref = Field(description="The session whose workspace to write.")
    path: WorkspacePath = Field(description=PATH_HELP + " Missing directories are made.")
    content: str = Field(max_length=MAX_CONTENT_CHARS, description="The whole new content of the file.")
    encoding: Literal["text", "base64"] = Field(default="text", description="'text' (UTF-8) or 'base64' bytes.")


class ListFilesInput(_Input):
    session_id: Ref = Field(description="The session whose workspace to list.")
    path: WorkspacePath = Field(default=".", description=PATH_HELP)
    depth: int = Field(default=1, ge=1, le=MAX_LIST_DEPTH, description="Levels below `path` to list (.git skipped).")


class SessionDiffInput(_Input):
    session_id: Ref = Field(description="The session whose changes to show.")


class ExportChangesInput(_Input):
    session_id: Ref = Field(description="The session whose work to export.")
    format: Literal["auto", "bundle", "patch"] = Field(
        default="auto",
        description="'auto': a branch mcp-sandboxes/<session_id> in the host repository the workspace was cloned"
        " from (operator only), else a git bundle; 'bundle': a base64 git bundle; 'patch': git format-patch text.",
    )


class FileRead(BaseModel):
    session_id: str
    path: str = Field(description="Relative to the workspace, symbolic links resolved.")
    size: int = Field(description="The file's whole size in bytes.")
    offset: int
    encoding: Literal["text", "base64"]
    content: str
    truncated: bool = Field(description="True when the file goes on past what was returned: read on with offset.")


class FileWritten(BaseModel):
    session_id: str
    path: str
    bytes_written: int


class FileEntry(BaseModel):
    path: str
    type: Literal["file", "directory", "symlink", "other"]
    size: int


class FileList(BaseModel):
    session_id: str
    path: str
    entries: list[FileEntry]
    truncated: bool = Field(description="True when there were more entries than the server returns.")


class ChangedFile(BaseModel):
    status: str = Field(description="git's letter: A added, M modified, D deleted, T type changed.")
    path: str


class SessionDiff(BaseModel):
    session_id: str
    base: str = Field(description="The commit the session's workspace started at.")
    files: list[ChangedFile]
    diff: str = Field(description="Unified diff (git, binary patches included) of the work tree against the base.")
    truncated: bool = Field(description="True when the diff was cut at the server's workspaces.max_diff_bytes.")


class ExportedChanges(BaseModel):
    session_id: str
    branch: str
    base: str
    commit: str = Field(description="The branch's head commit.")
    commits: int = Field(description="Commits on the branch since the base.")
    committed_now: bool = Field(description="Whether uncommitted work was committed for this export.")
    host_repository: str | None = Field(default=None, description="Where the branch was put, if in a host repository.")
    bundle_base64: str | None = None
    patch: str | None = None
    truncated: bool = False


def _summary(result: BaseModel) -> str:
    if isinstance(result, FileRead):
        more = f"; truncated, read on with offset={result.offset + len(result.content)}" if result.truncated else ""
        return f"{result.path}: {result.size} bytes ({result.encoding}){more}"
    if isinstance(result, FileWritten):
        return f"wrote {result.bytes_written} bytes to {result.path}"
    if isinstance(result, FileList):
        shown = "\n".join(f"{e.path}{'/' if e.type == 'directory' else ''}" for e in result.entries[:50])
        more = " (truncated)" if result.truncated else ""
        return f"{len(result.entries)} entries under {result.path}{more}\n{shown}"
    if isinstance(result, SessionDiff):
        files = "\n".join(f"{f.status} {f.path}" for f in result.files) or "no changes"
        return f"{len(result.files)} file(s) changed since {result.base[:12]}:\n{files}"
    if isinstance(result, ExportedChanges):
        where = (
            f"branch {result.branch} in {result.host_repository}"
            if result.host_repository
            else ("a patch" if result.patch is not None else "a git bundle (bundle_base64)")
        )
        return f"{result.commits} commit(s) since {result.base[:12]}, head {result.commit[:12]}, exported as {where}"
    return type(result).__name__  # pragma: no cover - every result type is listed above


def register_workspace_tools(
    server: MCPServer[Any], orchestrator: Orchestrator, call_scope: CallScope | None = None
) -> None:
    async def reachable(session_id: str) -> str:
        caller = current_caller.get()
        if caller.scope == "permissions":
            raise ConflictError(
                "session_id: this agent's token only asks about its own permission prompts"
                " (spawned with ask_permissions, not subagents)"
            )
        await orchestrator.check_reach(caller, session_id)
        return session_id

    async def read_file(request: ReadFileInput) -> FileRead:
        read = await orchestrator.read_workspace_file(
            await reachable(request.session_id), request.path, offset=request.offset, max_bytes=request.max_bytes
        )
        return FileRead(
            session_id=request.session_id,
            path=read.path,
            size=read.size,
            offset=read.offset,
            encoding=read.encoding,
            content=read.content,
            truncated=read.truncated,
        )

    async def write_file(request: WriteFileInput) -> FileWritten:
        path, written = await orchestrator.write_workspace_file(
            await reachable(request.session_id), request.path, request.content, request.encoding
        )
        return FileWritten(session_id=request.session_id, path=path, bytes_written=written)

    async def list_files(request: ListFilesInput) -> FileList:
        path, entries, truncated = await orchestrator.list_workspace(
            await reachable(request.session_id), request.path, depth=request.depth
        )
        return FileList(
            session_id=request.session_id,
            path=path,
            entries=[FileEntry(path=e.path, type=e.type, size=e.size) for e in entries],
            truncated=truncated,
        )

    async def session_diff(request: SessionDiffInput) -> SessionDiff:
        diff = await orchestrator.session_diff(await reachable(request.session_id))
        return SessionDiff(
            session_id=request.session_id,
            base=diff.base,
            files=[ChangedFile(status=status, path=path) for status, path in diff.files],
            diff=diff.diff,
            truncated=diff.truncated,
        )

    async def export_changes(request: ExportChangesInput) -> ExportedChanges:
        session_id = await reachable(request.session_id)
        # Only the operator's call puts a branch into a host repository; an agent gets a bundle.
        exported = await orchestrator.export_changes(
            session_id, format=request.format, to_host=not current_caller.get().is_agent
        )
        return ExportedChanges(
            session_id=session_id,
            branch=exported.branch,
            base=exported.base,
            commit=exported.commit,
            commits=exported.commits,
            committed_now=exported.committed_now,
            host_repository=exported.host_repository,
            bundle_base64=exported.bundle_base64,
            patch=exported.patch,
            truncated=exported.truncated,
        )

    tools: list[tuple[str, str, str, type[Any], type[BaseModel], Callable[[Any], Awaitable[Any]], ToolAnnotations]] = [
        (
            "read_file",
            "Read a file in a session's workspace",
            "Read a file from a session's workspace (its sandbox's workdir): text, or base64 for binary;"
            " size-capped, with offset to read on.",
            ReadFileInput,
            FileRead,
            read_file,
            READS,
        ),
        (
            "write_file",
            "Write a file in a session's workspace",
            "Write (create or replace) a file in a session's workspace, as the sandbox's user.",
            WriteFileInput,
            FileWritten,
            write_file,
            WRITES,
        ),
        (
            "list_files",
            "List a directory of a session's workspace",
            "List a directory of a session's workspace (paths, types, sizes; bounded).",
            ListFilesInput,
            FileList,
            list_files,
            READS,
        ),
        (
            "session_diff",
            "Show a session's changes",
            "The session's changes against the commit its workspace started at (git or copied workspaces),"
            " uncommitted and new files included: the changed-file list and a unified diff (size-capped).",
            SessionDiffInput,
            SessionDiff,
            session_diff,
            READS,
        ),
        (
            "export_changes",
            "Export a session's work",
            "Commit a session's uncommitted work on its branch mcp-sandboxes/<session_id>, then hand the branch"
            " out: into the host repository its workspace was cloned from (operator), or as a git bundle or patch."
            " How an orchestrator collects and merges the work of several sub-agents.",
            ExportChangesInput,
            ExportedChanges,
            export_changes,
            EXPORTS,
        ),
    ]
    for name, title, description, input_model, output_model, handler, hints in tools:
        register_tool(
            server,
            name=name,
            title=title,
            description=description,
            input_model=input_model,
            output_model=output_model,
            handler=handler,
            annotations=hints,
            call_scope=call_scope,
            summarize=_summary,
        )


__all__ = ["register_workspace_tools"]
