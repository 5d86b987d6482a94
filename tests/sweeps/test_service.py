"""app.sweeps.service: each sweep changes the right rows, once, even when runs overlap.

Service level, against the real database of the session stack (SQLite and
PostgreSQL). Time is passed in as `now` instead of slept through.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import select, text, update
from sqlmodel import Session, col

from app.agents.heartbeat_writer import Beat, write_beats
from app.agents.schemas import Heartbeat
from app.db import transaction
from app.models import Agent, Dispatch, RegistrationToken, Task
from app.models.types import utcnow
from app.notify import AgentEvent, LocalNotifier
from app.sweeps import service
from app.tasks import service as tasks_service
from app.tasks.schemas import TaskComplete
from app.tokens.service import hash_token
from pki import (
    generate_agent_key,
    issue_client_certificate,
    jwk_thumbprint,
    load_public_key_pem,
    public_key_pem,
)
from tests.conftest import AgentClient, Stack, agent_client

# The sweeps announce through whatever notifier they are given; this one is observable.
NOTIFIER = LocalNotifier()

CREDENTIALS: dict[str, object] = {"registry.password": "sweep-s3cr3t-0b7e"}
_names = itertools.count()


# --- helpers ---------------------------------------------------------------------------------


def agent_row(
    stack: Stack,
    *,
    status: str = "online",
    last_heartbeat: dt.datetime | None = None,
    cert_ttl: dt.timedelta = dt.timedelta(days=1),
) -> Agent:
    """An agent row as registration leaves it: a real key, certified for `cert_ttl`."""
    key = generate_agent_key()
    agent_id = uuid.uuid4()
    cert = issue_client_certificate(
        stack.runtime.ca, agent_id=agent_id, public_key=key.public_key(), ttl=cert_ttl
    )
    return Agent(
        id=agent_id,
        name=f"sweep-agent-{next(_names):05d}",
        status=status,
        last_heartbeat=last_heartbeat or utcnow(),
        public_key_pem=public_key_pem(key.public_key()),
        key_thumbprint=jwk_thumbprint(key.public_key()),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        cert_serial=format(cert.serial_number, "x"),
        cert_not_after=cert.not_valid_after_utc,
    )


def insert(stack: Stack, *rows: Any) -> None:
    with Session(stack.runtime.engine, expire_on_commit=False) as session:
        session.add_all(rows)
        session.commit()


def agent_status(stack: Stack) -> dict[uuid.UUID, str]:
    with stack.runtime.engine.connect() as connection:
        rows = connection.execute(select(col(Agent.id), col(Agent.status))).all()
    return {row.id: row.status for row in rows}


def load(stack: Stack, model: Any, row_id: uuid.UUID) -> Any:
    with Session(stack.runtime.engine) as session:
        return session.get(model, row_id)


def run_concurrently(count: int, target: Callable[[], Any]) -> list[Any]:
    """`target()` from `count` threads released together; their results (errors re-raised)."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[index] = target()
        except BaseException as exc:  # re-raised below, in the test's thread
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a sweep hung"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def wait_until_blocked(stack: Stack) -> None:
    """Give a concurrent transaction time to reach the lock the test holds.

    PostgreSQL says when a backend waits on a lock; SQLite cannot, so wait a
    moment there (the outcome asserted is the same either way).
    """
    engine = stack.runtime.engine
    if engine.dialect.name != "postgresql":
        time.sleep(0.3)
        return
    deadline = time.monotonic() + 10
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while True:
        with engine.connect() as connection:
            if connection.execute(query).scalar_one():
                return
        assert time.monotonic() < deadline, "the concurrent sweep never waited on the lock"
        time.sleep(0.02)


# --- mark_offline ----------------------------------------------------------------------------


