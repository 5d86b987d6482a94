"""The FastAPI application, built by `create_app(settings)`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from app.agents.heartbeat_lane import HeartbeatFastLane
from app.agents.heartbeats import HeartbeatService
from app.agents.router import router as agents_router
from app.api.body_limit import BodyLimitMiddleware
from app.api.refusals import install_refusal_audit
from app.audit.refusals import RefusalRecorder
from app.audit.router import router as audit_router
from app.certs.router import router as certs_router
from app.dispatch.router import router as dispatch_router
from app.errors import install_error_handlers
from app.forecast.router import router as forecast_router
from app.health.router import router as health_router
from app.logs.middleware import RequestIdMiddleware
from app.metrics.exposition import registry_for
from app.metrics.middleware import RequestMetricsMiddleware
from app.metrics.router import router as metrics_router
from app.notify import AgentEvent, LocalNotifier
from app.recovery.router import router as recovery_router
from app.runtime import Runtime, build_runtime
from app.settings import Settings, get_settings
from app.signing.router import agent_router as signing_agent_router
from app.signing.router import operator_router as receipts_router
from app.stream.hub import Hub, LocalHub, RedisHub
from app.stream.router import router as stream_router
from app.sweeps.router import router as sweeps_router
from app.tasks.router import agent_router as agent_tasks_router
from app.tasks.router import operator_router as tasks_router
from app.tokens.router import router as tokens_router


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The web app. Loads (or on first start creates) the PKI, so a broken one fails here."""
    settings = settings or get_settings()
    runtime = runtime or build_runtime(settings)
    bound_runtime = runtime

    hub = make_hub(runtime)
    heartbeats = HeartbeatService(runtime)
    hub.listen(heartbeats.on_event)
    refusals = RefusalRecorder(runtime.engine, interval=settings.audit_flush_interval)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        # Events this process publishes (from worker threads), onto the loop;
        # queued before the publishing request's own answer resumes.
        def hear(event: AgentEvent) -> None:
            loop.call_soon_threadsafe(heartbeats.on_event, event)

        bound_runtime.notifier.subscribe_all(hear)
        await hub.start()
        await heartbeats.start()
        await refusals.start()
        yield
        # Heartbeats first: their last writes need the database, not the hub.
        await heartbeats.stop()
        await refusals.stop()
        await hub.stop()
        bound_runtime.close()

    app = StellaApp(
        heartbeats,
        title="Stella agent dispatch",
        version="0.1.0",
        summary="Registration, mTLS certificates, heartbeats and task dispatch for agents.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.hub = hub
    app.state.heartbeats = heartbeats
    app.state.refusals = refusals
    app.state.metrics_registry = registry_for(runtime.engine, settings)
    install_error_handlers(app)
    install_refusal_audit(app, refusals)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Outermost of ours: its timing includes the body limit and every handler.
    app.add_middleware(RequestMetricsMiddleware)
    for router in (
        health_router,
        certs_router,
        tokens_router,
        agents_router,
        agent_tasks_router,
        tasks_router,
        signing_agent_router,
        receipts_router,
        dispatch_router,
        audit_router,
        recovery_router,
        forecast_router,
        sweeps_router,
        stream_router,
        metrics_router,
    ):
        app.include_router(router)
    return app


class StellaApp(FastAPI):
    """FastAPI, with the heartbeat fast lane in front of its whole middleware stack
    (and the request id in front of that).

    Outermost, so that the steady heartbeat skips even the framework's own
    error and telemetry middleware; the lane hands anything it does not
    answer (and any error of its own) to that stack.
    """

    def __init__(self, heartbeats: HeartbeatService, **kwargs: Any) -> None:
        self._heartbeats = heartbeats
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        lane = HeartbeatFastLane(
            stack, heartbeats=self._heartbeats, settings=self._heartbeats.settings
        )
        return RequestIdMiddleware(lane)


def make_hub(runtime: Runtime) -> Hub:
    """Redis pub/sub across processes where STELLA_REDIS_URL is set, else this process only."""
    settings = runtime.settings
    if settings.redis_url:
        return RedisHub(settings.redis_url, prefix=settings.broker_key_prefix)
    assert isinstance(runtime.notifier, LocalNotifier)
    return LocalHub(runtime.notifier)
