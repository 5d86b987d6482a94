"""`stella beat` and `stella worker` as real processes, running the sweeps.

One stack per backend for the module: SQLite with the embedded filesystem
broker, PostgreSQL with Redis. Intervals of one second (heartbeat and
sweep), an agent is offline after three missed heartbeats.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    Stack,
    dispatch,
    operator_client,
    register_agent,
    start_stack,
    truncate,
)
from tests.processes import StellaProcess, settings_env

pytestmark = pytest.mark.slow

OFFLINE_AFTER_MISSED = 3
BEAT_STARTED = "beat: Starting"
MARKED = re.compile(r"marked (\d+) agents offline")
SENT_MARK_OFFLINE = "Sending due task mark-offline"


@dataclass
class BeatStack:
    stack: Stack
    beat: StellaProcess
    operator: httpx.Client
    worker_log: Path

    def worker_output(self, since: int = 0) -> str:
        return self.worker_log.read_text(errors="replace")[since:]

    def agent(self, agent_id: str) -> dict[str, Any]:
        response = self.operator.get(f"/api/v1/agents/{agent_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.operator.get(f"/api/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@dataclass
class Agent:
    id: str
    http: httpx.Client

    def heartbeat(self) -> httpx.Response:
        return self.http.post(f"/api/v1/agents/{self.id}/heartbeat", json={"status": "healthy"})


@pytest.fixture(scope="module")
def _beat_stack(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BeatStack]:
    broker = "embedded" if backend == "sqlite" else "redis"
    tmp = tmp_path_factory.mktemp(f"beat-{backend}")
    running = contextmanager(start_stack)(
        tmp,
        database_url,
        broker=broker,
        heartbeat_interval=1,
        offline_after_missed=OFFLINE_AFTER_MISSED,
        sweep_interval=1,
    )
    with running as stack:
        beat = StellaProcess("beat", env=settings_env(stack.settings), log=tmp / "beat.log")
        with (
            beat,
            operator_client(stack) as operator,
        ):
            beat.wait_for(BEAT_STARTED)
            yield BeatStack(stack, beat, operator, tmp / "worker.log")
        assert "Traceback" not in beat.output(), beat.output()


@pytest.fixture
def beat_stack(_beat_stack: BeatStack) -> Iterator[BeatStack]:
    """The module's stack with empty tables; its worker log stays free of tracebacks."""
    truncate(_beat_stack.stack.runtime)
    assert _beat_stack.beat.process is not None
    assert _beat_stack.beat.process.poll() is None, _beat_stack.beat.output()
    yield _beat_stack
    output = _beat_stack.worker_output()
    assert "Traceback" not in output, output


@pytest.fixture
def register(beat_stack: BeatStack, tmp_path: Path) -> Iterator[Callable[[], Agent]]:
    clients: list[httpx.Client] = []

    def _register() -> Agent:
        stack = beat_stack.stack
        data, http = register_agent(
            stack, beat_stack.operator, tmp_path, name=f"beat-{uuid.uuid4().hex[:12]}"
        )
        assert data["config"]["heartbeatInterval"] == 1
        clients.append(http)
        return Agent(id=data["agentId"], http=http)

    yield _register
    for client in clients:
        client.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition` until true; the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} not within {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_silent_agent_goes_offline_and_a_heartbeat_brings_it_back(
    beat_stack: BeatStack, register: Callable[[], Agent]
) -> None:
    agent = register()
    response = agent.heartbeat()
    assert response.status_code == 200, response.text
    assert beat_stack.agent(agent.id)["status"] == "online"

    took = wait_for(
        lambda: beat_stack.agent(agent.id)["status"] == "offline", 6, "agent marked offline"
    )
    # Not before three intervals of silence (a little slack for our own clock).
    assert took >= OFFLINE_AFTER_MISSED - 0.5, took

    response = agent.heartbeat()
    assert response.status_code == 200, response.text
    assert beat_stack.agent(agent.id)["status"] == "online"


def test_an_unfinished_task_times_out(beat_stack: BeatStack, register: Callable[[], Agent]) -> None:
    agent = register()
    created = dispatch(beat_stack.operator, {"agentId": agent.id}, timeout=1)
    assert created.status_code == 201, created.text
    task_id = created.json()["tasks"][0]["taskId"]
    delivered = agent.heartbeat()
    assert delivered.status_code == 200, delivered.text
    assert [task["taskId"] for task in delivered.json()["tasks"]] == [task_id]
    assert beat_stack.task(task_id)["status"] == "assigned"

    wait_for(lambda: beat_stack.task(task_id)["status"] == "timed_out", 5, "task timed out")
    view = beat_stack.task(task_id)
    assert view["error"]
    assert view["completedAt"] is not None

    late = agent.http.post(
        f"/api/v1/agents/{agent.id}/tasks/{task_id}/complete", json={"success": True}
    )
    assert late.status_code == 409, late.text
    assert beat_stack.task(task_id)["status"] == "timed_out"
    open_tasks = agent.http.get(f"/api/v1/agents/{agent.id}/tasks")
    assert open_tasks.status_code == 200, open_tasks.text
    assert open_tasks.json()["tasks"] == []


def test_two_beats_on_one_schedule_file_do_no_harm(
    beat_stack: BeatStack, register: Callable[[], Agent]
) -> None:
    """A second `stella beat` by mistake (same data dir, so the same schedule
    file): both keep running, every sweep runs twice, yet each agent is
    marked offline exactly once."""
    stack = beat_stack.stack
    since = len(beat_stack.worker_output())
    first_beat_since = len(beat_stack.beat.output())
    second = StellaProcess("beat", env=settings_env(stack.settings), log=stack.tmp / "beat2.log")
    with second:
        agents = [register() for _ in range(4)]
        second.wait_for(BEAT_STARTED)
        wait_for(
            lambda: all(beat_stack.agent(a.id)["status"] == "offline" for a in agents),
            8,
            "every agent marked offline",
        )
        # A few more sweeps from both beats: nothing is marked again.
        time.sleep(1.5)
        assert second.process is not None
        assert second.process.poll() is None, second.output()
        assert beat_stack.beat.process is not None
        assert beat_stack.beat.process.poll() is None, beat_stack.beat.output()
        second_output = second.output()

    assert second_output.count(SENT_MARK_OFFLINE) >= 2, second_output
    assert beat_stack.beat.output()[first_beat_since:].count(SENT_MARK_OFFLINE) >= 2
    assert "Traceback" not in second_output, second_output
    marked = [int(count) for count in MARKED.findall(beat_stack.worker_output(since))]
    assert sum(marked) == len(agents), marked
