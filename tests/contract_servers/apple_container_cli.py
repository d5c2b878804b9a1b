#!/usr/bin/env python3
"""A recorded-behaviour stand-in for Apple's `container` CLI (macOS 26+), for Linux tests.

It accepts exactly the argv the real CLI documents for the subcommands the provider uses,
and answers as the real CLI does; anything else fails like Swift ArgumentParser does
("Error: Unknown option '--x'", exit 64). Followed: apple/container docs/command-reference.md
(`container run`, `exec`, `delete (rm)`, `list (ls)`, `system status`) and its sources:
`run -d` prints the container ID; `exec` runs the process with the CLI's stdio and exits
with the process's status; `list --format json` renders ManagedContainer objects
({"id", "configuration": {"id", "labels", "image": {"reference"}, ...},
"status": {"state", "networks", "startedDate"}}); a missing container is an error naming it.

State lives under $APPLE_CONTAINER_STANDIN_STATE (one folder per container); every
invocation's argv is appended to argv.log there. `exec` runs the command for real in a
bubblewrap sandbox over that container's folders (see sandbox_host.LocalMachine).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.contract_servers.sandbox_host import DEFAULT_PATH, LocalMachine

USAGE_ERROR = 64
# Options that take a value, and flags, per subcommand (long and short spellings).
RUN_VALUE = {
    "-e", "--env", "--env-file", "--gid", "-u", "--user", "--uid", "-w", "--workdir", "--cwd", "-c", "--cpus",
    "-m", "--memory", "-a", "--arch", "--cidfile", "--dns", "--entrypoint", "-l", "--label", "--mount", "--name",
    "--network", "--os", "-p", "--publish", "--platform", "--tmpfs", "-v", "--volume", "--ulimit", "--shm-size",
}  # fmt: skip
RUN_FLAGS = {"-d", "--detach", "-i", "--interactive", "-t", "--tty", "--rm", "--remove", "--init", "--read-only"}
EXEC_VALUE = {"-e", "--env", "--env-file", "--gid", "-u", "--user", "--uid", "-w", "--workdir", "--cwd"}
EXEC_FLAGS = {"-d", "--detach", "-i", "--interactive", "-t", "--tty", "--debug"}


def fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"Error: {message}\n")
    return code


def parse(args: list[str], value_options: set[str], flags: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Options before the first positional argument; everything from it on is passed through."""
    options: dict[str, list[str]] = {}
    index = 0
    while index < len(args) and args[index].startswith("-"):
        arg = args[index]
        name, _, inline = arg.partition("=")
        if name in value_options:
            if not inline:
                index += 1
                if index >= len(args):
                    raise ValueError(f"Missing value for '{name}'")
                inline = args[index]
            options.setdefault(name, []).append(inline)
        elif arg in flags:
            options.setdefault(arg, []).append("")
        else:
            raise ValueError(f"Unknown option '{arg}'")
        index += 1
    return options, args[index:]


def pick(options: dict[str, list[str]], *names: str) -> list[str]:
    return [value for name in names for value in options.get(name, [])]


def container_dir(state: Path, container_id: str) -> Path:
    return state / "containers" / container_id


def load(state: Path, container_id: str) -> dict[str, object] | None:
    path = container_dir(state, container_id) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cmd_run(state: Path, args: list[str]) -> int:
    options, rest = parse(args, RUN_VALUE, RUN_FLAGS)
    if not rest:
        return fail("Missing expected argument '<image>'", USAGE_ERROR)
    if not pick(options, "-d", "--detach"):
        return fail("the stand-in only records detached runs (-d)", USAGE_ERROR)
    image, command = rest[0], rest[1:]
    names = pick(options, "--name")
    container_id = names[-1] if names else os.urandom(16).hex()
    if load(state, container_id) is not None:
        return fail(f'container with id "{container_id}" already exists')
    labels = dict(label.partition("=")[::2] for label in pick(options, "-l", "--label"))
    networks = pick(options, "--network")
    memory = pick(options, "-m", "--memory")
    config = {
        "id": container_id,
        "image": image,
        "command": command,
        "labels": labels,
        "env": pick(options, "-e", "--env"),
        "network": networks[-1] if networks else "default",
        "cpus": int(pick(options, "-c", "--cpus")[-1]) if pick(options, "-c", "--cpus") else 4,
        "memory": memory[-1] if memory else "1024M",
        "user": users[-1] if (users := pick(options, "-u", "--user")) else None,
        "workdir": (pick(options, "-w", "--workdir", "--cwd") or ["/"])[-1],
        "started": datetime.now(UTC).isoformat(),
    }
    if image != "mcp-sandboxes/debian:bookworm" and not image.startswith("docker.io/library/"):
        return fail(f"failed to fetch image {image}: notFound")
    root = container_dir(state, container_id)
    LocalMachine(network=config["network"] != "none", root=root / "fs")
    (root / "config.json").write_text(json.dumps(config))
    sys.stdout.write(container_id + "\n")
    return 0


