"""Outcome unknown (app/tasks/lost_work.py), against both databases.

With STELLA_OUTCOME_UNKNOWN on, the offline sweep turns the non-idempotent
work in flight of the agents it marks into `unknown`; idempotent work and
pending work keep their course. The agent's own report later turns `unknown`
into the real outcome, once, whichever of the sweep and the report commits
first.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col

from app.db import transaction
from app.models import Agent
from app.models.types import utcnow
from app.settings import Settings
from app.sweeps import service as sweeps
from app.tasks import service
from app.tasks.lost_work import LOST_ERROR, mark_unknown
from app.tasks.schemas import TaskComplete
from app.tasks.types import idempotent_types, is_idempotent
from tests.conftest import AgentClient, Stack
from tests.metrics.helpers import scrape, value
from tests.sweeps.test_service import run_concurrently, wait_until_blocked
from tests.tasks.helpers import Register, create_task, delivered_task, view

SHORT = 5  # task timeout, seconds: the timeout sweep is run that far ahead


def enabled(stack: Stack) -> Settings:
    return stack.runtime.settings.model_copy(update={"outcome_unknown": True})


def go_silent(stack: Stack, agent: AgentClient) -> None:
    """The agent's last heartbeat an hour ago: the next offline sweep marks it."""
    with stack.runtime.engine.begin() as connection:
        connection.execute(
            update(Agent)
            .where(col(Agent.id) == uuid.UUID(agent.id))
            .values(last_heartbeat=utcnow() - dt.timedelta(hours=1))
        )


def sweep_offline(stack: Stack, settings: Settings) -> list[uuid.UUID]:
    with transaction(stack.runtime.engine) as session:
        return sweeps.mark_offline(session=session, settings=settings)


def statuses(operator: httpx.Client, task_ids: dict[str, str]) -> dict[str, str]:
    return {name: view(operator, task_id)["status"] for name, task_id in task_ids.items()}


def run_task(operator: httpx.Client, agent: AgentClient, task_type: str) -> str:
    """A task of `task_type` delivered to `agent` (assigned)."""
    return delivered_task(operator, agent, taskType=task_type, payload={}, timeout=SHORT)


def test_the_declaration() -> None:
    assert is_idempotent("docker.pull")
    for task_type in ("docker.run", "compose.up", "shell.exec", "k8s.apply"):
        assert not is_idempotent(task_type), task_type
    assert idempotent_types() == ("docker.pull",)


