"""POSIX shell wrapping shared by the remote providers.

Vendor exec APIs differ in what they take: Fly's exec has no cwd, env or user, Sprites
replaces the whole environment when given any variable, Vercel has no per-command
user beyond sudo. So a command is wrapped in a small `/bin/sh -c` script built here,
every argument single-quoted (`shlex.quote`), which does the `cd`, the `env`, the user
switch (`su` when the sandbox runs us as root, `sudo -n` otherwise) and, where the
vendor has no signal API, records the process id so a later command can signal it.
"""

from __future__ import annotations

import secrets
import shlex
import signal as _signal
from collections.abc import Iterable, Mapping

from mcp_sandboxes.errors import InvalidInputError
from mcp_sandboxes.providers._spec_support import refuse_unsupported
from mcp_sandboxes.providers.base import SandboxSpec

SHELL = "/bin/sh"


def q(value: str) -> str:
    return shlex.quote(value)


def quote(argv: Iterable[str]) -> str:
    """argv as words of a shell command line."""
    return " ".join(q(part) for part in argv)


def inner_script(
    argv: list[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    pidfile: str | None = None,
    stdin_file: str | None = None,
) -> str:
    """`cd`, `env` and `exec` of argv, as one shell script (exit 127 when argv[0] is missing)."""
    if not argv:
        raise InvalidInputError("argv", "the command is empty; pass at least the program name")
    parts: list[str] = []
    if pidfile:
        # $$ is this shell, which `exec` replaces with the command: the pid is the command's.
        parts.append(f"echo $$ > {q(pidfile)}")
    if cwd:
        parts.append(f"cd {q(cwd)}")
    command = "exec "
    if env:
        command += "env " + " ".join(q(f"{key}={value}") for key, value in env.items()) + " "
    command += quote(argv)
    if stdin_file:
        command += f" < {q(stdin_file)}"
    parts.append(command)
    return " && ".join(parts)


def as_user(script: str, user: str | None) -> str:
    """Run `script` as `user`: su when we are root, passwordless sudo otherwise, nothing if already them."""
    if not user:
        return script
    u = q(user)
    inner = q(script)
    return (
        f'cur=$(id -u); if [ "$cur" = {u} ] || [ "$(id -un)" = {u} ]; then exec {SHELL} -c {inner}; '
        f'elif [ "$cur" = 0 ]; then exec su -s {SHELL} -c {inner} {u}; '
        f"else exec sudo -n -H -u {u} -- {SHELL} -c {inner}; fi"
    )


def wrap(
    argv: list[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    pidfile: str | None = None,
    stdin_file: str | None = None,
) -> list[str]:
    script = inner_script(argv, cwd=cwd, env=env, pidfile=pidfile, stdin_file=stdin_file)
    return [SHELL, "-c", as_user(script, user)]


def run_as(default: str | None, user: str | None) -> str | None:
    """Who a command runs as: the call's `user`, else the sandbox's (`default`); an empty
    `user` means the vendor's own default user."""
    return default if user is None else (user or None)


def scratch_path() -> str:
    """A fresh path under the sandbox's /tmp for one command's files (output, FIFO, pid)."""
    return f"/tmp/.mcp-sandboxes-{secrets.token_hex(8)}"


def wait_until(test: str, *, tries: int = 200, step_s: float = 0.05) -> str:
    """Shell that waits, at most `tries` x `step_s`, until `[ test ]` holds (e.g. `-s <pidfile>`):
    a command started in the background writes its files a moment later."""
    return f"i=0; while [ ! {test} ] && [ $i -lt {tries} ]; do sleep {step_s:g}; i=$((i+1)); done; "


def stdin_holder(directory: str) -> str:
    """Shell that starts the holder of the FIFO `directory`/in (its pid in `directory`/holder).
    It keeps a writer open, so a command reading the FIFO sees the end of its input only
    when `end_holder` kills the holder (close_stdin)."""
    d = q(directory)
    return f"sleep 2147483647 <>{d}/in >/dev/null 2>&1 & echo $! > {d}/holder"


def end_holder(directory: str) -> str:
    return f'kill "$(cat {q(directory)}/holder)" 2>/dev/null; '


def signal_name(signum: int) -> str:
    """SIGTERM -> "TERM"; numbers without a name stay numbers."""
    try:
        return _signal.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        return str(signum)


def reject_unsupported(spec: SandboxSpec, provider: str, *, network_none: bool) -> None:
    """Remote sandboxes cannot mount host paths, and some cannot switch the network off."""
    refuse_unsupported(spec, provider)
    if spec.mounts:
        raise InvalidInputError(
            "mounts",
            f"{provider} sandboxes run on the vendor's machines and cannot mount host paths; "
            "remove the mounts and copy files in with put_file",
        )
    if spec.network == "none" and not network_none:
        raise InvalidInputError(
            "network",
            f"{provider} sandboxes always have the vendor's network and cannot run with network 'none'; "
            "set network = 'host' for this environment, or use a provider that can isolate the network",
        )


def captured(script: str, directory: str) -> str:
    """`script` with its stdout and stderr going to files `directory`/o and `directory`/e.

    For vendor APIs that hand output back as JSON strings (Fly's exec, Vercel's logs),
    which cannot carry bytes that are not UTF-8: the files are read back afterwards in a
    binary-safe way. The redirection is done with `exec`, so the command stays the process
    the vendor started (and that its timeout or kill reaches).
    """
    d = q(directory)
    return f"mkdir -p {d} && exec >{d}/o 2>{d}/e || exit 125\n{script}"
