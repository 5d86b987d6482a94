"""Selector dispatches: accepted at once, expanded in batches behind the request.

The dispatch row is the truth and holds the payload and the (encrypted)
credentials; the Celery job that runs the expansion receives only the
dispatch id, so neither the broker nor Flower ever sees a payload.
Expansion is idempotent: the unique (dispatch_id, agent_id) key makes a
second run, or a run resumed after a crash, create only the missing tasks.
"""

from __future__ import annotations

import logging
import time
import uuid

from sqlalchemy import Engine, select, update
from sqlmodel import Session, col

from app.agents import selectors
from app.db import after_commit, insert_ignoring_conflicts, transaction
from app.errors import NotFound, ServiceUnavailable
from app.jobs import EXPAND_DISPATCH
from app.logs import context as request_context
from app.models import Agent, Dispatch, Task
from app.models.types import utcnow
from app.runtime import Runtime
from app.tasks import service as tasks_service
from app.tasks.schemas import DispatchAccepted, DispatchView, TaskCreate, TaskRef, TasksCreated

log = logging.getLogger(__name__)

# Fan-out goes to agents that report healthy; `degraded` ones are left out.
DISPATCHABLE_STATUS = "online"


def submit(
    *, session: Session, runtime: Runtime, spec: TaskCreate
) -> TasksCreated | DispatchAccepted:
    """Dispatch to one agent (a task now) or to a selector (accepted, expanded behind)."""
    if spec.target.agent_id is not None:
        task = tasks_service.create_for_agent(
            session=session,
            settings=runtime.settings,
            cipher=runtime.cipher,
            notifier=runtime.notifier,
            agent_id=spec.target.agent_id,
            spec=spec,
            task_keys=runtime.task_keys,
        )
        return TasksCreated(
            tasks=[TaskRef(task_id=task.id, agent_id=task.agent_id, status=task.status)]
        )
    dispatch = create(session=session, runtime=runtime, spec=spec)
    return DispatchAccepted(dispatch_id=dispatch.id, status=dispatch.status)


def create(*, session: Session, runtime: Runtime, spec: TaskCreate) -> Dispatch:
    """Accept a selector dispatch; 503 when no online agent matches right now."""
    target = spec.target
    dialect = session.get_bind().dialect.name
    any_match = session.execute(
        select(col(Agent.id))
        .where(
            col(Agent.status) == DISPATCHABLE_STATUS,
            selectors.matches(dialect, capability=target.capability, labels=target.labels),
        )
        .limit(1)
    ).first()
    if any_match is None:
        raise ServiceUnavailable(
            "no online agent matches the target", retry_after=runtime.settings.heartbeat_interval
        )
    dispatch_id = uuid.uuid4()
    dispatch = Dispatch(
        id=dispatch_id,
        target=target.model_dump(by_alias=True, exclude_none=True, exclude={"agent_id"}),
        task_type=spec.task_type,
        payload=spec.payload,
        credentials_encrypted=(
            runtime.cipher.encrypt(spec.credentials, owner=dispatch_id)
            if spec.credentials is not None
            else None
        ),
        timeout=spec.timeout or runtime.settings.task_default_timeout,
        priority=spec.priority,
        request_id=request_context.current(),
    )
    session.add(dispatch)
    session.flush()
    log.info(
        "dispatch accepted",
        extra={
            "dispatch_id": str(dispatch_id),
            "task_type": spec.task_type,
            "target": dispatch.target,
        },
    )
    jobs = runtime.jobs
    after_commit(session, lambda: jobs.enqueue(EXPAND_DISPATCH, str(dispatch_id)))
    return dispatch


def expand(*, runtime: Runtime, dispatch_id: uuid.UUID, batch_size: int | None = None) -> int:
    """Create the dispatch's missing tasks, a committed batch at a time; returns how many.

    Safe to run twice at once or again after a crash midway. Each batch also
    touches `updated_at`, the progress mark the re-drive sweep watches.
    """
    settings = runtime.settings
    batch_size = batch_size or settings.fanout_batch_size
    engine: Engine = runtime.engine
    with transaction(engine) as session:
        started = session.scalars(
            update(Dispatch)
            .where(
                col(Dispatch.id) == dispatch_id, col(Dispatch.status).in_(("pending", "expanding"))
            )
            .values(status="expanding", updated_at=utcnow())
            .returning(Dispatch),
            execution_options={"synchronize_session": False},
        ).first()
        if started is None:
            return 0
        dispatch = started
    # Re-driven by a sweep, the job has no request id of its own: the dispatch's is the one.
    with request_context.bound(dispatch.request_id or request_context.current()):
        created = _expand_batches(runtime, dispatch, batch_size)
    log.info(
        "dispatch expanded",
        extra={
            "dispatch_id": str(dispatch_id),
            "tasks": created,
            "request_id": dispatch.request_id,
        },
    )
    return created


