"""Task endpoints: the agent's poll and completion, the operator's dispatch and views."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import AdminDep, RuntimeDep, SelfAgentDep, SessionDep
from app.api.problems import problems
from app.dispatch import service as dispatch_service
from app.pagination import DEFAULT_LIMIT, MAX_LIMIT
from app.tasks import service
from app.tasks.schemas import (
    Acknowledged,
    DispatchAccepted,
    TaskCancelled,
    TaskComplete,
    TaskCreate,
    TaskPendingList,
    TasksCreated,
    TaskStatus,
    TaskSummary,
    TaskView,
)

agent_router = APIRouter(prefix="/api/v1/agents/{id}/tasks", tags=["agents"])
operator_router = APIRouter(prefix="/api/v1/tasks", tags=["operators"], dependencies=[AdminDep])
TaskIdPath = Annotated[uuid.UUID, Path(alias="taskId")]


@agent_router.get("", responses=problems(401, 403, 422))
def poll_tasks(caller: SelfAgentDep, session: SessionDep, runtime: RuntimeDep) -> TaskPendingList:
    """Every unfinished task of the agent; pending ones become assigned."""
    tasks = service.open_tasks_for_agent(
        session=session, cipher=runtime.cipher, agent_id=caller.agent.id
    )
    return TaskPendingList(tasks=tasks)


@agent_router.post("/{taskId}/complete", responses=problems(401, 403, 404, 409, 422))
def complete_task(
    task_id: TaskIdPath,
    body: TaskComplete,
    caller: SelfAgentDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Acknowledged:
    """Report the outcome; repeating the same outcome is acknowledged again."""
    service.complete(
        session=session,
        settings=runtime.settings,
        agent_id=caller.agent.id,
        task_id=task_id,
        report=body,
    )
    return Acknowledged()


@operator_router.post(
    "",
    status_code=201,
    responses={
        202: {"model": DispatchAccepted, "description": "Selector dispatch accepted"},
        **problems(401, 404, 422, 503),
    },
)
def dispatch_task(body: TaskCreate, session: SessionDep, runtime: RuntimeDep) -> TasksCreated:
    """Dispatch to one agent (201) or fan out by capability and labels (202)."""
    outcome = dispatch_service.submit(session=session, runtime=runtime, spec=body)
    if isinstance(outcome, DispatchAccepted):
        # Rendered here: the declared response model is the 201 one.
        return JSONResponse(outcome.model_dump(mode="json", by_alias=True), status_code=202)  # type: ignore[return-value]
    return outcome


@operator_router.get("", responses=problems(401, 422))
def list_tasks(
    request: Request,
    response: Response,
    session: SessionDep,
    agent_id: Annotated[uuid.UUID | None, Query(alias="agentId")] = None,
    status: TaskStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> list[TaskSummary]:
    """Tasks newest first; the next page's URL is in the `Link` header (rel="next")."""
    tasks, next_cursor = service.list_summaries(
        session=session, agent_id=agent_id, status=status, limit=limit, cursor=cursor
    )
    if next_cursor is not None:
        next_url = request.url.include_query_params(cursor=next_cursor)
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return tasks


@operator_router.get("/{taskId}", responses=problems(401, 404, 422))
def get_task(task_id: TaskIdPath, session: SessionDep) -> TaskView:
    """One task with its progress, result and logs (never its credentials)."""
    return service.get_view(session=session, task_id=task_id)


@operator_router.post("/{taskId}/cancel", responses=problems(401, 404, 409, 422))
def cancel_task(task_id: TaskIdPath, session: SessionDep, runtime: RuntimeDep) -> TaskCancelled:
    """Cancel an unfinished task; its agent is told."""
    task = service.cancel(session=session, notifier=runtime.notifier, task_id=task_id)
    return TaskCancelled(task_id=task.id, status=task.status)
