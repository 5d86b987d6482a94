"""app.dispatch.service.expand: idempotent, safe to run at once, resumable after a crash."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select, update
from sqlmodel import Session, col

from app.db import insert_ignoring_conflicts
from app.dispatch import service
from app.models import Dispatch, Task
from app.tasks import service as tasks_service
from tests.conftest import AgentClient, Stack
from tests.dispatch.test_router import accepted, wait_done
from tests.tasks.helpers import CREDENTIALS, Register, set_agent_status

FLEET_SIZE = 10


@pytest.fixture
def fleet(register: Register) -> list[AgentClient]:
    """Ten online agents a "fan" dispatch matches, and one it does not."""
    register(capabilities=["other"])
    return [register(capabilities=["fan"], labels={"pool": "a"}) for _ in range(FLEET_SIZE)]


def new_dispatch(stack: Stack, *, status: str = "pending") -> uuid.UUID:
    """A dispatch row as `create` leaves it, inserted directly."""
    dispatch_id = uuid.uuid4()
    with Session(stack.runtime.engine) as session:
        session.add(
            Dispatch(
                id=dispatch_id,
                status=status,
                target={"capability": "fan", "labels": {"pool": "a"}},
                task_type="shell.exec",
                payload={"command": "true"},
                credentials_encrypted=stack.runtime.cipher.encrypt(CREDENTIALS, owner=dispatch_id),
                timeout=90,
                priority=2,
            )
        )
        session.commit()
    return dispatch_id


def tasks_per_agent(stack: Stack, dispatch_id: uuid.UUID | str) -> Counter[str]:
    with stack.runtime.engine.connect() as connection:
        agent_ids = connection.execute(
            select(col(Task.agent_id)).where(col(Task.dispatch_id) == uuid.UUID(str(dispatch_id)))
        ).scalars()
        return Counter(str(agent_id) for agent_id in agent_ids)


def task_ids(stack: Stack, dispatch_id: uuid.UUID) -> dict[str, str]:
    """agent id -> task id of the dispatch."""
    with stack.runtime.engine.connect() as connection:
        rows = connection.execute(
            select(col(Task.agent_id), col(Task.id)).where(col(Task.dispatch_id) == dispatch_id)
        ).all()
    return {str(agent_id): str(task_id) for agent_id, task_id in rows}


def dispatch_status(stack: Stack, dispatch_id: uuid.UUID) -> str:
    with stack.runtime.engine.connect() as connection:
        status: str = connection.execute(
            select(col(Dispatch.status)).where(col(Dispatch.id) == dispatch_id)
        ).scalar_one()
    return status


def run_concurrently(count: int, target: Any) -> list[Any]:
    """`target()` from `count` threads released together; their results (or errors)."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[index] = target()
        except BaseException as exc:  # returned, asserted by the caller
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


