"""The heartbeat path's caches, pending index and write-behind, against real processes.

Three web processes (`stella serve --tls`) share one PostgreSQL database,
one CA and one Redis. What one process learns (an agent deleted, a task
created) must reach the caches of the others; what a heartbeat changes
must reach the database within the flush interval; and a task whose
notification was lost must still be handed over, by the periodic
reconcile.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col

from app.db import transaction
from app.models import Agent
from app.models.types import utcnow
from app.notify import LocalNotifier
from app.runtime import Runtime
from app.settings import Settings
from app.sweeps import service as sweeps
from app.tasks import service as tasks_service
from app.tasks.schemas import TaskCreate
from tests.conftest import (
    ADMIN_TOKEN,
    free_port,
)
from tests.processes import StellaProcess
from tests.stream.helpers import (
    StreamAgent,
    client_context,
    register_in_process,
    shared_backend,
    wait_healthy,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

FLUSH_INTERVAL = 0.5
RECONCILE_INTERVAL = 1.0
# Cross-process news travels through Redis: allow it a moment.
PROPAGATION = 2.0


@dataclass
class Fleet:
    settings: Settings
    runtime: Runtime
    ca_file: Path
    tmp: Path
    env: dict[str, str]
    webs: dict[str, str]

    def operator(self, web: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.webs[web],
            verify=client_context(self.ca_file),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )

    def agent(self, web: str, agent: StreamAgent) -> httpx.Client:
        return httpx.Client(
            base_url=self.webs[web],
            verify=client_context(self.ca_file, agent),
            headers={"Authorization": f"Bearer {agent.token}"},
            timeout=30,
        )

    def start_web(self, name: str) -> StellaProcess:
        port = free_port()
        args = ("serve", "--tls", "--port", str(port), "--log-level", "warning")
        web = StellaProcess(*args, env=self.env, log=self.tmp / f"web-{name}.log").start()
        self.webs[name] = f"https://127.0.0.1:{port}"
        wait_healthy(self.webs[name], self.ca_file, web)
        return web


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("heartbeat-path")
    with shared_backend(
        tmp,
        "heartbeat_path",
        heartbeat_flush_interval=FLUSH_INTERVAL,
        pending_reconcile_interval=RECONCILE_INTERVAL,
    ) as backend:
        runtime = backend.runtime
        fleet = Fleet(backend.settings, runtime, runtime.ca.files.ca_cert, tmp, backend.env, {})
        webs = []
        try:
            webs = [fleet.start_web("a"), fleet.start_web("b")]
            yield fleet
        finally:
            for web in webs:
                web.stop()
    for web in webs:
        assert "Traceback" not in web.output(), web.output()


def beat(client: httpx.Client, agent: StreamAgent, **body: Any) -> httpx.Response:
    return client.post(f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy", **body})


def until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stored(fleet: Fleet, agent: StreamAgent) -> Agent:
    with transaction(fleet.runtime.engine) as session:
        row = session.get(Agent, uuid.UUID(agent.id))
        assert row is not None
        return row


def create_task(operator: httpx.Client, agent: StreamAgent) -> str:
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.pull",
            "payload": {"image": "x"},
            "target": {"agentId": agent.id},
        },
    )
    assert response.status_code in (201, 202), response.text
    (task,) = response.json()["tasks"]
    task_id: str = task["taskId"]
    return task_id


def warm(client: httpx.Client, agent: StreamAgent) -> None:
    """Two heartbeats: the second is served from the caches."""
    for _ in range(2):
        response = beat(client, agent)
        assert response.status_code == 200, response.text
        assert response.json() == {"tasks": []}


class TestCachesFollowTheFleet:
    def test_an_agent_deleted_on_one_process_is_refused_by_the_other(self, fleet: Fleet) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("b", agent) as on_b, fleet.operator("a") as operator_a:
            warm(on_b, agent)
            assert operator_a.delete(f"/api/v1/agents/{agent.id}").status_code == 200
            assert until(lambda: beat(on_b, agent).status_code == 401, PROPAGATION)
            # And it stays refused: nothing puts the registration back.
            for _ in range(5):
                assert beat(on_b, agent).status_code == 401

    def test_an_agent_deleted_on_its_own_process_is_refused_at_once(self, fleet: Fleet) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("a", agent) as on_a, fleet.operator("a") as operator_a:
            warm(on_a, agent)
            assert operator_a.delete(f"/api/v1/agents/{agent.id}").status_code == 200
            refused = beat(on_a, agent)
            assert refused.status_code == 401, refused.text
            assert refused.headers["content-type"] == "application/problem+json"

    def test_a_return_from_offline_is_written_before_the_answer(self, fleet: Fleet) -> None:
        """The sweep (another process) tells every web process who went offline, so
        the cached "online" is dropped and the return is written, not behind."""
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("b", agent) as on_b:
            warm(on_b, agent)
            time.sleep(2 * FLUSH_INTERVAL)  # nothing of this agent left to write behind
            silent_since = utcnow() - dt.timedelta(hours=1)
            with transaction(fleet.runtime.engine) as session:
                session.execute(
                    update(Agent)
                    .where(col(Agent.id) == uuid.UUID(agent.id))
                    .values(last_heartbeat=silent_since)
                )
            with transaction(fleet.runtime.engine) as session:
                marked = sweeps.mark_offline(
                    session=session, settings=fleet.settings, notifier=fleet.runtime.notifier
                )
            assert marked == [uuid.UUID(agent.id)]
            time.sleep(0.5)  # the event's way through Redis
            assert beat(on_b, agent).status_code == 200
            row = stored(fleet, agent)
            assert (row.status, row.last_heartbeat > silent_since) == ("online", True)

    def test_a_task_created_on_one_process_is_handed_over_by_the_other(self, fleet: Fleet) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("b", agent) as on_b, fleet.operator("a") as operator_a:
            warm(on_b, agent)
            task_id = create_task(operator_a, agent)
            received: list[str] = []

            def delivered() -> bool:
                answer = beat(on_b, agent)
                assert answer.status_code == 200, answer.text
                received.extend(task["taskId"] for task in answer.json()["tasks"])
                return bool(received)

            assert until(delivered, PROPAGATION)
            for _ in range(5):
                assert beat(on_b, agent).json() == {"tasks": []}
            assert received == [task_id]

    def test_a_task_created_on_the_same_process_comes_with_the_next_heartbeat(
        self, fleet: Fleet
    ) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("a", agent) as on_a, fleet.operator("a") as operator_a:
            warm(on_a, agent)
            task_id = create_task(operator_a, agent)
            answer = beat(on_a, agent)
            assert [task["taskId"] for task in answer.json()["tasks"]] == [task_id]

    def test_a_task_whose_notification_was_lost_is_found_by_the_reconcile(
        self, fleet: Fleet
    ) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        # A runtime whose notifier tells no one: the web processes never hear of this task.
        silent = replace(fleet.runtime, notifier=LocalNotifier())
        with fleet.agent("b", agent) as on_b:
            warm(on_b, agent)
            with transaction(silent.engine) as session:
                task = tasks_service.create_for_agent(
                    session=session,
                    settings=silent.settings,
                    cipher=silent.cipher,
                    notifier=silent.notifier,
                    agent_id=uuid.UUID(agent.id),
                    spec=TaskCreate.model_validate(
                        {"taskType": "docker.pull", "payload": {}, "target": {"agentId": agent.id}}
                    ),
                )
            received: list[str] = []

            def delivered() -> bool:
                received.extend(t["taskId"] for t in beat(on_b, agent).json()["tasks"])
                return bool(received)

            assert until(delivered, RECONCILE_INTERVAL + PROPAGATION)
            assert received == [str(task.id)]


class TestWriteBehind:
    def test_a_heartbeat_reaches_the_database_within_the_flush_interval(self, fleet: Fleet) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("b", agent) as on_b:
            warm(on_b, agent)
            sent = time.time()
            answer = beat(on_b, agent, runningTasks=7, resourceUsage={"cpu": 42.0})
            acknowledged = time.time()
            assert answer.status_code == 200
        assert until(lambda: stored(fleet, agent).running_tasks == 7, FLUSH_INTERVAL + 2)
        row = stored(fleet, agent)
        assert row.resource_usage == {"cpu": 42.0}
        assert sent - 0.05 <= row.last_heartbeat.timestamp() <= acknowledged + 0.05

    def test_later_heartbeats_keep_what_earlier_ones_reported(self, fleet: Fleet) -> None:
        """Coalescing keeps the newest value of each field, not just the newest heartbeat."""
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("b", agent) as on_b:
            warm(on_b, agent)
            beat(on_b, agent, resourceUsage={"cpu": 3.0}, capabilities=["docker", "ssh"])
            beat(on_b, agent, runningTasks=2)
        assert until(lambda: stored(fleet, agent).running_tasks == 2, FLUSH_INTERVAL + 2)
        row = stored(fleet, agent)
        assert (row.resource_usage, row.capabilities) == ({"cpu": 3.0}, ["docker", "ssh"])

    def test_a_clean_stop_writes_what_it_buffered(self, fleet: Fleet) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        web = fleet.start_web("c")
        try:
            with fleet.agent("c", agent) as on_c:
                warm(on_c, agent)
                assert beat(on_c, agent, runningTasks=11).status_code == 200
            web.stop()  # SIGTERM, well inside the flush interval
        finally:
            web.kill()
        assert stored(fleet, agent).running_tasks == 11


class TestFastLane:
    """A warm agent's heartbeats go through the fast lane first: whatever it does
    not answer itself must reach the route intact, and be answered as before."""

    def test_a_body_sent_in_chunks_is_read_whole(self, fleet: Fleet) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        body = b'{"status": "healthy", "runningTasks": 5}'
        with fleet.agent("b", agent) as on_b:
            warm(on_b, agent)
            answer = on_b.post(
                f"/api/v1/agents/{agent.id}/heartbeat",
                content=iter([body[:7], body[7:20], body[20:]]),
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"tasks": []}
        assert until(lambda: stored(fleet, agent).running_tasks == 5, FLUSH_INTERVAL + 2)

    @pytest.mark.parametrize(
        ("content", "content_type", "status"),
        [
            (b'{"status": ', "application/json", 422),
            (b'{"status": "healthy", "runningTasks": -1}', "application/json", 422),
            (b'{"status": "healthy"}', "text/plain", 422),
            (b'{"status": "healthy", "pad": "' + b"x" * 2_000_000 + b'"}', "application/json", 413),
        ],
        ids=["broken-json", "invalid-field", "not-json", "too-large"],
    )
    def test_what_the_lane_declines_the_route_answers(
        self, fleet: Fleet, content: bytes, content_type: str, status: int
    ) -> None:
        (agent,) = register_in_process(fleet.runtime, fleet.tmp, 1, capabilities=["docker"])
        with fleet.agent("b", agent) as on_b:
            warm(on_b, agent)
            answer = on_b.post(
                f"/api/v1/agents/{agent.id}/heartbeat",
                content=content,
                headers={"Content-Type": content_type},
            )
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/problem+json"

    def test_another_agents_path_is_refused_even_when_both_are_warm(self, fleet: Fleet) -> None:
        one, other = register_in_process(fleet.runtime, fleet.tmp, 2, capabilities=["docker"])
        with fleet.agent("b", one) as on_b, fleet.agent("b", other) as other_on_b:
            warm(on_b, one)
            warm(other_on_b, other)
            answer = beat(on_b, other)
        assert answer.status_code == 403, answer.text
