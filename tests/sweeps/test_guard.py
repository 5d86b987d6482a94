"""app.sweeps.guard: the mass-offline guard holds the offline sweep, then lets go once.

Service level, against the real database of the session stack (SQLite and
PostgreSQL); time is passed in as `now`. The beat runs the sweeps every
sweep interval, so the tests do too (a longer gap would be an outage of
the control plane, the guard's other reason).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from functools import partial
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select
from sqlmodel import col

from app.agents.heartbeat_writer import Beat, write_beats
from app.agents.schemas import Heartbeat
from app.db import transaction
from app.models import Agent, SweepMark
from app.models.types import utcnow
from app.settings import Settings
from app.sweeps import guard, service
from tests.api.problems import assert_problem
from tests.conftest import Stack
from tests.metrics.helpers import scrape, value
from tests.sweeps.test_service import (
    NOTIFIER,
    agent_row,
    agent_status,
    insert,
    run_concurrently,
    task_row,
)

PERCENT = 20.0


class Fleet:
    """Agent rows, and the sweeps and heartbeats a test drives through time."""

    def __init__(self, stack: Stack, **settings: Any) -> None:
        self.stack = stack
        self.settings: Settings = stack.runtime.settings.model_copy(update=settings)
        self.window = guard.offline_window(self.settings)
        self.step = dt.timedelta(seconds=self.settings.resolved_sweep_interval)

    def agents(
        self, count: int, *, last_heartbeat: dt.datetime, status: str = "online"
    ) -> list[Agent]:
        rows = [
            agent_row(self.stack, status=status, last_heartbeat=last_heartbeat)
            for _ in range(count)
        ]
        insert(self.stack, *rows)
        return rows

    def sweep(self, now: dt.datetime) -> list[uuid.UUID]:
        with transaction(self.stack.runtime.engine) as session:
            return service.mark_offline(session=session, settings=self.settings, now=now)

    def beat(self, agents: Iterable[Agent], at: dt.datetime) -> None:
        beats = [Beat.of(agent.id, Heartbeat(status="healthy"), at) for agent in agents]
        with transaction(self.stack.runtime.engine) as session:
            assert write_beats(session.connection(), beats) == {beat.agent_id for beat in beats}

    def state(self, now: dt.datetime) -> guard.GuardState:
        with transaction(self.stack.runtime.engine) as session:
            return guard.state(session=session, settings=self.settings, now=now)

    def offline(self) -> set[uuid.UUID]:
        return {
            agent_id for agent_id, status in agent_status(self.stack).items() if status == "offline"
        }


def truncate_mark(stack: Stack) -> None:
    """Forget the guard (and when the sweeps last ran)."""
    with transaction(stack.runtime.engine) as session:
        session.execute(delete(SweepMark))


def ids(agents: Iterable[Agent]) -> set[uuid.UUID]:
    return {agent.id for agent in agents}


class TestOffByDefault:
    def test_a_whole_silent_fleet_is_marked_at_once(self, stack: Stack) -> None:
        fleet = Fleet(stack)
        assert fleet.settings.offline_guard_percent == 0
        now = utcnow()
        silent = fleet.agents(10, last_heartbeat=now - fleet.window - dt.timedelta(seconds=1))
        assert set(fleet.sweep(now)) == ids(silent)
        state = fleet.state(now)
        assert not state.engaged
        assert state.engagements == {"outage": 0, "percent": 0}


class TestPercentTrigger:
    @pytest.mark.parametrize(
        ("silent", "fresh", "offline", "trips"),
        [
            (1, 4, 0, False),  # 20 %: not more than the percentage
            (1, 3, 0, True),  # 25 %
            (1, 3, 10, True),  # 25 % of the live agents: offline ones do not count
            (2, 38, 0, False),  # 5 %: the live agents are counted only so far
            (0, 5, 0, False),
        ],
    )
    def test_more_than_the_percentage_of_live_agents_silent_engages_the_guard(
        self, stack: Stack, silent: int, fresh: int, offline: int, trips: bool
    ) -> None:
        fleet = Fleet(stack, offline_guard_percent=PERCENT)
        now = utcnow()
        quiet = fleet.agents(silent, last_heartbeat=now - fleet.window - dt.timedelta(seconds=1))
        fleet.agents(fresh, last_heartbeat=now, status="degraded")
        fleet.agents(offline, last_heartbeat=now - 10 * fleet.window, status="offline")

        marked = fleet.sweep(now)

        state = fleet.state(now)
        assert state.engaged is trips
        if trips:
            assert marked == []
            assert not fleet.offline() & ids(quiet)
            assert (state.reason, state.since, state.until) == ("percent", now, now + fleet.window)
            assert state.silent_when_engaged == state.agents_held == silent
            assert state.engagements == {"outage": 0, "percent": 1}
        else:
            assert set(marked) == ids(quiet)
            assert state.engagements == {"outage": 0, "percent": 0}

    def test_a_fleet_silenced_at_once_trips_it_on_the_first_sweep_that_sees_any_of_it(
        self, stack: Stack
    ) -> None:
        """Last heartbeats spread over one interval: one agent is past the window,
        the others are a heartbeat short of it; together they are the event."""
        fleet = Fleet(stack, offline_guard_percent=PERCENT)
        now = utcnow()
        interval = dt.timedelta(seconds=fleet.settings.heartbeat_interval)
        first = fleet.agents(1, last_heartbeat=now - fleet.window - dt.timedelta(seconds=1))
        falling = fleet.agents(8, last_heartbeat=now - fleet.window + interval / 2)
        heard = fleet.agents(1, last_heartbeat=now - interval / 2)

        assert fleet.sweep(now) == []
        state = fleet.state(now)
        assert (state.reason, state.silent_when_engaged, state.agents_held) == ("percent", 9, 1)
        assert fleet.offline() == set()

        # Without the look-ahead's company, the one past the window is just one agent.
        fleet.beat([*falling, *heard], now)
        truncate_mark(stack)
        assert fleet.sweep(now) == [first[0].id]

    def test_agents_heard_during_the_grace_stay_and_the_still_silent_are_marked_after_it(
        self, stack: Stack
    ) -> None:
        fleet = Fleet(stack, offline_guard_percent=PERCENT)
        start = utcnow()
        fresh = fleet.agents(4, last_heartbeat=start)
        silent = fleet.agents(6, last_heartbeat=start - fleet.window - dt.timedelta(seconds=1))
        returning, lost = silent[:3], silent[3:]

        assert fleet.sweep(start) == []  # 60 % silent
        now = start
        while now + fleet.step < start + fleet.window:
            now += fleet.step
            fleet.beat([*fresh, *returning], now)
            assert fleet.sweep(now) == [], "marked within the grace"
            assert fleet.state(now).agents_held == len(lost)
        assert fleet.offline() == set()

        # After the grace: the still silent, 30 % of the fleet, are marked all the same.
        now = start + fleet.window
        fleet.beat([*fresh, *returning], now)
        assert set(fleet.sweep(now)) == ids(lost)
        assert fleet.offline() == ids(lost)
        state = fleet.state(now)
        assert not state.engaged
        assert state.engagements == {"outage": 0, "percent": 1}

        # The same event does not engage it again; a new one does.
        now += fleet.step
        fleet.beat([*fresh, *returning], now)
        assert fleet.sweep(now) == []
        assert fleet.state(now).engagements["percent"] == 1
        last_beat = now  # the three that returned fall silent: 3 of 7
        while now <= last_beat + fleet.window:
            now += fleet.step
            fleet.beat(fresh, now)
            assert fleet.sweep(now) == []
        state = fleet.state(now)
        assert (state.engaged, state.reason, state.silent_when_engaged) == (True, "percent", 3)
        assert state.engagements["percent"] == 2

    def test_the_grace_follows_its_setting(self, stack: Stack) -> None:
        fleet = Fleet(stack, offline_guard_percent=PERCENT, offline_guard_grace=150)
        grace = dt.timedelta(seconds=150)
        assert grace > fleet.window
        start = utcnow()
        fresh = fleet.agents(7, last_heartbeat=start)
        silent = fleet.agents(3, last_heartbeat=start - fleet.window - dt.timedelta(seconds=1))
        assert fleet.sweep(start) == []
        assert fleet.state(start).until == start + grace
        now = start
        while now + fleet.step < start + grace:
            now += fleet.step
            fleet.beat(fresh, now)
            assert fleet.sweep(now) == [], f"marked {now - start} into a grace of {grace}"
        now = start + grace
        fleet.beat(fresh, now)
        assert set(fleet.sweep(now)) == ids(silent)

    def test_the_timeout_sweep_does_not_hold_for_the_percent_reason(self, stack: Stack) -> None:
        fleet = Fleet(stack, offline_guard_percent=PERCENT)
        now = utcnow()
        (agent,) = fleet.agents(1, last_heartbeat=now - fleet.window - dt.timedelta(seconds=1))
        task = task_row(stack, agent, assigned_at=now - dt.timedelta(seconds=120), timeout=60)
        insert(stack, task)
        assert fleet.sweep(now) == []
        assert fleet.state(now).reason == "percent"
        with transaction(stack.runtime.engine) as session:
            ended = service.time_out_tasks(
                session=session, settings=fleet.settings, notifier=NOTIFIER, now=now
            )
        assert [item.task_id for item in ended] == [task.id]


class TestOutageReason:
    def test_an_outage_engages_the_guard_and_its_end_marks_the_still_silent_over_the_percentage(
        self, stack: Stack
    ) -> None:
        fleet = Fleet(stack, offline_guard_percent=PERCENT)
        start = utcnow()
        assert fleet.sweep(start) == []
        agents = fleet.agents(10, last_heartbeat=start)
        prompt, silent = agents[:5], agents[5:]
        back = start + 5 * fleet.window  # no sweep meanwhile: the control plane was down

        assert fleet.sweep(back) == []
        state = fleet.state(back)
        assert (state.engaged, state.reason, state.since) == (True, "outage", back)
        assert state.until == back + fleet.window
        assert state.silent_when_engaged == 10
        assert state.engagements == {"outage": 1, "percent": 0}
        now = back
        while now + fleet.step < back + fleet.window:
            now += fleet.step
            fleet.beat(prompt, now)
            assert fleet.sweep(now) == []
        now = back + fleet.window
        fleet.beat(prompt, now)
        # Half the fleet, over the percentage: the grace was theirs, no second hold.
        assert set(fleet.sweep(now)) == ids(silent)
        assert fleet.state(now).engagements == {"outage": 1, "percent": 0}


class TestConcurrentSweeps:
    def test_overlapping_sweeps_engage_once_and_mark_each_agent_once_after_the_grace(
        self, stack: Stack
    ) -> None:
        fleet = Fleet(stack, offline_guard_percent=PERCENT)
        start = utcnow()
        fresh = fleet.agents(10, last_heartbeat=start)
        silent = fleet.agents(10, last_heartbeat=start - fleet.window - dt.timedelta(seconds=1))

        assert run_concurrently(4, lambda: fleet.sweep(start)) == [[], [], [], []]
        assert fleet.state(start).engagements["percent"] == 1
        now = start
        while now + fleet.step < start + fleet.window:
            now += fleet.step
            fleet.beat(fresh, now)
            assert run_concurrently(2, partial(fleet.sweep, now)) == [[], []]
        now = start + fleet.window
        fleet.beat(fresh, now)
        results = run_concurrently(4, lambda: fleet.sweep(now))
        returned = [agent_id for result in results for agent_id in result]
        assert sorted(returned) == sorted(ids(silent))
        assert fleet.state(now).engagements == {"outage": 0, "percent": 1}
        with stack.runtime.engine.connect() as connection:
            mark = connection.execute(
                select(SweepMark).where(col(SweepMark.name) == guard.MARK)
            ).one()
        assert mark.guard_reason is None


class TestOperatorView:
    def test_the_api_and_metrics_show_the_guard(self, stack: Stack, operator: httpx.Client) -> None:
        idle = operator.get("/api/v1/sweeps/guard")
        assert idle.status_code == 200, idle.text
        grace = int(guard.grace(stack.runtime.settings).total_seconds())
        assert idle.json() == {
            "engaged": False,
            "reason": None,
            "since": None,
            "until": None,
            "agentsHeld": 0,
            "silentWhenEngaged": None,
            "percent": 0.0,
            "graceSeconds": grace,
            "engagements": {"outage": 0, "percent": 0},
        }
        samples = scrape(operator)
        assert value(samples, "stella_offline_guard_engaged", reason="outage") == 0

        fleet = Fleet(stack)
        now = utcnow()
        fleet.sweep(now - 5 * fleet.window)
        fleet.agents(2, last_heartbeat=now - 4 * fleet.window)
        fleet.agents(1, last_heartbeat=now)
        assert fleet.sweep(now) == []  # back after an outage

        body = operator.get("/api/v1/sweeps/guard").json()
        assert body["engaged"] is True
        assert body["reason"] == "outage"
        assert body["agentsHeld"] == 2
        assert body["silentWhenEngaged"] == 2
        assert body["engagements"] == {"outage": 1, "percent": 0}
        assert dt.datetime.fromisoformat(body["until"]) > utcnow()
        samples = scrape(operator)
        assert value(samples, "stella_offline_guard_engaged", reason="outage") == 1
        assert value(samples, "stella_offline_guard_engaged", reason="percent") == 0
        assert value(samples, "stella_offline_guard_agents_held") == 2
        assert value(samples, "stella_offline_guard_engagements_total", reason="outage") == 1

    def test_the_view_needs_the_operator_token(self, stack: Stack) -> None:
        with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context()) as anonymous:
            assert_problem(anonymous.get("/api/v1/sweeps/guard"), 401)
