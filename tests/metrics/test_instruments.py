"""The counters, histograms and gauges move as the work happens, by the right amounts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.conftest import AgentClient, Stack, dispatch
from tests.metrics.helpers import Samples, scrape, total, value, wait_until

HEARTBEATS = "stella_heartbeats_received_total"
HEARTBEAT_TIMES = "stella_heartbeat_duration_seconds_count"
DELIVERIES = "stella_task_delivery_seconds_count"
STREAMS = "stella_task_streams_open"


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


class TestRegistration:
    def test_counts_the_certificate_and_the_agent(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        before = scrape(operator)
        register()
        register()
        after = scrape(operator)
        assert moved(before, after, "stella_certificates_issued_total") == 2
        assert value(after, "stella_agents", status="online") == 2
        assert value(after, "stella_agents", status="offline") == 0
        assert value(after, "stella_certificates_expiring") == 0


class TestHeartbeats:
    def test_each_accepted_heartbeat_counts_once_and_is_timed(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent: AgentClient = register()
        before = scrape(operator)
        for _ in range(5):
            assert agent.heartbeat().status_code == 200
        after = scrape(operator)
        assert moved(before, after, HEARTBEATS) == 5
        assert moved(before, after, HEARTBEAT_TIMES) == 5
        if stack.settings.redis_url:
            # Registrations are cached where Redis carries the fleet's events:
            # after the first heartbeat the steady ones take the fast lane.
            assert moved(before, after, HEARTBEATS, path="fast_lane") >= 3
        else:
            assert moved(before, after, HEARTBEATS, path="full") == 5

    def test_a_refused_heartbeat_is_timed_but_not_received(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent: AgentClient = register()
        before = scrape(operator)
        refused = httpx.post(
            f"{stack.base_url}/api/v1/agents/{agent.id}/heartbeat",
            json={"status": "healthy"},
            headers={"Authorization": "Bearer not-a-jwt"},
            verify=stack.ssl_context(),
        )
        assert refused.status_code == 401
        after = scrape(operator)
        assert moved(before, after, HEARTBEATS) == 0
        assert moved(before, after, HEARTBEAT_TIMES, path="full") == 1
        status = {"route": "/api/v1/agents/{id}/heartbeat", "method": "POST", "status": "4xx"}
        assert moved(before, after, "stella_http_request_duration_seconds_count", **status) == 1


class TestDispatchAndDelivery:
    def test_a_task_handed_in_a_heartbeat_answer(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent: AgentClient = register()
        before = scrape(operator)
        created = dispatch(operator, {"agentId": agent.id})
        assert created.status_code == 201, created.text
        dispatched = scrape(operator)
        assert value(dispatched, "stella_tasks", status="pending") == 1
        assert value(dispatched, "stella_tasks", status="assigned") == 0

        answer = agent.heartbeat()
        assert len(answer.json()["tasks"]) == 1
        after = scrape(operator)
        assert value(after, "stella_tasks", status="pending") == 0
        assert value(after, "stella_tasks", status="assigned") == 1
        assert moved(before, after, DELIVERIES, path="heartbeat") == 1
        assert moved(before, after, DELIVERIES, path="stream") == 0

        task_id = answer.json()["tasks"][0]["taskId"]
        assert agent.complete(task_id).status_code == 200
        assert value(scrape(operator), "stella_tasks", status="succeeded") == 1

    def test_a_task_pushed_on_the_stream_and_the_stream_counted_while_open(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent: AgentClient = register()
        before = scrape(operator)
        url = stack.base_url.replace("https://", "wss://")

        async def scenario() -> None:
            async with connect(
                f"{url}/api/v1/agents/{agent.id}/task-stream",
                ssl=stack.ssl_context(agent.cert_file, agent.key_file),
                additional_headers={"Authorization": f"Bearer {agent.token}"},
                open_timeout=10,
            ) as websocket:
                await asyncio.to_thread(
                    wait_until,
                    operator,
                    lambda now: value(now, STREAMS) - value(before, STREAMS) == 1,
                )
                created = await asyncio.to_thread(dispatch, operator, {"agentId": agent.id})
                assert created.status_code == 201, created.text
                message = json.loads(await asyncio.wait_for(websocket.recv(), 10))
                assert message["type"] == "task_assigned"
                await asyncio.to_thread(
                    wait_until,
                    operator,
                    lambda now: moved(before, now, DELIVERIES, path="stream") == 1,
                )

        asyncio.run(scenario())
        after = wait_until(operator, lambda now: value(now, STREAMS) == value(before, STREAMS))
        assert moved(before, after, DELIVERIES, path="stream") == 1
        assert moved(before, after, DELIVERIES, path="heartbeat") == 0
        assert value(after, "stella_tasks", status="assigned") == 1
