"""Authenticating agents and operators.

An agent call needs both halves: the JWT we issued at registration and a
client certificate from our CA. They must name the same agent and the same
key, and that agent must still exist, so deleting an agent refuses both on
its very next request.
"""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass

from cryptography import x509
from pydantic import SecretStr
from sqlmodel import Session

from app.auth.agent_token import AgentTokenSigner, InvalidAgentToken
from app.errors import Unauthorized
from app.models import Agent
from pki import CertificateAuthority, CertificateRejected, verify_client_certificate


@dataclass
class AuthenticatedAgent:
    agent: Agent
    # notAfter of the certificate presented on this request (drives renewal).
    cert_not_after: dt.datetime


def authenticate_agent(
    *,
    session: Session,
    ca: CertificateAuthority,
    signer: AgentTokenSigner,
    token: str | None,
    certificate: x509.Certificate | None,
) -> AuthenticatedAgent:
    """The agent both credentials name; 401 when either is missing, bad or mismatched."""
    if not token:
        raise Unauthorized("agent token required (Authorization: Bearer ...)")
    try:
        claims = signer.verify(token)
    except InvalidAgentToken as exc:
        raise Unauthorized("agent token is invalid") from exc
    if certificate is None:
        raise Unauthorized("client certificate required (mutual TLS)")
    try:
        identity = verify_client_certificate(ca, certificate)
    except CertificateRejected as exc:
        raise Unauthorized(f"client certificate rejected: {exc}") from exc
    if identity.agent_id != claims.agent_id or identity.key_thumbprint != claims.key_thumbprint:
        raise Unauthorized("client certificate and token belong to different agents")
    agent = session.get(Agent, claims.agent_id)
    if agent is None or not hmac.compare_digest(agent.key_thumbprint, claims.key_thumbprint):
        raise Unauthorized("agent is not registered")
    return AuthenticatedAgent(agent=agent, cert_not_after=identity.not_after)


def is_operator(token: str | None, admin_token: SecretStr | None) -> bool:
    """Constant-time check of the operator's bearer token."""
    if not token or admin_token is None:
        return False
    return hmac.compare_digest(token.encode(), admin_token.get_secret_value().encode())
