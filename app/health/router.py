"""/healthz (the process answers) and /readyz (and its database does)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import SessionDep
from app.api.problems import problems

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=problems(503))
def readyz(session: SessionDep) -> dict[str, str]:
    # An unreachable database raises OperationalError: rendered as 503.
    session.execute(text("SELECT 1"))
    return {"status": "ready"}
