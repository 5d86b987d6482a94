"""GET /api/v1/sweeps/guard (operator): is the mass-offline guard holding the offline sweep?"""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdminDep, RuntimeDep, in_transaction
from app.api.problems import problems
from app.models.types import utcnow
from app.sweeps import guard
from app.sweeps.schemas import OfflineGuardPublic

router = APIRouter(prefix="/api/v1/sweeps", tags=["operators"], dependencies=[AdminDep])


@router.get("/guard", responses=problems(401))
async def offline_guard(runtime: RuntimeDep) -> OfflineGuardPublic:
    """Engaged or not, why, since and until when, and how many agents it keeps online."""
    settings = runtime.settings
    return await in_transaction(
        runtime, lambda session: guard.view(session=session, settings=settings, now=utcnow())
    )
