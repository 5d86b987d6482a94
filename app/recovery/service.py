"""Lockout-proof renewal: proof of possession of the certified key, then a new certificate.

An agent whose certificate expired while its host was off cannot make any
mTLS call, and its heartbeat was the only way to a renewal. With
STELLA_CERT_GRACE set, for that many seconds after the expiry of the newest
certificate issued to it, it may instead:

1. ask for a challenge (`issue_challenge`): bound to the agent by a MAC,
   valid CHALLENGE_TTL, and stored nowhere (app/recovery/challenges.py);
2. sign `stella-cert-recovery:<agentId>:<challenge>` with its key and
   redeem it (`recover`): the signature must verify with the public key
   recorded for the agent at registration; the challenge's nonce is
   stored in the same transaction that issues the certificate, so of two
   redemptions of one challenge exactly one wins.

It gets a fresh certificate for the same key and a fresh JWT, as at
registration, without a registration token. No valid client certificate
is needed (it has expired); one presented (through a trusted proxy: our
own TLS listener refuses an expired one in the handshake) must be ours and
name this agent and key, whatever its dates.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
from sqlalchemy import delete
from sqlmodel import Session, col

from app.agents.schemas import AgentCertificate, AgentConfig, AgentRegistered
from app.audit import service as audit_service
from app.auth.client_cert import MalformedCertificate, load_certificate
from app.certs import service as certs_service
from app.db import insert_ignoring_conflicts
from app.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from app.models import Agent, RecoveryChallenge
from app.models.types import utcnow
from app.recovery.challenges import OpenedChallenge
from app.recovery.schemas import RecoveryChallengeIssued, RecoveryRequest
from app.runtime import Runtime
from app.settings import Settings
from app.tokens.guard import RegistrationGuard
from pki import (
    AgentPublicKey,
    CertificateAuthority,
    CertificateRejected,
    CsrError,
    jwk_thumbprint,
    load_public_key_pem,
    public_key_from_csr,
    verify_client_certificate,
)


def signed_message(agent_id: uuid.UUID | str, challenge: str) -> bytes:
    """What the agent signs: the challenge, bound to its id and to this purpose."""
    return f"stella-cert-recovery:{agent_id}:{challenge}".encode()


def issue_challenge(
    *,
    session: Session,
    runtime: Runtime,
    agent_id: uuid.UUID,
    presented_pem: str | None,
    source: str | None = None,
) -> RecoveryChallengeIssued:
    """A new single-use challenge for `agent_id` (nothing is written).

    429 for a `source` past its failed attempts (see `app.tokens.guard`).
    """
    now = utcnow()
    with _failures_counted(runtime.registration_guard, source):
        agent = _eligible_agent(session, runtime.settings, agent_id, now)
    _check_presented(runtime.ca, presented_pem, agent)
    challenge, expires_at = runtime.recovery_challenges.issue(agent_id, now)
    return RecoveryChallengeIssued(agent_id=agent_id, challenge=challenge, expires_at=expires_at)


def recover(
    *,
    session: Session,
    runtime: Runtime,
    agent_id: uuid.UUID,
    request: RecoveryRequest,
    presented_pem: str | None,
    source: str | None = None,
) -> AgentRegistered:
    """Spend the challenge and re-certify the agent's key; its new certificate and JWT.

    401: a challenge not made here for this agent, expired or already used,
    or a signature that does not verify; each counts as a failed attempt of
    `source` (429 past the limit, as for registration tokens). 403: the
    grace is off or passed, or a presented certificate names another agent.
    404: no such agent (deleted).
    """
    settings = runtime.settings
    now = utcnow()
    with _failures_counted(runtime.registration_guard, source):
        agent = _eligible_agent(session, settings, agent_id, now)
        _check_presented(runtime.ca, presented_pem, agent)
        public_key = load_public_key_pem(agent.public_key_pem)
        if request.csr is not None:
            _check_csr(request.csr, agent.key_thumbprint)
        opened = runtime.recovery_challenges.open(agent_id, request.challenge, now)
        message = signed_message(agent_id, request.challenge)
        if not _signature_verifies(public_key, _b64url_decode(request.signature), message):
            raise Unauthorized(
                "the challenge signature does not verify with the agent's certified key"
            )
        _spend(session, agent_id, opened, now)

    # Locked from here: the row may have changed (or gone) since it was read.
    session.expire(agent)
    locked = session.get(Agent, agent_id, with_for_update=True)
    if locked is None:
        raise NotFound(f"agent {agent_id} not found")
    previous_serial, previous_not_after = locked.cert_serial, locked.cert_not_after
    issued = certs_service.issue(
        ca=runtime.ca, settings=settings, agent_id=agent_id, public_key=public_key
    )
    locked.cert_pem, locked.cert_serial = issued.pem, issued.serial
    locked.cert_not_after = issued.not_after
    session.add(locked)
    audit_service.record(
        session=session,
        action="cert.recovered",
        actor=audit_service.agent_actor(agent_id),
        agent_id=agent_id,
        source=source,
        detail={
            "serial": issued.serial,
            "notAfter": audit_service.timestamp(issued.not_after),
            "previousSerial": previous_serial,
            "previousNotAfter": audit_service.timestamp(previous_not_after),
            # Seconds since the previous certificate expired (negative: not yet).
            "expiredFor": int((now - previous_not_after).total_seconds()),
        },
    )
    return AgentRegistered(
        agent_id=agent_id,
        token=runtime.token_signer.issue(
            agent_id=agent_id, key_thumbprint=locked.key_thumbprint, issued_at=int(now.timestamp())
        ),
        config=AgentConfig(
            heartbeat_interval=settings.heartbeat_interval,
            task_poll_interval=settings.task_poll_interval,
            log_level=settings.agent_log_level,
        ),
        certificate=AgentCertificate(
            cert=issued.pem, ca=runtime.ca.cert_pem, expires_at=issued.not_after
        ),
    )


@contextmanager
def _failures_counted(guard: RegistrationGuard, source: str | None) -> Iterator[None]:
    """Refuse (429) a `source` past its failed attempts; count an unknown agent or a failed
    proof as one more: the endpoints answer anyone, so guessing ids or challenges is
    limited as guessing registration tokens is."""
    if source is None:
        yield
        return
    guard.check(source)
    try:
        yield
    except (NotFound, Unauthorized):
        guard.failed(source)
        raise


def _spend(
    session: Session, agent_id: uuid.UUID, opened: OpenedChallenge, now: dt.datetime
) -> None:
    """Store the challenge's nonce; 401 when another redemption stored it first."""
    # Spent challenges are kept only while they could still be presented.
    session.execute(delete(RecoveryChallenge).where(col(RecoveryChallenge.expires_at) < now))
    spent = insert_ignoring_conflicts(
        session,
        RecoveryChallenge,
        [{"nonce": opened.nonce, "agent_id": agent_id, "expires_at": opened.expires_at}],
        conflict_columns=("nonce",),
        returning=("nonce",),
    )
    if not spent:
        raise Unauthorized("the challenge was already used: ask for a new one")


