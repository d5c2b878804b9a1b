"""The in-sandbox forwarder of network mode "model": a tiny static C program (`forward.c`, shipped
with the package) that serves a loopback TCP port inside the sandbox and relays each connection
to the egress proxy's unix socket, mounted into the sandbox.

    forward PORT SOCKET PROGRAM [ARGS...]

It wraps the agent CLI and keeps its pid: a forked child serves the port and dies with PROGRAM.
The binary is compiled on the host once per version of the source (static, so it runs in a
busybox image as well as in Debian) and cached by the source's hash; the server mounts it
read-only at `IN_SANDBOX_PATH`.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import anyio

from mcp_sandboxes.errors import ProviderError
from mcp_sandboxes.files import make_private_dir

FORWARD_SOURCE = Path(__file__).with_name("forward.c")
# Where the server mounts the binary (read-only) inside a sandbox.
IN_SANDBOX_PATH = "/opt/mcp-sandboxes/egress/forward"
CFLAGS = ("-static", "-Os", "-s")
COMPILE_TIMEOUT_S = 60.0
_STDERR_TAIL = 2000
_HOW_TO_FIX = (
    "network 'model' needs the in-sandbox forwarder, built once with a C compiler: install gcc and the"
    " static C library (Debian: gcc libc6-dev), or set egress.forwarder_path to a prebuilt static binary"
    f" (cc {' '.join(CFLAGS)} -o forward {FORWARD_SOURCE})"
)


def binary_name(source: bytes) -> str:
    """The cached binary's file name: changes with the source and the flags, so an upgraded
    package never runs a stale forwarder."""
    digest = hashlib.sha256(source + b"\0" + " ".join(CFLAGS).encode()).hexdigest()
    return f"forward-{digest[:16]}"


def _compiler_argv(compiler: str | None) -> list[str]:
    words = shlex.split(compiler or os.environ.get("CC") or "cc")
    if not words or shutil.which(words[0]) is None:
        shown = words[0] if words else repr(compiler)
        raise ProviderError(f"egress forwarder: no C compiler {shown!r} found; {_HOW_TO_FIX}")
    return words


def _prepare(cache_dir: Path) -> tuple[bytes, Path]:
    source = FORWARD_SOURCE.read_bytes()
    make_private_dir(cache_dir)
    return source, cache_dir / binary_name(source)


async def forwarder_binary(cache_dir: Path, *, compiler: str | None = None) -> Path:
    """The path of the static forwarder for this version of `forward.c`, in `cache_dir` (made
    0700 if missing), compiled on first use with `compiler` (default: $CC, else `cc`).

    The compiler writes a private temporary name that is then renamed into place, so concurrent
    callers (tasks or server processes) at worst compile twice and never see a partial binary.
    Raises ProviderError naming the fix when there is no compiler or the compile fails."""
    source, target = await anyio.to_thread.run_sync(_prepare, cache_dir)
    if await anyio.Path(target).is_file():
        return target
    argv = _compiler_argv(compiler)
    temporary = cache_dir / f".{target.name}.{uuid.uuid4().hex}"
    # The bytes that were hashed are the bytes compiled (a private copy): the name never lies.
    copy = temporary.with_name(temporary.name + ".c")
    await anyio.Path(copy).write_bytes(source)
    try:
        with anyio.fail_after(COMPILE_TIMEOUT_S):
            result = await anyio.run_process(
                [*argv, *CFLAGS, "-o", str(temporary), str(copy)], check=False, stdin=subprocess.DEVNULL
            )
    except TimeoutError:
        await _remove(temporary)
        raise ProviderError(
            f"egress forwarder: {argv[0]} did not finish compiling in {COMPILE_TIMEOUT_S:g} s; {_HOW_TO_FIX}"
        ) from None
    except OSError as exc:
        await _remove(temporary)
        raise ProviderError(f"egress forwarder: cannot run {argv[0]!r}: {exc}; {_HOW_TO_FIX}") from exc
    finally:
        await _remove(copy)
    if result.returncode != 0:
        await _remove(temporary)
        tail = result.stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        raise ProviderError(
            f"egress forwarder: {argv[0]} failed (exit {result.returncode}); {_HOW_TO_FIX}. Compiler said:\n{tail}"
        )
    await anyio.Path(temporary).chmod(0o755)
    await anyio.Path(temporary).rename(target)
    return target


async def _remove(path: Path) -> None:
    # Shielded: a cancelled caller still leaves no temporary file behind.
    with anyio.CancelScope(shield=True):
        await anyio.Path(path).unlink(missing_ok=True)


async def configured_forwarder(forwarder_path: str, cache_dir: Path) -> Path:
    """The forwarder to mount: `forwarder_path` (egress.forwarder_path) when set, checked to be
    an executable file and copied into `cache_dir` (a server in a container mounts from its data
    directory, a path the engine's host shares; the configured path may exist only in the
    server's own filesystem); else the one built from the shipped source into `cache_dir`."""
    if not forwarder_path:
        return await forwarder_binary(cache_dir)
    path = await anyio.Path(forwarder_path).expanduser()
    if not await path.is_file() or not os.access(path, os.X_OK):
        raise ProviderError(
            f"egress.forwarder_path: {path} is not an executable file; build forward.c with"
            " `cc -static -Os -s` or leave it empty to have it built"
        )
    return await anyio.to_thread.run_sync(_copy_prebuilt, Path(path), cache_dir)


def _copy_prebuilt(source: Path, cache_dir: Path) -> Path:
    data = source.read_bytes()
    make_private_dir(cache_dir)
    target = cache_dir / f"forward-prebuilt-{hashlib.sha256(data).hexdigest()[:16]}"
    if not target.exists():
        partial = cache_dir / f".{target.name}.{uuid.uuid4().hex}"
        partial.write_bytes(data)
        partial.chmod(0o755)
        partial.replace(target)
    return target