class TestExpand:
    """service.expand(runtime, dispatch_id)."""

    def test_creates_one_task_per_matching_agent_and_finishes(
        self, stack: Stack, fleet: list[AgentClient]
    ) -> None:
        dispatch_id = new_dispatch(stack)
        created = service.expand(runtime=stack.runtime, dispatch_id=dispatch_id, batch_size=3)
        assert created == FLEET_SIZE
        assert tasks_per_agent(stack, dispatch_id) == Counter({a.id: 1 for a in fleet})
        assert dispatch_status(stack, dispatch_id) == "done"
        # Each task carries the dispatch's work and its credentials, sealed for that task.
        with Session(stack.runtime.engine) as session:
            tasks = session.scalars(select(Task).where(col(Task.dispatch_id) == dispatch_id)).all()
            for task in tasks:
                assert (task.task_type, task.timeout, task.priority) == ("shell.exec", 90, 2)
                assert task.payload == {"command": "true"}
                assert task.status == "pending"
                assert task.credentials_encrypted is not None
                assert stack.runtime.cipher.decrypt(task.credentials_encrypted, owner=task.id) == (
                    CREDENTIALS
                )

    def test_again_after_it_finished_creates_nothing(
        self, stack: Stack, operator: httpx.Client, fleet: list[AgentClient]
    ) -> None:
        dispatch_id = accepted(operator, {"capability": "fan"})
        before = wait_done(operator, dispatch_id)
        assert len(before["tasks"]) == FLEET_SIZE
        again = service.expand(runtime=stack.runtime, dispatch_id=uuid.UUID(dispatch_id))
        assert again == 0
        assert tasks_per_agent(stack, dispatch_id) == Counter({a.id: 1 for a in fleet})

    def test_a_finished_dispatch_ignores_agents_that_came_later(
        self, stack: Stack, fleet: list[AgentClient], register: Register
    ) -> None:
        dispatch_id = new_dispatch(stack)
        assert service.expand(runtime=stack.runtime, dispatch_id=dispatch_id) == FLEET_SIZE
        register(capabilities=["fan"], labels={"pool": "a"})
        assert service.expand(runtime=stack.runtime, dispatch_id=dispatch_id) == 0
        assert sum(tasks_per_agent(stack, dispatch_id).values()) == FLEET_SIZE

    def test_unknown_dispatch_creates_nothing(self, stack: Stack) -> None:
        assert service.expand(runtime=stack.runtime, dispatch_id=uuid.uuid4()) == 0

    def test_four_expansions_at_once_create_each_task_once(
        self, stack: Stack, fleet: list[AgentClient]
    ) -> None:
        dispatch_id = new_dispatch(stack)
        results = run_concurrently(
            4,
            lambda: service.expand(runtime=stack.runtime, dispatch_id=dispatch_id, batch_size=3),
        )
        assert all(isinstance(result, int) for result in results), results
        assert sum(results) == FLEET_SIZE
        assert tasks_per_agent(stack, dispatch_id) == Counter({a.id: 1 for a in fleet})
        assert dispatch_status(stack, dispatch_id) == "done"

    def test_resumes_after_a_crash_creating_only_the_missing_tasks(
        self, stack: Stack, fleet: list[AgentClient]
    ) -> None:
        dispatch_id = new_dispatch(stack)
        assert service.expand(runtime=stack.runtime, dispatch_id=dispatch_id, batch_size=3) == 10
        survivors = task_ids(stack, dispatch_id)
        lost = sorted(survivors)[::3]  # as if those batches never committed
        with stack.runtime.engine.begin() as connection:
            connection.execute(
                delete(Task).where(
                    col(Task.dispatch_id) == dispatch_id,
                    col(Task.agent_id).in_([uuid.UUID(agent_id) for agent_id in lost]),
                )
            )
            connection.execute(
                update(Dispatch).where(col(Dispatch.id) == dispatch_id).values(status="expanding")
            )
        for agent_id in lost:
            del survivors[agent_id]

        created = service.expand(runtime=stack.runtime, dispatch_id=dispatch_id, batch_size=3)
        assert created == len(lost)
        after = task_ids(stack, dispatch_id)
        assert sorted(after) == sorted(agent.id for agent in fleet)
        # The tasks that survived the crash are the same rows, not recreated.
        assert {agent_id: after[agent_id] for agent_id in survivors} == survivors
        assert dispatch_status(stack, dispatch_id) == "done"

    def test_resumes_a_half_expanded_dispatch(self, stack: Stack, fleet: list[AgentClient]) -> None:
        dispatch_id = new_dispatch(stack, status="expanding")
        half = fleet[: FLEET_SIZE // 2]
        with Session(stack.runtime.engine) as session:
            rows = []
            for agent in half:
                task = tasks_service.new_task(
                    settings=stack.runtime.settings,
                    cipher=stack.runtime.cipher,
                    agent_id=uuid.UUID(agent.id),
                    task_type="shell.exec",
                    payload={"command": "true"},
                    credentials=CREDENTIALS,
                    timeout=90,
                    priority=2,
                    dispatch_id=dispatch_id,
                )
                rows.append({column: getattr(task, column) for column in Task.model_fields})
            insert_ignoring_conflicts(
                session,
                Task,
                rows,
                conflict_columns=("dispatch_id", "agent_id"),
                returning=("id",),
            )
            session.commit()
        before = task_ids(stack, dispatch_id)

        results = run_concurrently(
            2,
            lambda: service.expand(runtime=stack.runtime, dispatch_id=dispatch_id, batch_size=3),
        )
        assert sum(results) == FLEET_SIZE - len(half)
        after = task_ids(stack, dispatch_id)
        assert sorted(after) == sorted(agent.id for agent in fleet)
        assert {agent.id: after[agent.id] for agent in half} == before
        assert dispatch_status(stack, dispatch_id) == "done"

    def test_leaves_out_agents_that_are_not_online(
        self, stack: Stack, fleet: list[AgentClient]
    ) -> None:
        offline, degraded = fleet[0], fleet[1]
        set_agent_status(stack, offline, "offline")
        assert degraded.heartbeat(status="unhealthy").status_code == 200
        dispatch_id = new_dispatch(stack)
        assert service.expand(runtime=stack.runtime, dispatch_id=dispatch_id) == FLEET_SIZE - 2
        assert set(tasks_per_agent(stack, dispatch_id)) == {a.id for a in fleet[2:]}
        with stack.runtime.engine.connect() as connection:
            total = connection.execute(select(func.count()).select_from(Task)).scalar_one()
        assert total == FLEET_SIZE - 2
