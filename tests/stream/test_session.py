"""The task stream over a real mutual-TLS WebSocket, on both stacks.

SQLite runs with the in-process hub, PostgreSQL with Redis pub/sub.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import AgentClient, Stack, dispatch


def stream_url(stack: Stack, agent_id: str) -> str:
    return stack.base_url.replace("https://", "wss://") + f"/api/v1/agents/{agent_id}/task-stream"


@asynccontextmanager
async def stream(stack: Stack, agent: AgentClient) -> AsyncIterator[ClientConnection]:
    async with connect(
        stream_url(stack, agent.id),
        ssl=stack.ssl_context(agent.cert_file, agent.key_file),
        additional_headers={"Authorization": f"Bearer {agent.token}"},
        open_timeout=10,
    ) as websocket:
        yield websocket


async def receive(websocket: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), timeout))
    return message


async def in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(function, *args, **kwargs)


def task_view(operator: httpx.Client, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = operator.get(f"/api/v1/tasks/{task_id}").json()
    return view


class TestTaskStream:
    def test_pending_then_new_tasks_arrive_and_progress_and_logs_are_recorded(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent = register()
        first = dispatch(operator, {"agentId": agent.id}, credentials={"registry.password": "pw"})
        first_id = first.json()["tasks"][0]["taskId"]

        async def scenario() -> None:
            async with stream(stack, agent) as websocket:
                assigned = await receive(websocket)
                assert assigned["type"] == "task_assigned"
                assert assigned["task"]["taskId"] == first_id
                assert assigned["task"]["credentials"] == {"registry.password": "pw"}

                started = time.monotonic()
                second = await in_thread(dispatch, operator, {"agentId": agent.id})
                second_id = second.json()["tasks"][0]["taskId"]
                pushed = await receive(websocket)
                assert pushed["task"]["taskId"] == second_id
                # Pushed, not found by the periodic re-check (taskPollInterval = 5 s).
                assert time.monotonic() - started < 2

                await websocket.send(
                    json.dumps(
                        {
                            "type": "task_progress",
                            "taskId": first_id,
                            "progress": 50,
                            "message": "Pulling layer 3/5",
                        }
                    )
                )
                await websocket.send(
                    json.dumps(
                        {
                            "type": "task_log",
                            "taskId": first_id,
                            "level": "info",
                            "message": "layer 3 done",
                        }
                    )
                )
                await websocket.send(json.dumps({"type": "task_progress", "taskId": "nope"}))
                error = await receive(websocket)
                assert error["type"] == "error"
                assert "taskId" in error["detail"]

                deadline = time.monotonic() + 5
                while True:
                    view = await in_thread(task_view, operator, first_id)
                    if view["status"] == "running" and view["logs"]:
                        break
                    assert time.monotonic() < deadline, view
                    await asyncio.sleep(0.05)
                assert view["progress"] == 50
                assert view["progressMessage"] == "Pulling layer 3/5"
                assert view["logs"][0]["message"] == "layer 3 done"

                cancelled = await in_thread(operator.post, f"/api/v1/tasks/{second_id}/cancel")
                assert cancelled.status_code == 200
                message = await receive(websocket)
                assert message == {"type": "task_cancelled", "taskId": second_id}

        asyncio.run(scenario())

    def test_deleting_the_agent_closes_its_stream_within_a_second(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent = register()

        async def scenario() -> None:
            async with stream(stack, agent) as websocket:
                await asyncio.sleep(0.3)
                started = time.monotonic()
                deleted = await in_thread(operator.delete, f"/api/v1/agents/{agent.id}")
                assert deleted.status_code == 200
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(websocket.recv(), 5)
                assert time.monotonic() - started < 1
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4401

        asyncio.run(scenario())

    def test_a_jwt_without_its_certificate_is_closed_with_4401(
        self, stack: Stack, register: Any
    ) -> None:
        agent = register()
        url = (
            stack.base_url.replace("https://", "wss://") + f"/api/v1/agents/{agent.id}/task-stream"
        )

        async def scenario() -> None:
            async with connect(
                url,
                ssl=stack.ssl_context(),
                additional_headers={"Authorization": f"Bearer {agent.token}"},
                open_timeout=10,
            ) as websocket:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(websocket.recv(), 5)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4401
                assert "client certificate" in closed.value.rcvd.reason

        asyncio.run(scenario())


class TestSync:
    def test_synced_answers_once_every_earlier_message_is_stored(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = dispatch(operator, {"agentId": agent.id}).json()["tasks"][0]["taskId"]

        async def scenario() -> None:
            async with stream(stack, agent) as websocket:
                assert (await receive(websocket))["type"] == "task_assigned"
                for n in range(20):
                    await websocket.send(
                        json.dumps({"type": "task_log", "taskId": task_id, "message": f"line {n}"})
                    )
                await websocket.send(json.dumps({"type": "sync", "syncId": "s-1"}))
                assert await receive(websocket) == {"type": "synced", "syncId": "s-1"}
                # Answered only after the lines before it: all twenty are stored now.
                view = await in_thread(task_view, operator, task_id)
                assert [line["message"] for line in view["logs"]] == [
                    f"line {n}" for n in range(20)
                ]

        asyncio.run(scenario())