class TestTheOfflineSweep:
    def test_non_idempotent_work_in_flight_becomes_unknown(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        lost, alive = register(), register()
        tasks = {
            "run": run_task(operator, lost, "docker.run"),
            "compose": run_task(operator, lost, "compose.up"),
            "shell": run_task(operator, lost, "shell.exec"),
            "undeclared": run_task(operator, lost, "k8s.apply"),
            "pull": run_task(operator, lost, "docker.pull"),
            "elsewhere": run_task(operator, alive, "docker.run"),
        }
        # Running (progress reported), not only assigned.
        with transaction(stack.runtime.engine) as session:
            service.record_progress(
                session=session,
                agent_id=uuid.UUID(lost.id),
                task_id=uuid.UUID(tasks["compose"]),
                progress=40,
                message="half way",
            )
        done = run_task(operator, lost, "docker.run")
        assert lost.complete(done, success=False, error="exit 1").status_code == 200
        pending = create_task(operator, lost, taskType="docker.run", payload={})
        go_silent(stack, lost)

        assert sweep_offline(stack, enabled(stack)) == [uuid.UUID(lost.id)]

        assert statuses(operator, tasks) == {
            "run": "unknown",
            "compose": "unknown",
            "shell": "unknown",
            "undeclared": "unknown",
            "pull": "assigned",
            "elsewhere": "assigned",
        }
        assert view(operator, pending)["status"] == "pending"
        assert view(operator, done)["status"] == "failed"
        lost_view = view(operator, tasks["compose"])
        assert lost_view["error"] == LOST_ERROR
        assert lost_view["completedAt"] is None  # not final
        assert lost_view["progress"] == 40

        # Neither a later sweep nor the timeout touches them; the pull times out as today.
        assert sweep_offline(stack, enabled(stack)) == []
        with transaction(stack.runtime.engine) as session:
            ended = sweeps.time_out_tasks(
                session=session,
                settings=stack.runtime.settings,
                notifier=stack.runtime.notifier,
                now=utcnow() + dt.timedelta(seconds=SHORT + 1),
            )
        timed_out = {str(item.task_id) for item in ended}
        assert timed_out == {tasks["pull"], tasks["elsewhere"]}
        assert statuses(operator, tasks)["run"] == "unknown"

    def test_off_by_default_the_seed_course_is_kept(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = run_task(operator, agent, "docker.run")
        go_silent(stack, agent)
        assert stack.runtime.settings.outcome_unknown is False
        assert sweep_offline(stack, stack.runtime.settings) == [uuid.UUID(agent.id)]
        assert view(operator, task_id)["status"] == "assigned"

    def test_a_timeout_while_the_agent_is_offline_is_unknown_too(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        """Marked offline before the setting was on: the timeout sweep does not time it out."""
        agent = register()
        run, pull = (
            run_task(operator, agent, "docker.run"),
            run_task(operator, agent, "docker.pull"),
        )
        go_silent(stack, agent)
        assert sweep_offline(stack, stack.runtime.settings) == [uuid.UUID(agent.id)]
        assert view(operator, run)["status"] == "assigned"
        with transaction(stack.runtime.engine) as session:
            ended = sweeps.time_out_tasks(
                session=session,
                settings=enabled(stack),
                notifier=stack.runtime.notifier,
                now=utcnow() + dt.timedelta(seconds=SHORT + 1),
            )
        assert [str(item.task_id) for item in ended] == [pull]
        assert (view(operator, run)["status"], view(operator, pull)["status"]) == (
            "unknown",
            "timed_out",
        )

    def test_overlapping_runs_change_each_task_once(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agents = [register() for _ in range(3)]
        task_ids = {run_task(operator, agent, "docker.run") for agent in agents for _ in range(4)}
        for agent in agents:
            go_silent(stack, agent)
        marked = sweep_offline(stack, stack.runtime.settings)  # offline, tasks still assigned
        assert len(marked) == 3
        settings = enabled(stack)

        def run() -> list[uuid.UUID]:
            with transaction(stack.runtime.engine) as session:
                return mark_unknown(session=session, settings=settings, marked=marked)

        changed = [str(task_id) for result in run_concurrently(3, run) for task_id in result]
        assert sorted(changed) == sorted(task_ids)  # every task once, by one of the runs
        assert {view(operator, task_id)["status"] for task_id in task_ids} == {"unknown"}


class TestTheAgentsReport:
    def lost_task(
        self, stack: Stack, operator: httpx.Client, agent: AgentClient, task_type: str
    ) -> str:
        task_id = run_task(operator, agent, task_type)
        go_silent(stack, agent)
        assert sweep_offline(stack, enabled(stack)) == [uuid.UUID(agent.id)]
        assert view(operator, task_id)["status"] == "unknown"
        return task_id

    def test_turns_unknown_into_the_real_outcome_once(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent, other = register(), register()
        task_id = self.lost_task(stack, operator, agent, "docker.run")

        # Shown and filtered as such, counted by /metrics, and never handed out again.
        listed = operator.get("/api/v1/tasks", params={"status": "unknown"})
        assert listed.status_code == 200, listed.text
        assert [item["taskId"] for item in listed.json()] == [task_id]
        assert value(scrape(operator), "stella_tasks", status="unknown") == 1
        beat = agent.heartbeat()
        assert beat.status_code == 200, beat.text
        assert beat.json().get("tasks", []) == []
        polled = agent.poll().json()["tasks"]
        assert [(item["taskId"], item["status"]) for item in polled] == [(task_id, "unknown")]

        # Another agent cannot settle it; its own agent can, once.
        assert other.complete(task_id).status_code == 404
        result = {"containerId": "c0ffee"}
        assert agent.complete(task_id, result=result).status_code == 200
        settled = view(operator, task_id)
        assert (settled["status"], settled["result"], settled["error"]) == (
            "succeeded",
            result,
            None,
        )
        assert settled["completedAt"] is not None
        assert agent.complete(task_id, result=result).status_code == 200  # a repeat
        assert agent.complete(task_id, success=False, error="no").status_code == 409
        assert operator.get("/api/v1/tasks", params={"status": "unknown"}).json() == []
        assert value(scrape(operator), "stella_tasks", status="unknown") == 0

    def test_a_failure_report_is_kept_with_its_logs(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = self.lost_task(stack, operator, agent, "shell.exec")
        line = {"timestamp": "2026-01-10T14:23:45.000Z", "level": "info", "message": "ran"}
        response = agent.complete(task_id, success=False, error="interrupted", logs=[line])
        assert response.status_code == 200, response.text
        settled = view(operator, task_id)
        assert (settled["status"], settled["error"]) == ("failed", "interrupted")
        assert [item["message"] for item in settled["logs"]] == ["ran"]

    def test_an_operator_may_give_up_on_it(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = self.lost_task(stack, operator, agent, "compose.up")
        response = operator.post(f"/api/v1/tasks/{task_id}/cancel")
        assert response.status_code == 200, response.text
        assert view(operator, task_id)["status"] == "cancelled"
        assert agent.complete(task_id).status_code == 409  # too late now
        assert agent.poll().json()["tasks"] == []

    def test_an_unknown_filter_is_refused_only_when_misspelt(self, operator: httpx.Client) -> None:
        assert operator.get("/api/v1/tasks", params={"status": "unknown"}).status_code == 200
        assert operator.get("/api/v1/tasks", params={"status": "unknwn"}).status_code == 422


class TestTheRaceOfSweepAndReport:
    """The sweep and the agent's completion on one task, in both orders."""

    def prepare(self, stack: Stack, operator: httpx.Client, register: Register) -> tuple[str, str]:
        agent = register()
        task_id = run_task(operator, agent, "docker.run")
        go_silent(stack, agent)
        return agent.id, task_id

    def complete(self, stack: Stack, agent_id: str, task_id: str) -> None:
        with transaction(stack.runtime.engine) as session:
            service.complete(
                session=session,
                settings=stack.runtime.settings,
                agent_id=uuid.UUID(agent_id),
                task_id=uuid.UUID(task_id),
                report=TaskComplete(success=True, result={"exitCode": 0}),
            )

    def test_a_completion_first_keeps_its_outcome(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent_id, task_id = self.prepare(stack, operator, register)
        outcome: dict[str, Any] = {}

        def sweep() -> None:
            try:
                outcome["marked"] = sweep_offline(stack, enabled(stack))
            except BaseException as exc:  # asserted below
                outcome["error"] = exc

        sweeper = threading.Thread(target=sweep)
        with transaction(stack.runtime.engine) as session:
            service.complete(
                session=session,
                settings=stack.runtime.settings,
                agent_id=uuid.UUID(agent_id),
                task_id=uuid.UUID(task_id),
                report=TaskComplete(success=True, result={"exitCode": 0}),
            )
            # The sweep waits on the task's row (PostgreSQL) or the database (SQLite).
            sweeper.start()
            wait_until_blocked(stack)
        sweeper.join(timeout=30)

        assert not sweeper.is_alive()
        assert "error" not in outcome, outcome
        assert outcome["marked"] == [uuid.UUID(agent_id)]
        assert view(operator, task_id)["status"] == "succeeded"

    def test_a_completion_after_the_sweep_settles_unknown(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent_id, task_id = self.prepare(stack, operator, register)
        outcome: dict[str, Any] = {}

        def complete() -> None:
            try:
                self.complete(stack, agent_id, task_id)
                outcome["done"] = True
            except BaseException as exc:  # asserted below
                outcome["error"] = exc

        completer = threading.Thread(target=complete)
        settings = enabled(stack)
        with transaction(stack.runtime.engine) as session:
            assert sweeps.mark_offline(session=session, settings=settings) == [uuid.UUID(agent_id)]
            completer.start()
            wait_until_blocked(stack)
        completer.join(timeout=30)

        assert not completer.is_alive()
        assert outcome == {"done": True}
        settled = view(operator, task_id)
        assert (settled["status"], settled["result"]) == ("succeeded", {"exitCode": 0})

    @pytest.mark.parametrize("runs", [4])
    def test_concurrent_sweeps_and_completions_settle_every_task_once(
        self, stack: Stack, operator: httpx.Client, register: Register, runs: int
    ) -> None:
        agent = register()
        task_ids = [run_task(operator, agent, "docker.run") for _ in range(8)]
        go_silent(stack, agent)
        settings = enabled(stack)
        calls = iter(range(runs))
        lock = threading.Lock()

        def one() -> str:
            with lock:
                index = next(calls)
            if index % 2:
                sweep_offline(stack, settings)
                return "sweep"
            for task_id in task_ids[index // 2 :: 2]:
                self.complete(stack, agent.id, task_id)
            return "complete"

        assert sorted(run_concurrently(runs, one)) == ["complete", "complete", "sweep", "sweep"]
        assert {view(operator, task_id)["status"] for task_id in task_ids} == {"succeeded"}
