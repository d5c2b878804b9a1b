"""`mcp-sandboxes images build`: the standard images, from files shipped in the package, with no
repository checkout. The same steps as scripts/build-images.sh (which a checkout uses):

    mcp-sandboxes/debian:bookworm  a debootstrap minbase tree, `docker import`ed (no registry here)
    mcp-sandboxes/base:latest      + agent user, /workspace, git ...   (_images/base/Dockerfile)
    mcp-sandboxes/agent:latest     + node and the pinned agent CLIs     (_images/agent/Dockerfile),
                                   installed with npm on the host from _images/agent-clis/package*.json

The build contexts in the package (mcp_sandboxes/_images/) are links to configs/images/ and
tools/agent-clis/ in the repository, so there is one copy of each file; a wheel holds them as
plain files. An image that exists is kept unless --force. Long steps show a live progress line;
each step's output goes to a log in the cache directory, whose tail is shown when it fails."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from mcp_sandboxes.errors import McpSandboxesError

DEBIAN_IMAGE = "mcp-sandboxes/debian:bookworm"
BASE_IMAGE = "mcp-sandboxes/base:latest"
AGENT_IMAGE = "mcp-sandboxes/agent:latest"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CACHE_ENV = "MCP_SANDBOXES_CACHE"
# The files each context needs (package data); `images build --dry-run` and the packaging test
# check them.
CONTEXT_FILES = {
    "base": ["Dockerfile"],
    "agent": ["Dockerfile"],
    "agent-clis": ["package.json", "package-lock.json"],
}
LOG_TAIL_LINES = 25
STEP_CHOICES = ("debian", "base", "agent")


def context_root() -> Traversable:
    return resources.files("mcp_sandboxes").joinpath("_images")


def context_file(context: str, name: str) -> Traversable:
    return context_root().joinpath(context, name)


def missing_context_files() -> list[str]:
    return [
        f"{context}/{name}"
        for context, names in CONTEXT_FILES.items()
        for name in names
        if not context_file(context, name).is_file()
    ]


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    base = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "mcp-sandboxes"
    return base.expanduser()


def agent_stamp() -> str:
    """Names the agent image by what went into it: the CLI pins and the Dockerfile."""
    digest = hashlib.sha256()
    for context, name in (("agent-clis", "package-lock.json"), ("agent-clis", "package.json"), ("agent", "Dockerfile")):
        digest.update(context_file(context, name).read_bytes())
    return digest.hexdigest()[:12]


def image_exists(name: str) -> bool:
    return (
        subprocess.run(["docker", "image", "inspect", name], capture_output=True, check=False, timeout=60).returncode
        == 0
    )


class StepFailed(McpSandboxesError):
    pass


@dataclass
class Builder:
    """Runs the steps; `report(text)` shows the current line of a long step."""

    cache: Path
    force: bool
    report: Callable[[str], None]

    def run(self, argv: Sequence[str], log: Path, *, cwd: Path | None = None, stdin: Any = None) -> None:
        with log.open("a", encoding="utf-8") as out:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                if line.strip():
                    self.report(line.strip()[:100])
            code = process.wait()
        if code != 0:
            tail = "".join(log.read_text("utf-8", "replace").splitlines(keepends=True)[-LOG_TAIL_LINES:])
            raise StepFailed(f"`{' '.join(argv[:3])} ...` failed (exit {code}); the end of {log}:\n{tail}")

    def debian(self) -> str:
        rootfs = self.cache / "rootfs-bookworm"
        log = self.cache / "debian.log"
        if not (rootfs / ".complete").exists():
            if shutil.which("debootstrap") is None:
                raise StepFailed(
                    "debootstrap is not installed; on Debian or Ubuntu: apt-get install -y debootstrap"
                    " (no registry is reachable here, so the root filesystem is made locally)"
                )
            shutil.rmtree(rootfs, ignore_errors=True)
            rootfs.mkdir(parents=True)
            self.report("debootstrap --variant=minbase bookworm (about 20 s)")
            self.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], log)
            (rootfs / ".complete").touch()
        self.report(f"docker import {DEBIAN_IMAGE}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./.complete", "-c", "."], stdout=subprocess.PIPE)
        try:
            self.run(["docker", "import", "-", DEBIAN_IMAGE], log, stdin=tar.stdout)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        return "imported"

    def base(self) -> str:
        with tempfile.TemporaryDirectory(prefix="mcp-sandboxes-base-") as tmp:
            (Path(tmp) / "Dockerfile").write_bytes(context_file("base", "Dockerfile").read_bytes())
            self.run(["docker", "build", "--network", "host", "-t", BASE_IMAGE, tmp], self.cache / "base.log")
        return "built"

    def agent(self) -> str:
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            raise StepFailed(
                "node and npm are needed to install the agent CLIs (Node.js 20 or newer); install them and run again"
            )
        log = self.cache / "agent.log"
        clis = self.cache / "agent-clis"
        clis.mkdir(parents=True, exist_ok=True)
        for name in CONTEXT_FILES["agent-clis"]:
            (clis / name).write_bytes(context_file("agent-clis", name).read_bytes())
        stamp = clis / "node_modules" / f".installed-{agent_stamp()}"
        if not stamp.exists():
            # `npm install` as scripts/install-agent-clis.sh does: the lock pins the versions, and
            # `npm ci` refuses it (it lists optional platform packages npm records per machine).
            self.report("npm install (the pinned agent CLIs)")
            self.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], log, cwd=clis)
            # @factory/cli's postinstall links the native droid binary; npm skips it when the
            # platform package arrives later (as scripts/install-agent-clis.sh explains).
            self.run([npm, "rebuild", "@factory/cli", "--loglevel=error"], log, cwd=clis)
            stamp.touch()
        with tempfile.TemporaryDirectory(prefix="mcp-sandboxes-agent-") as tmp:
            context = Path(tmp)
            shutil.copy2(node, context / "node")
            self.report("linking node_modules into the build context")
            try:  # hard links keep a second GB of CLIs off the disk
                shutil.copytree(clis / "node_modules", context / "node_modules", symlinks=True, copy_function=os.link)
            except OSError:
                shutil.rmtree(context / "node_modules", ignore_errors=True)
                shutil.copytree(clis / "node_modules", context / "node_modules", symlinks=True)
            (context / "Dockerfile").write_bytes(context_file("agent", "Dockerfile").read_bytes())
            tag = f"mcp-sandboxes/agent:{agent_stamp()}"
            self.run(["docker", "build", "-t", tag, "-t", AGENT_IMAGE, str(context)], log)
        return f"built ({agent_stamp()})"


def plan(force: bool, only: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(step, image, build?) for each step asked for."""
    images = {"debian": DEBIAN_IMAGE, "base": BASE_IMAGE, "agent": f"mcp-sandboxes/agent:{agent_stamp()}"}
    return [(step, images[step], force or not image_exists(images[step])) for step in only]


