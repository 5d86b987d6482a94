"""The task stream across real processes: two `stella serve --tls` on one Redis.

Both web processes share one PostgreSQL database, one data directory (so one
CA) and one Redis (pub/sub and the Celery broker, under a private key
prefix). The agent's socket is on web A; tasks are created through web B or
by a Celery worker, and must be pushed to A through Redis.

`taskPollInterval` is 60 s here, so anything arriving within seconds came
by push, never by the stream's periodic re-check.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from app.runtime import Runtime
from app.settings import Settings
from tests.conftest import (
    ADMIN_TOKEN,
    REDIS_URL,
    dispatch,
    free_port,
)
from tests.processes import StellaProcess, start_worker
from tests.stream.helpers import (
    StreamAgent,
    client_context,
    connect_stream,
    open_stream,
    percentile,
    receive,
    register_in_process,
    register_via_api,
    shared_backend,
    wait_healthy,
    wait_subscribed,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

POLL_INTERVAL = 60
PUSH_DEADLINE = 2.0
DISPATCHES = 20
FLEET = 200


@dataclass
class Cluster:
    settings: Settings
    runtime: Runtime  # in this process, on the same database and CA
    web_a: str
    web_b: str
    ca_file: Path
    prefix: str
    tmp: Path

    def operator(self, base_url: str) -> httpx.Client:
        return httpx.Client(
            base_url=base_url,
            verify=client_context(self.ca_file),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    with shared_backend(tmp, "processes", task_poll_interval=POLL_INTERVAL) as backend:
        webs: list[StellaProcess] = []
        try:
            urls = []
            for name in ("a", "b"):
                port = free_port()
                args = ("serve", "--tls", "--port", str(port), "--log-level", "warning")
                log = tmp / f"web-{name}.log"
                webs.append(StellaProcess(*args, env=backend.env, log=log).start())
                urls.append(f"https://127.0.0.1:{port}")
            ca_file = backend.runtime.ca.files.ca_cert
            for web, url in zip(webs, urls, strict=True):
                wait_healthy(url, ca_file, web)
            yield Cluster(
                settings=backend.settings,
                runtime=backend.runtime,
                web_a=urls[0],
                web_b=urls[1],
                ca_file=ca_file,
                prefix=backend.prefix,
                tmp=tmp,
            )
        finally:
            for web in webs:
                web.stop()
    for web in webs:
        assert "Traceback" not in web.output(), web.output()


@pytest.fixture(scope="module")
def worker(cluster: Cluster) -> Iterator[StellaProcess]:
    """A real Celery worker on the cluster's Redis broker."""
    process = start_worker(
        cluster.settings, cluster.tmp / "worker.log", name=f"processes-{os.getpid()}"
    )
    yield process
    process.stop()
    assert "Traceback" not in process.output(), process.output()


async def stamped_receive(
    websocket: ClientConnection, timeout: float = 5
) -> tuple[dict[str, Any], float]:
    """The next message and when it arrived (perf_counter)."""
    message = await receive(websocket, timeout)
    return message, time.perf_counter()


async def silent(websocket: ClientConnection, seconds: float) -> dict[str, Any] | None:
    """The message that arrives within `seconds`, or None."""
    try:
        return await receive(websocket, seconds)
    except TimeoutError:
        return None


