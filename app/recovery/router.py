"""POST /api/v1/agents/{id}/recover/challenge and /recover: lockout-proof renewal.

No JWT and no valid client certificate required: the proof is the
signature over the challenge (see `app.recovery.service`). So no bearer
scheme either: the OpenAPI document lists them as public operations.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.agents.schemas import AgentRegistered
from app.api.deps import (
    Caller,
    ClientAddressDep,
    RuntimeDep,
    caller_certificate,
    in_transaction,
)
from app.api.problems import problems
from app.recovery import service
from app.recovery.schemas import RecoveryChallengeIssued, RecoveryRequest

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])
AgentIdPath = Annotated[uuid.UUID, Path(alias="id")]


@router.post(
    "/{id}/recover/challenge", status_code=201, responses=problems(403, 404, 413, 422, 429)
)
async def recovery_challenge(
    agent_id: AgentIdPath, request: Request, runtime: RuntimeDep, source: ClientAddressDep
) -> RecoveryChallengeIssued:
    """A single-use challenge (60 s) for an agent whose certificate lapsed within the grace."""
    presented = caller_certificate(runtime, Caller(token=None, scope=request.scope))
    return await in_transaction(
        runtime,
        lambda session: service.issue_challenge(
            session=session,
            runtime=runtime,
            agent_id=agent_id,
            presented_pem=presented,
            source=source,
        ),
    )


@router.post("/{id}/recover", responses=problems(401, 403, 404, 413, 422, 429))
async def recover(
    agent_id: AgentIdPath,
    body: RecoveryRequest,
    request: Request,
    runtime: RuntimeDep,
    source: ClientAddressDep,
) -> AgentRegistered:
    """Redeem the signed challenge: a new certificate for the same key, and a new JWT."""
    presented = caller_certificate(runtime, Caller(token=None, scope=request.scope))
    return await in_transaction(
        runtime,
        lambda session: service.recover(
            session=session,
            runtime=runtime,
            agent_id=agent_id,
            request=body,
            presented_pem=presented,
            source=source,
        ),
    )
