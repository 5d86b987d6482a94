"""Redis restarts under an open task stream: no task is lost, none is sent twice.

A private `redis-server` (never the shared one) carries the web process's
pub/sub. `taskPollInterval` is 30 s, so within this test's deadlines only
the push, or the resync the hub sends after resubscribing, can deliver.

`TestHubResubscribe` drives the hub alone: a stream that subscribes while
the hub is resubscribing after a restart must still get its channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from app.notify import AgentEvent, RedisNotifier, agent_channel
from app.stream.hub import RESYNC, RedisHub
from tests.conftest import (
    ADMIN_TOKEN,
    Stack,
    dispatch,
    start_stack,
)
from tests.faults.services import PrivateRedis
from tests.stream.helpers import (
    StreamAgent,
    client_context,
    open_stream,
    receive,
    register_via_api,
    wait_subscribed,
)

pytestmark = pytest.mark.slow

PUSH_DEADLINE = 2.0
# The hub retries with a backoff that tops out at 5 s.
RESYNC_DEADLINE = 10.0


@dataclass(frozen=True)
class Agents:
    streaming: StreamAgent  # its stream is open from the start
    late: StreamAgent  # opens its stream while Redis is down
    idle: StreamAgent  # only sends heartbeats


def agent_http(stack: Stack, agent: StreamAgent) -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url,
        verify=client_context(stack.ca_file, agent),
        headers={"Authorization": f"Bearer {agent.token}"},
        timeout=30,
    )


def heartbeat(client: httpx.Client, agent: StreamAgent) -> httpx.Response:
    return client.post(f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"})


def task_id_of(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text
    task_id: str = response.json()["tasks"][0]["taskId"]
    return task_id


async def silent(websocket: Any, seconds: float) -> dict[str, Any] | None:
    try:
        return await receive(websocket, seconds)
    except TimeoutError:
        return None


class TestRedisRestart:
    def test_tasks_created_while_redis_is_down_arrive_after_it_is_back(
        self,
        database_url: str,
        private_redis: PrivateRedis,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.WARNING, logger="app.notify")
        stacked = contextmanager(start_stack)(
            tmp_path,
            database_url,
            broker="embedded",
            worker=False,
            redis_url=private_redis.url,
            task_poll_interval=30,
        )
        with (
            stacked as stack,
            httpx.Client(
                base_url=stack.base_url,
                verify=client_context(stack.ca_file),
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=30,
            ) as operator,
        ):
            agents = Agents(
                *(
                    register_via_api(stack.base_url, stack.ca_file, operator, tmp_path)
                    for _ in "123"
                )
            )
            timings = asyncio.run(self.scenario(stack, private_redis, operator, agents))
        assert any(
            "could not publish task_created" in record.getMessage() for record in caplog.records
        ), [record.getMessage() for record in caplog.records]
        print(
            f"\nRedis restart: task created during the outage arrived "
            f"{timings['resync']:.2f} s after redis-server was back; "
            f"POST during the outage took {timings['post_down'] * 1000:.0f} ms; "
            f"after a second, brief outage: {timings['blip']:.2f} s"
        )

    async def scenario(
        self, stack: Stack, server: PrivateRedis, operator: httpx.Client, agents: Agents
    ) -> dict[str, float]:
        streaming, late, idle = agents.streaming, agents.late, agents.idle
        received: dict[str, list[str]] = {streaming.id: [], late.id: []}
        timings: dict[str, float] = {}

        async def send(target: StreamAgent) -> str:
            return task_id_of(await asyncio.to_thread(dispatch, operator, {"agentId": target.id}))

        async def take(websocket: Any, agent: StreamAgent, timeout: float) -> None:
            message = await receive(websocket, timeout)
            assert message["type"] == "task_assigned", message
            received[agent.id].append(message["task"]["taskId"])

        async def heartbeat_answers(agent: StreamAgent) -> None:
            with agent_http(stack, agent) as client:
                started = time.perf_counter()
                answer = await asyncio.to_thread(heartbeat, client, agent)
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"tasks": []}
            assert time.perf_counter() - started < 2

        async with open_stream(stack.base_url, stack.ca_file, streaming) as websocket:
            await asyncio.to_thread(wait_subscribed, server.url, "", [streaming.id])

            # 1. Redis up: pushed.
            started = time.perf_counter()
            first = await send(streaming)
            await take(websocket, streaming, PUSH_DEADLINE)
            assert time.perf_counter() - started < PUSH_DEADLINE
            assert received[streaming.id] == [first]

            # 2. Redis killed. Heartbeats still answer (before task 2: a
            # heartbeat would hand it over). A task created now is in the
            # database; its notification is lost.
            server.kill()
            await heartbeat_answers(streaming)
            await heartbeat_answers(idle)
            started = time.perf_counter()
            second = await send(streaming)
            timings["post_down"] = time.perf_counter() - started
            async with open_stream(stack.base_url, stack.ca_file, late) as late_socket:
                # A stream opened during the outage: its task, too, waits for Redis.
                # (Dispatched once the server has surely run the stream's first
                # database read, which would hand it over at once.)
                await asyncio.sleep(1)
                late_task = await send(late)
                # Nothing can deliver them while Redis is down (the re-check is
                # 30 s away), and the web process keeps serving agents.
                quiet = await asyncio.gather(
                    silent(websocket, 1.5),
                    silent(late_socket, 1.5),
                    heartbeat_answers(idle),
                    heartbeat_answers(idle),
                )
                assert list(quiet) == [None] * 4

                # 3. Redis back on the same port: the hub resubscribes and resyncs.
                await asyncio.to_thread(server.start)
                restarted = time.perf_counter()
                await asyncio.gather(
                    take(websocket, streaming, RESYNC_DEADLINE),
                    take(late_socket, late, RESYNC_DEADLINE),
                )
                timings["resync"] = time.perf_counter() - restarted
                assert received == {streaming.id: [first, second], late.id: [late_task]}

                # 4. After the restart: pushed again, to both.
                started = time.perf_counter()
                third, late_again = await send(streaming), await send(late)
                await asyncio.gather(
                    take(websocket, streaming, PUSH_DEADLINE),
                    take(late_socket, late, PUSH_DEADLINE),
                )
                assert time.perf_counter() - started < PUSH_DEADLINE

                # 5. A second, brief outage: the hub's backoff starts again from
                # its minimum, so it is back within a second, not after seconds.
                server.kill()
                blip = await send(streaming)
                await asyncio.to_thread(server.start)
                restarted = time.perf_counter()
                await take(websocket, streaming, RESYNC_DEADLINE)
                timings["blip"] = time.perf_counter() - restarted
                assert timings["blip"] < 1, timings

                # None lost, none twice.
                extra = await asyncio.gather(silent(websocket, 1.5), silent(late_socket, 0.1))
                assert list(extra) == [None, None]
                assert received == {
                    streaming.id: [first, second, third, blip],
                    late.id: [late_task, late_again],
                }
            await heartbeat_answers(streaming)
            await heartbeat_answers(idle)
        for task_ids in received.values():
            for task_id in task_ids:
                view = await asyncio.to_thread(operator.get, f"/api/v1/tasks/{task_id}")
                assert view.json()["status"] == "assigned", view.json()
        return timings


class TestHubResubscribe:
    def test_a_stream_arriving_while_the_hub_resubscribes_still_hears_its_agent(
        self, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After a restart the hub resubscribes every channel in one SUBSCRIBE; a
        stream that subscribes while that is being sent (a large fleet, many
        agents reconnecting at once) must still get its channel."""
        known, newcomer = uuid.uuid4(), uuid.uuid4()
        resubscribing, release = asyncio.Event(), asyncio.Event()
        armed = False
        original = aioredis.client.PubSub.subscribe

        async def slow_subscribe(self: Any, *args: Any, **kwargs: Any) -> Any:
            if armed and agent_channel("", known) in args:
                resubscribing.set()
                await release.wait()
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(aioredis.client.PubSub, "subscribe", slow_subscribe)

        async def scenario() -> None:
            nonlocal armed
            hub = RedisHub(private_redis.url)
            await hub.start()
            notifier = RedisNotifier(private_redis.url)
            try:
                first = await hub.subscribe(known)
                await asyncio.to_thread(wait_subscribed, private_redis.url, "", [str(known)])
                armed = True
                private_redis.kill()
                await asyncio.to_thread(private_redis.start)
                await asyncio.wait_for(resubscribing.wait(), RESYNC_DEADLINE)
                second = await hub.subscribe(newcomer)
                release.set()
                await asyncio.to_thread(
                    wait_subscribed, private_redis.url, "", [str(known), str(newcomer)], timeout=5
                )
                for agent_id in (known, newcomer):
                    notifier.publish(AgentEvent("task_created", agent_id=agent_id))
                for subscription, agent_id in ((first, known), (second, newcomer)):
                    while (item := await asyncio.wait_for(subscription.queue.get(), 2)) == RESYNC:
                        pass
                    assert item == AgentEvent("task_created", agent_id=agent_id)
            finally:
                notifier.close()
                await hub.stop()

        asyncio.run(scenario())


