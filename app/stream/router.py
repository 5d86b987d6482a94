"""WS /api/v1/agents/{id}/task-stream: authenticated like every agent call."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, WebSocket
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from app.api.deps import Caller, authenticate
from app.db import transaction
from app.errors import StellaError
from app.runtime import Runtime
from app.stream.hub import Hub
from app.stream.session import CLOSE_FORBIDDEN, CLOSE_TRY_LATER, CLOSE_UNAUTHORIZED, TaskStream

router = APIRouter(tags=["agents"])


@router.websocket("/api/v1/agents/{id}/task-stream")
async def task_stream(websocket: WebSocket, id: str) -> None:
    runtime: Runtime = websocket.app.state.runtime
    hub: Hub = websocket.app.state.hub
    await websocket.accept()
    try:
        agent_id = uuid.UUID(id)
    except ValueError:
        await websocket.close(code=CLOSE_FORBIDDEN, reason="not an agent id")
        return
    try:
        caller_id = await run_in_threadpool(_authenticate, websocket, runtime)
    except StellaError as exc:
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason=exc.detail[:120])
        return
    except DBAPIError:
        await websocket.close(code=CLOSE_TRY_LATER, reason="database unavailable; reconnect later")
        return
    if caller_id != agent_id:
        await websocket.close(code=CLOSE_FORBIDDEN, reason="agent not authorized for this stream")
        return
    await TaskStream(websocket, runtime, hub, agent_id).run()


def _authenticate(websocket: WebSocket, runtime: Runtime) -> uuid.UUID:
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    caller = Caller(token=token if scheme.lower() == "bearer" else None, scope=websocket.scope)
    with transaction(runtime.engine) as session:
        return authenticate(session, runtime, caller).agent.id
