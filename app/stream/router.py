"""WS /api/v1/agents/{id}/task-stream: authenticated like every agent call.

A plain Starlette WebSocket route: the endpoint takes no dependencies, and
FastAPI's dependency machinery (exit stacks, solved values) would stay in
memory for as long as each of thousands of streams is open.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.websockets import WebSocket

from app.api.deps import Caller, authenticate
from app.audit.refusals import RefusalRecorder, refusal_of
from app.db import transaction
from app.errors import StellaError
from app.runtime import Runtime
from app.stream.claims import ClaimBatcher
from app.stream.hub import Hub
from app.stream.recheck import Recheck
from app.stream.session import CLOSE_FORBIDDEN, CLOSE_TRY_LATER, CLOSE_UNAUTHORIZED, TaskStream

PATH = "/api/v1/agents/{id}/task-stream"
FORBIDDEN_STREAM = "agent not authorized for this stream"


async def task_stream(websocket: WebSocket) -> None:
    state: State = websocket.app.state
    runtime: Runtime = state.runtime
    hub: Hub = state.hub
    await websocket.accept()
    try:
        agent_id = uuid.UUID(websocket.path_params["id"])
    except ValueError:
        await websocket.close(code=CLOSE_FORBIDDEN, reason="not an agent id")
        return
    try:
        caller_id = await run_in_threadpool(_authenticate, websocket, runtime)
    except StellaError as exc:
        _refused(state, websocket, exc.detail, exc.status)
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason=exc.detail[:120])
        return
    except DBAPIError:
        await websocket.close(code=CLOSE_TRY_LATER, reason="database unavailable; reconnect later")
        return
    if caller_id != agent_id:
        _refused(state, websocket, FORBIDDEN_STREAM, 403)
        await websocket.close(code=CLOSE_FORBIDDEN, reason=FORBIDDEN_STREAM)
        return
    await TaskStream(websocket, runtime, agent_id).run(
        hub, recheck(state, runtime), claims(state, runtime)
    )


def recheck(state: State, runtime: Runtime) -> Recheck:
    """The web app's one `Recheck`, made by its first stream."""
    found: Recheck | None = getattr(state, "stream_recheck", None)
    if found is None:
        found = state.stream_recheck = Recheck(runtime)
    return found


def claims(state: State, runtime: Runtime) -> ClaimBatcher:
    """The web app's one `ClaimBatcher`, made by its first stream."""
    found: ClaimBatcher | None = getattr(state, "stream_claims", None)
    if found is None:
        found = state.stream_claims = ClaimBatcher(runtime)
    return found


def _refused(state: State, websocket: WebSocket, reason: str, status: int) -> None:
    recorder: RefusalRecorder = state.refusals
    recorder.refused(refusal_of(websocket.scope, reason=reason, status=status, route=PATH))


def _authenticate(websocket: WebSocket, runtime: Runtime) -> uuid.UUID:
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    caller = Caller(token=token if scheme.lower() == "bearer" else None, scope=websocket.scope)
    with transaction(runtime.engine) as session:
        return authenticate(session, runtime, caller).agent.id


router = APIRouter(tags=["agents"])
router.add_websocket_route(PATH, task_stream, name="task_stream")
