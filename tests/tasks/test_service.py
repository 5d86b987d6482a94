"""app.tasks.service against both databases: claims and transitions under concurrency."""

from __future__ import annotations

import threading
import uuid

import httpx
from sqlalchemy import select
from sqlmodel import col

from app.db import transaction
from app.models import Task
from app.tasks import service
from tests.conftest import AgentClient, Stack
from tests.tasks.helpers import Register, create_task, delivered_task, view


class TestClaimPending:
    """service.claim_pending: each pending task goes to exactly one claim."""

    def test_claims_best_first_and_only_pending(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        already = delivered_task(operator, agent, priority=100)
        low = create_task(operator, agent, priority=1)
        high = create_task(operator, agent, priority=9)
        with transaction(stack.runtime.engine) as session:
            claimed = service.claim_pending(session=session, agent_id=uuid.UUID(agent.id), limit=1)
        assert [str(task.id) for task in claimed] == [high]
        with transaction(stack.runtime.engine) as session:
            claimed = service.claim_pending(session=session, agent_id=uuid.UUID(agent.id))
        assert [str(task.id) for task in claimed] == [low]
        assert view(operator, already)["status"] == "assigned"

    def test_concurrent_claims_never_hand_a_task_out_twice(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        agent_id = uuid.UUID(agent.id)
        created = {create_task(operator, agent) for _ in range(12)}
        claims: list[list[str]] = []
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def claimer() -> None:
            try:
                barrier.wait(timeout=10)
                while True:
                    with transaction(stack.runtime.engine) as session:
                        batch = service.claim_pending(session=session, agent_id=agent_id, limit=3)
                        more = service.has_pending(session=session, agent_id=agent_id)
                    claims.append([str(task.id) for task in batch])
                    if not batch and not more:
                        return
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=claimer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        handed_out = [task_id for batch in claims for task_id in batch]
        assert sorted(handed_out) == sorted(created)  # every task once, none twice
        with stack.runtime.engine.connect() as connection:
            statuses = connection.execute(
                select(col(Task.status)).where(col(Task.agent_id) == agent_id)
            ).scalars()
            assert set(statuses) == {"assigned"}

    def test_a_claim_takes_only_its_agents_tasks(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent, other = register(), register()
        create_task(operator, other)
        with transaction(stack.runtime.engine) as session:
            assert service.claim_pending(session=session, agent_id=uuid.UUID(agent.id)) == []
            assert service.has_pending(session=session, agent_id=uuid.UUID(other.id))


class TestCompleteVersusCancel:
    """service.complete racing service.cancel: the task ends in exactly one state."""

    @staticmethod
    def race(operator: httpx.Client, agent: AgentClient, task_id: str) -> dict[str, int]:
        barrier = threading.Barrier(2)
        answers: dict[str, int] = {}

        def cancel() -> None:
            barrier.wait(timeout=10)
            answers["cancel"] = operator.post(f"/api/v1/tasks/{task_id}/cancel").status_code

        def complete() -> None:
            barrier.wait(timeout=10)
            answers["complete"] = agent.complete(task_id).status_code

        threads = [threading.Thread(target=cancel), threading.Thread(target=complete)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        return answers

    def test_one_of_them_wins(self, operator: httpx.Client, register: Register) -> None:
        agent = register()
        for task_id in [delivered_task(operator, agent) for _ in range(4)]:
            answers = self.race(operator, agent, task_id)
            status = view(operator, task_id)["status"]
            assert status in ("cancelled", "succeeded")
            if status == "cancelled":
                assert answers == {"cancel": 200, "complete": 409}
            else:
                assert answers == {"cancel": 409, "complete": 200}


class TestClaimPendingForAgents:
    """service.claim_pending_for_agents: the streams' batched claim, as exactly-once."""

    def test_each_agent_gets_its_own_best_first_up_to_the_limit(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        one, two, idle = register(), register(), register()
        low = create_task(operator, one, priority=1)
        high = create_task(operator, one, priority=9)
        middle = create_task(operator, one, priority=5)
        theirs = create_task(operator, two)
        ids = [uuid.UUID(agent.id) for agent in (one, two, idle)]
        with transaction(stack.runtime.engine) as session:
            claimed = service.claim_pending_for_agents(session=session, agent_ids=ids, limit=2)
        got = {agent_id: [str(task.id) for task in tasks] for agent_id, tasks in claimed.items()}
        assert got == {ids[0]: [high, middle], ids[1]: [theirs], ids[2]: []}
        with transaction(stack.runtime.engine) as session:
            claimed = service.claim_pending_for_agents(session=session, agent_ids=ids, limit=2)
        assert [str(task.id) for task in claimed[ids[0]]] == [low]

    def test_concurrent_batches_never_hand_a_task_out_twice(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agents = [register() for _ in range(3)]
        ids = [uuid.UUID(agent.id) for agent in agents]
        created = {create_task(operator, agent) for agent in agents for _ in range(4)}
        handed: list[str] = []
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def claimer() -> None:
            try:
                barrier.wait(timeout=10)
                while True:
                    with transaction(stack.runtime.engine) as session:
                        batch = service.claim_pending_for_agents(
                            session=session, agent_ids=ids, limit=1
                        )
                    tasks = [str(task.id) for tasks in batch.values() for task in tasks]
                    handed.extend(tasks)
                    if not tasks:
                        return
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=claimer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert sorted(handed) == sorted(created)
