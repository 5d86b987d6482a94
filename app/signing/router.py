"""Task-signing keys for agents; receipts for operators."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path
from sqlmodel import Session

from app.api.deps import AdminDep, CallerDep, RuntimeDep, authenticate_self, in_transaction
from app.api.problems import problems
from app.signing import receipts
from app.signing.schemas import ReceiptView, SigningKeys
from app.signing.tasks import published_keys

agent_router = APIRouter(prefix="/api/v1/agents/{id}", tags=["agents"])
operator_router = APIRouter(prefix="/api/v1/tasks", tags=["operators"], dependencies=[AdminDep])
AgentIdPath = Annotated[uuid.UUID, Path(alias="id")]
TaskIdPath = Annotated[uuid.UUID, Path(alias="taskId")]


@agent_router.get("/task-signing-keys", responses=problems(401, 403, 422))
async def task_signing_keys(
    agent_id: AgentIdPath, runtime: RuntimeDep, caller: CallerDep
) -> SigningKeys:
    """The public keys that sign tasks now, over the agent's own mutual-TLS channel."""

    def work(session: Session) -> SigningKeys:
        authenticate_self(session, runtime, caller, agent_id)
        return SigningKeys(keys=published_keys(runtime.task_keys))

    return await in_transaction(runtime, work)


@operator_router.get("/{taskId}/receipt", responses=problems(401, 404, 422))
async def task_receipt(task_id: TaskIdPath, runtime: RuntimeDep) -> ReceiptView:
    """The agent's signed receipt, with its certificate and the CA's, to check offline."""
    return await in_transaction(
        runtime,
        lambda session: receipts.view(session=session, task_id=task_id, ca_pem=runtime.ca.cert_pem),
    )
