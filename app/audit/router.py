"""GET /api/v1/audit (operator): the audit trail, newest first."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import AdminDep, RuntimeDep, in_transaction
from app.api.problems import problems
from app.audit import service
from app.audit.refusals import RefusalRecorder
from app.audit.schemas import AuditAction, AuditEventPublic
from app.pagination import DEFAULT_LIMIT, MAX_LIMIT, set_next_link
from app.schemas import Timestamp

router = APIRouter(prefix="/api/v1/audit", tags=["operators"], dependencies=[AdminDep])


@router.get("", responses=problems(401, 422))
async def list_audit_events(
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    action: AuditAction | None = None,
    agent_id: Annotated[uuid.UUID | None, Query(alias="agentId")] = None,
    since: Annotated[Timestamp | None, Query(description="RFC 3339; events at or after")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> list[AuditEventPublic]:
    """Who did what, and when; the next page's URL is in the `Link` header (rel="next")."""
    refusals: RefusalRecorder = request.app.state.refusals
    await refusals.flush()
    events, next_cursor = await in_transaction(
        runtime,
        lambda session: service.list_events(
            session=session,
            action=action,
            agent_id=agent_id,
            since=since,
            limit=limit,
            cursor=cursor,
        ),
    )
    set_next_link(request, response, next_cursor)
    return events
