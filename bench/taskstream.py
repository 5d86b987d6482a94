"""Simulated agents on the task stream: connect, and stamp what arrives.

Each `StreamClient` holds one agent's WebSocket, opened as the reference
agent opens it (Bearer JWT header, the agent's own client certificate,
the same websockets client defaults), and a reader that stamps every
message with `time.perf_counter()` the moment it is read, before anyone
looks at it. The stream protocol asks nothing back of an agent that only
receives tasks: pings are answered by the websockets client itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.fleet import SimAgent


@dataclass(frozen=True)
class Received:
    at: float  # time.perf_counter() when read off the socket
    message: dict[str, Any]


@dataclass
class StreamClient:
    agent: SimAgent
    connection: ClientConnection
    inbox: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name=f"bench-stream-{self.agent.name}")

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                at = time.perf_counter()
                message = json.loads(raw)
                self.inbox.put_nowait(Received(at, message if isinstance(message, dict) else {}))
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def next_task(self, timeout: float) -> Received:
        """The next `task_assigned`, skipping anything else (cancellations, errors)."""
        return await self.next_of("task_assigned", timeout)

    async def next_of(self, kind: str, timeout: float) -> Received:
        """The next message of type `kind`, skipping any other."""
        async with asyncio.timeout(timeout):
            while True:
                if self.inbox.empty() and self.closed.is_set():
                    raise ConnectionError(f"stream of {self.agent.name} closed: {self.why()}")
                getter = asyncio.ensure_future(self.inbox.get())
                closer = asyncio.ensure_future(self.closed.wait())
                await asyncio.wait({getter, closer}, return_when=asyncio.FIRST_COMPLETED)
                closer.cancel()
                if not getter.done():
                    getter.cancel()
                    continue
                received = getter.result()
                if received.message.get("type") == kind:
                    return received

    def why(self) -> str:
        """The close code and reason the server gave, if it closed the stream."""
        rcvd = self.connection.close_code, self.connection.close_reason
        return f"{rcvd[0]} {rcvd[1]}"

    async def send(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.connection.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def stream_url(server_url: str, agent: SimAgent) -> str:
    return (
        f"{server_url.replace('https://', 'wss://', 1)}/api/v1/agents/{agent.agent_id}/task-stream"
    )


async def open_stream(url: str, agent: SimAgent) -> StreamClient:
    """One agent's stream, with the reference agent's connection settings."""
    connection = await connect(
        url,
        ssl=agent.ssl_context(),
        additional_headers={"Authorization": agent.authorization},
        open_timeout=30,
        ping_interval=20,
        ping_timeout=20,
        close_timeout=2,
        max_size=8 * 1024 * 1024,
    )
    client = StreamClient(agent, connection)
    client.start()
    return client


async def open_many(urls: list[tuple[str, SimAgent]], *, parallel: int = 32) -> list[StreamClient]:
    """Many streams, `parallel` handshakes at a time (a burst of thousands would only queue)."""
    raise_file_limit()
    gate = asyncio.Semaphore(parallel)

    async def one(url: str, agent: SimAgent) -> StreamClient:
        async with gate:
            return await open_stream(url, agent)

    return list(await asyncio.gather(*(one(url, agent) for url, agent in urls)))


def raise_file_limit() -> None:
    """Thousands of sockets need more descriptors than the usual soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
