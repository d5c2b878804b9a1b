"""Placeholder until the proxy lands (helper at work): the API the orchestrator is written against."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from pydantic import BaseModel, ConfigDict, Field


class ModelRoute(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    upstream: str
    credentials: dict[str, str] = Field(default_factory=dict)


class EgressPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)

    session_id: str
    routes: list[ModelRoute] = Field(default_factory=list)
    agent_upstream: str | None = None
    allowed_hosts: list[str] = Field(default_factory=list)


class RefusedRequest(BaseModel):
    session_id: str
    method: str
    target: str
    reason: str


class EgressProxy:
    def __init__(self, *, on_refused: Callable[[RefusedRequest], Awaitable[None]] | None = None) -> None:
        self._on_refused = on_refused

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def serve(self, socket_path: Path, policy: EgressPolicy) -> None:
        raise NotImplementedError("the egress proxy is not built yet")

    def policy(self, socket_path: Path) -> EgressPolicy | None:
        return None

    async def stop(self, socket_path: Path) -> None:
        return None
