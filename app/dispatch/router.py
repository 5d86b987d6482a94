"""GET /api/v1/dispatches/{dispatchId} (operator)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path

from app.api.deps import AdminDep, RuntimeDep, in_transaction
from app.api.problems import problems
from app.dispatch import service
from app.tasks.schemas import DispatchView

router = APIRouter(prefix="/api/v1/dispatches", tags=["operators"], dependencies=[AdminDep])


@router.get("/{dispatchId}", responses=problems(401, 404, 422))
async def get_dispatch(
    dispatch_id: Annotated[uuid.UUID, Path(alias="dispatchId")], runtime: RuntimeDep
) -> DispatchView:
    """A selector dispatch and the tasks it has created so far."""
    return await in_transaction(
        runtime, lambda session: service.view(session=session, dispatch_id=dispatch_id)
    )
