"""The life of a task: created for one agent, claimed, completed or cancelled.

Every transition is one guarded UPDATE on the expected prior state, so two
heartbeats, two completions or a completion racing a cancel are settled by
the database: exactly one of them changes the row.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, func, insert, select, update
from sqlmodel import Session, col

from app.db import after_commit
from app.errors import (
    Conflict,
    CredentialsUnreadable,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
)
from app.logs import context as request_context
from app.models import Agent, Task, TaskLog
from app.models.types import utcnow
from app.notify import AgentEvent, Notifier
from app.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from app.settings import Settings
from app.signing.tasks import sign_task
from app.tasks.credentials import CredentialCipher
from app.tasks.schemas import (
    FINAL_STATUSES,
    OPEN_STATUSES,
    RUNNING_STATUSES,
    UNKNOWN_STATUS,
    LogLine,
    TaskComplete,
    TaskCreate,
    TaskDelivery,
    TaskPending,
    TaskSummary,
    TaskView,
)
from pki.task_signing import TaskSigningKeyring

log = logging.getLogger(__name__)

# Tasks one heartbeat or poll hands over at most; the rest follow next time.
CLAIM_BATCH = 100


def create_for_agent(
    *,
    session: Session,
    settings: Settings,
    cipher: CredentialCipher,
    notifier: Notifier,
    agent_id: uuid.UUID,
    spec: TaskCreate,
    task_keys: TaskSigningKeyring | None = None,
) -> Task:
    """A pending task for one agent; 404 when it is unknown, 503 when it is offline."""
    # FOR SHARE: a concurrent delete waits for this insert (and then cancels it).
    agent = session.scalars(
        select(Agent).where(col(Agent.id) == agent_id).with_for_update(read=True)
    ).first()
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    if agent.status == "offline":
        raise ServiceUnavailable(
            f"agent {agent_id} is offline", retry_after=settings.heartbeat_interval
        )
    task = new_task(
        settings=settings,
        cipher=cipher,
        agent_id=agent_id,
        task_type=spec.task_type,
        payload=spec.payload,
        credentials=spec.credentials,
        timeout=spec.timeout,
        priority=spec.priority,
        task_keys=task_keys,
    )
    session.add(task)
    session.flush()
    notify_created(session=session, notifier=notifier, agent_id=agent_id, task_id=task.id)
    log.info(
        "task created",
        extra={"task_id": str(task.id), "agent_id": str(agent_id), "task_type": task.task_type},
    )
    return task


def new_task(
    *,
    settings: Settings,
    cipher: CredentialCipher,
    agent_id: uuid.UUID,
    task_type: str,
    payload: dict[str, object],
    credentials: dict[str, object] | None,
    timeout: int | None,
    priority: int,
    dispatch_id: uuid.UUID | None = None,
    task_keys: TaskSigningKeyring | None = None,
) -> Task:
    """A Task row, its credentials encrypted for that row alone, signed with `task_keys`."""
    task_id = uuid.uuid4()
    timeout = timeout or settings.task_default_timeout
    signature = (
        sign_task(
            task_keys,
            task_id=task_id,
            agent_id=agent_id,
            task_type=task_type,
            payload=payload,
            timeout=timeout,
        )
        if task_keys is not None
        else None
    )
    return Task(
        id=task_id,
        agent_id=agent_id,
        dispatch_id=dispatch_id,
        task_type=task_type,
        payload=payload,
        credentials_encrypted=(
            cipher.encrypt(credentials, owner=task_id) if credentials is not None else None
        ),
        timeout=timeout,
        signature=signature,
        priority=priority,
        request_id=request_context.current(),
    )


def notify_created(
    *, session: Session, notifier: Notifier, agent_id: uuid.UUID, task_id: uuid.UUID
) -> None:
    after_commit(
        session,
        lambda: notifier.publish(AgentEvent("task_created", agent_id=agent_id, task_id=task_id)),
    )


def notify_cancelled(
    *, session: Session, notifier: Notifier, ended: Sequence[tuple[uuid.UUID, uuid.UUID]]
) -> None:
    """After commit, tell each agent to stop its task: `ended` holds (task_id, agent_id)."""

    def announce() -> None:
        for task_id, agent_id in ended:
            notifier.publish(AgentEvent("task_cancelled", agent_id=agent_id, task_id=task_id))

    after_commit(session, announce)


def claim_pending(*, session: Session, agent_id: uuid.UUID, limit: int = CLAIM_BATCH) -> list[Task]:
    """Mark the agent's best pending tasks assigned and return them, best first."""
    best = (
        select(col(Task.id))
        .where(col(Task.agent_id) == agent_id, col(Task.status) == "pending")
        .order_by(col(Task.priority).desc(), col(Task.created_at))
        .limit(limit)
    )
    return sorted(_assign(session, best), key=_delivery_order)