def cmd_exec(state: Path, args: list[str]) -> int:
    options, rest = parse(args, EXEC_VALUE, EXEC_FLAGS)
    if not rest:
        return fail("Missing expected argument '<container-id>'", USAGE_ERROR)
    container_id, argv = rest[0], rest[1:]
    config = load(state, container_id)
    if config is None:
        return fail(f"container {container_id} not found")
    if not argv:
        return fail("no command specified for exec", USAGE_ERROR)
    machine = LocalMachine(network=config["network"] != "none", root=container_dir(state, container_id) / "fs")
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    for item in [*config["env"], *pick(options, "-e", "--env")]:  # type: ignore[misc]
        key, _, value = item.partition("=")
        env[key] = value if _ else os.environ.get(key, "")
    cwd = (pick(options, "-w", "--workdir", "--cwd") or [str(config["workdir"])])[-1]
    if not machine.resolve(cwd).is_dir():
        return fail(f"failed to exec process: chdir {cwd}: no such file or directory", 126)
    if not pick(options, "-i", "--interactive"):
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
    bwrap = [*machine.bwrap_args(cwd, env, None, False), "--", *argv]
    os.execv(bwrap[0], bwrap)
    return 127  # pragma: no cover - execv does not return


def cmd_delete(state: Path, args: list[str]) -> int:
    _options, ids = parse(args, set(), {"-a", "--all", "-f", "--force", "--debug"})
    missing = []
    for container_id in ids:
        if load(state, container_id) is None:
            missing.append(container_id)
            continue
        shutil.rmtree(container_dir(state, container_id), ignore_errors=True)
        sys.stdout.write(container_id + "\n")
    if missing:
        return fail(f"failed to delete one or more containers: {missing}: notFound")
    return 0


def cmd_list(state: Path, args: list[str]) -> int:
    options, rest = parse(args, {"--format"}, {"-a", "--all", "-q", "--quiet", "--debug"})
    if rest:
        return fail(f"Unexpected argument '{rest[0]}'", USAGE_ERROR)
    items = []
    base = state / "containers"
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        config = load(state, folder.name)
        if config is None:
            continue
        items.append(
            {
                "id": config["id"],
                "configuration": {
                    "id": config["id"],
                    "labels": config["labels"],
                    "image": {"reference": config["image"]},
                    "platform": {"os": "linux", "architecture": "arm64"},
                    "resources": {"cpus": config["cpus"]},
                },
                "status": {"state": "running", "networks": [], "startedDate": config["started"]},
            }
        )
    fmt = (options.get("--format") or ["table"])[-1]
    if fmt == "json":
        sys.stdout.write(json.dumps(items) + "\n")
    elif fmt == "table":
        for item in items:
            sys.stdout.write(f"{item['id']}\n")
    else:
        return fail(f"The value '{fmt}' is invalid for '--format <format>'", USAGE_ERROR)
    return 0


def main(argv: list[str]) -> int:
    state = Path(os.environ.get("APPLE_CONTAINER_STANDIN_STATE", ""))
    if not state.is_dir():
        return fail("APPLE_CONTAINER_STANDIN_STATE must name an existing folder")
    with (state / "argv.log").open("a") as log:
        log.write(json.dumps(argv) + "\n")
    if not argv:
        return fail("Missing expected argument '<subcommand>'", USAGE_ERROR)
    command, args = argv[0], argv[1:]
    try:
        if command == "run":
            return cmd_run(state, args)
        if command == "exec":
            return cmd_exec(state, args)
        if command in ("delete", "rm"):
            return cmd_delete(state, args)
        if command in ("list", "ls"):
            return cmd_list(state, args)
        if command == "system" and args == ["status"]:
            sys.stdout.write("apiserver is running\n")
            return 0
    except ValueError as exc:
        return fail(str(exc), USAGE_ERROR)
    return fail(f"Unknown subcommand or plugin name '{command}'", USAGE_ERROR)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
