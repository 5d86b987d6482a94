"""The periodic re-check: what no notification announced still reaches the stream.

Tasks and deletions written straight to the database publish no event, as
when Redis was unreachable at the time: only the per-process re-check
(`app.stream.recheck`, every `taskPollInterval`) can find them. Both
stacks: SQLite with the in-process hub, PostgreSQL with Redis pub/sub.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import select
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.db import transaction
from app.models import Agent
from app.stream.hub import Subscription
from app.stream.recheck import CHUNK, Recheck
from app.tasks import service as tasks_service
from tests.conftest import AgentClient, Stack, start_stack, truncate
from tests.tasks.helpers import Register

POLL = 1  # taskPollInterval, seconds (its minimum)


@pytest.fixture(scope="module")
def polling(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    broker = "embedded" if backend == "sqlite" else "redis"
    yield from start_stack(
        tmp_path_factory.mktemp("recheck"),
        database_url,
        broker=broker,
        worker=False,
        task_poll_interval=POLL,
    )


@pytest.fixture
def stack(polling: Stack) -> Stack:
    """Overrides conftest's `stack`: `operator` and `register` use this one."""
    truncate(polling.runtime)
    return polling


def insert_pending_task(stack: Stack, agent_id: str) -> str:
    """A pending task written straight to the database: no event announces it."""
    with transaction(stack.runtime.engine) as session:
        task = tasks_service.new_task(
            settings=stack.settings,
            cipher=stack.runtime.cipher,
            agent_id=uuid.UUID(agent_id),
            task_type="docker.pull",
            payload={},
            credentials=None,
            timeout=None,
            priority=0,
        )
        session.add(task)
        return str(task.id)


def delete_quietly(stack: Stack, agent_id: str) -> None:
    """Delete the agent's row without the service: no event announces it."""
    with transaction(stack.runtime.engine) as session:
        agent = session.get(Agent, uuid.UUID(agent_id))
        assert agent is not None
        session.delete(agent)


def stream(stack: Stack, agent: AgentClient) -> Any:
    url = stack.base_url.replace("https://", "wss://") + f"/api/v1/agents/{agent.id}/task-stream"
    return connect(
        url,
        ssl=stack.ssl_context(agent.cert_file, agent.key_file),
        additional_headers={"Authorization": f"Bearer {agent.token}"},
        open_timeout=10,
    )


class TestRecheck:
    def test_a_task_no_event_announced_arrives_within_the_interval(
        self, stack: Stack, register: Register
    ) -> None:
        agent, idle = register(), register()

        async def scenario() -> None:
            async with stream(stack, agent) as websocket, stream(stack, idle) as bystander:
                await asyncio.sleep(0.2)  # connected, nothing pending
                task_id = await asyncio.to_thread(insert_pending_task, stack, agent.id)
                started = time.monotonic()
                message = json.loads(await asyncio.wait_for(websocket.recv(), 2 * POLL + 3))
                assert message["type"] == "task_assigned"
                assert message["task"]["taskId"] == task_id
                assert time.monotonic() - started < 2 * POLL + 2
                # The other stream had nothing due, and was sent nothing.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(bystander.recv(), POLL + 0.5)

        asyncio.run(scenario())

    def test_an_agent_deleted_without_an_event_is_closed_with_4401(
        self, stack: Stack, register: Register
    ) -> None:
        agent = register()

        async def scenario() -> None:
            async with stream(stack, agent) as websocket:
                await asyncio.sleep(0.2)
                await asyncio.to_thread(delete_quietly, stack, agent.id)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(websocket.recv(), 2 * POLL + 3)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4401

        asyncio.run(scenario())


class TestDue:
    def test_one_pass_finds_pending_work_and_gone_agents_among_many(
        self, stack: Stack, register: Register
    ) -> None:
        busy, quiet, gone = register(), register(), register()
        insert_pending_task(stack, busy.id)
        delete_quietly(stack, gone.id)
        # More ids than one statement takes: never registered, so gone as well.
        strangers = {uuid.uuid4() for _ in range(CHUNK + 20)}
        ids = {uuid.UUID(busy.id), uuid.UUID(quiet.id), uuid.UUID(gone.id), *strangers}

        due = Recheck(stack.runtime)._due(ids)

        assert due == {uuid.UUID(busy.id), uuid.UUID(gone.id), *strangers}
        with transaction(stack.runtime.engine) as session:  # only read: nothing was claimed
            assert session.exec(select(Agent).where(Agent.id == uuid.UUID(quiet.id))).one()
            assert tasks_service.has_pending(session=session, agent_id=uuid.UUID(busy.id))

    def test_the_task_runs_only_while_some_stream_is_registered(self, stack: Stack) -> None:
        async def scenario() -> None:
            recheck = Recheck(stack.runtime)

            def running() -> bool:
                return any(
                    task.get_name() == "stella-stream-recheck" and not task.done()
                    for task in asyncio.all_tasks()
                )

            first, second = Subscription(uuid.uuid4()), Subscription(uuid.uuid4())
            assert not running()
            recheck.add(first)
            recheck.add(second)
            assert running()
            assert len(recheck) == 2
            recheck.discard(first)
            assert running()
            recheck.discard(second)
            await asyncio.sleep(0)  # let the cancellation land
            assert not running()
            assert len(recheck) == 0

        asyncio.run(scenario())