def claim_pending_for_agents(
    *, session: Session, agent_ids: Sequence[uuid.UUID], limit: int = CLAIM_BATCH
) -> dict[uuid.UUID, list[Task]]:
    """`claim_pending` for many agents in one statement: each agent's best `limit`, best first.

    A fan-out wakes hundreds of streams at once; one claim each would be
    one transaction each. The same guard makes it exactly-once.
    """
    ranked = (
        select(
            col(Task.id).label("id"),
            func.row_number()
            .over(
                partition_by=col(Task.agent_id),
                order_by=(col(Task.priority).desc(), col(Task.created_at)),
            )
            .label("rank"),
        )
        .where(col(Task.agent_id).in_(agent_ids), col(Task.status) == "pending")
        .subquery()
    )
    best = select(ranked.c.id).where(ranked.c.rank <= limit)
    by_agent: dict[uuid.UUID, list[Task]] = {agent_id: [] for agent_id in agent_ids}
    for task in sorted(_assign(session, best), key=_delivery_order):
        by_agent[task.agent_id].append(task)
    return by_agent


def _assign(session: Session, best: Select[Any]) -> Sequence[Task]:
    """Mark the tasks `best` selects assigned, if still pending; the ones this call got.

    The `status = 'pending'` guard on the UPDATE itself (not only in the
    subquery) is what makes a task go to exactly one of two racing claims.
    """
    return session.scalars(
        update(Task)
        .where(col(Task.id).in_(best.scalar_subquery()), col(Task.status) == "pending")
        .values(status="assigned", assigned_at=utcnow())
        .returning(Task),
        execution_options={"synchronize_session": False},
    ).all()


def has_pending(*, session: Session, agent_id: uuid.UUID) -> bool:
    found = session.execute(
        select(col(Task.id))
        .where(col(Task.agent_id) == agent_id, col(Task.status) == "pending")
        .limit(1)
    ).first()
    return found is not None


def deliver(task: Task, cipher: CredentialCipher) -> TaskDelivery:
    """The task as its own agent receives it, credentials decrypted."""
    return TaskDelivery(
        task_id=task.id,
        task_type=task.task_type,
        payload=task.payload,
        credentials=_credentials(task, cipher),
        timeout=task.timeout,
        priority=task.priority,
        signature=task.signature,
    ).created_on(task.created_at, request_id=task.request_id)


def log_delivered(via: str, agent_id: uuid.UUID, deliveries: Iterable[TaskDelivery]) -> None:
    """One line per task handed over, under the id of the request that created it."""
    for delivery in deliveries:
        log.info(
            "task delivered",
            extra={
                "task_id": str(delivery.task_id),
                "agent_id": str(agent_id),
                "task_type": delivery.task_type,
                "via": via,
                "request_id": delivery.request_id,
            },
        )


def open_tasks_for_agent(
    *, session: Session, cipher: CredentialCipher, agent_id: uuid.UUID
) -> list[TaskPending]:
    """Claim what is pending, then list every unfinished task of the agent.

    A restarted agent learns here what it held before; an agent that only
    polls gets everything it needs to run its tasks. Tasks of `unknown`
    outcome are listed too (never started by an agent: their status says so),
    so that an agent back from a partition keeps running what it holds.
    """
    claim_pending(session=session, agent_id=agent_id)
    tasks = session.scalars(
        select(Task)
        .where(
            col(Task.agent_id) == agent_id,
            col(Task.status).in_((*OPEN_STATUSES, UNKNOWN_STATUS)),
        )
        .order_by(col(Task.priority).desc(), col(Task.created_at))
    ).all()
    return [
        TaskPending(
            **deliver(task, cipher).model_dump(), status=task.status, created_at=task.created_at
        )
        for task in tasks
    ]


