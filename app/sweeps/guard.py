"""The mass-offline guard: when the offline sweep holds instead of judging by silence.

Two events silence many agents at once without any of them being gone:
the control plane (or its database) was down, so no heartbeat could be
heard ("outage"), or something between the fleet and the control plane
failed ("percent": one sweep would mark more than
STELLA_OFFLINE_GUARD_PERCENT of the live agents offline). Either engages
the guard: for the grace (STELLA_OFFLINE_GUARD_GRACE, by default one
offline window) no agent is marked offline. Agents heard meanwhile are
never marked; the first sweep after the grace marks those still silent,
however many they are, and releases the guard, so a real mass death is
recognised once and the same event never engages it again.

The state lives on the control-plane row of `sweep_marks`, locked by every
sweep that judges by silence: all workers agree, and overlapping runs are
ordered by that lock.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Integer, case, cast, func, literal, select
from sqlmodel import Session, col

from app.db import insert_ignoring_conflicts
from app.models import Agent, SweepMark
from app.settings import Settings
from app.sweeps.schemas import GuardEngagements, GuardReason, OfflineGuardPublic

log = logging.getLogger(__name__)

MARK = "control-plane"  # the sweeps that judge by silence share one mark
LIVE_STATUSES = ("online", "degraded")
OUTAGE: Final = "outage"
PERCENT: Final = "percent"
REASONS: tuple[GuardReason, ...] = (OUTAGE, PERCENT)


def offline_window(settings: Settings) -> dt.timedelta:
    return dt.timedelta(seconds=settings.heartbeat_interval * settings.offline_after_missed)


def grace(settings: Settings) -> dt.timedelta:
    """How long the guard holds once engaged."""
    if settings.offline_guard_grace is not None:
        return dt.timedelta(seconds=settings.offline_guard_grace)
    return offline_window(settings)


def lock(*, session: Session, settings: Settings, now: dt.datetime) -> SweepMark:
    """The control-plane mark, locked for this transaction, with this run noted.

    No sweep for longer than the offline window (and two sweep intervals)
    means the control plane was down and no agent could be heard: the guard
    engages for the outage, as a new leader gives every agent a full window
    after a failover.
    """
    insert_ignoring_conflicts(
        session, SweepMark, [{"name": MARK, "last_run_at": now}],
        conflict_columns=("name",), returning=("name",),
    )  # fmt: skip
    mark = session.execute(
        select(SweepMark).where(col(SweepMark.name) == MARK).with_for_update()
    ).scalar_one()
    assert isinstance(mark, SweepMark)
    window = offline_window(settings)
    outage = max(window, dt.timedelta(seconds=2 * settings.resolved_sweep_interval))
    if now - mark.last_run_at > outage:
        silent = count_silent(session=session, cutoff=now - window)
        _engage(mark, OUTAGE, now=now, until=now + grace(settings), silent=silent)
        log.warning(
            "no sweep for %d s: the control plane was down; offline guard engaged (outage): "
            "no agent is marked offline and no task timed out before %s (%d agents silent)",
            (now - mark.last_run_at).total_seconds(),
            _iso(mark.held_until),
            silent,
        )
    mark.last_run_at = max(mark.last_run_at, now)
    return mark


def holds(mark: SweepMark, now: dt.datetime, reason: GuardReason | None = None) -> bool:
    """True while the guard (for `reason`, or for any) is within its grace."""
    if mark.guard_reason is None or mark.held_until is None or now >= mark.held_until:
        return False
    return reason is None or mark.guard_reason == reason


def trips(
    *, session: Session, settings: Settings, mark: SweepMark, cutoff: dt.datetime, now: dt.datetime
) -> bool:
    """Engage the guard if this sweep would start marking too many agents offline.

    A fleet silenced at once has its last heartbeats spread over one
    heartbeat interval, so the first sweep to see any of it past `cutoff`
    (the offline window) sees only part of it. The share is therefore taken
    of the agents falling silent: past `cutoff`, or within one heartbeat
    interval of it (past all but one of their missed heartbeats). Judged
    only when this sweep would mark someone, and not on the sweep that
    ends a grace: the agents still silent then have had theirs.

    One statement over the (status, last_heartbeat) index: the falling
    silent are counted, and the live agents only as far as it takes to
    settle the question (a bound proportional to the silent), so its cost
    follows the silent agents, not the fleet.
    """
    percent = settings.offline_guard_percent
    if not percent or mark.guard_reason is not None:
        return False
    live = col(Agent.status).in_(LIVE_STATUSES)
    falling = (
        select(
            func.count().label("falling"),
            func.coalesce(
                func.sum(case((col(Agent.last_heartbeat) < cutoff, 1), else_=0)), 0
            ).label("due"),
        )
        .where(live, col(Agent.last_heartbeat) < cutoff + look_ahead(settings))
        .cte("falling_silent")
    )
    # Enough live agents to keep the falling within `percent`: counting past it changes nothing.
    bound = select(cast(falling.c.falling * (100.0 / percent), Integer) + 1).scalar_subquery()
    live_rows = select(literal(1)).select_from(Agent).where(live).limit(bound).subquery()
    live_n = select(func.count()).select_from(live_rows).scalar_subquery()
    silent, due, counted = session.execute(
        select(falling.c.falling, falling.c.due, live_n).select_from(falling)
    ).one()
    if not due or silent * 100 <= percent * counted:
        return False
    _engage(mark, PERCENT, now=now, until=now + grace(settings), silent=silent)
    log.warning(
        "offline guard engaged (percent): %d of %d live agents (%.1f %%) falling silent "
        "(%d past the offline window of %d s), more than STELLA_OFFLINE_GUARD_PERCENT=%g; "
        "none is marked offline before %s",
        silent,
        counted,
        100 * silent / counted,
        due,
        (now - cutoff).total_seconds(),
        percent,
        _iso(mark.held_until),
    )
    return True


def look_ahead(settings: Settings) -> dt.timedelta:
    """How far short of the offline window an agent already counts as falling silent."""
    if settings.offline_after_missed < 2:
        return dt.timedelta(0)  # one missed heartbeat is the window itself
    return dt.timedelta(seconds=settings.heartbeat_interval)


def release(mark: SweepMark, *, marked: int, now: dt.datetime) -> None:
    """After the grace: the sweep has marked the agents still silent; the guard lets go."""
    if mark.guard_reason is None:
        return
    log.warning(
        "offline guard released (%s, engaged at %s with %d agents silent): "
        "%d agents still silent after the grace marked offline",
        mark.guard_reason,
        _iso(mark.guard_since),
        mark.guard_held or 0,
        marked,
    )
    mark.guard_reason = None
    mark.guard_since = None
    mark.guard_held = None
    mark.held_until = None


def count_silent(*, session: Session, cutoff: dt.datetime) -> int:
    """Live agents not heard since `cutoff` (an index range: cost follows the silent)."""
    count: int = session.execute(
        select(func.count())
        .select_from(Agent)
        .where(col(Agent.status).in_(LIVE_STATUSES), col(Agent.last_heartbeat) < cutoff)
    ).scalar_one()
    return count


def _engage(
    mark: SweepMark, reason: GuardReason, *, now: dt.datetime, until: dt.datetime, silent: int
) -> None:
    if mark.guard_reason is None:
        mark.guard_since = now
    mark.guard_reason = reason
    mark.guard_held = silent
    mark.held_until = max(until, mark.held_until) if mark.held_until else until
    if reason == OUTAGE:
        mark.guard_outages += 1
    else:
        mark.guard_percent_trips += 1


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


# --- what operators see ---------------------------------------------------------------------


@dataclass(frozen=True)
class GuardState:
    engaged: bool
    reason: GuardReason | None
    since: dt.datetime | None
    until: dt.datetime | None
    # Live agents silent for longer than the offline window now: the ones
    # the guard keeps from being marked offline (0 when not engaged).
    agents_held: int
    silent_when_engaged: int | None
    engagements: dict[GuardReason, int]


def state(*, session: Session, settings: Settings, now: dt.datetime) -> GuardState:
    """The guard as the sweeps left it; reads only (takes no lock)."""
    mark = session.execute(
        select(SweepMark).where(col(SweepMark.name) == MARK)
    ).scalar_one_or_none()
    if mark is None:
        return GuardState(False, None, None, None, 0, None, dict.fromkeys(REASONS, 0))
    engagements: dict[GuardReason, int] = {
        OUTAGE: mark.guard_outages,
        PERCENT: mark.guard_percent_trips,
    }
    if not holds(mark, now):
        return GuardState(False, None, None, None, 0, None, engagements)
    held = count_silent(session=session, cutoff=now - offline_window(settings))
    reason: GuardReason = OUTAGE if mark.guard_reason == OUTAGE else PERCENT
    return GuardState(
        True, reason, mark.guard_since, mark.held_until, held, mark.guard_held, engagements
    )


def view(*, session: Session, settings: Settings, now: dt.datetime) -> OfflineGuardPublic:
    """The guard as operators see it (GET /api/v1/sweeps/guard)."""
    current = state(session=session, settings=settings, now=now)
    return OfflineGuardPublic(
        engaged=current.engaged,
        reason=current.reason,
        since=current.since,
        until=current.until,
        agents_held=current.agents_held,
        silent_when_engaged=current.silent_when_engaged,
        percent=settings.offline_guard_percent,
        grace_seconds=int(grace(settings).total_seconds()),
        engagements=GuardEngagements(
            outage=current.engagements[OUTAGE], percent=current.engagements[PERCENT]
        ),
    )
