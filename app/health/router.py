"""/healthz (the process answers) and /readyz (and its database does)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import RuntimeDep, in_transaction
from app.api.problems import problems

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=problems(503))
async def readyz(runtime: RuntimeDep) -> dict[str, str]:
    # An unreachable database raises OperationalError: rendered as 503.
    await in_transaction(runtime, lambda session: session.execute(text("SELECT 1")))
    return {"status": "ready"}
