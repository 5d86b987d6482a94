"""A write-behind loop: call `flush` every `interval` seconds on the event loop.

Shared by the buffers a web process writes behind (heartbeats, refused
authentications). A stop is not a cancel: a flush in flight would lose its
batch, so the loop is told to end, awaited, and flushed once more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class FlushLoop:
    def __init__(self, flush: Callable[[], Awaitable[None]], *, interval: float, name: str) -> None:
        self._flush = flush
        self._interval = interval
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """End the loop and flush what is left (a clean stop loses nothing)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._flush()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            await self._flush()
