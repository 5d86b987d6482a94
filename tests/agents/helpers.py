"""Small helpers shared by the agent API tests (no fixtures: see tests/conftest.py)."""

from __future__ import annotations

import datetime as dt
import re
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select, update
from sqlmodel import col

from app.models import Agent
from tests.conftest import Stack

T = TypeVar("T")

# UTC, millisecond precision, "Z": 2026-01-10T14:23:45.123Z
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NEXT_LINK = re.compile(r'<([^>]+)>;\s*rel="next"')


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """`response` is an RFC 9457 problem with `status`; its body is returned."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    if status == 401:
        assert response.headers["www-authenticate"].lower().startswith("bearer")
    return body


def post_register(
    stack: Stack, token: str | None, body: dict[str, Any] | None = None, **kwargs: Any
) -> httpx.Response:
    """POST /api/v1/agents/register from a fresh client (no client certificate)."""
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["X-Agent-Token"] = token
    if body is not None:
        kwargs["json"] = body
    with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context(), timeout=30) as client:
        return client.post("/api/v1/agents/register", headers=headers, **kwargs)


def registration_body(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "version": "1.0.0", "capabilities": ["docker"], "labels": {}, **extra}


def race(count: int, attempt: Callable[[int], T]) -> list[T]:
    """Run `attempt(i)` for i in range(count) in threads released together."""
    barrier = threading.Barrier(count)

    def run(index: int) -> T:
        barrier.wait(timeout=30)
        return attempt(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def timestamp(value: dt.datetime) -> str:
    """How the API renders a datetime."""
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(value: str) -> dt.datetime:
    assert TIMESTAMP.match(value), value
    return dt.datetime.fromisoformat(value)


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def spki(key: Any) -> bytes:
    """A public key (or a private key's public half) as comparable DER bytes."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def make_csr(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    *,
    common_name: str = "agent",
    ca: bool = False,
) -> str:
    """A PEM PKCS#10 request for `key`, optionally asking for CA powers."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def set_agent(stack: Stack, agent_id: str, **values: Any) -> None:
    """Change an agent row directly (as a sweep would), through the app's engine."""
    with stack.runtime.engine.begin() as connection:
        connection.execute(
            update(Agent).where(col(Agent.id) == uuid.UUID(agent_id)).values(**values)
        )


def count_agents(stack: Stack) -> int:
    with stack.runtime.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(Agent)).scalar_one())


def task_ids(response: httpx.Response) -> list[str]:
    """The task ids of a heartbeat or poll answer."""
    assert response.status_code == 200, response.text
    return [task["taskId"] for task in response.json()["tasks"]]