class TestMarkOffline:
    """service.mark_offline: silent for heartbeat_interval x offline_after_missed."""

    def test_marks_only_stale_live_agents_and_returns_their_ids(self, stack: Stack) -> None:
        now = utcnow()
        settings = stack.runtime.settings
        limit = dt.timedelta(seconds=settings.heartbeat_interval * settings.offline_after_missed)
        second = dt.timedelta(seconds=1)
        stale_online = agent_row(stack, last_heartbeat=now - limit - second)
        stale_degraded = agent_row(stack, status="degraded", last_heartbeat=now - 10 * limit)
        inside = agent_row(stack, last_heartbeat=now - limit + second)
        fresh_degraded = agent_row(stack, status="degraded", last_heartbeat=now)
        already_offline = agent_row(stack, status="offline", last_heartbeat=now - 10 * limit)
        insert(stack, stale_online, stale_degraded, inside, fresh_degraded, already_offline)

        with transaction(stack.runtime.engine) as session:
            marked = service.mark_offline(session=session, settings=settings, now=now)

        assert sorted(marked) == sorted([stale_online.id, stale_degraded.id])
        assert agent_status(stack) == {
            stale_online.id: "offline",
            stale_degraded.id: "offline",
            inside.id: "online",
            fresh_degraded.id: "degraded",
            already_offline.id: "offline",
        }

    def test_offline_agents_are_not_returned_again(self, stack: Stack) -> None:
        now = utcnow()
        stale = agent_row(stack, last_heartbeat=now - dt.timedelta(hours=1))
        insert(stack, stale)
        settings = stack.runtime.settings
        with transaction(stack.runtime.engine) as session:
            assert service.mark_offline(session=session, settings=settings, now=now) == [stale.id]
        later = now + dt.timedelta(hours=1)
        with transaction(stack.runtime.engine) as session:
            assert service.mark_offline(session=session, settings=settings, now=later) == []

    def test_the_limit_follows_both_settings(self, stack: Stack) -> None:
        """10 s x 2 missed: 21 s of silence is too much, 19 s is not."""
        now = utcnow()
        settings = stack.runtime.settings.model_copy(
            update={"heartbeat_interval": 10, "offline_after_missed": 2}
        )
        past = agent_row(stack, last_heartbeat=now - dt.timedelta(seconds=21))
        within = agent_row(stack, last_heartbeat=now - dt.timedelta(seconds=19))
        insert(stack, past, within)
        with transaction(stack.runtime.engine) as session:
            assert service.mark_offline(session=session, settings=settings, now=now) == [past.id]
        assert agent_status(stack)[within.id] == "online"

    def test_a_rolled_back_run_changes_nothing(self, stack: Stack) -> None:
        now = utcnow()
        stale = agent_row(stack, last_heartbeat=now - dt.timedelta(hours=1))
        insert(stack, stale)
        with Session(stack.runtime.engine) as session:
            settings = stack.runtime.settings
            assert service.mark_offline(session=session, settings=settings, now=now) == [stale.id]
            session.rollback()
        assert agent_status(stack)[stale.id] == "online"

    @pytest.mark.parametrize(
        ("status", "reported"), [("online", "healthy"), ("degraded", "unhealthy")]
    )
    def test_a_heartbeat_racing_the_sweep_leaves_the_agent_live(
        self, stack: Stack, status: str, reported: str
    ) -> None:
        """Authentication has read the (stale) agent row when the sweep runs; the
        heartbeat that follows must still leave the agent live, not offline with
        a fresh lastHeartbeat. (SQLite serializes the two; PostgreSQL interleaves.)"""
        engine = stack.runtime.engine
        stale = agent_row(stack, status=status, last_heartbeat=utcnow() - dt.timedelta(hours=1))
        insert(stack, stale)
        outcome: dict[str, Any] = {}

        def sweep() -> None:
            try:
                with transaction(engine) as session:
                    outcome["marked"] = service.mark_offline(
                        session=session, settings=stack.runtime.settings
                    )
            except BaseException as exc:  # asserted below
                outcome["error"] = exc

        sweeper = threading.Thread(target=sweep)
        with Session(engine, expire_on_commit=False) as session:
            agent = session.get(Agent, stale.id)  # as authentication reads it
            assert agent is not None
            sweeper.start()
            sweeper.join(timeout=30 if engine.dialect.name == "postgresql" else 0.3)
            # What the heartbeat path writes, at once or behind: the status is
            # always written, so the sweep's "offline" cannot survive it.
            beat = Beat.of(stale.id, Heartbeat(status=reported), utcnow())
            assert write_beats(session.connection(), [beat]) == {stale.id}
            session.commit()
        sweeper.join(timeout=30)

        assert not sweeper.is_alive()
        assert "error" not in outcome, outcome
        if engine.dialect.name == "postgresql":
            assert outcome["marked"] == [stale.id], "the sweep was meant to run in between"
        row = load(stack, Agent, stale.id)
        assert row.status == status
        assert utcnow() - row.last_heartbeat < dt.timedelta(seconds=30)

    def test_four_concurrent_runs_mark_each_agent_once(self, stack: Stack) -> None:
        """200 stale agents, 4 overlapping sweeps: every id returned exactly once overall."""
        now = utcnow()
        stale = [
            agent_row(
                stack,
                status="online" if i % 3 else "degraded",
                last_heartbeat=now - dt.timedelta(minutes=10, seconds=i),
            )
            for i in range(200)
        ]
        fresh = [agent_row(stack, last_heartbeat=now) for _ in range(5)]
        insert(stack, *stale, *fresh)

        def sweep() -> list[uuid.UUID]:
            with transaction(stack.runtime.engine) as session:
                return service.mark_offline(
                    session=session, settings=stack.runtime.settings, now=now
                )

        results = run_concurrently(4, sweep)
        returned = [agent_id for result in results for agent_id in result]
        assert len(returned) == 200
        assert set(returned) == {agent.id for agent in stale}
        statuses = agent_status(stack)
        assert {statuses[agent.id] for agent in stale} == {"offline"}
        assert {statuses[agent.id] for agent in fresh} == {"online"}


