"""agent/client.py TaskStream: sync and close codes, against a local WebSocket server.

The server here mimics the rules the agent relies on (messages applied in
order; `sync` answered with `synced` after the messages before it); the
end-to-end tests check the same against the real one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from agent.client import CredentialsRefused, ServerUnavailable, TaskStream

Handler = Callable[[ServerConnection], Awaitable[None]]


async def with_stream(handler: Handler, scenario: Callable[[TaskStream], Awaitable[Any]]) -> Any:
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", open_timeout=5) as connection:
            return await scenario(TaskStream(connection))


def test_sync_returns_once_earlier_messages_are_applied() -> None:
    applied: list[str] = []

    async def server(connection: ServerConnection) -> None:
        async for raw in connection:
            message = json.loads(raw)
            if message["type"] == "task_log":
                await asyncio.sleep(0.05)  # slow storage
                applied.append(message["message"])
            elif message["type"] == "sync":
                await connection.send(json.dumps({"type": "synced", "syncId": message["syncId"]}))

    async def scenario(stream: TaskStream) -> tuple[bool, list[str]]:
        reader = asyncio.create_task(stream.run(_ignore))
        for number in range(3):
            assert await stream.send({"type": "task_log", "message": f"line {number}"})
        confirmed = await stream.sync()
        seen = list(applied)
        reader.cancel()
        return confirmed, seen

    confirmed, seen = asyncio.run(with_stream(server, scenario))
    assert confirmed
    assert seen == ["line 0", "line 1", "line 2"]


def test_sync_gives_up_when_no_reply_comes() -> None:
    async def server(connection: ServerConnection) -> None:
        async for _ in connection:
            pass

    async def scenario(stream: TaskStream) -> bool:
        reader = asyncio.create_task(stream.run(_ignore))
        confirmed = await stream.sync(timeout=0.2)
        reader.cancel()
        return confirmed

    assert asyncio.run(with_stream(server, scenario)) is False


@pytest.mark.parametrize(("code", "error"), [(4401, CredentialsRefused), (1013, ServerUnavailable)])
def test_close_codes(code: int, error: type[Exception]) -> None:
    async def server(connection: ServerConnection) -> None:
        await connection.send(json.dumps({"type": "task_cancelled", "taskId": "t"}))
        await connection.close(code, "bye")

    received: list[dict[str, Any]] = []

    async def collect(message: dict[str, Any]) -> None:
        received.append(message)

    async def scenario(stream: TaskStream) -> None:
        with pytest.raises(error, match=f"task stream closed: {code} bye"):
            await stream.run(collect)
        assert not await stream.send({"type": "task_log"})

    asyncio.run(with_stream(server, scenario))
    assert received == [{"type": "task_cancelled", "taskId": "t"}]


async def _ignore(message: dict[str, Any]) -> None:
    return None