def _expand_batches(runtime: Runtime, dispatch: Dispatch, batch_size: int) -> int:
    settings = runtime.settings
    engine: Engine = runtime.engine
    dispatch_id = dispatch.id
    created = 0
    after_agent: uuid.UUID | None = None
    while True:
        with transaction(engine) as session:
            agent_ids = _next_batch(session, dispatch, after_agent, batch_size)
            if agent_ids:
                created += _create_tasks(session, runtime, dispatch, agent_ids)
            _touch(session, dispatch_id)
        if len(agent_ids) < batch_size:
            break
        after_agent = agent_ids[-1]
        if settings.fanout_batch_interval:
            time.sleep(settings.fanout_batch_interval)
    with transaction(engine) as session:
        session.execute(
            update(Dispatch)
            .where(col(Dispatch.id) == dispatch_id, col(Dispatch.status) == "expanding")
            .values(status="done", updated_at=utcnow(), completed_at=utcnow())
        )
    return created


def _touch(session: Session, dispatch_id: uuid.UUID) -> None:
    session.execute(
        update(Dispatch)
        .where(col(Dispatch.id) == dispatch_id, col(Dispatch.status) == "expanding")
        .values(updated_at=utcnow())
    )


def _next_batch(
    session: Session, dispatch: Dispatch, after_agent: uuid.UUID | None, batch_size: int
) -> list[uuid.UUID]:
    dialect = session.get_bind().dialect.name
    query = select(col(Agent.id)).where(
        col(Agent.status) == DISPATCHABLE_STATUS,
        selectors.matches(
            dialect,
            capability=dispatch.target.get("capability"),
            labels=dispatch.target.get("labels"),
        ),
    )
    if after_agent is not None:
        query = query.where(col(Agent.id) > after_agent)
    # FOR SHARE: an agent deleted meanwhile either waits for this batch (and
    # cancels its task) or is already gone from it.
    rows = session.scalars(
        query.order_by(col(Agent.id)).limit(batch_size).with_for_update(read=True)
    )
    return list(rows)


def _create_tasks(
    session: Session, runtime: Runtime, dispatch: Dispatch, agent_ids: list[uuid.UUID]
) -> int:
    credentials = (
        runtime.cipher.decrypt(dispatch.credentials_encrypted, owner=dispatch.id)
        if dispatch.credentials_encrypted is not None
        else None
    )
    rows = []
    for agent_id in agent_ids:
        task = tasks_service.new_task(
            settings=runtime.settings,
            cipher=runtime.cipher,
            agent_id=agent_id,
            task_type=dispatch.task_type,
            payload=dispatch.payload,
            credentials=credentials,
            timeout=dispatch.timeout,
            priority=dispatch.priority,
            dispatch_id=dispatch.id,
            task_keys=runtime.task_keys,
        )
        rows.append(
            {column: getattr(task, column) for column in Task.model_fields if column != "logs"}
        )
    inserted = insert_ignoring_conflicts(
        session,
        Task,
        rows,
        conflict_columns=("dispatch_id", "agent_id"),
        returning=("id", "agent_id"),
    )
    for task_id, agent_id in inserted:
        tasks_service.notify_created(
            session=session, notifier=runtime.notifier, agent_id=agent_id, task_id=task_id
        )
    return len(inserted)


def view(*, session: Session, dispatch_id: uuid.UUID) -> DispatchView:
    """The dispatch and the tasks it has created so far."""
    dispatch = session.get(Dispatch, dispatch_id)
    if dispatch is None:
        raise NotFound(f"dispatch {dispatch_id} not found")
    tasks = session.execute(
        select(col(Task.id), col(Task.agent_id), col(Task.status))
        .where(col(Task.dispatch_id) == dispatch_id)
        .order_by(col(Task.agent_id))
    ).all()
    return DispatchView(
        dispatch_id=dispatch.id,
        status=dispatch.status,
        target=dispatch.target,
        created_at=dispatch.created_at,
        tasks=[TaskRef(task_id=t, agent_id=a, status=s) for t, a, s in tasks],
    )