class TestOfflineGraceAfterAnOutage:
    """No sweep for longer than the offline window: one window of grace before judging."""

    def sweep(self, stack: Stack, now: dt.datetime) -> list[uuid.UUID]:
        with transaction(stack.runtime.engine) as session:
            return service.mark_offline(session=session, settings=stack.runtime.settings, now=now)

    def window(self, stack: Stack) -> dt.timedelta:
        settings = stack.runtime.settings
        return dt.timedelta(seconds=settings.heartbeat_interval * settings.offline_after_missed)

    def test_sweeps_on_schedule_mark_at_once(self, stack: Stack) -> None:
        start, window = utcnow(), self.window(stack)
        assert self.sweep(stack, start) == []
        stale = agent_row(stack, last_heartbeat=start - 10 * window)
        insert(stack, stale)
        step = dt.timedelta(seconds=stack.runtime.settings.resolved_sweep_interval)
        assert self.sweep(stack, start + step) == [stale.id]

    def test_the_first_sweep_after_an_outage_holds(self, stack: Stack) -> None:
        start, window = utcnow(), self.window(stack)
        assert self.sweep(stack, start) == []
        back = start + 5 * window  # the control plane was down meanwhile
        silent = agent_row(stack, last_heartbeat=start - dt.timedelta(seconds=1))
        prompt = agent_row(stack, last_heartbeat=start - dt.timedelta(seconds=1))
        insert(stack, silent, prompt)

        assert self.sweep(stack, back) == []
        assert self.sweep(stack, back + window / 2) == [], "still within the grace"
        # The prompt agent is heard soon after the control plane is back.
        with transaction(stack.runtime.engine) as session:
            beat = Beat.of(prompt.id, Heartbeat(status="healthy"), back + window / 3)
            assert write_beats(session.connection(), [beat]) == {prompt.id}

        after = back + window + dt.timedelta(seconds=1)
        assert self.sweep(stack, after) == [silent.id]
        assert agent_status(stack) == {silent.id: "offline", prompt.id: "online"}

    def test_tasks_whose_timeout_passed_during_the_outage_wait_for_the_grace(
        self, stack: Stack
    ) -> None:
        start, window = utcnow(), self.window(stack)
        settings = stack.runtime.settings
        agent = agent_row(stack, last_heartbeat=start)
        task = task_row(stack, agent, assigned_at=start, timeout=1)
        insert(stack, agent)
        insert(stack, task)

        def time_out(now: dt.datetime) -> list[uuid.UUID]:
            with transaction(stack.runtime.engine) as session:
                ended = service.time_out_tasks(
                    session=session, settings=settings, notifier=NOTIFIER, now=now
                )
            return [item.task_id for item in ended]

        assert self.sweep(stack, start) == []  # the mark: sweeps ran until now
        back = start + 5 * window
        assert time_out(back) == [], "timed out before its agent could report"
        assert time_out(back + window / 2) == []  # the beat keeps running the sweeps
        assert time_out(back + window + dt.timedelta(seconds=1)) == [task.id]

    def test_concurrent_sweeps_after_an_outage_hold_alike(self, stack: Stack) -> None:
        start, window = utcnow(), self.window(stack)
        self.sweep(stack, start)
        insert(stack, *(agent_row(stack, last_heartbeat=start) for _ in range(20)))
        back = start + 5 * window
        results = run_concurrently(4, lambda: self.sweep(stack, back))
        assert results == [[], [], [], []]
        assert set(agent_status(stack).values()) == {"online"}


# --- time_out_tasks --------------------------------------------------------------------------


