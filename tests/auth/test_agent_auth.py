"""Agent authentication against a real heartbeat endpoint over mutual TLS.

Every agent call needs both the JWT we issued and a client certificate from
our CA for the same agent and key. Each forged or mismatched credential below
must be refused with 401 problem+json (or, for certificates our CA never
signed or that expired, at the TLS handshake).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.auth.agent_token import AUDIENCE, ISSUER
from pki import issue_client_certificate, jwk_thumbprint, load_or_create_pki
from tests.api.problems import assert_problem
from tests.conftest import ADMIN_TOKEN, AgentClient, Stack

Register = Callable[..., AgentClient]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(agent: AgentClient, **changes: Any) -> dict[str, Any]:
    """The claims of `agent`'s real token, with `changes` applied."""
    claims: dict[str, Any] = jwt.decode(agent.token, options={"verify_signature": False})
    return {**claims, **changes}


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    segments = [b64url(json.dumps(part).encode()) for part in (header, claims)]
    return ".".join([*segments, b64url(signature)])


def heartbeat(agent: AgentClient, token: str | None = None, **body: Any) -> httpx.Response:
    """`agent`'s heartbeat over its own certificate, with `token` instead of its JWT."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return agent.http.post(
        f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy", **body}, headers=headers
    )


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or during."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def raw_tls13_answer(stack: Stack, cert_file: Path, key_file: Path) -> bytes:
    """The first bytes the server answers a GET /healthz over TLS 1.3 (b"" for none)."""
    context = stack.ssl_context(cert_file, key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    host, port = stack.base_url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        try:
            return conn.recv(1024)
        except ssl.SSLError:
            return b""


def bearer(agent: AgentClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.token}"}


def private_key(agent: AgentClient) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(agent.key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def client_with(stack: Stack, cert_pem: str, key_file: Path, token: str) -> httpx.Client:
    cert_file = key_file.with_name(f"{uuid.uuid4().hex}.pem")
    cert_file.write_text(cert_pem)
    return httpx.Client(
        base_url=stack.base_url,
        verify=stack.ssl_context(cert_file, key_file),
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


class TestAgentToken:
    """The JWT half: only ES256 tokens signed by our key, as issued, are accepted."""

    def test_the_real_token_and_a_correctly_signed_copy_are_accepted(
        self, stack: Stack, register: Register
    ) -> None:
        # The forging helpers below are sound: signed with the real key they pass.
        agent = register()
        assert heartbeat(agent).status_code == 200
        signer = stack.runtime.token_signer
        token = jwt.encode(
            claims_for(agent), stack.runtime.ca.jwt_key, "ES256", headers={"kid": signer.key_id}
        )
        assert heartbeat(agent, token).status_code == 200

    def test_alg_none_is_401(self, stack: Stack, register: Register) -> None:
        agent = register()
        kid = stack.runtime.token_signer.key_id
        for alg in ("none", "None", "NONE"):
            token = unsigned({"alg": alg, "typ": "JWT", "kid": kid}, claims_for(agent))
            assert_problem(heartbeat(agent, token), 401)

    def test_hs256_signed_with_the_public_key_is_401(
        self, stack: Stack, register: Register
    ) -> None:
        agent = register()
        public_pem = stack.runtime.ca.jwt_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": stack.runtime.token_signer.key_id}
        signing_input = unsigned(header, claims_for(agent)).rstrip(".")
        for secret in (public_pem, public_pem.strip()):
            mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
            assert_problem(heartbeat(agent, f"{signing_input}.{b64url(mac)}"), 401)

    def test_es256_from_a_foreign_key_with_our_kid_is_401(
        self, stack: Stack, register: Register
    ) -> None:
        agent = register()
        foreign = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(
            claims_for(agent),
            foreign,
            "ES256",
            headers={"kid": stack.runtime.token_signer.key_id},
        )
        assert_problem(heartbeat(agent, token), 401)

    def test_an_expired_token_is_401(self, stack: Stack, register: Register) -> None:
        agent = register()
        now = int(time.time())
        token = jwt.encode(
            claims_for(agent, iat=now - 7200, exp=now - 3600),
            stack.runtime.ca.jwt_key,
            "ES256",
            headers={"kid": stack.runtime.token_signer.key_id},
        )
        assert_problem(heartbeat(agent, token), 401)

    def test_a_tampered_payload_is_401(self, register: Register) -> None:
        # A's token re-pointed at B (sub and key), presented with B's own certificate:
        # only the signature tells it apart from a token issued to B.
        agent_a, agent_b = register(), register()
        header, _payload, signature = agent_a.token.split(".")
        forged_claims = claims_for(agent_a, sub=agent_b.id, cnf=claims_for(agent_b)["cnf"])
        forged_payload = b64url(json.dumps(forged_claims).encode())
        assert_problem(heartbeat(agent_b, f"{header}.{forged_payload}.{signature}"), 401)
        assert heartbeat(agent_b).status_code == 200

    @pytest.mark.parametrize(
        "kid", ["elsewhere", "https://attacker.example/jwks.json", "../../jwt-signing.key", ""]
    )
    def test_a_kid_pointing_elsewhere_is_401(
        self, stack: Stack, register: Register, kid: str
    ) -> None:
        agent = register()
        token = jwt.encode(
            claims_for(agent), stack.runtime.ca.jwt_key, "ES256", headers={"kid": kid}
        )
        assert_problem(heartbeat(agent, token), 401)

    @pytest.mark.parametrize(
        "claims",
        [
            {"aud": "someone-else"},
            {"iss": "not-stella"},
            {"sub": "not-a-uuid"},
            {"cnf": {"jkt": "another-key-thumbprint"}},
        ],
        ids=["aud", "iss", "sub", "cnf"],
    )
    def test_claims_we_never_issue_are_401(
        self, stack: Stack, register: Register, claims: dict[str, Any]
    ) -> None:
        agent = register()
        token = jwt.encode(
            claims_for(agent, **claims),
            stack.runtime.ca.jwt_key,
            "ES256",
            headers={"kid": stack.runtime.token_signer.key_id},
        )
        assert_problem(heartbeat(agent, token), 401)

    @pytest.mark.parametrize("token", ["garbage", "a.b.c", "Bearer", "x" * 4096])
    def test_garbage_is_401(self, register: Register, token: str) -> None:
        agent = register()
        response = agent.http.post(
            f"/api/v1/agents/{agent.id}/heartbeat",
            json={"status": "healthy"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert_problem(response, 401)

    def test_no_token_is_401(self, register: Register) -> None:
        agent = register()
        response = agent.http.post(
            f"/api/v1/agents/{agent.id}/heartbeat",
            json={"status": "healthy"},
            headers={"Authorization": ""},
        )
        assert_problem(response, 401)

    def test_the_admin_token_is_not_an_agent_token(self, stack: Stack, register: Register) -> None:
        agent = register()
        assert_problem(heartbeat(agent, ADMIN_TOKEN), 401)

    def test_a_deleted_agents_valid_token_is_401(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        assert heartbeat(agent).status_code == 200
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200
        assert_problem(heartbeat(agent), 401)
        assert_problem(agent.poll(), 401)


class TestClientCertificate:
    """The certificate half: issued by our CA, current, and for the token's agent."""

    def test_no_certificate_is_401(self, stack: Stack, register: Register) -> None:
        agent = register()
        response = httpx.post(
            f"{stack.base_url}/api/v1/agents/{agent.id}/heartbeat",
            json={"status": "healthy"},
            headers={"Authorization": f"Bearer {agent.token}"},
            verify=stack.ssl_context(),
        )
        assert_problem(response, 401)

    def test_a_certificate_from_another_ca_fails_the_handshake(
        self, stack: Stack, operator: httpx.Client, register: Register, tmp_path: Path
    ) -> None:
        agent = register()
        foreign_ca = load_or_create_pki(tmp_path / "foreign-pki")
        cert = issue_client_certificate(
            foreign_ca,
            agent_id=uuid.UUID(agent.id),
            public_key=private_key(agent).public_key(),
            ttl=dt.timedelta(hours=1),
        )
        self.assert_refused_at_handshake(
            stack, operator, agent, cert.public_bytes(serialization.Encoding.PEM).decode()
        )

    def test_an_expired_certificate_from_our_ca_fails_the_handshake(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
        cert = issue_client_certificate(
            stack.runtime.ca,
            agent_id=uuid.UUID(agent.id),
            public_key=private_key(agent).public_key(),
            ttl=dt.timedelta(hours=1),
            now=past,
        )
        self.assert_refused_at_handshake(
            stack, operator, agent, cert.public_bytes(serialization.Encoding.PEM).decode()
        )

    @staticmethod
    def assert_refused_at_handshake(
        stack: Stack, operator: httpx.Client, agent: AgentClient, cert_pem: str
    ) -> None:
        """The server aborts the TLS handshake: no request ever reaches the app."""
        before = operator.get(f"/api/v1/agents/{agent.id}").json()["lastHeartbeat"]
        cert_file = agent.key_file.with_name(f"{uuid.uuid4().hex}.pem")
        cert_file.write_text(cert_pem)
        path = f"/api/v1/agents/{agent.id}/heartbeat"
        # TLS 1.2: the server's verification fails the client's handshake itself.
        tls12 = stack.ssl_context(cert_file, agent.key_file)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            httpx.Client(base_url=stack.base_url, verify=tls12, timeout=10) as client,
            pytest.raises(httpx.ConnectError) as raised,
        ):
            client.post(path, json={"status": "healthy"}, headers=bearer(agent))
        assert any(isinstance(cause, ssl.SSLError) for cause in chain(raised.value)), raised.value
        # TLS 1.3: the client's handshake completes first; then the server drops the
        # connection (uvicorn's asyncio SSL layer sends no alert) without an answer, where
        # the agent's own certificate gets one on the same kind of raw connection.
        assert raw_tls13_answer(stack, agent.cert_file, agent.key_file).startswith(b"HTTP/1.1 ")
        assert raw_tls13_answer(stack, cert_file, agent.key_file) == b""
        tls13 = stack.ssl_context(cert_file, agent.key_file)
        tls13.minimum_version = ssl.TLSVersion.TLSv1_3
        with (
            httpx.Client(base_url=stack.base_url, verify=tls13, timeout=10) as client,
            pytest.raises(httpx.TransportError),
        ):
            client.post(path, json={"status": "healthy"}, headers=bearer(agent))
        assert operator.get(f"/api/v1/agents/{agent.id}").json()["lastHeartbeat"] == before

    def test_the_certificate_of_a_with_the_token_of_b_is_401(self, register: Register) -> None:
        agent_a, agent_b = register(), register()
        # On B's path (what the token names) and on A's (what the certificate names).
        for path_agent in (agent_b, agent_a):
            response = agent_a.http.post(
                f"/api/v1/agents/{path_agent.id}/heartbeat",
                json={"status": "healthy"},
                headers={"Authorization": f"Bearer {agent_b.token}"},
            )
            assert_problem(response, 401)
        assert heartbeat(agent_a).status_code == 200
        assert heartbeat(agent_b).status_code == 200

    def test_our_certificate_for_another_key_is_401(
        self, stack: Stack, register: Register, tmp_path: Path
    ) -> None:
        # Same agent id, signed by our CA, but for a key the token is not bound to.
        agent = register()
        other_key = ec.generate_private_key(ec.SECP256R1())
        assert jwk_thumbprint(other_key.public_key()) != claims_for(agent)["cnf"]["jkt"]
        cert = issue_client_certificate(
            stack.runtime.ca,
            agent_id=uuid.UUID(agent.id),
            public_key=other_key.public_key(),
            ttl=dt.timedelta(hours=1),
        )
        key_file = tmp_path / "other.key"
        key_file.write_bytes(
            other_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        with client_with(stack, cert_pem, key_file, agent.token) as client:
            response = client.post(
                f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"}
            )
        assert_problem(response, 401)

    def test_a_deleted_agents_certificate_is_401(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200
        response = agent.http.get(f"/api/v1/agents/{agent.id}")
        assert_problem(response, 401)

    def test_claims_and_issuer_match_what_we_issue(self, register: Register) -> None:
        # Guards the forging helpers: the real token carries the claims they edit.
        agent = register()
        claims = claims_for(agent)
        assert (claims["iss"], claims["aud"], claims["sub"]) == (ISSUER, AUDIENCE, agent.id)
        assert claims["cnf"]["jkt"] == jwk_thumbprint(private_key(agent).public_key())
