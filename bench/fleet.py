"""Simulated agents, provisioned straight into the database.

Each gets what a registered agent holds: its own P-256 key, a certificate
from the stack's CA naming it, and a JWT bound to that key. They are
written in bulk (registering 10,000 agents through the API would measure
registration, which has a scenario of its own). Key and certificate go
into one PEM file per agent, which is what `ssl.SSLContext.load_cert_chain`
reads.
"""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import insert

from app.auth.agent_token import AgentTokenSigner
from app.certs import service as certs_service
from app.models import Agent
from app.models.types import utcnow
from bench.stack import BenchStack
from pki import generate_agent_key, jwk_thumbprint, private_key_pem, public_key_pem


@dataclass(frozen=True)
class SimAgent:
    agent_id: uuid.UUID
    name: str
    token: str = field(repr=False)  # a credential: kept out of reprs
    credentials: Path  # certificate + private key, PEM
    ca_file: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context presenting this agent's certificate (one per agent)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.credentials))
        return context

    @property
    def authorization(self) -> str:
        return f"Bearer {self.token}"


def provision(
    stack: BenchStack,
    count: int,
    *,
    prefix: str = "sim",
    labels: dict[str, str] | None = None,
    capabilities: list[str] | None = None,
    batch: int = 1000,
) -> list[SimAgent]:
    """`count` registered agents, online, heartbeat now."""
    folder = stack.workdir / "agents" / prefix
    folder.mkdir(parents=True, exist_ok=True)
    signer = AgentTokenSigner(stack.ca.jwt_key)
    agents: list[SimAgent] = []
    rows: list[dict[str, object]] = []
    now = utcnow()
    for index in range(count):
        agent_id = uuid.uuid4()
        key = generate_agent_key()
        public_key = key.public_key()
        issued = certs_service.issue(
            ca=stack.ca, settings=stack.settings, agent_id=agent_id, public_key=public_key
        )
        thumbprint = jwk_thumbprint(public_key)
        credentials = folder / f"{agent_id}.pem"
        credentials.write_text(issued.pem + private_key_pem(key))
        name = f"{prefix}-{index:06d}"
        rows.append(
            {
                "id": agent_id,
                "name": name,
                "version": "bench",
                "status": "online",
                "reported_status": "healthy",
                "capabilities": capabilities or ["docker"],
                "labels": labels or {},
                "running_tasks": 0,
                "registered_at": now,
                "last_heartbeat": now,
                "public_key_pem": public_key_pem(public_key),
                "key_thumbprint": thumbprint,
                "cert_pem": issued.pem,
                "cert_serial": issued.serial,
                "cert_not_after": issued.not_after,
            }
        )
        token = signer.issue(
            agent_id=agent_id, key_thumbprint=thumbprint, issued_at=int(now.timestamp())
        )
        agents.append(SimAgent(agent_id, name, token, credentials, stack.ca.files.ca_cert))
        if len(rows) >= batch:
            _insert(stack, rows)
            rows = []
    if rows:
        _insert(stack, rows)
    return agents


def _insert(stack: BenchStack, rows: list[dict[str, object]]) -> None:
    with stack.engine.begin() as connection:
        connection.execute(insert(Agent), rows)