def task_row(
    stack: Stack,
    agent: Agent,
    *,
    status: str = "assigned",
    assigned_at: dt.datetime | None = None,
    timeout: int = 60,
) -> Task:
    task = tasks_service.new_task(
        settings=stack.runtime.settings,
        cipher=stack.runtime.cipher,
        agent_id=agent.id,
        task_type="shell.exec",
        payload={"command": "sleep 1000"},
        credentials=CREDENTIALS,
        timeout=timeout,
        priority=0,
    )
    task.status = status
    task.assigned_at = assigned_at
    if status in ("succeeded", "failed"):
        task.completed_at = assigned_at
        task.credentials_encrypted = None
    return task


@pytest.fixture
def events(stack: Stack) -> Iterator[Callable[[Agent], list[AgentEvent]]]:
    """Record what the notifier publishes for the agents asked about."""
    unsubscribes: list[Callable[[], None]] = []
    lock = threading.Lock()

    def listen(agent: Agent) -> list[AgentEvent]:
        received: list[AgentEvent] = []

        def listener(event: AgentEvent) -> None:
            with lock:
                received.append(event)

        unsubscribes.append(NOTIFIER.subscribe(agent.id, listener))
        return received

    yield listen
    for unsubscribe in unsubscribes:
        unsubscribe()


