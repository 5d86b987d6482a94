"""Agents: registration, the fleet listing, operator updates, deletion, heartbeats."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import Session, col

from app.agents import selectors
from app.agents.schemas import (
    AgentCertificate,
    AgentCertificateInfo,
    AgentConfig,
    AgentDetail,
    AgentPublic,
    AgentRegister,
    AgentRegistered,
    AgentUpdate,
)
from app.audit import service as audit_service
from app.certs import service as certs_service
from app.db import after_commit, insert_ignoring_conflicts
from app.errors import Conflict, InvalidInput, NotFound, Unauthorized
from app.metrics.instruments import CERTIFICATES_ISSUED
from app.models import Agent, Task
from app.notify import AgentEvent
from app.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from app.runtime import Runtime
from app.signing.tasks import published_keys
from app.tasks import service as tasks_service
from app.tasks.schemas import OPEN_STATUSES
from app.tokens import service as tokens_service
from pki import CsrError, generate_agent_key, jwk_thumbprint, private_key_pem, public_key_pem
from pki.csr import public_key_from_csr


def register(
    *,
    session: Session,
    runtime: Runtime,
    token: str,
    request: AgentRegister,
    source: str | None = None,
) -> AgentRegistered:
    """Spend the registration token and create the agent with its certificate and JWT.

    One transaction: a registration that fails (taken name, bad CSR) spends
    no token and leaves no audit event. 401 for a bad, used or expired
    token; 409 for a taken name; 429 for any registration from a `source`
    past its failed attempts (see `app.tokens.guard`).
    """
    guard = runtime.registration_guard
    if source is not None:
        guard.check(source)
    if request.csr is not None:
        try:
            public_key = public_key_from_csr(request.csr)
        except CsrError as exc:
            raise InvalidInput(f"csr: {exc}") from exc
        private_key_out = None
    else:
        private_key = generate_agent_key()
        public_key = private_key.public_key()
        private_key_out = private_key_pem(private_key)

    agent_id = uuid.uuid4()
    if not tokens_service.consume_token(session=session, token=token, agent_id=agent_id):
        if source is not None:
            guard.failed(source)
        raise Unauthorized("registration token is invalid, used or expired")

    issued = certs_service.issue(
        ca=runtime.ca, settings=runtime.settings, agent_id=agent_id, public_key=public_key
    )
    thumbprint = jwk_thumbprint(public_key)
    agent = Agent(
        id=agent_id,
        name=request.name,
        version=request.version,
        capabilities=request.capabilities,
        labels=request.labels,
        public_key_pem=public_key_pem(public_key),
        key_thumbprint=thumbprint,
        cert_pem=issued.pem,
        cert_serial=issued.serial,
        cert_not_after=issued.not_after,
    )
    # ON CONFLICT rather than a savepoint: two round trips fewer per registration.
    inserted = insert_ignoring_conflicts(
        session, Agent, [agent.model_dump()], conflict_columns=("name",), returning=("id",)
    )
    if not inserted:
        raise Conflict(f"agent name {request.name!r} is already registered")
    _audit_registration(session, agent, source=source, csr=request.csr is not None)
    after_commit(session, CERTIFICATES_ISSUED.inc)

    settings = runtime.settings
    return AgentRegistered(
        agent_id=agent_id,
        token=runtime.token_signer.issue(
            agent_id=agent_id,
            key_thumbprint=thumbprint,
            issued_at=int(agent.registered_at.timestamp()),
        ),
        config=AgentConfig(
            heartbeat_interval=settings.heartbeat_interval,
            task_poll_interval=settings.task_poll_interval,
            log_level=settings.agent_log_level,
        ),
        certificate=AgentCertificate(
            cert=issued.pem,
            key=private_key_out,
            ca=runtime.ca.cert_pem,
            expires_at=issued.not_after,
        ),
        task_signing_keys=published_keys(runtime.task_keys),
    )


def _audit_registration(session: Session, agent: Agent, *, source: str | None, csr: bool) -> None:
    actor = audit_service.agent_actor(agent.id)
    audit_service.record(
        session=session,
        action="agent.registered",
        actor=actor,
        agent_id=agent.id,
        source=source,
        detail={
            "name": agent.name,
            "version": agent.version,
            "capabilities": agent.capabilities,
            "labels": agent.labels,
        },
    )
    audit_service.record(
        session=session,
        action="cert.issued",
        actor=actor,
        agent_id=agent.id,
        source=source,
        detail={
            "serial": agent.cert_serial,
            "notAfter": audit_service.timestamp(agent.cert_not_after),
            # Whether the key came from the agent's CSR or was generated here.
            "keyFrom": "csr" if csr else "server",
        },
    )


def get(*, session: Session, agent_id: uuid.UUID) -> Agent:
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    return agent


def detail(*, session: Session, agent_id: uuid.UUID) -> AgentDetail:
    """Everything known about one agent."""
    agent = get(session=session, agent_id=agent_id)
    open_tasks = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(col(Task.agent_id) == agent_id, col(Task.status).in_(OPEN_STATUSES))
    )
    return AgentDetail(
        **public(agent).model_dump(),
        reported_status=agent.reported_status,
        running_tasks=agent.running_tasks,
        registered_at=agent.registered_at,
        certificate=AgentCertificateInfo(serial=agent.cert_serial, expires_at=agent.cert_not_after),
        open_tasks=open_tasks or 0,
    )


def public(agent: Agent) -> AgentPublic:
    return AgentPublic.model_validate(agent)


def list_public(
    *,
    session: Session,
    status: str | None = None,
    capability: str | None = None,
    labels: dict[str, str] | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[AgentPublic], str | None]:
    """Agents by name, filtered, one keyset page at a time (next cursor or None)."""
    dialect = session.get_bind().dialect.name
    query = select(Agent).where(selectors.matches(dialect, capability=capability, labels=labels))
    if status is not None:
        query = query.where(col(Agent.status) == status)
    if cursor is not None:
        (after_name,) = decode_cursor(cursor, 1)
        query = query.where(col(Agent.name) > str(after_name))
    rows = session.scalars(query.order_by(col(Agent.name)).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].name) if len(rows) > limit else None
    return [public(agent) for agent in page], next_cursor


def update(
    *, session: Session, agent_id: uuid.UUID, changes: AgentUpdate, source: str | None = None
) -> AgentDetail:
    """Apply an operator's changes (fields left out stay as they are)."""
    agent = get(session=session, agent_id=agent_id)
    previous_name = agent.name
    if changes.name is not None:
        agent.name = changes.name
    if changes.labels is not None:
        agent.labels = dict(changes.labels)
    if changes.capabilities is not None:
        agent.capabilities = list(changes.capabilities)
    try:
        with session.begin_nested():
            session.add(agent)
            session.flush()
    except IntegrityError as exc:
        raise Conflict(f"agent name {changes.name!r} is already registered") from exc
    except StaleDataError as exc:
        # Deleted by a concurrent request after we read it.
        raise NotFound(f"agent {agent_id} not found") from exc
    audit_service.record(
        session=session,
        action="agent.updated",
        actor=audit_service.OPERATOR,
        agent_id=agent_id,
        source=source,
        detail={
            "name": previous_name,
            "changes": changes.model_dump(exclude_none=True, by_alias=True),
        },
    )
    return detail(session=session, agent_id=agent_id)


def delete_agent(
    *, session: Session, runtime: Runtime, agent_id: uuid.UUID, source: str | None = None
) -> None:
    """Remove the agent: its JWT and certificate fail from the next request on.

    Its unfinished tasks are cancelled; finished ones stay as history.
    """
    deleted = session.execute(
        delete(Agent).where(col(Agent.id) == agent_id).returning(col(Agent.name))
    ).first()
    if deleted is None:
        raise NotFound(f"agent {agent_id} not found")
    cancelled = tasks_service.cancel_all_for_agent(
        session=session, agent_id=agent_id, reason="agent deleted"
    )
    audit_service.record(
        session=session,
        action="agent.deleted",
        actor=audit_service.OPERATOR,
        agent_id=agent_id,
        source=source,
        detail={"name": deleted[0], "cancelledTasks": cancelled},
    )
    notifier = runtime.notifier
    after_commit(session, lambda: notifier.publish(AgentEvent("agent_deleted", agent_id=agent_id)))
