"""Runs containerd's `ctr` client (anyio.open_process, never a blocking subprocess) and turns
its failures into the package's errors.

ctr prints its own failures as one `ctr: ...` line on stderr and exits 1; a process run with
`ctr task exec` exits with the process's own status (128+N when killed by signal N).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import anyio

from mcp_sandboxes.errors import (
    ConflictError,
    ImageNotFoundError,
    InvalidInputError,
    McpSandboxesError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)

CONNECT_TIMEOUT_S = 5.0  # ctr's own dial timeout; without it ctr waits 10 s for a dead socket
START_FIX = "start dockerd (scripts/start-dockerd.sh), which starts its containerd, or set providers.containerd.address"
INSTALL_FIX = "install ctr (scripts/setup-system.sh installs docker.io, which ships containerd and ctr)"

# ctr's own failure lines, as opposed to what a process run through it wrote.
_CTR_LINE = re.compile(r"(?m)^ctr: (.+)$")
_UNREACHABLE = ("failed to dial", "connection refused", "transport: error while dialing", "connection error")
_GONE = (
    "not found",
    "no running task",
    "cannot exec in a stopped state",
    "process already finished",
    "container not created",
    "not running",
)


@dataclass(frozen=True, slots=True)
class CtrResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    def failure(self) -> str | None:
        """ctr's own error message, when ctr (not a process it ran) failed."""
        if self.returncode != 1:
            return None
        return ctr_failure(self.stderr)


def ctr_failure(stderr: bytes) -> str | None:
    """The last `ctr: ...` line of stderr, if there is one."""
    found = _CTR_LINE.findall(stderr.decode("utf-8", "replace"))
    return found[-1].strip() if found else None


class Ctr:
    """One containerd address and namespace, driven through the ctr CLI."""

    def __init__(self, ctr_path: str, address: str, namespace: str) -> None:
        self.ctr_path = ctr_path
        self.address = address
        self.namespace = namespace
        # ctr needs nothing from our environment but PATH; secrets in it stay with us.
        self.env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}

    def argv(self, *args: str) -> list[str]:
        return [
            self.ctr_path,
            "--address",
            self.address,
            "--namespace",
            self.namespace,
            "--connect-timeout",
            f"{CONNECT_TIMEOUT_S:g}s",
            *args,
        ]

    async def run(self, args: list[str], *, action: str, limit_s: float, stdin: bytes | None = None) -> CtrResult:
        """Run ctr to its end under a deadline (the process is killed when it passes)."""
        if not await anyio.Path(self.address).exists():
            # ctr would spend its whole connect timeout dialling a socket that is not there.
            raise self.unreachable(f"no socket at {self.address}")
        try:
            with anyio.fail_after(limit_s):
                done = await anyio.run_process(
                    self.argv(*args),
                    input=stdin,
                    stdin=None if stdin else subprocess.DEVNULL,
                    check=False,
                    env=self.env,
                )
        except TimeoutError as exc:
            raise ProviderError(
                f"containerd at {self.address} did not finish {action} within {limit_s:g}s;"
                " check `ctr version` and the dockerd/containerd log"
            ) from exc
        except FileNotFoundError as exc:
            raise ProviderUnavailableError(f"{self.ctr_path} was not found: {INSTALL_FIX}") from exc
        except OSError as exc:
            raise ProviderError(f"cannot run {self.ctr_path}: {exc.strerror or exc}") from exc
        return CtrResult(done.returncode, done.stdout or b"", done.stderr or b"")

    async def checked(
        self, args: list[str], *, action: str, limit_s: float, stdin: bytes | None = None, subject: str = ""
    ) -> bytes:
        """Run ctr and return its stdout; a failure raises the matching error."""
        result = await self.run(args, action=action, limit_s=limit_s, stdin=stdin)
        if result.returncode != 0:
            message = (
                result.failure() or result.stderr.decode("utf-8", "replace").strip() or f"exit {result.returncode}"
            )
            raise self.error(message, action=action, subject=subject)
        return result.stdout

    def unreachable(self, message: str) -> ProviderUnavailableError:
        return ProviderUnavailableError(f"containerd not reachable at {self.address} ({message}): {START_FIX}")

    def error(self, message: str, *, action: str, subject: str = "") -> McpSandboxesError:
        """The package error for a `ctr: ...` message. `subject` names the sandbox concerned."""
        lowered = message.lower()
        if any(marker in lowered for marker in _UNREACHABLE):
            return self.unreachable(message)
        if "no users found" in lowered or "unable to find user" in lowered or "no such user" in lowered:
            return InvalidInputError("user", f"the user does not exist in the sandbox's image ({message})")
        if "chdir to cwd" in lowered:
            return InvalidInputError("cwd", f"the directory does not exist in the sandbox ({message})")
        if lowered.startswith("image ") and "not found" in lowered:
            return ImageNotFoundError(f"{message} in containerd namespace {self.namespace!r}")
        if "already exists" in lowered:
            return ConflictError(f"name: {message}; choose another name or destroy the existing sandbox")
        if subject and any(marker in lowered for marker in _GONE):
            return SandboxGoneError(
                f"sandbox {subject} no longer exists or is not running ({message}); create a new one"
            )
        return ProviderError(f"containerd failed {action}: {message}")