class TestTimeOutTasks:
    """service.time_out_tasks: assigned/running tasks past assigned_at + timeout."""

    def test_ends_overdue_work_and_leaves_the_rest(self, stack: Stack) -> None:
        now = utcnow()
        agent = agent_row(stack)
        ago = dt.timedelta(seconds=61)
        overdue_assigned = task_row(stack, agent, assigned_at=now - ago)
        overdue_running = task_row(stack, agent, status="running", assigned_at=now - ago)
        in_time = task_row(stack, agent, assigned_at=now - dt.timedelta(seconds=59))
        long_one = task_row(stack, agent, assigned_at=now - ago, timeout=3600)
        completed = task_row(stack, agent, status="succeeded", assigned_at=now - 10 * ago)
        pending = task_row(stack, agent, status="pending")
        pending.created_at = now - 10 * ago
        insert(stack, agent, overdue_assigned, overdue_running, in_time, long_one)
        insert(stack, completed, pending)

        with transaction(stack.runtime.engine) as session:
            ended = service.time_out_tasks(
                session=session, settings=stack.runtime.settings, notifier=NOTIFIER, now=now
            )

        expected = {overdue_assigned.id, overdue_running.id}
        assert {item.task_id for item in ended} == expected
        assert len(ended) == len(expected)
        assert {item.agent_id for item in ended} == {agent.id}
        for task_id in expected:
            task = load(stack, Task, task_id)
            assert task.status == "timed_out"
            assert task.completed_at == now
            assert task.error
            assert task.credentials_encrypted is None
        for task, status in (
            (in_time, "assigned"),
            (long_one, "assigned"),
            (completed, "succeeded"),
            (pending, "pending"),
        ):
            stored = load(stack, Task, task.id)
            assert stored.status == status
            assert stored.error is None
            assert stored.completed_at == task.completed_at
            assert stored.credentials_encrypted == task.credentials_encrypted

    def test_nothing_due_returns_nothing(self, stack: Stack) -> None:
        agent = agent_row(stack)
        fresh = task_row(stack, agent, assigned_at=utcnow())
        insert(stack, agent, fresh)
        with transaction(stack.runtime.engine) as session:
            ended = service.time_out_tasks(
                session=session, settings=stack.runtime.settings, notifier=NOTIFIER
            )
        assert ended == []
        assert load(stack, Task, fresh.id).status == fresh.status

    def test_the_agent_is_told_after_commit_only(
        self, stack: Stack, events: Callable[[Agent], list[AgentEvent]]
    ) -> None:
        now = utcnow()
        one, two, bystander = agent_row(stack), agent_row(stack), agent_row(stack)
        overdue = now - dt.timedelta(hours=1)
        task_a, task_b = task_row(stack, one, assigned_at=overdue), task_row(stack, one)
        task_c = task_row(stack, two, status="running", assigned_at=overdue)
        task_b.assigned_at = overdue
        insert(stack, one, two, bystander, task_a, task_b, task_c)
        heard = {agent.id: events(agent) for agent in (one, two, bystander)}

        with transaction(stack.runtime.engine) as session:
            ended = service.time_out_tasks(
                session=session, settings=stack.runtime.settings, notifier=NOTIFIER, now=now
            )
            assert len(ended) == 3
            assert heard == {one.id: [], two.id: [], bystander.id: []}, "announced before commit"

        assert sorted(heard[one.id], key=lambda e: str(e.task_id)) == sorted(
            [AgentEvent("task_cancelled", agent_id=one.id, task_id=t.id) for t in (task_a, task_b)],
            key=lambda e: str(e.task_id),
        )
        assert heard[two.id] == [AgentEvent("task_cancelled", agent_id=two.id, task_id=task_c.id)]
        assert heard[bystander.id] == []

    def test_a_rolled_back_run_announces_nothing(
        self, stack: Stack, events: Callable[[Agent], list[AgentEvent]]
    ) -> None:
        agent = agent_row(stack)
        task = task_row(stack, agent, assigned_at=utcnow() - dt.timedelta(hours=1))
        insert(stack, agent, task)
        heard = events(agent)
        with Session(stack.runtime.engine) as session:
            ended = service.time_out_tasks(
                session=session, settings=stack.runtime.settings, notifier=NOTIFIER
            )
            assert [item.task_id for item in ended] == [task.id]
            session.rollback()
        assert heard == []
        assert load(stack, Task, task.id).status == "assigned"

    def test_a_task_completed_concurrently_is_not_timed_out(
        self, stack: Stack, events: Callable[[Agent], list[AgentEvent]]
    ) -> None:
        """The agent's completion holds the row while the sweep runs: the sweep
        waits for it, then leaves the task alone (its guard sees the new state)."""
        now = utcnow()
        agent = agent_row(stack)
        racing = task_row(stack, agent, assigned_at=now - dt.timedelta(hours=1))
        other = task_row(stack, agent, assigned_at=now - dt.timedelta(hours=1))
        insert(stack, agent, racing, other)
        heard = events(agent)
        outcome: dict[str, Any] = {}

        def sweep() -> None:
            try:
                with transaction(stack.runtime.engine) as session:
                    outcome["ended"] = service.time_out_tasks(
                        session=session,
                        settings=stack.runtime.settings,
                        notifier=NOTIFIER,
                        now=now,
                    )
            except BaseException as exc:  # asserted below
                outcome["error"] = exc

        sweeper = threading.Thread(target=sweep)
        with transaction(stack.runtime.engine) as completer:
            tasks_service.complete(
                session=completer,
                settings=stack.settings,
                agent_id=agent.id,
                task_id=racing.id,
                report=TaskComplete(success=True, result={"exitCode": 0}),
            )
            sweeper.start()
            wait_until_blocked(stack)
        sweeper.join(timeout=30)

        assert not sweeper.is_alive()
        assert "error" not in outcome, outcome
        assert [item.task_id for item in outcome["ended"]] == [other.id]
        completed = load(stack, Task, racing.id)
        assert (completed.status, completed.result, completed.error) == (
            "succeeded",
            {"exitCode": 0},
            None,
        )
        assert load(stack, Task, other.id).status == "timed_out"
        assert heard == [AgentEvent("task_cancelled", agent_id=agent.id, task_id=other.id)]

    def test_two_concurrent_runs_end_each_task_once(
        self, stack: Stack, events: Callable[[Agent], list[AgentEvent]]
    ) -> None:
        now = utcnow()
        agents = [agent_row(stack) for _ in range(4)]
        tasks = [
            task_row(
                stack,
                agents[i % 4],
                status="assigned" if i % 2 else "running",
                assigned_at=now - dt.timedelta(minutes=5, seconds=i),
            )
            for i in range(60)
        ]
        insert(stack, *agents, *tasks)
        heard = [events(agent) for agent in agents]

        def sweep() -> list[service.TimedOut]:
            with transaction(stack.runtime.engine) as session:
                return service.time_out_tasks(
                    session=session, settings=stack.runtime.settings, notifier=NOTIFIER, now=now
                )

        first, second = run_concurrently(2, sweep)
        first_ids = {item.task_id for item in first}
        second_ids = {item.task_id for item in second}
        assert not first_ids & second_ids
        assert len(first) + len(second) == 60
        assert first_ids | second_ids == {task.id for task in tasks}
        announced = [event.task_id for received in heard for event in received]
        assert sorted(map(str, announced)) == sorted(str(task.id) for task in tasks)
        with stack.runtime.engine.connect() as connection:
            statuses = connection.execute(select(col(Task.status))).scalars().all()
        assert set(statuses) == {"timed_out"}


# --- issue_renewals --------------------------------------------------------------------------


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def stored_certificate(stack: Stack, agent_id: uuid.UUID) -> tuple[x509.Certificate, Agent]:
    agent = load(stack, Agent, agent_id)
    return x509.load_pem_x509_certificate(agent.cert_pem.encode()), agent