def complete(
    *,
    session: Session,
    settings: Settings,
    agent_id: uuid.UUID,
    task_id: uuid.UUID,
    report: TaskComplete,
) -> None:
    """Record the agent's outcome; a repeat of the same outcome is accepted again.

    404 for a task that is not this agent's, 409 when the task already ended
    otherwise (another outcome, cancelled, timed out) or was never delivered.
    A task of `unknown` outcome takes its agent's report once, as the real one.
    """
    outcome = "succeeded" if report.success else "failed"
    now = utcnow()
    finished = session.execute(
        update(Task)
        .where(
            col(Task.id) == task_id,
            col(Task.agent_id) == agent_id,
            col(Task.status).in_((*RUNNING_STATUSES, UNKNOWN_STATUS)),
        )
        .values(
            status=outcome,
            completed_at=now,
            result=report.result,
            error=report.error,
            credentials_encrypted=None,
        )
        .returning(col(Task.request_id)),
        execution_options={"synchronize_session": False},
    ).first()
    if finished is not None:
        append_logs(session=session, settings=settings, task_id=task_id, lines=report.logs)
        log.info(
            "task completed",
            extra={
                "task_id": str(task_id),
                "agent_id": str(agent_id),
                "status": outcome,
                "request_id": finished.request_id,
            },
        )
        return
    task = session.get(Task, task_id)
    if task is not None and task.agent_id == agent_id and task.status == outcome:
        return
    _refuse_update(session=session, agent_id=agent_id, task_id=task_id)


def append_logs(
    *, session: Session, settings: Settings, task_id: uuid.UUID, lines: Sequence[LogLine]
) -> int:
    """Store log lines within the task's byte budget; returns how many were kept.

    The budget (STELLA_TASK_LOG_MAX_BYTES) is claimed by a guarded UPDATE, so
    concurrent writers never overshoot it. The first line that does not fit
    is replaced by one visible marker, once; later lines are dropped.
    """
    kept = []
    for line in lines:
        size = len(_storable(line.message).encode())
        granted = session.execute(
            update(Task)
            .where(
                col(Task.id) == task_id,
                col(Task.log_truncated).is_(False),
                col(Task.log_bytes) + size <= settings.task_log_max_bytes,
            )
            .values(log_bytes=col(Task.log_bytes) + size)
            .returning(col(Task.id)),
            execution_options={"synchronize_session": False},
        ).first()
        if granted is not None:
            kept.append(line)
            continue
        truncated = session.execute(
            update(Task)
            .where(col(Task.id) == task_id, col(Task.log_truncated).is_(False))
            .values(log_truncated=True)
            .returning(col(Task.id)),
            execution_options={"synchronize_session": False},
        ).first()
        if truncated is not None:
            kept.append(
                LogLine(
                    timestamp=utcnow(),
                    level="warning",
                    message=f"[log truncated: over {settings.task_log_max_bytes} bytes]",
                )
            )
        break
    if kept:
        session.execute(
            insert(TaskLog),
            [
                {
                    "task_id": task_id,
                    "timestamp": line.timestamp,
                    "level": _storable(line.level),
                    "message": _storable(line.message),
                }
                for line in kept
            ],
        )
    return len(kept)


def record_progress(
    *,
    session: Session,
    agent_id: uuid.UUID,
    task_id: uuid.UUID,
    progress: int | None,
    message: str | None,
) -> None:
    """The agent reports progress: the task is running; 404/409 as for completion."""
    now = utcnow()
    values: dict[str, object] = {
        "status": "running",
        "progress_message": _storable(message) if message is not None else None,
    }
    if progress is not None:
        values["progress"] = progress
    updated = session.execute(
        update(Task)
        .where(
            col(Task.id) == task_id,
            col(Task.agent_id) == agent_id,
            col(Task.status).in_(RUNNING_STATUSES),
        )
        .values(**values, started_at=func.coalesce(col(Task.started_at), now))
        .returning(col(Task.id)),
        execution_options={"synchronize_session": False},
    ).first()
    if updated is None:
        _refuse_update(session=session, agent_id=agent_id, task_id=task_id)


def append_agent_log(
    *, session: Session, settings: Settings, agent_id: uuid.UUID, task_id: uuid.UUID, line: LogLine
) -> None:
    """A log line streamed by the agent for one of its unfinished tasks."""
    owned = session.execute(
        select(col(Task.id)).where(
            col(Task.id) == task_id,
            col(Task.agent_id) == agent_id,
            col(Task.status).in_(RUNNING_STATUSES),
        )
    ).first()
    if owned is None:
        _refuse_update(session=session, agent_id=agent_id, task_id=task_id)
    append_logs(session=session, settings=settings, task_id=task_id, lines=[line])


def _storable(text: str) -> str:
    """PostgreSQL text cannot hold NUL: store U+FFFD instead, on every backend alike."""
    return text.replace("\x00", "\ufffd")


def _refuse_update(*, session: Session, agent_id: uuid.UUID, task_id: uuid.UUID) -> None:
    task = session.get(Task, task_id)
    if task is None or task.agent_id != agent_id:
        raise NotFound(f"task {task_id} not found")
    if task.status == "pending":
        raise Conflict(f"task {task_id} was not delivered yet")
    raise Conflict(f"task {task_id} already ended as {task.status}")


