"""Agent CLIs in any image: the host's installation as the fallback, a probe before the first turn,
and the API key found before a spawn.

The image's own CLI stays the fast path. Where `backends.<name>.cli_path` is empty, the server
looks for its own installation of the CLI (this checkout's pinned `tools/agent-clis`, then the
server's PATH, following npm's `.bin` links to the real package) and mounts it read-only under
TOOLS_DIR: a self-contained native binary as it is (Claude Code, OpenCode and Droid are glibc
binaries, Codex a static musl one), a CLI that is a Node script (Gemini CLI) as its npm package
plus the host's `node`. Every turn then starts through `/bin/sh`: the image's own CLI when its
PATH has one, else ours (`exec`, so the CLI keeps the shell's pid and gets every signal). The
choice is made by each turn, not recorded: sandboxes made before a restart, warm pools and
network mode "model" need nothing remembered.

Before the first turn, `check_cli` probes the new sandbox once: the image's own CLI is trusted as
it is; ours must start (`--version`; for a Node script, `node --version`), and a refusal says why
(e.g. the image has no glibc loader) and what to use instead. `check_api_key` refuses a spawn
whose CLI could reach no model because the server has none of its keys.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from mcp_sandboxes.backends.base import AgentSpec, Backend, Command, Translator, Turn
from mcp_sandboxes.config import BackendSettings
from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers.base import Sandbox
from mcp_sandboxes.specs import Mount, SandboxSetup

# Where the host's CLIs are mounted in a sandbox (read-only); TOOLS_BIN is the fallback PATH entry.
TOOLS_DIR = "/opt/mcp-sandboxes/tools"
TOOLS_BIN = f"{TOOLS_DIR}/bin"
# Providers that bind-mount host paths into their sandboxes: only these get (and probe) ours.
MOUNTING_PROVIDERS = frozenset({"docker", "podman", "containerd", "bubblewrap"})
# This checkout's pinned CLIs (scripts/install-agent-clis.sh); absent in an installed package.
PINNED_BIN = Path(__file__).resolve().parents[2] / "tools" / "agent-clis" / "node_modules" / ".bin"
# A probe runs `--version` once per spawn on the fallback path (Claude Code: about 0.3 s).
PROBE_TIMEOUT_S = 30.0
# How each backend's npm package is named, for the "install it" hint.
_PACKAGES = {
    "claude": "@anthropic-ai/claude-code",
    "codex": "@openai/codex",
    "gemini": "@google/gemini-cli",
    "opencode": "opencode-ai",
    "factory": "@factory/cli",
}
_ARCH = {"x86_64": ("x64", "x86_64"), "amd64": ("x64", "x86_64"), "aarch64": ("arm64", "aarch64")}
_PT_INTERP = 3
# The probe's verdicts (exit codes of its script).
_MISSING, _NO_LOADER, _FAILED, _NO_NODE = 10, 11, 12, 13


@dataclass(frozen=True)
class HostCli:
    """A CLI of the host's, as a sandbox sees it: what is mounted, how it is started there."""

    executable: str
    source: Path  # the real file on the host (the binary, or the Node entry script)
    kind: Literal["binary", "node"]
    launch: tuple[str, ...]  # argv prefix in the sandbox
    mounts: tuple[Mount, ...] = field(default=())
    interpreter: str | None = None  # the ELF loader the binary (or node) needs; None: static


def elf_interpreter(path: Path) -> str | None:
    """The PT_INTERP of a 64-bit little-endian ELF file ('' for a static one); None when `path`
    is no such ELF file (a script, or a format this does not read)."""
    try:
        with path.open("rb") as handle:
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            phoff = struct.unpack_from("<Q", header, 0x20)[0]
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
            for index in range(phnum):
                entry = index * phentsize
                if struct.unpack_from("<I", table, entry)[0] == _PT_INTERP:
                    offset, _, _, size = struct.unpack_from("<QQQQ", table, entry + 8)
                    handle.seek(offset)
                    return handle.read(size).rstrip(b"\0").decode("utf-8", "replace")
            return ""
    except (OSError, struct.error):
        return None