class TestIssueRenewals:
    """service.issue_renewals: live agents whose certificate expires within the
    renewal window plus two sweep intervals get their next certificate ahead."""

    def test_renews_live_agents_near_expiry_only(self, stack: Stack) -> None:
        settings = stack.runtime.settings
        lead = settings.cert_renewal_window + 2 * settings.resolved_sweep_interval
        due_online = agent_row(stack, cert_ttl=dt.timedelta(minutes=10))
        # Not yet inside the renewal window, but will be before the next sweeps run.
        due_ahead = agent_row(stack, status="degraded", cert_ttl=dt.timedelta(seconds=lead - 30))
        offline = agent_row(stack, status="offline", cert_ttl=dt.timedelta(minutes=10))
        far = agent_row(stack, cert_ttl=dt.timedelta(seconds=lead + 600))
        insert(stack, due_online, due_ahead, offline, far)
        before = {agent.id: stored_certificate(stack, agent.id)[0] for agent in (offline, far)}

        with transaction(stack.runtime.engine) as session:
            renewed = service.issue_renewals(
                session=session, ca=stack.runtime.ca, settings=settings
            )

        assert renewed == 2
        for old in (due_online, due_ahead):
            cert, row = stored_certificate(stack, old.id)
            assert cert.serial_number != int(old.cert_serial, 16)
            assert row.cert_serial == format(cert.serial_number, "x")
            assert row.cert_not_after == cert.not_valid_after_utc
            lifetime = (cert.not_valid_after_utc - utcnow()).total_seconds()
            assert lifetime == pytest.approx(settings.cert_ttl, abs=120)
            assert spki(cert) == spki(x509.load_pem_x509_certificate(old.cert_pem.encode()))
            assert cert.public_key() == load_public_key_pem(row.public_key_pem)
            cert.verify_directly_issued_by(stack.runtime.ca.cert)
            (common_name,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            assert common_name.value == str(old.id)
        for agent_id, old_cert in before.items():
            cert, _ = stored_certificate(stack, agent_id)
            assert cert.serial_number == old_cert.serial_number

        with transaction(stack.runtime.engine) as session:
            again = service.issue_renewals(session=session, ca=stack.runtime.ca, settings=settings)
        assert again == 0

    def test_two_concurrent_runs_issue_one_renewal_per_agent(self, stack: Stack) -> None:
        agents = [agent_row(stack, cert_ttl=dt.timedelta(minutes=10)) for _ in range(20)]
        insert(stack, *agents)

        def sweep() -> int:
            with transaction(stack.runtime.engine) as session:
                return service.issue_renewals(
                    session=session, ca=stack.runtime.ca, settings=stack.runtime.settings
                )

        counts = run_concurrently(2, sweep)
        assert sum(counts) == 20, counts
        for agent in agents:
            cert, row = stored_certificate(stack, agent.id)
            assert row.cert_serial != agent.cert_serial
            assert row.cert_serial == format(cert.serial_number, "x")
            assert (cert.not_valid_after_utc - utcnow()) > dt.timedelta(hours=23)

    def test_a_heartbeat_with_the_old_certificate_gets_the_issued_one(
        self,
        stack: Stack,
        register: Callable[..., AgentClient],
        operator: httpx.Client,
        tmp_path: Path,
    ) -> None:
        agent = register()
        key = serialization.load_pem_private_key(agent.key_file.read_bytes(), password=None)
        short = issue_client_certificate(
            stack.runtime.ca,
            agent_id=uuid.UUID(agent.id),
            public_key=key.public_key(),  # type: ignore[arg-type]
            ttl=dt.timedelta(minutes=10),
        )
        short_pem = short.public_bytes(serialization.Encoding.PEM).decode()
        with stack.runtime.engine.begin() as connection:
            connection.execute(
                update(Agent)
                .where(col(Agent.id) == uuid.UUID(agent.id))
                .values(
                    cert_pem=short_pem,
                    cert_serial=format(short.serial_number, "x"),
                    cert_not_after=short.not_valid_after_utc,
                )
            )

        with transaction(stack.runtime.engine) as session:
            renewed = service.issue_renewals(
                session=session, ca=stack.runtime.ca, settings=stack.runtime.settings
            )
        assert renewed == 1
        issued, row = stored_certificate(stack, uuid.UUID(agent.id))
        assert issued.serial_number != short.serial_number

        (tmp_path / "short").mkdir()
        with agent_client(
            stack,
            agent_id=agent.id,
            token=agent.token,
            cert_pem=short_pem,
            key_pem=agent.key_file.read_text(),
            tmp=tmp_path / "short",
        ) as client:
            response = client.post(
                f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"}
            )
        assert response.status_code == 200, response.text
        renewal = response.json()["certificateRenewal"]
        handed = x509.load_pem_x509_certificate(renewal["cert"].encode())
        assert handed.serial_number == issued.serial_number
        assert renewal["cert"] == row.cert_pem
        # Handing it out signed nothing new.
        detail = operator.get(f"/api/v1/agents/{agent.id}").json()
        assert detail["certificate"]["serial"] == format(issued.serial_number, "x")


# --- purge_tokens ----------------------------------------------------------------------------


def token_row(*, expires_at: dt.datetime, used_at: dt.datetime | None = None) -> RegistrationToken:
    return RegistrationToken(
        token_hash=hash_token(uuid.uuid4().hex),
        created_at=expires_at - dt.timedelta(hours=1),
        expires_at=expires_at,
        used_at=used_at,
        agent_id=uuid.uuid4() if used_at else None,
    )


class TestPurgeTokens:
    def test_deletes_expired_and_used_tokens_only(self, stack: Stack) -> None:
        now = utcnow()
        hour = dt.timedelta(hours=1)
        expired = token_row(expires_at=now - hour)
        expiring_now = token_row(expires_at=now)
        used = token_row(expires_at=now + hour, used_at=now - hour)
        used_and_expired = token_row(expires_at=now - hour, used_at=now - 2 * hour)
        live = token_row(expires_at=now + hour)
        live_soon_expiring = token_row(expires_at=now + dt.timedelta(seconds=1))
        insert(stack, expired, expiring_now, used, used_and_expired, live, live_soon_expiring)

        with transaction(stack.runtime.engine) as session:
            assert service.purge_tokens(session=session, now=now) == 4
        with stack.runtime.engine.connect() as connection:
            left = connection.execute(select(col(RegistrationToken.id))).scalars().all()
        assert sorted(left) == sorted([live.id, live_soon_expiring.id])
        with transaction(stack.runtime.engine) as session:
            assert service.purge_tokens(session=session, now=now) == 0

    def test_a_token_minted_through_the_api_survives(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        response = operator.post("/api/v1/registration-tokens", json={"ttlSeconds": 600})
        assert response.status_code == 201, response.text
        with transaction(stack.runtime.engine) as session:
            assert service.purge_tokens(session=session) == 0
        with transaction(stack.runtime.engine) as session:
            later = utcnow() + dt.timedelta(seconds=601)
            assert service.purge_tokens(session=session, now=later) == 1


# --- redrive_dispatches ----------------------------------------------------------------------


class RecordingJobs:
    """A JobQueue (our interface) that records what would have been sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: list[tuple[str, tuple[str, ...]]] = []

    def enqueue(self, name: str, *args: str) -> None:
        with self.lock:
            self.sent.append((name, args))


def dispatch_row(
    stack: Stack, *, status: str = "pending", updated_at: dt.datetime, capability: str = "fan"
) -> Dispatch:
    dispatch_id = uuid.uuid4()
    return Dispatch(
        id=dispatch_id,
        status=status,
        target={"capability": capability},
        task_type="shell.exec",
        payload={"command": "true"},
        credentials_encrypted=stack.runtime.cipher.encrypt(CREDENTIALS, owner=dispatch_id),
        timeout=90,
        created_at=updated_at,
        updated_at=updated_at,
        completed_at=updated_at if status == "done" else None,
    )


class TestRedriveDispatches:
    """service.redrive_dispatches: pending/expanding with no progress for dispatch_stall_after."""

    def test_enqueues_stalled_dispatches_once_after_commit(self, stack: Stack) -> None:
        now = utcnow()
        stall = dt.timedelta(seconds=stack.runtime.settings.dispatch_stall_after)
        second = dt.timedelta(seconds=1)
        stalled_pending = dispatch_row(stack, updated_at=now - stall - second)
        stalled_expanding = dispatch_row(stack, status="expanding", updated_at=now - 10 * stall)
        progressing = dispatch_row(stack, status="expanding", updated_at=now - stall + second)
        done = dispatch_row(stack, status="done", updated_at=now - 10 * stall)
        insert(stack, stalled_pending, stalled_expanding, progressing, done)
        jobs = RecordingJobs()

        with transaction(stack.runtime.engine) as session:
            redriven = service.redrive_dispatches(
                session=session, settings=stack.runtime.settings, jobs=jobs, now=now
            )
            assert jobs.sent == [], "enqueued before commit"

        expected = {stalled_pending.id, stalled_expanding.id}
        assert sorted(redriven) == sorted(expected)
        assert sorted(jobs.sent) == sorted(("dispatch.expand", (str(i),)) for i in expected)
        for dispatch_id in expected:
            assert load(stack, Dispatch, dispatch_id).updated_at == now
        assert load(stack, Dispatch, progressing.id).updated_at == progressing.updated_at
        untouched = load(stack, Dispatch, done.id)
        assert (untouched.status, untouched.updated_at) == ("done", done.updated_at)

        # Touched: not stalled again until another stall period has passed.
        with transaction(stack.runtime.engine) as session:
            again = service.redrive_dispatches(
                session=session, settings=stack.runtime.settings, jobs=jobs, now=now + stall
            )
        assert again == [progressing.id]
        assert len(jobs.sent) == 3

    def test_a_rolled_back_run_enqueues_nothing(self, stack: Stack) -> None:
        now = utcnow()
        stalled = dispatch_row(stack, updated_at=now - dt.timedelta(hours=1))
        insert(stack, stalled)
        jobs = RecordingJobs()
        with Session(stack.runtime.engine) as session:
            redriven = service.redrive_dispatches(
                session=session, settings=stack.runtime.settings, jobs=jobs, now=now
            )
            assert redriven == [stalled.id]
            session.rollback()
        assert jobs.sent == []
        assert load(stack, Dispatch, stalled.id).updated_at == stalled.updated_at

    def test_a_done_dispatch_is_never_redriven(self, stack: Stack) -> None:
        long_ago = utcnow() - dt.timedelta(days=30)
        done = dispatch_row(stack, status="done", updated_at=long_ago)
        insert(stack, done)
        jobs = RecordingJobs()
        with transaction(stack.runtime.engine) as session:
            assert (
                service.redrive_dispatches(
                    session=session, settings=stack.runtime.settings, jobs=jobs
                )
                == []
            )
        assert jobs.sent == []

    def test_two_concurrent_redrives_enqueue_each_dispatch_once(self, stack: Stack) -> None:
        now = utcnow()
        stalled = [
            dispatch_row(
                stack,
                status="pending" if i % 2 else "expanding",
                updated_at=now - dt.timedelta(minutes=5, seconds=i),
            )
            for i in range(30)
        ]
        done = dispatch_row(stack, status="done", updated_at=now - dt.timedelta(days=365))
        insert(stack, *stalled, done)
        jobs = RecordingJobs()

        def sweep() -> list[uuid.UUID]:
            with transaction(stack.runtime.engine) as session:
                return service.redrive_dispatches(
                    session=session, settings=stack.runtime.settings, jobs=jobs, now=now
                )

        first, second = run_concurrently(2, sweep)
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(d.id for d in stalled)
        sent_ids = [args[0] for name, args in jobs.sent if name == "dispatch.expand"]
        assert len(jobs.sent) == len(sent_ids) == 30
        assert sorted(sent_ids) == sorted(str(d.id) for d in stalled)

    def test_the_real_worker_expands_a_redriven_dispatch(
        self, stack: Stack, operator: httpx.Client, register: Callable[..., AgentClient]
    ) -> None:
        """A wake-up lost on the broker: the sweep re-drives through the real queue,
        and the session stack's worker fans the dispatch out to done."""
        fleet = [register(capabilities=["fan"]) for _ in range(3)]
        register(capabilities=["other"])
        stalled = dispatch_row(stack, updated_at=utcnow() - dt.timedelta(hours=1))
        insert(stack, stalled)

        with transaction(stack.runtime.engine) as session:
            redriven = service.redrive_dispatches(
                session=session, settings=stack.runtime.settings, jobs=stack.runtime.jobs
            )
        assert redriven == [stalled.id]

        deadline = time.monotonic() + 15
        while True:
            response = operator.get(f"/api/v1/dispatches/{stalled.id}")
            assert response.status_code == 200, response.text
            body = response.json()
            if body["status"] == "done":
                break
            assert time.monotonic() < deadline, f"re-driven dispatch not expanded: {body}"
            time.sleep(0.05)
        assert sorted(task["agentId"] for task in body["tasks"]) == sorted(a.id for a in fleet)
        assert {task["status"] for task in body["tasks"]} == {"pending"}
