"""What every router shares: the runtime, who is calling, and the request's transaction.

A request's database work and its commit run in ONE worker thread
(`in_transaction`). Spreading them over several thread hops (a session
dependency, then the endpoint, then the commit) lets a request hold a lock
(a row lock; SQLite's write lock) while it waits for a free thread to
commit: enough such requests starve the pool and every request waits. So
the dependencies here do no I/O and are `async` (no thread hop at all), and
each endpoint hands its work to `in_transaction` once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from app.auth.client_cert import MalformedCertificate, presented_certificate_pem
from app.auth.service import AuthenticatedAgent, authenticate_agent, is_operator
from app.db import transaction
from app.errors import Forbidden, Unauthorized
from app.runtime import Runtime
from app.tokens.guard import source_address

T = TypeVar("T")


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_bearer = HTTPBearer(auto_error=False, description="Operator: STELLA_ADMIN_TOKEN. Agent: its JWT.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_registration_token = APIKeyHeader(name="X-Agent-Token", auto_error=False)
RegistrationTokenDep = Annotated[str | None, Depends(_registration_token)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


async def require_operator(runtime: RuntimeDep, credentials: BearerDep) -> None:
    if runtime.settings.admin_token is None:
        raise Unauthorized("the operator API is disabled: STELLA_ADMIN_TOKEN is not set")
    if not is_operator(_token(credentials), runtime.settings.admin_token):
        raise Unauthorized("operator token required")


AdminDep = Depends(require_operator)


@dataclass(frozen=True)
class Caller:
    """What a request presents: its bearer token and its connection's scope."""

    token: str | None
    scope: Any


async def get_caller(request: Request, credentials: BearerDep) -> Caller:
    return Caller(token=_token(credentials), scope=request.scope)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_client_address(request: Request, runtime: RuntimeDep) -> str | None:
    """The caller's address, as the audit trail and the registration guard name it:
    the TCP peer, or the address a trusted proxy forwarded."""
    return source_address(request.scope, runtime.settings)


ClientAddressDep = Annotated[str | None, Depends(get_client_address)]


async def in_transaction(runtime: Runtime, work: Callable[[Session], T]) -> T:
    """Run `work(session)` and commit, in one worker thread; roll back on error."""
    return await run_in_threadpool(_run, runtime.engine, work)


def _run(engine: Engine, work: Callable[[Session], T]) -> T:
    with transaction(engine) as session:
        return work(session)


def authenticate(session: Session, runtime: Runtime, caller: Caller) -> AuthenticatedAgent:
    """The agent the caller's JWT and client certificate both name (401 otherwise)."""
    return authenticate_agent(
        session=session,
        auth=runtime.auth,
        token=caller.token,
        certificate_pem=caller_certificate(runtime, caller),
    )


def caller_certificate(runtime: Runtime, caller: Caller) -> str | None:
    """The PEM client certificate the caller presented (401 when it is malformed)."""
    try:
        return presented_certificate_pem(caller.scope, runtime.settings)
    except MalformedCertificate as exc:
        raise Unauthorized(str(exc)) from exc


def authenticate_self(
    session: Session, runtime: Runtime, caller: Caller, agent_id: uuid.UUID
) -> AuthenticatedAgent:
    """The authenticated agent, which must be the one the path names (403 otherwise)."""
    agent = authenticate(session, runtime, caller)
    if agent.agent.id != agent_id:
        raise Forbidden("agent not authorized for this operation")
    return agent


def authorize_operator_or_self(
    session: Session, runtime: Runtime, caller: Caller, agent_id: uuid.UUID
) -> None:
    """Operators may read any agent; an agent may read itself."""
    if not is_operator(caller.token, runtime.settings.admin_token):
        authenticate_self(session, runtime, caller, agent_id)
