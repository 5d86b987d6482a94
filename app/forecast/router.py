"""GET /api/v1/certificates/forecast (operator): the lockout forecast."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.agents.heartbeats import HeartbeatService
from app.api.deps import AdminDep, RuntimeDep, in_transaction
from app.api.problems import problems
from app.forecast import service
from app.forecast.schemas import LockoutForecast

router = APIRouter(prefix="/api/v1/certificates", tags=["operators"], dependencies=[AdminDep])


@router.get("/forecast", responses=problems(401, 422))
async def lockout_forecast(
    request: Request,
    runtime: RuntimeDep,
    hours: Annotated[int, Query(ge=1, le=24 * 366)] = 24,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> LockoutForecast:
    """How many agents' certificates expire within `hours` with no renewal in sight, and which."""
    heartbeats: HeartbeatService = request.app.state.heartbeats
    await heartbeats.flush()  # judge silence on this process's latest heartbeats too
    return await in_transaction(
        runtime,
        lambda session: service.forecast(
            session=session, settings=runtime.settings, hours=hours, limit=limit
        ),
    )