def _package_root(path: Path) -> Path | None:
    """The npm package directory holding `path` (the nearest package.json above it)."""
    for parent in path.parents:
        if (parent / "package.json").is_file():
            return parent
        if parent.name == "node_modules":
            return None
    return None


def _native_candidates(executable: str, root: Path) -> list[Path]:
    """Where an npm package that launches a native binary through Node keeps that binary."""
    arch, triple = _ARCH.get(platform.machine().lower(), ("x64", "x86_64"))
    musl = f"vendor/{triple}-unknown-linux-musl/bin/codex"
    table = {
        "codex": [
            root / musl,
            root / f"node_modules/@openai/codex-linux-{arch}/{musl}",
            root.parent / f"codex-linux-{arch}/{musl}",
        ],
        "droid": [
            root.parent / f"cli-linux-{arch}/bin/droid",
            root / f"node_modules/@factory/cli-linux-{arch}/bin/droid",
        ],
        "opencode": [
            root.parent / f"opencode-linux-{arch}/bin/opencode",
            root / f"node_modules/opencode-linux-{arch}/bin/opencode",
        ],
        "claude": [root.parent / f"claude-code-linux-{arch}/claude"],
    }
    return table.get(executable, [])


def _binary(executable: str, binary: Path, interpreter: str) -> HostCli:
    if executable == "codex" and binary.parent.name == "bin" and (binary.parent.parent / "codex-path").is_dir():
        # Codex finds its helpers (codex-path/rg, codex-resources) beside its bin/ directory.
        target = f"{TOOLS_DIR}/codex"
        mount = Mount(source=str(binary.parent.parent), target=target)
        return HostCli(executable, binary, "binary", (f"{target}/bin/codex",), (mount,), interpreter or None)
    target = f"{TOOLS_BIN}/{executable}"
    mount = Mount(source=str(binary), target=target)
    return HostCli(executable, binary, "binary", (target,), (mount,), interpreter or None)


def _layout(executable: str, found: Path) -> HostCli | None:
    """How the installation whose real file is `found` reaches a sandbox, or None when it cannot."""
    interpreter = elf_interpreter(found)
    if interpreter is not None:
        return _binary(executable, found, interpreter)
    root = _package_root(found)
    if root is None:
        return None
    for candidate in _native_candidates(executable, root):
        native = elf_interpreter(candidate) if candidate.is_file() else None
        if native is not None:
            return _binary(executable, candidate.resolve(), native)
    node = shutil.which("node")
    node_interpreter = elf_interpreter(Path(node).resolve()) if node else None
    if node is None or node_interpreter is None:
        return None
    target = f"{TOOLS_DIR}/{executable}-cli"
    mounts = (
        Mount(source=str(root), target=target),
        Mount(source=str(Path(node).resolve()), target=f"{TOOLS_BIN}/node"),
    )
    entry = found.relative_to(root).as_posix()
    return HostCli(executable, found, "node", ("node", f"{target}/{entry}"), mounts, node_interpreter or None)