def add_image_commands(commands: Any) -> None:
    images = commands.add_parser("images", help="the standard sandbox images")
    actions = images.add_subparsers(dest="images_command", required=True)
    build = actions.add_parser(
        "build",
        help="build mcp-sandboxes/debian, base and agent from the files shipped in the package (no checkout needed)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    build.add_argument("--force", action="store_true", help="rebuild images that exist")
    build.add_argument(
        "--only", action="append", choices=STEP_CHOICES, help="build only this image (repeatable); default all three"
    )
    build.add_argument("--dry-run", action="store_true", help="say what would be built and from where, build nothing")
    build.add_argument("--cache", help=f"work directory for the rootfs and the CLIs (default ${CACHE_ENV} or ~/.cache)")


def run_image_command(args: argparse.Namespace) -> int:
    console = Console(highlight=False, soft_wrap=True)
    missing = missing_context_files()
    if missing:
        console.print(
            Text(f"mcp-sandboxes: the package lacks its image files ({', '.join(missing)}); reinstall it", style="red")
        )
        return 1
    if shutil.which("docker") is None:
        console.print(Text("mcp-sandboxes: docker is not on PATH; install Docker and start it first", style="red"))
        return 1
    steps = list(dict.fromkeys(args.only or STEP_CHOICES))
    cache = Path(args.cache).expanduser() if args.cache else cache_dir()
    try:
        chosen = plan(args.force, steps)
    except subprocess.TimeoutExpired:
        console.print(Text("mcp-sandboxes: docker did not answer within 60 s; is the engine running?", style="red"))
        return 1
    if args.dry_run:
        console.print(f"build contexts: {context_root()}")
        console.print(f"cache: {cache}")
        for step, image, build in chosen:
            console.print(f"{step:<7} {image:<40} {'build' if build else 'keep (exists; --force rebuilds)'}")
        return 0
    cache.mkdir(parents=True, exist_ok=True)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as progress:
        for step, image, build in chosen:
            task = progress.add_task(f"{image}", total=1)
            if not build:
                progress.update(task, completed=1, description=f"{image}: kept (exists)")
                continue

            def report(line: str, task: Any = task, image: str = image) -> None:
                progress.update(task, description=f"{image}: {line}")

            builder = Builder(cache, args.force, report)
            started = time.monotonic()
            try:
                outcome = getattr(builder, step)()
            except McpSandboxesError as exc:
                progress.update(task, description=f"{image}: failed")
                progress.stop()
                console.print(Text(f"mcp-sandboxes: {image}: {exc}", style="red"))
                return 1
            progress.update(task, completed=1, description=f"{image}: {outcome} in {time.monotonic() - started:.0f} s")
    return 0