def _eligible_agent(
    session: Session, settings: Settings, agent_id: uuid.UUID, now: dt.datetime
) -> Agent:
    """The agent, if the grace is on and its newest certificate lapsed within it."""
    grace = settings.cert_grace
    if grace <= 0:
        raise Forbidden(
            "lockout-proof renewal is off (STELLA_CERT_GRACE is 0): "
            "register the agent again with a new token"
        )
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    if now - agent.cert_not_after > dt.timedelta(seconds=grace):
        raise Forbidden(
            f"the agent's certificate expired at {audit_service.timestamp(agent.cert_not_after)}, "
            f"more than STELLA_CERT_GRACE ({grace} s) ago: register the agent again "
            "with a new token"
        )
    return agent


def _check_presented(ca: CertificateAuthority, pem: str | None, agent: Agent) -> None:
    """A client certificate, if presented, identifies: ours, for this agent and key, any dates."""
    if pem is None:
        return
    try:
        certificate = load_certificate(pem)
        # Its validity window is what lapsed: check everything but the dates.
        identity = verify_client_certificate(ca, certificate, now=certificate.not_valid_after_utc)
    except MalformedCertificate as exc:
        raise Unauthorized(str(exc)) from exc
    except CertificateRejected as exc:
        raise Unauthorized(f"client certificate rejected: {exc}") from exc
    if identity.agent_id != agent.id or identity.key_thumbprint != agent.key_thumbprint:
        raise Forbidden("the presented client certificate belongs to another agent or key")


def _check_csr(csr: str, thumbprint: str) -> None:
    try:
        key = public_key_from_csr(csr)
    except CsrError as exc:
        raise InvalidInput(f"csr: {exc}") from exc
    if jwk_thumbprint(key) != thumbprint:
        raise InvalidInput("csr: not for the agent's certified key (a recovery keeps the key)")


def _b64url_decode(text: str) -> bytes:
    try:
        padded = text + "=" * (-len(text) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("signature: not base64url") from exc


def _signature_verifies(key: AgentPublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True
