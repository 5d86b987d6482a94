"""The agent endpoints of the seed: register, list, get, update, delete, heartbeat."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from sqlmodel import Session

from app.agents import service
from app.agents.heartbeats import HeartbeatService
from app.agents.schemas import (
    AgentDeleted,
    AgentDetail,
    AgentPublic,
    AgentRegister,
    AgentRegistered,
    AgentStatus,
    AgentUpdate,
    Heartbeat,
    HeartbeatAnswer,
)
from app.api.deps import (
    AdminDep,
    CallerDep,
    ClientAddressDep,
    RegistrationTokenDep,
    RuntimeDep,
    authorize_operator_or_self,
    caller_certificate,
    in_transaction,
)
from app.api.problems import problems
from app.errors import InvalidInput, Unauthorized
from app.pagination import DEFAULT_LIMIT, MAX_LIMIT, set_next_link

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])
AgentIdPath = Annotated[uuid.UUID, Path(alias="id")]


@router.post("/register", status_code=201, responses=problems(401, 409, 413, 422, 429))
async def register_agent(
    body: AgentRegister, runtime: RuntimeDep, token: RegistrationTokenDep, source: ClientAddressDep
) -> AgentRegistered:
    """Register with a single-use token; get a JWT and a client certificate."""
    if not token:
        raise Unauthorized("registration token required (X-Agent-Token)")
    return await in_transaction(
        runtime,
        lambda session: service.register(
            session=session, runtime=runtime, token=token, request=body, source=source
        ),
    )


@router.get("", dependencies=[AdminDep], tags=["operators"], responses=problems(401, 422))
async def list_agents(
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    status: AgentStatus | None = None,
    capability: str | None = None,
    label: Annotated[
        list[str] | None, Query(description="key=value; repeat to require several")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> list[AgentPublic]:
    """The fleet by name; the next page's URL is in the `Link` header (rel="next")."""
    labels = _parse_labels(label or [])
    await _heartbeats(request).flush()
    agents, next_cursor = await in_transaction(
        runtime,
        lambda session: service.list_public(
            session=session,
            status=status,
            capability=capability,
            labels=labels,
            limit=limit,
            cursor=cursor,
        ),
    )
    set_next_link(request, response, next_cursor)
    return agents


@router.get("/{id}", responses=problems(401, 403, 404, 422))
async def get_agent(
    agent_id: AgentIdPath, request: Request, runtime: RuntimeDep, caller: CallerDep
) -> AgentDetail:
    """One agent in full (operators, or the agent itself)."""
    await _heartbeats(request).flush()

    def work(session: Session) -> AgentDetail:
        authorize_operator_or_self(session, runtime, caller, agent_id)
        return service.detail(session=session, agent_id=agent_id)

    return await in_transaction(runtime, work)


@router.put(
    "/{id}",
    dependencies=[AdminDep],
    tags=["operators"],
    responses=problems(401, 404, 409, 413, 422),
)
async def update_agent(
    agent_id: AgentIdPath, body: AgentUpdate, runtime: RuntimeDep, source: ClientAddressDep
) -> AgentDetail:
    """Change an agent's labels, capabilities or name."""
    return await in_transaction(
        runtime,
        lambda session: service.update(
            session=session, agent_id=agent_id, changes=body, source=source
        ),
    )


@router.delete(
    "/{id}", dependencies=[AdminDep], tags=["operators"], responses=problems(401, 404, 422)
)
async def delete_agent(
    agent_id: AgentIdPath, runtime: RuntimeDep, source: ClientAddressDep
) -> AgentDeleted:
    """Revoke the agent's credentials and remove its registration."""
    await in_transaction(
        runtime,
        lambda session: service.delete_agent(
            session=session, runtime=runtime, agent_id=agent_id, source=source
        ),
    )
    return AgentDeleted()


# The answer of most heartbeats, ready-made.
_NO_TASKS = b'{"tasks":[]}'


@router.post(
    "/{id}/heartbeat", response_model=HeartbeatAnswer, responses=problems(401, 403, 413, 422)
)
async def heartbeat(
    agent_id: AgentIdPath, body: Heartbeat, request: Request, runtime: RuntimeDep, caller: CallerDep
) -> Any:
    """Report liveness; the answer carries pending tasks and, near expiry, a new certificate."""
    answer = await _heartbeats(request).receive(
        agent_id=agent_id,
        report=body,
        token=caller.token,
        certificate_pem=caller_certificate(runtime, caller),
    )
    if answer is None:
        return Response(_NO_TASKS, media_type="application/json")
    return answer


def _heartbeats(request: Request) -> HeartbeatService:
    heartbeats: HeartbeatService = request.app.state.heartbeats
    return heartbeats


def _parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"label filter {pair!r} must be key=value")
        labels[key] = value
    return labels