def task_id_of(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text
    task_id: str = response.json()["tasks"][0]["taskId"]
    return task_id


class TestAcrossWebProcesses:
    def test_a_task_created_through_web_b_is_pushed_to_the_stream_on_web_a(
        self, cluster: Cluster, tmp_path: Path
    ) -> None:
        with (
            cluster.operator(cluster.web_a) as operator_a,
            cluster.operator(cluster.web_b) as operator_b,
        ):
            agent = register_via_api(cluster.web_a, cluster.ca_file, operator_a, tmp_path)
            other = register_via_api(cluster.web_b, cluster.ca_file, operator_b, tmp_path)
            latencies: list[float] = []
            posts: list[float] = []

            async def scenario() -> None:
                async with (
                    open_stream(cluster.web_a, cluster.ca_file, agent) as on_a,
                    open_stream(cluster.web_b, cluster.ca_file, other) as on_b,
                ):
                    await asyncio.to_thread(
                        wait_subscribed, REDIS_URL, cluster.prefix, [agent.id, other.id]
                    )
                    for _ in range(DISPATCHES):
                        waiting = asyncio.create_task(stamped_receive(on_a))
                        started = time.perf_counter()
                        response = await asyncio.to_thread(
                            dispatch, operator_b, {"agentId": agent.id}
                        )
                        posts.append(time.perf_counter() - started)
                        task_id = task_id_of(response)
                        message, arrived = await waiting
                        latencies.append(arrived - started)
                        assert message["type"] == "task_assigned", message
                        assert message["task"]["taskId"] == task_id
                        assert arrived - started < PUSH_DEADLINE

                    # And the other way round: created through A, streamed on B.
                    waiting = asyncio.create_task(stamped_receive(on_b))
                    started = time.perf_counter()
                    task_id = task_id_of(
                        await asyncio.to_thread(dispatch, operator_a, {"agentId": other.id})
                    )
                    message, arrived = await waiting
                    assert message["task"]["taskId"] == task_id
                    assert arrived - started < PUSH_DEADLINE

                    # Each task exactly once.
                    assert await silent(on_a, 1) is None
                    assert await silent(on_b, 0.1) is None

            asyncio.run(scenario())
        print(
            f"\ndispatch (POST on web B) -> task_assigned (stream on web A), "
            f"{len(latencies)} dispatches: "
            f"p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms; "
            f"POST alone p50 {percentile(posts, 0.5) * 1000:.1f} ms"
        )

    def test_a_selector_dispatch_expanded_by_a_worker_reaches_the_stream_on_web_a(
        self, cluster: Cluster, worker: StellaProcess, tmp_path: Path
    ) -> None:
        capability = f"cap-{uuid.uuid4().hex[:8]}"
        with (
            cluster.operator(cluster.web_a) as operator_a,
            cluster.operator(cluster.web_b) as operator_b,
        ):
            agent = register_via_api(
                cluster.web_a, cluster.ca_file, operator_a, tmp_path, capabilities=[capability]
            )

            async def scenario() -> None:
                async with open_stream(cluster.web_a, cluster.ca_file, agent) as websocket:
                    await asyncio.to_thread(wait_subscribed, REDIS_URL, cluster.prefix, [agent.id])
                    started = time.perf_counter()
                    accepted = await asyncio.to_thread(
                        dispatch, operator_b, {"capability": capability}
                    )
                    assert accepted.status_code == 202, accepted.text
                    message = await receive(websocket, 15)
                    elapsed = time.perf_counter() - started
                    assert message["type"] == "task_assigned", message
                    # Well under the 60 s re-check: the worker's publish woke web A.
                    assert elapsed < 10
                    view = await asyncio.to_thread(
                        operator_b.get, f"/api/v1/dispatches/{accepted.json()['dispatchId']}"
                    )
                    assert [task["taskId"] for task in view.json()["tasks"]] == [
                        message["task"]["taskId"]
                    ]
                    assert await silent(websocket, 1) is None
                    print(f"\nselector dispatch via web B -> worker -> web A: {elapsed:.2f} s")

            asyncio.run(scenario())


class TestManyStreams:
    def test_two_hundred_streams_each_receive_their_task_exactly_once(
        self, cluster: Cluster, worker: StellaProcess, tmp_path: Path
    ) -> None:
        capability = f"fleet-{uuid.uuid4().hex[:8]}"
        began = time.perf_counter()
        agents = register_in_process(cluster.runtime, tmp_path, FLEET, capabilities=[capability])
        contexts = [client_context(cluster.ca_file, agent) for agent in agents]
        registered = time.perf_counter()
        ids = [agent.id for agent in agents]
        timings: dict[str, float] = {}

        async def open_one(agent: StreamAgent, context: Any) -> ClientConnection:
            connection: ClientConnection = await connect_stream(
                cluster.web_a, cluster.ca_file, agent, context=context, open_timeout=30
            )
            return connection

        async def scenario(operator: httpx.Client) -> None:
            opened = await asyncio.gather(
                *(
                    open_one(agent, context)
                    for agent, context in zip(agents, contexts, strict=True)
                ),
                return_exceptions=True,
            )
            sockets = [item for item in opened if isinstance(item, ClientConnection)]
            try:
                failures = [item for item in opened if isinstance(item, BaseException)]
                assert not failures, f"{len(failures)} streams failed to open: {failures[:3]}"
                timings["open"] = time.perf_counter() - registered
                await asyncio.to_thread(wait_subscribed, REDIS_URL, cluster.prefix, ids, timeout=20)

                started = time.perf_counter()
                accepted = await asyncio.to_thread(dispatch, operator, {"capability": capability})
                assert accepted.status_code == 202, accepted.text
                messages = await asyncio.gather(*(receive(ws, 20) for ws in sockets))
                timings["fan-out"] = time.perf_counter() - started

                assert all(message["type"] == "task_assigned" for message in messages)
                received = [message["task"]["taskId"] for message in messages]
                assert len(set(received)) == FLEET
                view = await asyncio.to_thread(
                    operator.get, f"/api/v1/dispatches/{accepted.json()['dispatchId']}"
                )
                tasks = {task["taskId"]: task["agentId"] for task in view.json()["tasks"]}
                # Each agent received its own task, and no other.
                assert {
                    task_id: agent.id for task_id, agent in zip(received, agents, strict=True)
                } == tasks

                extra = await asyncio.gather(*(silent(ws, 1) for ws in sockets))
                assert [message for message in extra if message is not None] == []
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
            assert [ws.close_code for ws in sockets] == [1000] * FLEET

        with cluster.operator(cluster.web_b) as operator:
            asyncio.run(scenario(operator))
        # The web process let go of every agent channel.
        wait_subscribed(REDIS_URL, cluster.prefix, ids, present=False)
        print(
            f"\n{FLEET} streams on one web process: registered in {registered - began:.1f} s, "
            f"opened in {timings['open']:.1f} s, "
            f"selector dispatch -> all {FLEET} task_assigned in {timings['fan-out']:.2f} s"
        )