class TestHubSurvivesAnyLoss:
    """Whatever ends the pub/sub connection, the hub reconnects by itself and tells every
    stream to resync: what was published meanwhile is gone."""

    @staticmethod
    async def next_resync(subscription: Any, timeout: float) -> None:
        while await asyncio.wait_for(subscription.queue.get(), timeout) != RESYNC:
            pass

    def test_a_connection_the_server_drops_is_followed_by_a_resync(
        self, private_redis: PrivateRedis
    ) -> None:
        """The server ends the connection (CLIENT KILL: a failover, a proxy, a timeout):
        the hub reconnects, not redis-py behind its back, so the streams hear of it."""
        agent_id = uuid.uuid4()

        async def scenario() -> None:
            hub = RedisHub(private_redis.url)
            await hub.start()
            client = aioredis.Redis.from_url(private_redis.url)
            try:
                subscription = await hub.subscribe(agent_id)
                await asyncio.to_thread(wait_subscribed, private_redis.url, "", [str(agent_id)])
                await self.next_resync(subscription, 5)  # the one after subscribing
                assert await client.client_kill_filter(_type="pubsub") == 1
                await self.next_resync(subscription, RESYNC_DEADLINE)
                await asyncio.to_thread(wait_subscribed, private_redis.url, "", [str(agent_id)])
            finally:
                await client.aclose()
                await hub.stop()

        asyncio.run(scenario())

    def test_an_unexpected_error_does_not_end_the_hub(
        self, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """uvloop raises RuntimeError writing to a transport the server closed; an error
        the hub did not foresee must not end it, leaving the process deaf to events."""
        agent_id = uuid.uuid4()
        original = aioredis.client.PubSub.get_message
        armed = False

        async def failing_once(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal armed
            # This hub's connection only: other tests' servers may run hubs in this process.
            ours = getattr(self.connection, "port", None) == private_redis.port
            if armed and ours:
                armed = False
                raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(aioredis.client.PubSub, "get_message", failing_once)

        async def scenario() -> None:
            nonlocal armed
            hub = RedisHub(private_redis.url)
            await hub.start()
            notifier = RedisNotifier(private_redis.url)
            try:
                subscription = await hub.subscribe(agent_id)
                await asyncio.to_thread(wait_subscribed, private_redis.url, "", [str(agent_id)])
                await self.next_resync(subscription, 5)
                armed = True
                await self.next_resync(subscription, RESYNC_DEADLINE)
                await asyncio.to_thread(wait_subscribed, private_redis.url, "", [str(agent_id)])
                notifier.publish(AgentEvent("task_created", agent_id=agent_id))
                event = await asyncio.wait_for(subscription.queue.get(), PUSH_DEADLINE)
                assert event == AgentEvent("task_created", agent_id=agent_id)
            finally:
                notifier.close()
                await hub.stop()

        asyncio.run(scenario())
