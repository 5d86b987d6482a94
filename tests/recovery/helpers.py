"""Agents with a key of the test's own, and certificates made to have lapsed."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import update
from sqlmodel import col

from app.db import transaction
from app.models import Agent
from app.models.types import utcnow
from app.recovery.service import signed_message
from pki import issue_client_certificate
from tests.conftest import Stack, mint_token


@dataclass
class KeyedAgent:
    """A registered agent whose key the test holds (registered with a CSR)."""

    id: str
    name: str
    key: ec.EllipticCurvePrivateKey
    token: str
    cert_pem: str

    def sign(self, challenge: str, *, agent_id: str | None = None) -> str:
        message = signed_message(agent_id or self.id, challenge)
        signature = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()


def csr_for(key: ec.EllipticCurvePrivateKey, name: str = "agent") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def register_keyed(stack: Stack, operator: httpx.Client, name: str) -> KeyedAgent:
    key = ec.generate_private_key(ec.SECP256R1())
    response = httpx.post(
        f"{stack.base_url}/api/v1/agents/register",
        json={"name": name, "csr": csr_for(key, name)},
        headers={"X-Agent-Token": mint_token(operator)},
        verify=stack.ssl_context(),
    )
    assert response.status_code == 201, response.text
    data = response.json()
    return KeyedAgent(
        id=data["agentId"],
        name=name,
        key=key,
        token=data["token"],
        cert_pem=data["certificate"]["cert"],
    )


def lapse(stack: Stack, agent_id: str, public_key: Any, *, ago: dt.timedelta) -> str:
    """Make the agent's newest certificate one that expired `ago`; its PEM."""
    ttl = dt.timedelta(seconds=120)
    certificate = issue_client_certificate(
        stack.runtime.ca,
        agent_id=uuid.UUID(agent_id),
        public_key=public_key,
        ttl=ttl,
        now=utcnow() - ago - ttl,
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    with transaction(stack.runtime.engine) as session:
        session.execute(
            update(Agent)
            .where(col(Agent.id) == uuid.UUID(agent_id))
            .values(
                cert_pem=pem,
                cert_serial=format(certificate.serial_number, "x"),
                cert_not_after=certificate.not_valid_after_utc,
            )
        )
    return pem
