"""Prepared images: an environment's packages and setup commands run once, in a sandbox of their
own, and the result is saved as an image that every spawn starts from.

The image is named by what went into it: `mcp-sandboxes/prepared:<hash16>`, the hash over the
provider, the base image's id (digest), the environment variables and workdir the steps see, the
packages and the setup commands. An environment whose recipe hashes the same, now or after a
restart, takes the image that is already there and installs nothing.

States (stored on the environment): `preparing` -> `ready` (the image exists) or `failed` (the
failing step and its redacted output tail). A server stopped mid-way leaves `preparing`, and the
next start prepares again from the beginning (the half-done sandbox is removed first).

Steps run as root, each as an argv (package names are argv elements, never shell text); only the
setup commands are shell strings, as before. Package installs need the network, so an environment
with packages must use network 'host': preparation runs on the environment's own network, never
on more (an agent's environment could otherwise reach further while preparing than when running).

Providers that cannot commit images (containerd, bubblewrap, process, the remote ones) run setup
commands at each spawn as before, and refuse packages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from mcp_sandboxes.errors import ConflictError, InvalidInputError, McpSandboxesError
from mcp_sandboxes.orchestrator.providers import ProviderPool
from mcp_sandboxes.providers import RECIPE_LABEL, ImageCommitter, SandboxSpec
from mcp_sandboxes.redaction import redact
from mcp_sandboxes.store import Database, EnvironmentRecord, Packages

logger = logging.getLogger(__name__)

PREPARED_REPOSITORY = "mcp-sandboxes/prepared"
PREPARE_STEP_TIMEOUT_S = 900.0  # one install or setup command
PREPARE_DESTROY_TIMEOUT_S = 60.0
MAX_PACKAGES = 200  # per manager
# Characters of a failing step's output kept: fewer when an agent made the environment (its
# commands may probe for secrets; the output is redacted either way).
TAIL_FOR_OPERATOR = 800
TAIL_FOR_AGENTS = 200
# Part of the spawn call's budget (server.max_call_s) spent waiting for a preparation to end.
SPAWN_WAIT_SHARE = 0.75

# A package name, optionally with a version: what each manager takes as one argument. No
# leading '-' (an option), no '/', spaces, quotes or shell characters (no URLs, paths or archives).
_APT = re.compile(r"[a-z0-9][a-z0-9+.-]*(:[a-z0-9][a-z0-9-]*)?(=[A-Za-z0-9.+~:-]+)?")
_PIP_VERSION = r"(==|===|!=|>=|<=|~=|>|<)[A-Za-z0-9.*+!_-]+"
_PIP = re.compile(
    rf"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(\[[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*\])?"
    rf"({_PIP_VERSION}(,{_PIP_VERSION})*)?"
)
_NPM = re.compile(r"(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(@[A-Za-z0-9.^~*+_-]+)?")
_EXAMPLES = {
    "apt": "'git' or 'git=1:2.39.5-0+deb12u1'",
    "pip": "'requests' or 'ruff==0.6.9'",
    "npm": "'typescript' or '@scope/tool@1.2.3'",
}
_PATTERNS = {"apt": _APT, "pip": _PIP, "npm": _NPM}


@dataclass(frozen=True, slots=True)
class Step:
    """One command of a preparation: `label` names it in progress and in a failure."""

    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def check_packages(packages: Packages) -> None:
    """InvalidInputError naming the first package that is not a plain name (with a version)."""
    for manager, pattern in _PATTERNS.items():
        names: list[str] = getattr(packages, manager)
        if len(names) > MAX_PACKAGES:
            raise InvalidInputError(f"packages.{manager}", f"{len(names)} packages; at most {MAX_PACKAGES}")
        for index, name in enumerate(names):
            if not pattern.fullmatch(name):
                raise InvalidInputError(
                    f"packages.{manager}[{index}]",
                    f"{name[:80]!r} is not a package name; give a name, optionally with a version, e.g."
                    f" {_EXAMPLES[manager]} (no options, paths, URLs, spaces or shell characters)",
                )


def recipe_steps(packages: Packages, setup_commands: list[str]) -> list[Step]:
    """What preparing runs, in order: apt, pip, npm, then the setup commands."""
    steps: list[Step] = []
    if packages.apt:
        apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
        steps.append(Step("packages.apt (apt-get update)", ["apt-get", "update"], apt_env))
        steps.append(
            Step("packages.apt", ["apt-get", "install", "-y", "--no-install-recommends", *packages.apt], apt_env)
        )
    if packages.pip:
        # Debian's Python is "externally managed" (PEP 668); a sandbox image is ours to change.
        pip_env = {"PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_ROOT_USER_ACTION": "ignore"}
        steps.append(
            Step(
                "packages.pip",
                ["python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", *packages.pip],
                pip_env,
            )
        )
    if packages.npm:
        steps.append(Step("packages.npm", ["npm", "install", "--global", "--no-fund", "--no-audit", *packages.npm]))
    for index, command in enumerate(setup_commands):
        steps.append(Step(f"setup_commands[{index}]", ["sh", "-c", command]))
    return steps


def recipe_hash(provider: str, base_image_id: str, spec: SandboxSpec, packages: Packages, setup: list[str]) -> str:
    """sha256 over everything that decides the prepared image's contents."""
    recipe = {
        "version": 1,
        "provider": provider,
        "base_image": base_image_id,
        "env": dict(sorted(spec.env.items())),
        "workdir": spec.workdir,
        "packages": packages.model_dump(),
        "setup_commands": setup,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def prepared_tag(digest: str) -> str:
    return f"{PREPARED_REPOSITORY}:{digest[:16]}"


class PreparationFailed(McpSandboxesError):
    pass


@dataclass
class _Run:
    """One preparation in progress: its current step, and events for its end and each change."""

    step: str = "starting"
    done: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    def at(self, step: str) -> None:
        self.step = step
        self.changed.set()
        self.changed = anyio.Event()


Progress = Callable[[float, float | None, str | None], Awaitable[None]]


class Preparations:
    """Runs environments' preparations in the orchestrator's task group, one per environment and
    one at a time per image (a second environment with the same recipe waits, then reuses it)."""

    def __init__(self, db: Database, providers: ProviderPool, secret_values: Callable[[], list[str]]) -> None:
        self._db = db
        self._providers = providers
        self._secret_values = secret_values
        self._task_group: TaskGroup | None = None
        self._runs: dict[str, _Run] = {}
        self._image_locks: dict[str, anyio.Lock] = {}

    def attach_to(self, task_group: TaskGroup | None) -> None:
        self._task_group = task_group

    # -- at create_environment ------------------------------------------------------------

    async def plan(
        self, provider_name: str, spec: SandboxSpec, packages: Packages, setup_commands: list[str]
    ) -> tuple[str | None, str | None]:
        """(prepared image tag, note): the tag when the environment is to be prepared; else None
        and, for setup commands that will run at each spawn, a note that says so."""
        check_packages(packages)
        if packages.empty() and not setup_commands:
            return None, None
        provider = await self._providers.get(provider_name)
        if not isinstance(provider, ImageCommitter):
            if not packages.empty():
                raise InvalidInputError(
                    "packages",
                    f"the {provider_name} provider cannot save prepared images, so packages cannot be installed"
                    " once for all sandboxes; install them with setup_commands (run at each spawn), or use a"
                    " docker or podman environment",
                )
            return None, f"setup runs at each spawn: {provider_name} cannot commit images"
        if not packages.empty() and spec.network != "host":
            raise InvalidInputError(
                "packages",
                f"installing packages needs the network, but the environment's network is {spec.network!r}"
                " (preparation runs on the environment's own network); create it with network='host', or bake"
                " the packages into the image",
            )
        base_id = await provider.image_id(spec.image) or spec.image  # not here yet: pulled at preparation
        return prepared_tag(recipe_hash(provider_name, base_id, spec, packages, setup_commands)), None

    def start(self, record: EnvironmentRecord) -> None:
        """Prepare the environment in the background (its row says `preparing`)."""
        if record.id in self._runs:
            return
        if self._task_group is None:
            logger.warning("environment %s: no task group to prepare in; it prepares at the next start", record.name)
            return
        run = _Run()
        self._runs[record.id] = run
        self._task_group.start_soon(self._run, record, run, name=f"prepare-{record.name}")

    async def resume(self) -> None:
        """After a restart: environments left `preparing` start again."""
        for record in await self._db.environments_preparing():
            logger.info("environment %s: preparation was cut off by a restart; preparing again", record.name)
            self.start(record)

    def cancel(self, env_id: str) -> None:
        """Stop a preparation (its environment is being deleted)."""
        run = self._runs.get(env_id)
        if run is not None:
            run.scope.cancel()

    # -- the work -------------------------------------------------------------------------

    async def _run(self, record: EnvironmentRecord, run: _Run) -> None:
        try:
            with run.scope:
                try:
                    image = await self._prepare(record, run)
                except Exception as exc:  # any failure ends as 'failed', never as a stuck 'preparing'
                    detail = str(exc)
                    if not isinstance(exc, PreparationFailed):
                        detail = f"{run.step}: {redact(detail, self._secret_values())}"
                    logger.warning("environment %s failed to prepare: %s", record.name, detail)
                    await self._db.set_preparation(record.id, "failed", detail=detail)
                else:
                    logger.info("environment %s: prepared image %s ready", record.name, image)
                    await self._db.set_preparation(record.id, "ready", prepared_image=image)
        finally:
            self._runs.pop(record.id, None)
            run.done.set()
            run.changed.set()

    async def _prepare(self, record: EnvironmentRecord, run: _Run) -> str:
        tag = record.prepared_image
        provider = await self._providers.get(record.provider)
        if tag is None or not isinstance(provider, ImageCommitter):
            raise PreparationFailed(f"the {record.provider} provider cannot commit images")
        lock = self._image_locks.setdefault(tag, anyio.Lock())
        async with lock:
            run.at("looking for the prepared image")
            if await provider.image_id(tag) is not None:
                logger.info("environment %s: reusing prepared image %s", record.name, tag)
                return tag
            name = f"mcp-sandboxes-prepare-{record.id}"
            spec = record.spec.model_copy(
                update={
                    "name": name,
                    "mounts": [],  # workspaces come at spawn; a commit would not keep them anyway
                    "read_only_root": False,  # installing writes the root filesystem
                    "user": None,
                    # 'model' is 'none' plus a per-session proxy; preparing has no session, so none.
                    "network": "host" if record.spec.network == "host" else "none",
                    "labels": {"io.mcp-sandboxes.preparing": record.id},
                }
            )
            with anyio.CancelScope(shield=True), anyio.move_on_after(PREPARE_DESTROY_TIMEOUT_S):
                await self._remove(provider, name)  # a sandbox a killed server left half-prepared
            run.at("creating the preparation sandbox")
            sandbox = await provider.create(spec)
            try:
                for step in recipe_steps(record.packages, record.setup_commands):
                    run.at(step.label)
                    logger.info("environment %s: preparing, %s", record.name, step.label)
                    result = await sandbox.exec(
                        step.argv, env=step.env or None, user="0", timeout=PREPARE_STEP_TIMEOUT_S
                    )
                    if not result.ok:
                        output = (result.stderr or result.stdout).decode("utf-8", "replace")
                        keep = TAIL_FOR_AGENTS if record.created_by_session is not None else TAIL_FOR_OPERATOR
                        tail = redact(output, self._secret_values())[-keep:].strip()
                        raise PreparationFailed(f"{step.label}: exited with code {result.exit_code}: {tail}")
                run.at("saving the prepared image")
                await provider.commit(sandbox.id, tag, {RECIPE_LABEL: tag.rpartition(":")[2]})
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(PREPARE_DESTROY_TIMEOUT_S):
                    await self._remove(provider, sandbox.id)
        return tag

    @staticmethod
    async def _remove(provider: object, sandbox_id: str) -> None:
        destroy = getattr(provider, "destroy", None)
        if destroy is None:
            return
        try:
            await destroy(sandbox_id)
        except McpSandboxesError as exc:
            logger.warning("could not remove preparation sandbox %s: %s", sandbox_id, exc)

    # -- waits ----------------------------------------------------------------------------

    def current_step(self, env_id: str) -> str | None:
        run = self._runs.get(env_id)
        return None if run is None else run.step

    async def wait(self, env_id: str, max_wait_s: float, progress: Progress | None = None) -> None:
        """Until the environment's preparation ends or `max_wait_s` passes; `progress` hears each step."""
        started = anyio.current_time()
        with anyio.move_on_after(max_wait_s):
            while (run := self._runs.get(env_id)) is not None and not run.done.is_set():
                if progress is not None:
                    await progress(anyio.current_time() - started, None, f"preparing: {run.step}")
                await run.changed.wait()

    async def ready_for_spawn(
        self, record: EnvironmentRecord, spec: SandboxSpec, *, max_wait_s: float
    ) -> tuple[EnvironmentRecord, SandboxSpec]:
        """The environment and sandbox spec a spawn uses: for a prepared environment its image and
        no setup commands (they are in the image), once its preparation is done."""
        if record.prep_state is None:
            return record, spec
        if record.prep_state == "preparing":
            await self.wait(record.id, max_wait_s * SPAWN_WAIT_SHARE)
            record = await self._db.find_environment(record.id) or record
        if record.prep_state == "preparing":
            step = self.current_step(record.id)
            raise ConflictError(
                f"environment: {record.name!r} is still preparing its image"
                + (f" (now: {step})" if step else " (it resumes when the server starts)")
                + "; spawn again once list_environments shows it ready (or create_environment with wait=true)"
            )
        if record.prep_state == "failed" or record.prepared_image is None:
            raise InvalidInputError(
                "environment",
                f"{record.name!r} failed to prepare: {record.prep_detail}; fix the recipe: delete_environment,"
                " then create_environment",
            )
        image = record.prepared_image
        prepared = record.model_copy(
            update={"setup_commands": [], "spec": record.spec.model_copy(update={"image": image})}
        )
        return prepared, spec.model_copy(update={"image": image})
