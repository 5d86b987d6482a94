"""Issuing and renewing agent certificates (the CA itself lives in `pki`)."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from app.audit import service as audit_service
from app.certs.renew_at import renewal_threshold
from app.db import after_commit
from app.metrics.instruments import CERTIFICATES_RENEWED
from app.models import Agent
from app.models.types import utcnow
from app.settings import Settings
from pki import AgentPublicKey, CertificateAuthority, issue_client_certificate, load_public_key_pem


@dataclass(frozen=True)
class IssuedCertificate:
    pem: str
    serial: str
    not_after: dt.datetime


def issue(
    *, ca: CertificateAuthority, settings: Settings, agent_id: uuid.UUID, public_key: AgentPublicKey
) -> IssuedCertificate:
    """A certificate for `public_key` naming `agent_id`, valid for STELLA_CERT_TTL."""
    cert = issue_client_certificate(
        ca, agent_id=agent_id, public_key=public_key, ttl=dt.timedelta(seconds=settings.cert_ttl)
    )
    return IssuedCertificate(
        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
    )


def renewal_for(
    *,
    session: Session,
    ca: CertificateAuthority,
    settings: Settings,
    agent: Agent,
    presented_not_after: dt.datetime,
) -> IssuedCertificate | None:
    """The certificate to hand an agent whose presented one is due for renewal, else None.

    Due: within STELLA_CERT_RENEWAL_WINDOW of expiry, or past the agent's
    share of its lifetime under STELLA_CERT_RENEW_AT (`app.certs.renew_at`).

    The decision follows the certificate the agent actually presented, not
    the newest one we stored: if a renewal answer was lost, the agent asks
    again with its old certificate and gets the stored renewal back. A
    renewal issued ahead of time (by a worker) is handed out as it is;
    signing here is the fallback.
    """
    now = utcnow()
    window = renewal_threshold(settings, agent.id)
    if presented_not_after - now > window:
        return None
    # Re-read what is stored now: a concurrent heartbeat (or the sweep) may have
    # renewed since authentication loaded the row; hand that out, sign no second one.
    session.refresh(agent, ["cert_pem", "cert_serial", "cert_not_after"])
    if agent.cert_not_after > presented_not_after and agent.cert_not_after - now > window:
        return IssuedCertificate(
            pem=agent.cert_pem, serial=agent.cert_serial, not_after=agent.cert_not_after
        )
    renewed = issue(
        ca=ca,
        settings=settings,
        agent_id=agent.id,
        public_key=load_public_key_pem(agent.public_key_pem),
    )
    audit_renewal(session=session, agent_id=agent.id, renewed=renewed, previous=agent.cert_serial)
    after_commit(session, CERTIFICATES_RENEWED.inc)
    agent.cert_pem = renewed.pem
    agent.cert_serial = renewed.serial
    agent.cert_not_after = renewed.not_after
    session.add(agent)
    return renewed


def audit_renewal(
    *,
    session: Session,
    agent_id: uuid.UUID,
    renewed: IssuedCertificate,
    previous: str,
    by_sweep: bool = False,
) -> None:
    """Record a renewal: signed ahead by the sweep (system), or on the agent's heartbeat."""
    audit_service.record(
        session=session,
        action="cert.renewed",
        actor=audit_service.SYSTEM if by_sweep else audit_service.agent_actor(agent_id),
        agent_id=agent_id,
        detail={
            "serial": renewed.serial,
            "notAfter": audit_service.timestamp(renewed.not_after),
            "previousSerial": previous,
        },
    )
