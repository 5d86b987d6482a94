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

from pydantic import SecretStr
from sqlmodel import Session

from app.auth.cache import AgentAuthCache
from app.errors import Unauthorized
from app.models import Agent
from app.models.types import utcnow
from pki import ClientIdentity


@dataclass
class AuthenticatedAgent:
    agent: Agent
    # notAfter of the certificate presented on this request (drives renewal).
    cert_not_after: dt.datetime


def authenticate_agent(
    *,
    session: Session,
    auth: AgentAuthCache,
    token: str | None,
    certificate_pem: str | None,
) -> AuthenticatedAgent:
    """The agent both credentials name; 401 when either is missing, bad or mismatched."""
    identity = auth.check(token, certificate_pem, utcnow())
    agent = registered_agent(session, identity)
    return AuthenticatedAgent(agent=agent, cert_not_after=identity.not_after)


def registered_agent(session: Session, identity: ClientIdentity, *, lock: bool = False) -> Agent:
    """The agent row `identity` names, still registered with that key (401 otherwise).

    `lock`: FOR UPDATE, for a transaction that may change the row.
    """
    agent = session.get(Agent, identity.agent_id, with_for_update=lock)
    if agent is None or not hmac.compare_digest(agent.key_thumbprint, identity.key_thumbprint):
        raise Unauthorized("agent is not registered")
    return agent


def is_operator(token: str | None, admin_token: SecretStr | None) -> bool:
    """Constant-time check of the operator's bearer token."""
    if not token or admin_token is None:
        return False
    return hmac.compare_digest(token.encode(), admin_token.get_secret_value().encode())
