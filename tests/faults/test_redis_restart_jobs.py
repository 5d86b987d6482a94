"""Redis killed under the Celery side: the worker and beat reconnect by themselves.

A private `redis-server` is the broker of a real worker and beat, and the
pub/sub of the web process. A selector dispatch made while it is down is
committed (202) but its wake-up is lost; once Redis is back on the same
port, the same worker and beat processes, never restarted, drive it (the
stalled-dispatch sweep), and later dispatches expand at once. Every
dispatch ends with exactly one task per matching agent, and every task is
handed to its agent exactly once.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Stack, operator_client, start_stack, truncate
from tests.faults.services import PrivateRedis
from tests.processes import StellaProcess, settings_env
from tests.stream.helpers import StreamAgent, client_context, register_via_api

pytestmark = pytest.mark.slow

AGENTS = 3


@pytest.fixture
def stack(database_url: str, private_redis: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    serve = contextmanager(start_stack)(
        tmp_path,
        database_url,
        worker=True,
        broker_url=private_redis.url,
        redis_url=private_redis.url,
        broker_key_prefix=f"stella-jobs-{uuid.uuid4().hex[:8]}-",
        sweep_interval=1,
        dispatch_stall_after=2,
    )
    with serve as stack:
        truncate(stack.runtime)
        yield stack


def post_selector(operator: httpx.Client, capability: str) -> str:
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.pull",
            "payload": {"image": "app"},
            "target": {"capability": capability},
        },
    )
    assert response.status_code == 202, response.text
    dispatch_id: str = response.json()["dispatchId"]
    return dispatch_id


def wait_done(operator: httpx.Client, dispatch_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view: dict[str, Any] = operator.get(f"/api/v1/dispatches/{dispatch_id}").json()
        if view["status"] == "done":
            return view
        assert time.monotonic() < deadline, f"dispatch stuck: {view}"
        time.sleep(0.2)


def test_worker_and_beat_reconnect_and_no_task_is_lost_or_doubled(
    stack: Stack, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    capability = f"cap-{uuid.uuid4().hex[:8]}"
    beat = StellaProcess(
        "beat", env=settings_env(stack.settings), log=tmp_path / "beat.log"
    ).start()
    with operator_client(stack) as operator:
        agents = [
            register_via_api(
                stack.base_url, stack.ca_file, operator, tmp_path, capabilities=[capability]
            )
            for _ in range(AGENTS)
        ]
        clients = {
            agent.id: httpx.Client(
                base_url=stack.base_url,
                verify=client_context(stack.ca_file, agent),
                headers={"Authorization": f"Bearer {agent.token}"},
                timeout=30,
            )
            for agent in agents
        }
        delivered: Counter[str] = Counter()

        def heartbeat(agent: StreamAgent) -> None:
            response = clients[agent.id].post(
                f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"}
            )
            assert response.status_code == 200, response.text
            delivered.update(task["taskId"] for task in response.json()["tasks"])

        try:
            before = wait_done(operator, post_selector(operator, capability), timeout=20)

            private_redis.kill()
            for agent in agents:
                heartbeat(agent)  # the web process keeps serving agents
            during_id = post_selector(operator, capability)

            private_redis.start()
            during = wait_done(operator, during_id, timeout=30)
            after = wait_done(operator, post_selector(operator, capability), timeout=20)

            for _ in range(3):
                for agent in agents:
                    heartbeat(agent)
        finally:
            for client in clients.values():
                client.close()
            beat.stop()

    worker = stack.tmp / "worker.log"
    assert "re-driving 1 stalled dispatches" in worker.read_text(errors="replace")
    ids = {agent.id for agent in agents}
    all_tasks: list[str] = []
    for view in (before, during, after):
        assert sorted(task["agentId"] for task in view["tasks"]) == sorted(ids), view
        all_tasks += [task["taskId"] for task in view["tasks"]]
    assert len(set(all_tasks)) == 3 * AGENTS
    assert delivered == Counter(dict.fromkeys(all_tasks, 1)), delivered
