"""Work in flight on a lost agent: `unknown`, not failed, when running it twice is not safe.

With STELLA_OUTCOME_UNKNOWN on, the offline sweep calls `mark_unknown` in the
transaction that marked agents offline, and the timeout sweep before it ends
anything (a timeout passing while the agent is offline says nothing of what
the task did either: the setting turned on later, a race). A task of a type that is not
idempotent (app/tasks/types.py), assigned or running on an offline agent, may
have done its work or not: it becomes `unknown`, is never handed out again,
and waits for its agent to report what happened (`service.complete` accepts
that report once). Idempotent tasks keep the seed's course (timed out by the
timeout sweep, unless the agent reports first).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import select, update
from sqlmodel import Session, col

from app.models import Agent, Task
from app.settings import Settings
from app.tasks.schemas import RUNNING_STATUSES, UNKNOWN_STATUS
from app.tasks.types import idempotent_types

log = logging.getLogger(__name__)

LOST_ERROR = (
    "the agent was lost while the task was in flight: its outcome is unknown "
    "until the agent reports it"
)


def mark_unknown(
    *, session: Session, settings: Settings, marked: Sequence[uuid.UUID] | None = None
) -> list[uuid.UUID]:
    """Non-idempotent work in flight on offline agents becomes `unknown`; the tasks changed.

    `marked`: the agents the calling sweep just marked offline (nothing to do
    when it marked none); None: look at every offline agent.

    One guarded UPDATE: a completion committed first leaves its task final
    (not in flight), one that waits on the row lock finds `unknown` and is
    accepted; two overlapping sweeps change each task once. It covers every
    offline agent, not only `marked`, so a sweep that lost the race to mark
    an agent still finds its tasks changed by the one that won.
    """
    if not settings.outcome_unknown or (marked is not None and not marked):
        return []
    offline = select(col(Agent.id)).where(col(Agent.status) == "offline")
    rows = session.execute(
        update(Task)
        .where(
            col(Task.status).in_(RUNNING_STATUSES),
            col(Task.agent_id).in_(offline.scalar_subquery()),
            col(Task.task_type).not_in(idempotent_types()),
        )
        .values(status=UNKNOWN_STATUS, error=LOST_ERROR)
        .returning(col(Task.id)),
        execution_options={"synchronize_session": False},
    ).all()
    lost = [row[0] for row in rows]
    if lost:
        log.warning("%d task(s) of lost agents have an unknown outcome now", len(lost))
    return lost
