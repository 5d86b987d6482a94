"""Annotated dependencies: the request's session, the runtime, and who is calling."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from app.auth.client_cert import MalformedCertificate, presented_certificate
from app.auth.service import AuthenticatedAgent, authenticate_agent, is_operator
from app.db import transaction
from app.errors import Forbidden, Unauthorized
from app.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    """One transaction per request: commit on success, roll back on error."""
    with transaction(runtime.engine) as session:
        yield session


# scope="function": commit before the response is sent, so a failed commit
# becomes an error answer instead of a success that did not happen.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="Operator: STELLA_ADMIN_TOKEN. Agent: its JWT.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_registration_token = APIKeyHeader(name="X-Agent-Token", auto_error=False)
RegistrationTokenDep = Annotated[str | None, Depends(_registration_token)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


def require_operator(runtime: RuntimeDep, credentials: BearerDep) -> None:
    if runtime.settings.admin_token is None:
        raise Unauthorized("the operator API is disabled: STELLA_ADMIN_TOKEN is not set")
    if not is_operator(_token(credentials), runtime.settings.admin_token):
        raise Unauthorized("operator token required")


AdminDep = Depends(require_operator)


def _authenticate_agent(
    request: Request, runtime: RuntimeDep, session: SessionDep, credentials: BearerDep
) -> AuthenticatedAgent:
    try:
        certificate = presented_certificate(request.scope, runtime.settings)
    except MalformedCertificate as exc:
        raise Unauthorized(str(exc)) from exc
    return authenticate_agent(
        session=session,
        ca=runtime.ca,
        signer=runtime.token_signer,
        token=_token(credentials),
        certificate=certificate,
    )


def require_self(
    agent_id: Annotated[uuid.UUID, Path(alias="id")],
    caller: Annotated[AuthenticatedAgent, Depends(_authenticate_agent)],
) -> AuthenticatedAgent:
    """The authenticated agent, which must be the one the path names."""
    if caller.agent.id != agent_id:
        raise Forbidden("agent not authorized for this operation")
    return caller


SelfAgentDep = Annotated[AuthenticatedAgent, Depends(require_self)]


def require_operator_or_self(
    request: Request,
    agent_id: Annotated[uuid.UUID, Path(alias="id")],
    runtime: RuntimeDep,
    session: SessionDep,
    credentials: BearerDep,
) -> None:
    """Operators may read any agent; an agent may read itself."""
    if is_operator(_token(credentials), runtime.settings.admin_token):
        return
    require_self(agent_id, _authenticate_agent(request, runtime, session, credentials))


OperatorOrSelfDep = Depends(require_operator_or_self)