def cancel(*, session: Session, notifier: Notifier, task_id: uuid.UUID) -> Task:
    """Cancel an unfinished task and tell its agent; 409 once it has ended.

    An `unknown` one too: the operator gives up waiting for its agent's report.
    """
    cancelled = session.scalars(
        update(Task)
        .where(col(Task.id) == task_id, col(Task.status).in_((*OPEN_STATUSES, UNKNOWN_STATUS)))
        .values(status="cancelled", completed_at=utcnow(), credentials_encrypted=None)
        .returning(Task),
        execution_options={"synchronize_session": False},
    ).first()
    if cancelled is None:
        task = session.get(Task, task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        raise Conflict(f"task {task_id} already ended as {task.status}")
    notify_cancelled(session=session, notifier=notifier, ended=[(task_id, cancelled.agent_id)])
    return cancelled


def cancel_all_for_agent(*, session: Session, agent_id: uuid.UUID, reason: str) -> int:
    """End every unfinished task of an agent that is going away."""
    result = session.execute(
        update(Task)
        .where(col(Task.agent_id) == agent_id, col(Task.status).in_(OPEN_STATUSES))
        .values(status="cancelled", completed_at=utcnow(), error=reason, credentials_encrypted=None)
        .returning(col(Task.id)),
        execution_options={"synchronize_session": False},
    )
    return len(result.all())


def get_view(*, session: Session, task_id: uuid.UUID) -> TaskView:
    """A task with its logs, as operators see it (never its credentials)."""
    task = session.get(Task, task_id)
    if task is None:
        raise NotFound(f"task {task_id} not found")
    logs = session.scalars(
        select(TaskLog).where(col(TaskLog.task_id) == task_id).order_by(col(TaskLog.id))
    ).all()
    return TaskView(
        task_id=task.id,
        agent_id=task.agent_id,
        dispatch_id=task.dispatch_id,
        task_type=task.task_type,
        status=task.status,
        priority=task.priority,
        timeout=task.timeout,
        payload=task.payload,
        created_at=task.created_at,
        assigned_at=task.assigned_at,
        started_at=task.started_at,
        completed_at=task.completed_at,
        progress=task.progress,
        progress_message=task.progress_message,
        result=task.result,
        logs=[
            LogLine(timestamp=log.timestamp, level=log.level, message=log.message) for log in logs
        ],
        error=task.error,
    )


def list_summaries(
    *,
    session: Session,
    agent_id: uuid.UUID | None,
    status: str | None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[TaskSummary], str | None]:
    """Tasks newest first, filtered, one keyset page at a time."""
    query = select(Task)
    if agent_id is not None:
        query = query.where(col(Task.agent_id) == agent_id)
    if status is not None:
        if status not in (*OPEN_STATUSES, *FINAL_STATUSES, UNKNOWN_STATUS):
            raise InvalidInput(f"unknown task status {status!r}")
        query = query.where(col(Task.status) == status)
    if cursor is not None:
        created_raw, id_raw = decode_cursor(cursor, 2)
        try:
            created_at = dt.datetime.fromisoformat(created_raw)
            last_id = uuid.UUID(id_raw)
        except (TypeError, ValueError) as exc:
            raise InvalidInput("cursor is not valid") from exc
        query = query.where(
            (col(Task.created_at) < created_at)
            | ((col(Task.created_at) == created_at) & (col(Task.id) < last_id))
        )
    rows = session.scalars(
        query.order_by(col(Task.created_at).desc(), col(Task.id).desc()).limit(limit + 1)
    ).all()
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > limit else None
    )
    return [
        TaskSummary(
            task_id=task.id,
            agent_id=task.agent_id,
            task_type=task.task_type,
            status=task.status,
            priority=task.priority,
            created_at=task.created_at,
            completed_at=task.completed_at,
        )
        for task in page
    ], next_cursor


def _credentials(task: Task, cipher: CredentialCipher) -> dict[str, object] | None:
    if task.credentials_encrypted is None:
        return None
    try:
        return cipher.decrypt(task.credentials_encrypted, owner=task.id)
    except ValueError as exc:
        # Never deliver the task without them: the request fails (and its
        # claim rolls back), so that a server with the right key hands it over.
        log.error("credentials of task %s do not decrypt: %s", task.id, exc)
        raise CredentialsUnreadable(
            "the task's credentials do not decrypt with this server's credentials key "
            "(credentials.key in the PKI directory): every process must use the same one"
        ) from exc


def _delivery_order(task: Task) -> tuple[int, dt.datetime]:
    return (-task.priority, task.created_at)
