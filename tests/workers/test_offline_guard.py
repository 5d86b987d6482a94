"""The mass-offline guard with real `stella worker` and `stella beat` processes.

Every agent stops heartbeating at once while STELLA_OFFLINE_GUARD_PERCENT is
on: none is marked offline until the grace passes. Agents heard again during
the grace stay online; the ones still silent are marked after it. One stack
per backend (SQLite with the embedded broker, PostgreSQL with Redis); one-second
heartbeat and sweep intervals, offline after three missed heartbeats.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.models.types import utcnow
from tests.conftest import (
    Stack,
    operator_client,
    register_agent,
    start_stack,
    truncate,
)
from tests.processes import StellaProcess, settings_env

pytestmark = pytest.mark.slow

MISSED = 3
GRACE = 3  # seconds
FLEET = 4
BEAT_STARTED = "beat: Starting"


@dataclass
class BeatingAgent:
    """A registered agent heartbeating every second in a thread, until told to stop."""

    id: str
    http: httpx.Client
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            response = self.http.post(
                f"/api/v1/agents/{self.id}/heartbeat", json={"status": "healthy"}
            )
            assert response.status_code == 200, response.text
            self.stop.wait(0.5)

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


@pytest.fixture
def guarded_stack(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, StellaProcess, httpx.Client]]:
    broker = "embedded" if backend == "sqlite" else "redis"
    tmp = tmp_path_factory.mktemp(f"guard-{backend}")
    running = contextmanager(start_stack)(
        tmp,
        database_url,
        broker=broker,
        heartbeat_interval=1,
        offline_after_missed=MISSED,
        sweep_interval=1,
        offline_guard_percent=50,
        offline_guard_grace=GRACE,
    )
    with running as stack:
        truncate(stack.runtime)
        beat = StellaProcess("beat", env=settings_env(stack.settings), log=tmp / "beat.log")
        with (
            beat,
            operator_client(stack) as operator,
        ):
            beat.wait_for(BEAT_STARTED)
            yield stack, beat, operator
        assert "Traceback" not in beat.output(), beat.output()
        truncate(stack.runtime)


def register(stack: Stack, operator: httpx.Client, tmp: Path) -> BeatingAgent:
    data, http = register_agent(stack, operator, tmp, name=f"guard-{uuid.uuid4().hex[:12]}")
    agent = BeatingAgent(id=data["agentId"], http=http)
    agent.start()  # at once: a lone silent agent would be 100 % of the fleet
    return agent


def statuses(operator: httpx.Client, agents: list[BeatingAgent]) -> dict[str, str]:
    response = operator.get("/api/v1/agents", params={"limit": 100})
    assert response.status_code == 200, response.text
    by_id = {agent["id"]: agent["status"] for agent in response.json()}
    return {agent.id: by_id[agent.id] for agent in agents}


def guard_view(operator: httpx.Client) -> dict[str, Any]:
    response = operator.get("/api/v1/sweeps/guard")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_every_heartbeat_stopping_at_once_marks_none_offline_until_the_grace_passes(
    guarded_stack: tuple[Stack, StellaProcess, httpx.Client], tmp_path: Path
) -> None:
    stack, _beat, operator = guarded_stack
    agents = [register(stack, operator, tmp_path) for _ in range(FLEET)]
    try:
        # Heard for a moment, then every heartbeat stops at once.
        wait(lambda: set(statuses(operator, agents).values()) == {"online"}, 10, "fleet online")
        threading.Event().wait(1.0)
        for agent in agents:
            agent.halt()
        stopped = utcnow()

        # The first sweep to see them silent engages the guard and marks none.
        def engaged() -> bool:
            assert "offline" not in statuses(operator, agents).values(), "marked before the guard"
            return bool(guard_view(operator)["engaged"])

        wait(engaged, MISSED + 8, "the guard never engaged")
        view = guard_view(operator)
        assert view["reason"] == "percent"
        assert view["silentWhenEngaged"] == FLEET
        assert 1 <= view["agentsHeld"] <= FLEET  # past the window now; all of them soon
        since = dt.datetime.fromisoformat(view["since"])
        until = dt.datetime.fromisoformat(view["until"])
        assert since - stopped >= dt.timedelta(seconds=MISSED - 1)  # last beats up to 0.5 s before
        assert until - since == dt.timedelta(seconds=GRACE)

        # Half the fleet is heard again during the grace; no one is marked within it.
        returning, silent = agents[: FLEET // 2], agents[FLEET // 2 :]
        for agent in returning:
            agent.start()
        while utcnow() < until - dt.timedelta(seconds=0.2):
            assert set(statuses(operator, agents).values()) == {"online"}, "marked in the grace"
            threading.Event().wait(0.1)

        # After it: the still silent are marked (half the fleet, over the percentage).
        wait(
            lambda: all(statuses(operator, silent)[a.id] == "offline" for a in silent),
            MISSED + 5,
            "the still silent were never marked offline",
        )
        assert not guard_view(operator)["engaged"]
        threading.Event().wait(1.5)  # a few more sweeps: the event does not engage it again
        assert set(statuses(operator, returning).values()) == {"online"}
        view = guard_view(operator)
        assert not view["engaged"]
        assert view["engagements"] == {"outage": 0, "percent": 1}
    finally:
        for agent in agents:
            agent.halt()
            agent.http.close()
    worker_log = (stack.tmp / "worker.log").read_text(errors="replace")
    assert (
        "offline guard engaged (percent): 4 of 4 live agents (100.0 %) falling silent" in worker_log
    ), worker_log
    assert "offline guard released (percent" in worker_log, worker_log


def wait(condition: Any, timeout: float, what: str) -> None:
    deadline = utcnow() + dt.timedelta(seconds=timeout)
    while not condition():
        assert utcnow() < deadline, f"{what} within {timeout} s"
        threading.Event().wait(0.1)
