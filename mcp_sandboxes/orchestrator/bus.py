"""Wakes long-polling readers and feeds resource subscribers when a session's log grows.

Events are persisted before they are published, so a woken reader always finds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

SUBSCRIBER_BUFFER = 256


@dataclass(frozen=True, slots=True)
class SessionChanged:
    session_id: str
    last_seq: int
    status_changed: bool


class EventBus:
    def __init__(self) -> None:
        self._waiters: dict[str, anyio.Event] = {}
        self._subscribers: list[MemoryObjectSendStream[SessionChanged]] = []

    def publish(self, change: SessionChanged) -> None:
        waiter = self._waiters.pop(change.session_id, None)
        if waiter is not None:
            waiter.set()
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(change)
            except anyio.WouldBlock:
                # A slow subscriber misses an intermediate notice; the next one carries the
                # latest seq, and readers always re-read the log, so nothing is lost.
                pass
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(stream)

    async def wait(self, session_id: str, max_wait_s: float) -> bool:
        """Wait until the session publishes something; False on timeout."""
        if max_wait_s <= 0:
            return False
        waiter = self._waiters.get(session_id)
        if waiter is None:
            waiter = self._waiters[session_id] = anyio.Event()
        with anyio.move_on_after(max_wait_s if math.isfinite(max_wait_s) else None):
            await waiter.wait()
            return True
        return False

    async def wait_any(self, session_ids: list[str], max_wait_s: float) -> bool:
        """Wait until any of the sessions publishes something; False on timeout."""
        if max_wait_s <= 0 or not session_ids:
            return False
        waiters = [self._waiters.setdefault(session_id, anyio.Event()) for session_id in dict.fromkeys(session_ids)]
        woken = False
        with anyio.move_on_after(max_wait_s if math.isfinite(max_wait_s) else None):
            async with anyio.create_task_group() as task_group:

                async def watch(waiter: anyio.Event) -> None:
                    nonlocal woken
                    await waiter.wait()
                    woken = True
                    task_group.cancel_scope.cancel()

                for waiter in waiters:
                    task_group.start_soon(watch, waiter)
        return woken

    def subscribe(self) -> MemoryObjectReceiveStream[SessionChanged]:
        send, receive = anyio.create_memory_object_stream[SessionChanged](SUBSCRIBER_BUFFER)
        self._subscribers.append(send)
        return receive

    def close(self) -> None:
        for stream in self._subscribers:
            stream.close()
        self._subscribers.clear()
