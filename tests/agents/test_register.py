"""POST /api/v1/agents/register: single-use tokens in, a JWT and a client certificate out."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.agents.helpers import (
    assert_problem,
    common_name,
    count_agents,
    load_cert,
    make_csr,
    parse_timestamp,
    post_register,
    race,
    registration_body,
    spki,
    timestamp,
)
from tests.conftest import AgentClient, Stack, mint_token

SECRET = "SECRET-MARKER-7f3a"


class TestRegister:
    def test_answer_is_the_seeds(self, stack: Stack, operator: httpx.Client) -> None:
        """agentId, token, config from settings, certificate {cert, key, ca, expiresAt}."""
        response = post_register(stack, mint_token(operator), registration_body("agent-prod-01"))
        assert response.status_code == 201, response.text
        body = response.json()
        # The seed's four, and the task-signing keys to pin (an extra field, app/signing/).
        assert set(body) == {"agentId", "token", "config", "certificate", "taskSigningKeys"}
        agent_id = str(uuid.UUID(body["agentId"]))
        seed_config = {"heartbeatInterval": 30, "taskPollInterval": 5, "logLevel": "info"}
        assert body["config"] == seed_config
        settings = stack.settings
        assert body["config"] == {
            "heartbeatInterval": settings.heartbeat_interval,
            "taskPollInterval": settings.task_poll_interval,
            "logLevel": settings.agent_log_level,
        }
        assert set(body["certificate"]) == {"cert", "key", "ca", "expiresAt"}
        assert body["certificate"]["ca"] == stack.ca_file.read_text()

        assert jwt.get_unverified_header(body["token"])["alg"] == "ES256"
        claims = stack.runtime.token_signer.verify(body["token"])
        assert str(claims.agent_id) == agent_id

    def test_certificate_names_the_agent_and_is_signed_by_the_ca(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        """CN = agentId, signed by `ca`, a client certificate that is not a CA, ~24 h."""
        body = post_register(stack, mint_token(operator), registration_body("a1")).json()
        certificate = body["certificate"]
        cert = load_cert(certificate["cert"])
        assert common_name(cert) == body["agentId"]
        cert.verify_directly_issued_by(load_cert(certificate["ca"]))
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

        assert certificate["expiresAt"] == timestamp(cert.not_valid_after_utc)
        lifetime = parse_timestamp(certificate["expiresAt"]) - dt.datetime.now(dt.UTC)
        assert lifetime.total_seconds() == pytest.approx(86400, abs=120)

    def test_key_is_pkcs8_p256_matching_the_certificate(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        certificate = post_register(stack, mint_token(operator), registration_body("a1")).json()[
            "certificate"
        ]
        assert certificate["key"].startswith("-----BEGIN PRIVATE KEY-----")
        key = serialization.load_pem_private_key(certificate["key"].encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert spki(key) == spki(load_cert(certificate["cert"]).public_key())

    def test_new_agent_is_online_with_what_it_registered(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """Registration counts as a heartbeat; name, version, capabilities and labels kept."""
        agent = register("a1", capabilities=["docker", "compose"], labels={"dc": "us-east-1"})
        detail = operator.get(f"/api/v1/agents/{agent.id}").json()
        assert detail["status"] == "online"
        assert detail["name"] == "a1"
        assert detail["version"] == "1.0.0"
        assert detail["capabilities"] == ["docker", "compose"]
        assert detail["labels"] == {"dc": "us-east-1"}

    def test_credentials_work_for_agent_calls(self, register: Callable[..., AgentClient]) -> None:
        """The JWT plus the issued certificate authenticate a heartbeat over mTLS."""
        assert register("a1").heartbeat().status_code == 200


class TestRegisterWithCsr:
    @pytest.mark.parametrize("kind", ["p256", "ed25519"])
    def test_certifies_the_csr_key_and_returns_no_key(
        self, register: Callable[..., AgentClient], kind: str
    ) -> None:
        """No `key` in the answer; the certificate carries the CSR's key, which then works."""
        key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        if kind == "p256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            key = ed25519.Ed25519PrivateKey.generate()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        agent = register("csr-agent", csr=make_csr(key), key_pem=key_pem)
        certificate = agent.registration["certificate"]
        assert "key" not in certificate
        assert set(certificate) == {"cert", "ca", "expiresAt"}
        cert = load_cert(certificate["cert"])
        assert spki(cert.public_key()) == spki(key)
        assert common_name(cert) == agent.id
        assert agent.heartbeat().status_code == 200

    def test_csr_cannot_choose_its_name_or_become_a_ca(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = make_csr(key, common_name="admin", ca=True)
        response = post_register(stack, mint_token(operator), registration_body("a1", csr=csr))
        assert response.status_code == 201, response.text
        body = response.json()
        cert = load_cert(body["certificate"]["cert"])
        assert common_name(cert) == body["agentId"]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    @pytest.mark.parametrize(
        "csr",
        [
            "not a pem",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ],
    )
    def test_bad_csr_is_422_and_spends_no_token(
        self, stack: Stack, operator: httpx.Client, csr: str
    ) -> None:
        token = mint_token(operator)
        assert_problem(post_register(stack, token, registration_body("a1", csr=csr)), 422)
        assert count_agents(stack) == 0
        assert post_register(stack, token, registration_body("a1")).status_code == 201


class TestRegisterUnauthorized:
    def test_missing_token(self, stack: Stack) -> None:
        assert_problem(post_register(stack, None, registration_body("a1")), 401)

    def test_unknown_token(self, stack: Stack) -> None:
        assert_problem(post_register(stack, "srt_unknown", registration_body("a1")), 401)

    def test_used_token(self, stack: Stack, operator: httpx.Client) -> None:
        token = mint_token(operator)
        assert post_register(stack, token, registration_body("a1")).status_code == 201
        assert_problem(post_register(stack, token, registration_body("a2")), 401)
        assert count_agents(stack) == 1

    def test_expired_token(self, stack: Stack, operator: httpx.Client) -> None:
        token = mint_token(operator, ttlSeconds=1)
        threading.Event().wait(1.2)
        assert_problem(post_register(stack, token, registration_body("a1")), 401)
        assert count_agents(stack) == 0

    def test_operator_token_is_not_a_registration_token(self, stack: Stack) -> None:
        from tests.conftest import ADMIN_TOKEN  # noqa: PLC0415  (only here)

        assert_problem(post_register(stack, ADMIN_TOKEN, registration_body("a1")), 401)


class TestRegisterConflict:
    def test_taken_name_is_409_and_spends_no_token(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        first = post_register(stack, mint_token(operator), registration_body("dup"))
        assert first.status_code == 201, first.text
        token = mint_token(operator)
        assert_problem(post_register(stack, token, registration_body("dup")), 409)
        assert post_register(stack, token, registration_body("other")).status_code == 201
        assert count_agents(stack) == 2


class TestRegisterInvalid:
    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(registration_body(""), id="empty-name"),
            pytest.param(registration_body(f"has spaces {SECRET}"), id="name-with-spaces"),
            pytest.param(registration_body(SECRET + "a" * 200), id="name-200-chars"),
            pytest.param({"version": "1.0.0"}, id="no-name"),
            pytest.param(registration_body("a1", capabilities=SECRET), id="capabilities-str"),
            pytest.param(registration_body("a1", capabilities=[1, 2]), id="capabilities-ints"),
            pytest.param(registration_body("a1", labels={"k": 12345}), id="label-int"),
            pytest.param(registration_body("a1", labels={"k": [SECRET]}), id="label-list"),
            pytest.param(registration_body("a1", labels=[SECRET]), id="labels-list"),
            pytest.param([SECRET], id="body-list"),
        ],
    )
    def test_bad_body_is_422_without_echo(
        self, stack: Stack, operator: httpx.Client, body: Any
    ) -> None:
        """422 problem+json that never echoes the input, and the token stays unspent."""
        token = mint_token(operator)
        response = post_register(stack, token, body)
        assert_problem(response, 422)
        assert SECRET not in response.text
        assert "12345" not in response.text
        assert post_register(stack, token, registration_body("good")).status_code == 201

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            pytest.param(registration_body("a\x00b"), "body.name", id="name-nul"),
            pytest.param(registration_body("a\tb"), "body.name", id="name-tab"),
            pytest.param(registration_body("ab\x7f"), "body.name", id="name-del"),
            pytest.param(registration_body("a" * 10_240), "body.name", id="name-10kB"),
            pytest.param(
                registration_body("a1", version="1.0\x1b[31m"), "body.version", id="version-esc"
            ),
            pytest.param(
                registration_body("a1", version="1" * 10_240), "body.version", id="version-10kB"
            ),
            pytest.param(
                registration_body("a1", labels={"dc": "us\neast"}),
                "body.labels.dc",
                id="label-newline",
            ),
            pytest.param(
                registration_body("a1", labels={"dc": "x" * 10_240}),
                "body.labels.dc",
                id="label-10kB",
            ),
            pytest.param(
                registration_body("a1", labels={f"k{i}": "v" for i in range(1_000)}),
                "body.labels",
                id="labels-1000",
            ),
            pytest.param(
                registration_body("a1", capabilities=["dock\x00er"]),
                "body.capabilities.0",
                id="capability-nul",
            ),
            pytest.param(
                registration_body("a1", capabilities=[f"c{i}" for i in range(10_000)]),
                "body.capabilities",
                id="capabilities-10000",
            ),
        ],
    )
    def test_control_characters_and_absurd_sizes_are_a_422_naming_the_field(
        self, stack: Stack, operator: httpx.Client, body: dict[str, Any], field: str
    ) -> None:
        problem = assert_problem(post_register(stack, mint_token(operator), body), 422)
        assert problem["detail"].startswith(f"{field}: "), problem["detail"]
        assert count_agents(stack) == 0

    def test_malformed_json_is_422_without_echo(self, stack: Stack, operator: httpx.Client) -> None:
        response = post_register(
            stack,
            mint_token(operator),
            content=f'{{"name": "{SECRET}", '.encode(),
            headers={"Content-Type": "application/json"},
        )
        assert_problem(response, 422)
        assert SECRET not in response.text


class TestRegisterConcurrency:
    def test_one_token_registers_exactly_one_agent(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        """20 simultaneous registrations with one token: one 201, nineteen 401, one row."""
        token = mint_token(operator)
        responses = race(20, lambda i: post_register(stack, token, registration_body(f"r{i}")))
        statuses = Counter(response.status_code for response in responses)
        assert statuses == {201: 1, 401: 19}, [r.text for r in responses if r.status_code >= 500]
        assert count_agents(stack) == 1

    def test_one_name_is_registered_once(self, stack: Stack, operator: httpx.Client) -> None:
        """10 simultaneous registrations of one name: one 201, nine 409, nine unspent tokens."""
        tokens = [mint_token(operator) for _ in range(10)]
        responses = race(10, lambda i: post_register(stack, tokens[i], registration_body("same")))
        statuses = Counter(response.status_code for response in responses)
        assert statuses == {201: 1, 409: 9}, [r.text for r in responses if r.status_code >= 500]
        losers = [t for t, r in zip(tokens, responses, strict=True) if r.status_code == 409]
        for index, token in enumerate(losers):
            retry = post_register(stack, token, registration_body(f"other-{index}"))
            assert retry.status_code == 201, retry.text
        assert count_agents(stack) == 10
