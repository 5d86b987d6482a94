"""Trusted-proxy mode: TLS ends at a proxy that passes the verified client certificate on.

Two plain-HTTP servers share one SQLite database and one PKI: one trusts
127.0.0.1 (where these requests come from) as its proxy, the other only
10.0.0.0/8. The certificate header must count only from a trusted proxy,
and even then it must be a certificate of our CA for the token's agent.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from app.db import make_engine
from app.main import create_app
from app.migrate import upgrade
from app.runtime import build_runtime
from app.server.tls import uvicorn_config
from app.settings import Settings
from pki import AgentPublicKey, generate_agent_key, issue_client_certificate, load_or_create_pki
from tests.api.problems import assert_problem
from tests.conftest import ADMIN_TOKEN, ServerThread, free_port

HEADER = "X-Client-Cert"


@dataclass(frozen=True)
class Agent:
    id: str
    token: str
    cert_pem: str


@dataclass(frozen=True)
class Proxies:
    trusted: str  # base URL of the server trusting 127.0.0.1
    untrusted: str  # base URL of the server trusting only 10.0.0.0/8
    tmp: Path


def serve(tmp: Path, database_url: str, trusted_proxies: list[str]) -> Generator[str]:
    settings = Settings(
        data_dir=tmp,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        trusted_proxies=trusted_proxies,
    )
    app = create_app(settings, build_runtime(settings))
    port = free_port()
    config = uvicorn_config(
        app, host="127.0.0.1", port=port, tls=False, log_level="warning", lifespan="on"
    )
    with ServerThread(config):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxies]:
    tmp = tmp_path_factory.mktemp("proxy")
    database_url = f"sqlite:///{tmp / 'stella.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    engine.dispose()
    trusted = serve(tmp, database_url, ["127.0.0.1/32"])
    untrusted = serve(tmp, database_url, ["10.0.0.0/8"])
    trusted_url, untrusted_url = next(trusted), next(untrusted)
    try:
        yield Proxies(trusted=trusted_url, untrusted=untrusted_url, tmp=tmp)
    finally:
        for server in (untrusted, trusted):
            server.close()


def register(base_url: str, name: str) -> Agent:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        minted = client.post(
            "/api/v1/registration-tokens", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert minted.status_code == 201, minted.text
        response = client.post(
            "/api/v1/agents/register",
            json={"name": name, "version": "1.0.0", "capabilities": ["docker"]},
            headers={"X-Agent-Token": minted.json()["token"]},
        )
    assert response.status_code == 201, response.text
    body = response.json()
    return Agent(id=body["agentId"], token=body["token"], cert_pem=body["certificate"]["cert"])


def public_key_of(agent: Agent) -> AgentPublicKey:
    key = x509.load_pem_x509_certificate(agent.cert_pem.encode()).public_key()
    assert isinstance(key, AgentPublicKey)
    return key


@pytest.fixture
def agent(proxies: Proxies) -> Agent:
    return register(proxies.trusted, f"proxied-{uuid.uuid4().hex[:12]}")


def heartbeat(
    base_url: str,
    agent: Agent,
    *,
    cert_header: str | None,
    token: str | None = None,
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or agent.token}", **(extra or {})}
    if cert_header is not None:
        headers[HEADER] = cert_header
    return httpx.post(
        f"{base_url}/api/v1/agents/{agent.id}/heartbeat",
        json={"status": "healthy"},
        headers=headers,
        timeout=10,
    )


class TestTrustedProxyHeader:
    """The client certificate passed in X-Client-Cert by a TLS-terminating proxy."""

    def test_accepted_from_a_trusted_proxy(self, proxies: Proxies, agent: Agent) -> None:
        response = heartbeat(proxies.trusted, agent, cert_header=quote(agent.cert_pem))
        assert response.status_code == 200, response.text
        assert response.json()["tasks"] == []

    def test_accepted_as_nginx_escapes_it(self, proxies: Proxies, agent: Agent) -> None:
        # $ssl_client_escaped_cert leaves "/" "+" "=" as they are.
        escaped = quote(agent.cert_pem, safe="/+=")
        response = heartbeat(proxies.trusted, agent, cert_header=escaped)
        assert response.status_code == 200, response.text

    def test_delivers_tasks_through_the_proxy(self, proxies: Proxies, agent: Agent) -> None:
        created = httpx.post(
            f"{proxies.trusted}/api/v1/tasks",
            json={"taskType": "docker.pull", "target": {"agentId": agent.id}},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )
        assert created.status_code == 201, created.text
        response = heartbeat(proxies.trusted, agent, cert_header=quote(agent.cert_pem))
        assert response.status_code == 200, response.text
        assert [t["taskId"] for t in response.json()["tasks"]] == [
            created.json()["tasks"][0]["taskId"]
        ]

    def test_refused_from_an_untrusted_source(self, proxies: Proxies, agent: Agent) -> None:
        response = heartbeat(proxies.untrusted, agent, cert_header=quote(agent.cert_pem))
        assert_problem(response, 401)

    def test_no_header_is_401(self, proxies: Proxies, agent: Agent) -> None:
        assert_problem(heartbeat(proxies.trusted, agent, cert_header=None), 401)

    def test_the_header_without_the_token_is_401(self, proxies: Proxies, agent: Agent) -> None:
        response = httpx.post(
            f"{proxies.trusted}/api/v1/agents/{agent.id}/heartbeat",
            json={"status": "healthy"},
            headers={HEADER: quote(agent.cert_pem)},
            timeout=10,
        )
        assert_problem(response, 401)

    @pytest.mark.parametrize(
        "garbage",
        [
            "garbage",
            quote("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"),
            quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "%ZZ%00%ff",
            "A" * 20_000,
        ],
        ids=["word", "bad-base64", "bad-der", "bad-escapes", "oversized"],
    )
    def test_garbage_is_401_not_500(self, proxies: Proxies, agent: Agent, garbage: str) -> None:
        assert_problem(heartbeat(proxies.trusted, agent, cert_header=garbage), 401)

    def test_a_certificate_from_another_ca_is_401(
        self, proxies: Proxies, agent: Agent, tmp_path: Path
    ) -> None:
        foreign_ca = load_or_create_pki(tmp_path / "foreign-pki")
        cert = issue_client_certificate(
            foreign_ca,
            agent_id=uuid.UUID(agent.id),
            public_key=public_key_of(agent),
            ttl=dt.timedelta(hours=1),
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        assert_problem(heartbeat(proxies.trusted, agent, cert_header=quote(pem)), 401)

    def test_an_expired_certificate_from_our_ca_is_401(
        self, proxies: Proxies, agent: Agent
    ) -> None:
        ca = load_or_create_pki(proxies.tmp / "pki")
        cert = issue_client_certificate(
            ca,
            agent_id=uuid.UUID(agent.id),
            public_key=public_key_of(agent),
            ttl=dt.timedelta(hours=1),
            now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3),
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        assert_problem(heartbeat(proxies.trusted, agent, cert_header=quote(pem)), 401)

    def test_another_agents_certificate_is_401(self, proxies: Proxies, agent: Agent) -> None:
        other = register(proxies.trusted, f"proxied-{uuid.uuid4().hex[:12]}")
        assert_problem(heartbeat(proxies.trusted, agent, cert_header=quote(other.cert_pem)), 401)

    def test_our_certificate_for_another_key_is_401(self, proxies: Proxies, agent: Agent) -> None:
        ca = load_or_create_pki(proxies.tmp / "pki")
        cert = issue_client_certificate(
            ca,
            agent_id=uuid.UUID(agent.id),
            public_key=generate_agent_key().public_key(),
            ttl=dt.timedelta(hours=1),
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        assert_problem(heartbeat(proxies.trusted, agent, cert_header=quote(pem)), 401)

    def test_accepted_when_the_proxy_also_sets_x_forwarded_for(
        self, proxies: Proxies, agent: Agent
    ) -> None:
        # A real proxy in front (nginx, HAProxy, Traefik) adds the agent's address; trust is
        # about the peer that passed the header on, which is still the trusted proxy.
        response = heartbeat(
            proxies.trusted,
            agent,
            cert_header=quote(agent.cert_pem),
            extra={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
        )
        assert response.status_code == 200, response.text

    def test_a_forwarded_for_naming_a_trusted_proxy_does_not_make_a_source_trusted(
        self, proxies: Proxies, agent: Agent
    ) -> None:
        response = heartbeat(
            proxies.untrusted,
            agent,
            cert_header=quote(agent.cert_pem),
            extra={"X-Forwarded-For": "10.1.2.3"},
        )
        assert_problem(response, 401)
