"""dispatch.expand: fan a selector dispatch out into one task per matching agent."""

from __future__ import annotations

import uuid

from app.dispatch import service as dispatch_service
from app.jobs import EXPAND_DISPATCH
from workers.celery_app import celery_app
from workers.runtime import runtime


@celery_app.task(name=EXPAND_DISPATCH)  # type: ignore[untyped-decorator]
def expand(dispatch_id: str) -> int:
    return dispatch_service.expand(runtime=runtime(), dispatch_id=uuid.UUID(dispatch_id))
