"""GET /api/v1/sweeps/guard (operator): is the mass-offline guard holding the offline sweep?"""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import Session

from app.api.deps import AdminDep, RuntimeDep, in_transaction
from app.api.problems import problems
from app.models.types import utcnow
from app.settings import Settings
from app.sweeps import guard
from app.sweeps.schemas import GuardEngagements, OfflineGuardPublic

router = APIRouter(prefix="/api/v1/sweeps", tags=["operators"], dependencies=[AdminDep])


@router.get("/guard", responses=problems(401))
async def offline_guard(runtime: RuntimeDep) -> OfflineGuardPublic:
    """Engaged or not, why, since and until when, and how many agents it keeps online."""
    settings = runtime.settings
    return await in_transaction(runtime, lambda session: _view(session, settings))


def _view(session: Session, settings: Settings) -> OfflineGuardPublic:
    state = guard.state(session=session, settings=settings, now=utcnow())
    return OfflineGuardPublic(
        engaged=state.engaged,
        reason=state.reason,
        since=state.since,
        until=state.until,
        agents_held=state.agents_held,
        silent_when_engaged=state.silent_when_engaged,
        percent=settings.offline_guard_percent,
        grace_seconds=int(guard.grace(settings).total_seconds()),
        engagements=GuardEngagements(
            outage=state.engagements[guard.OUTAGE], percent=state.engagements[guard.PERCENT]
        ),
    )