def search_path(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """Where the server looks for its CLIs: this checkout's pinned ones, then its PATH."""
    path = (os.environ if environ is None else environ).get("PATH", "")
    return (PINNED_BIN, *(Path(part) for part in path.split(os.pathsep) if part))


@lru_cache(maxsize=64)
def find_host_cli(executable: str, search: tuple[Path, ...]) -> HostCli | None:
    """The first installation of `executable` in `search` that a sandbox can be given."""
    for directory in search:
        candidate = directory / executable
        if candidate.is_file() and os.access(candidate, os.X_OK):
            cli = _layout(executable, candidate.resolve())
            if cli is not None:
                return cli
    return None


def _launcher(cli: HostCli) -> str:
    """The shell text every turn starts with: `$0` is the executable, "$@" its arguments."""
    launch = " ".join(shlex.quote(part) for part in cli.launch)
    return (
        'command -v "$0" >/dev/null 2>&1 && exec "$0" "$@"\n'
        f'PATH="${{PATH:+$PATH:}}{TOOLS_BIN}"; export PATH\n'
        f'exec {launch} "$@"\n'
    )


class HostCliBackend:
    """A backend whose turns run the image's own CLI, else the host's mounted one."""

    def __init__(self, inner: Backend, cli: HostCli) -> None:
        self.inner = inner
        self.host_cli = cli
        self.name = inner.name
        self.executable = inner.executable

    def command(self, turn: Turn) -> Command:
        command = self.inner.command(turn)
        if not command.argv or command.argv[0] != self.executable:
            return command
        return command.model_copy(update={"argv": ["/bin/sh", "-c", _launcher(self.host_cli), *command.argv]})

    def translator(self) -> Translator:
        return self.inner.translator()

    def mounts(self) -> list[Mount]:
        return [*self.inner.mounts(), *self.host_cli.mounts]

    def setup(self, agent: AgentSpec, *, home: str) -> SandboxSetup:
        return self.inner.setup(agent, home=home)

    def __getattr__(self, name: str) -> Any:
        # Anything else a backend offers (its module's helpers) is the inner one's.
        return getattr(self.inner, name)


def with_host_cli(backend: Backend, settings: BackendSettings, search: tuple[Path, ...] | None = None) -> Backend:
    """`backend` with the host's CLI as its fallback, when no cli_path is configured and the host
    has one; else `backend` as it is (custom runs whatever its config names)."""
    if backend.name == "custom" or settings.cli_path:
        return backend
    cli = find_host_cli(backend.executable, search if search is not None else search_path())
    return backend if cli is None else HostCliBackend(backend, cli)


def mounts_for(provider: str, mounts: Sequence[Mount]) -> list[Mount]:
    """The mounts a sandbox of `provider` gets: a provider that mounts nothing from this host
    (remote ones) is not given ours (a configured cli_path is still its to refuse)."""
    if provider in MOUNTING_PROVIDERS:
        return list(mounts)
    return [mount for mount in mounts if not mount.target.startswith(TOOLS_DIR + "/")]


def _host_layer(backend: Backend) -> Backend:
    """The HostCliBackend under any wrappers (network mode "model" wraps its own), else the
    innermost backend."""
    current: Any = backend
    while not isinstance(current, HostCliBackend):
        inner = getattr(current, "inner", None)
        if inner is None:
            break
        current = inner
    return current  # type: ignore[no-any-return]


def _probe_script(backend: Backend) -> tuple[str, HostCli | None, str | None]:
    """The probe's shell text, the host CLI it falls back on, and the loader it needs."""
    layer = _host_layer(backend)
    executable = shlex.quote(backend.executable)
    if isinstance(layer, HostCliBackend):
        cli = layer.host_cli
        lines = [
            f"command -v {executable} >/dev/null 2>&1 && exit 0",
            f'PATH="${{PATH:+$PATH:}}{TOOLS_BIN}"; export PATH',
            f"[ -e {shlex.quote(cli.launch[-1])} ] || exit {_MISSING}",
        ]
        if cli.kind == "node":
            lines.append(f"command -v node >/dev/null 2>&1 || exit {_NO_NODE}")
            lines.append("out=$(node --version 2>&1) && exit 0")
        else:
            lines.append(f"out=$({shlex.quote(cli.launch[0])} --version 2>&1) && exit 0")
        if cli.interpreter:
            lines.append(f"[ -e {shlex.quote(cli.interpreter)} ] || exit {_NO_LOADER}")
        lines.append(f'printf %s "$out" | tail -c 400; exit {_FAILED}')
        return "\n".join(lines), cli, cli.interpreter
    cli_path = str(getattr(layer, "cli_path", "") or "")
    program = str(getattr(layer, "program", "") or backend.executable)
    if not cli_path:
        return f"command -v {executable} >/dev/null 2>&1 || exit {_MISSING}", None, None
    # A configured cli_path: mounted where the backend says; it needs its loader (or node).
    interpreter = elf_interpreter(Path(cli_path).expanduser().resolve())
    lines = [f"[ -e {shlex.quote(program)} ] || exit {_MISSING}"]
    if interpreter is None:
        lines.append(f"command -v node >/dev/null 2>&1 || exit {_NO_NODE}")
    elif interpreter:
        lines.append(f"[ -e {shlex.quote(interpreter)} ] || exit {_NO_LOADER}")
    return "\n".join(lines), None, interpreter or None


async def check_cli(sandbox: Sandbox, backend: Backend, *, image: str, user: str | None) -> None:
    """Refuses (InvalidInputError on `environment`) a sandbox whose image cannot run the
    backend's CLI, saying why and what to use instead. One exec; the image's own CLI is trusted."""
    if backend.name == "custom":
        return
    script, cli, interpreter = _probe_script(backend)
    result = await sandbox.exec(["/bin/sh", "-c", script], user=user, timeout=PROBE_TIMEOUT_S)
    if result.ok:
        return
    executable = backend.executable
    output = (result.stdout or result.stderr).decode("utf-8", "replace").strip()
    if result.exit_code == _MISSING and cli is None and not getattr(_host_layer(backend), "cli_path", ""):
        package = _PACKAGES.get(backend.name, executable)
        raise InvalidInputError(
            "environment",
            f"image {image!r} cannot run the {backend.name} CLI: it has no `{executable}` on its PATH and this"
            f" server found no installation of it to mount; install it on the server (npm install -g {package},"
            f" or scripts/install-agent-clis.sh in a checkout), set backends.{backend.name}.cli_path, or use an"
            f" image with `{executable}` installed (e.g. mcp-sandboxes/agent:latest)",
        )
    if result.exit_code == _MISSING:
        reason = f"it has no `{executable}` and the host's could not be mounted in it"
    elif result.exit_code == _NO_LOADER:
        reason = f"it has no glibc loader {interpreter}"
    elif result.exit_code == _NO_NODE:
        reason = f"it has no `node` to run the {executable} script with"
    elif result.exit_code == _FAILED:
        what = "node" if cli is not None and cli.kind == "node" else executable
        reason = f"`{what} --version` failed there: {output or f'exit code {result.exit_code}'}"
    else:
        detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-400:]
        reason = f"the probe could not run /bin/sh in it (exit code {result.exit_code}): {detail}"
    raise InvalidInputError(
        "environment",
        f"image {image!r} cannot run the {backend.name} CLI: {reason}; use an image with glibc (Debian/Ubuntu)"
        f" or one with `{executable}` installed",
    )


def check_api_key(name: str, settings: BackendSettings, environ: Mapping[str, str]) -> None:
    """Refuses a spawn whose CLI would find none of its API keys (`api_key_env`), unless the
    backend reaches a model another way its config names. The custom backend is exempt."""
    keys = settings.api_key_env
    if name == "custom" or not keys:
        return
    if any(environ.get(key) or settings.env.get(key) for key in keys):
        return
    extra = settings.model_extra or {}
    droid_settings = extra.get("droid_settings")
    if name == "factory" and isinstance(droid_settings, Mapping) and droid_settings.get("customModels"):
        return  # BYOK: the models' own keys are in droid_settings
    if name == "gemini" and (environ.get("GOOGLE_GENAI_USE_VERTEXAI") or settings.env.get("GOOGLE_GENAI_USE_VERTEXAI")):
        return  # Vertex AI with the project's own credentials
    listed = " or ".join(keys) if len(keys) <= 2 else ", ".join(keys[:-1]) + f" or {keys[-1]}"
    raise InvalidInputError(
        "backend",
        f"backend {name}: no API key: set {listed} in the server's environment (it is passed to the CLI"
        f" through backends.{name}.pass_env)",
    )
