"""GET /metrics: Prometheus text format, for the operator (or anyone, if public)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.concurrency import run_in_threadpool

from app.api.deps import BearerDep, RuntimeDep, require_operator
from app.api.problems import problems
from app.metrics import exposition

router = APIRouter(tags=["operators"])


async def require_metrics_reader(runtime: RuntimeDep, credentials: BearerDep) -> None:
    if not runtime.settings.metrics_public:
        await require_operator(runtime, credentials)


@router.get(
    "/metrics",
    dependencies=[Depends(require_metrics_reader)],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **problems(401, 503)},
)
async def metrics(request: Request) -> Response:
    """This server's metrics (Prometheus text format); STELLA_METRICS_PUBLIC drops the token."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    body = await run_in_threadpool(exposition.render, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
