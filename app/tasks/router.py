"""Task endpoints: the agent's poll and completion, the operator's dispatch and views."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlmodel import Session

from app.api.deps import (
    AdminDep,
    CallerDep,
    RuntimeDep,
    authenticate_self,
    in_transaction,
)
from app.api.problems import problems
from app.dispatch import service as dispatch_service
from app.pagination import DEFAULT_LIMIT, MAX_LIMIT, set_next_link
from app.signing import receipts
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
AgentIdPath = Annotated[uuid.UUID, Path(alias="id")]
TaskIdPath = Annotated[uuid.UUID, Path(alias="taskId")]


@agent_router.get("", responses=problems(401, 403, 422))
async def poll_tasks(
    agent_id: AgentIdPath, runtime: RuntimeDep, caller: CallerDep
) -> TaskPendingList:
    """Every unfinished task of the agent; pending ones become assigned."""

    def work(session: Session) -> TaskPendingList:
        me = authenticate_self(session, runtime, caller, agent_id)
        tasks = service.open_tasks_for_agent(
            session=session, cipher=runtime.cipher, agent_id=me.agent.id
        )
        return TaskPendingList(tasks=tasks)

    return await in_transaction(runtime, work)


@agent_router.post("/{taskId}/complete", responses=problems(401, 403, 404, 409, 413, 422))
async def complete_task(
    agent_id: AgentIdPath,
    task_id: TaskIdPath,
    body: TaskComplete,
    runtime: RuntimeDep,
    caller: CallerDep,
) -> Acknowledged:
    """Report the outcome; repeating the same outcome is acknowledged again."""

    def work(session: Session) -> None:
        me = authenticate_self(session, runtime, caller, agent_id)
        receipt = (
            receipts.verify(
                agent=me.agent,
                task_id=task_id,
                success=body.success,
                result=body.result,
                receipt=body.receipt,
            )
            if body.receipt is not None
            else None
        )
        service.complete(
            session=session,
            settings=runtime.settings,
            agent_id=me.agent.id,
            task_id=task_id,
            report=body,
        )
        if receipt is not None:
            receipts.store(session=session, receipt=receipt)

    await in_transaction(runtime, work)
    return Acknowledged()


@operator_router.post(
    "",
    status_code=201,
    responses={
        202: {"model": DispatchAccepted, "description": "Selector dispatch accepted"},
        **problems(401, 404, 413, 422, 503),
    },
)
async def dispatch_task(body: TaskCreate, runtime: RuntimeDep) -> TasksCreated:
    """Dispatch to one agent (201) or fan out by capability and labels (202)."""
    outcome = await in_transaction(
        runtime,
        lambda session: dispatch_service.submit(session=session, runtime=runtime, spec=body),
    )
    if isinstance(outcome, DispatchAccepted):
        # Rendered here: the declared response model is the 201 one.
        return JSONResponse(outcome.model_dump(mode="json", by_alias=True), status_code=202)  # type: ignore[return-value]
    return outcome


@operator_router.get("", responses=problems(401, 422))
async def list_tasks(
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    agent_id: Annotated[uuid.UUID | None, Query(alias="agentId")] = None,
    status: TaskStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> list[TaskSummary]:
    """Tasks newest first; the next page's URL is in the `Link` header (rel="next")."""
    tasks, next_cursor = await in_transaction(
        runtime,
        lambda session: service.list_summaries(
            session=session, agent_id=agent_id, status=status, limit=limit, cursor=cursor
        ),
    )
    set_next_link(request, response, next_cursor)
    return tasks


@operator_router.get("/{taskId}", responses=problems(401, 404, 422))
async def get_task(task_id: TaskIdPath, runtime: RuntimeDep) -> TaskView:
    """One task with its progress, result and logs (never its credentials)."""
    return await in_transaction(
        runtime, lambda session: service.get_view(session=session, task_id=task_id)
    )


@operator_router.post("/{taskId}/cancel", responses=problems(401, 404, 409, 422))
async def cancel_task(task_id: TaskIdPath, runtime: RuntimeDep) -> TaskCancelled:
    """Cancel an unfinished task; its agent is told."""

    def work(session: Session) -> TaskCancelled:
        task = service.cancel(session=session, notifier=runtime.notifier, task_id=task_id)
        return TaskCancelled(task_id=task.id, status=task.status)

    return await in_transaction(runtime, work)
