"""POST /api/v1/registration-tokens: minting single-use registration tokens (operators only)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.models import RegistrationToken
from app.tokens.service import hash_token
from tests.agents.helpers import assert_problem, parse_timestamp, post_register, registration_body
from tests.conftest import Stack

PATH = "/api/v1/registration-tokens"


def _expires_in(body: dict[str, Any]) -> float:
    """Seconds from now until the answer's expiresAt."""
    expires_at = parse_timestamp(body["expiresAt"])
    return (expires_at - dt.datetime.now(dt.UTC)).total_seconds()


class TestCreateRegistrationToken:
    def test_default_expiry_is_24_hours(self, operator: httpx.Client) -> None:
        """201 {token, expiresAt}, expiring in 24 h when no ttl is asked for."""
        response = operator.post(PATH, json={})
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == {"token", "expiresAt"}
        assert len(body["token"]) >= 32
        assert _expires_in(body) == pytest.approx(86400, abs=60)

    def test_no_body_at_all(self, operator: httpx.Client) -> None:
        """The body is optional."""
        response = operator.post(PATH)
        assert response.status_code == 201, response.text
        assert _expires_in(response.json()) == pytest.approx(86400, abs=60)

    def test_ttl_seconds_is_honoured(self, operator: httpx.Client) -> None:
        response = operator.post(PATH, json={"ttlSeconds": 600})
        assert response.status_code == 201, response.text
        assert _expires_in(response.json()) == pytest.approx(600, abs=30)

    def test_every_token_is_new(self, operator: httpx.Client) -> None:
        tokens = {operator.post(PATH, json={}).json()["token"] for _ in range(3)}
        assert len(tokens) == 3

    def test_minted_token_registers_an_agent(self, stack: Stack, operator: httpx.Client) -> None:
        token = operator.post(PATH, json={"ttlSeconds": 60}).json()["token"]
        assert post_register(stack, token, registration_body("minted")).status_code == 201

    @pytest.mark.parametrize("ttl", [86401, 0, -5, 10**12])
    def test_ttl_out_of_range_is_422(self, operator: httpx.Client, ttl: int) -> None:
        assert_problem(operator.post(PATH, json={"ttlSeconds": ttl}), 422)

    @pytest.mark.parametrize(
        "body", [{"ttl": 60}, {"ttlSeconds": 60, "name": "x"}, {"ttlSeconds": "soon"}, [60]]
    )
    def test_bad_body_is_422(self, operator: httpx.Client, body: Any) -> None:
        """Unknown fields (typos) and wrong types are refused, not ignored."""
        assert_problem(operator.post(PATH, json=body), 422)

    def test_malformed_json_is_422(self, operator: httpx.Client) -> None:
        response = operator.post(
            PATH, content=b'{"ttlSeconds": ', headers={"Content-Type": "application/json"}
        )
        assert_problem(response, 422)

    @pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic YWRtaW46eA=="])
    def test_operator_token_required(self, stack: Stack, authorization: str | None) -> None:
        """401 problem+json with WWW-Authenticate, and nothing minted."""
        headers = {"Authorization": authorization} if authorization else {}
        with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context()) as client:
            assert_problem(client.post(PATH, json={}, headers=headers), 401)
        with stack.runtime.engine.connect() as connection:
            assert connection.execute(select(RegistrationToken)).all() == []

    def test_token_is_stored_only_as_a_hash(self, stack: Stack, operator: httpx.Client) -> None:
        """The plaintext appears in no column of the registration_tokens row."""
        token = operator.post(PATH, json={}).json()["token"]
        table = RegistrationToken.metadata.tables["registration_tokens"]
        with stack.runtime.engine.connect() as connection:
            rows = connection.execute(select(table)).mappings().all()
        assert len(rows) == 1
        row = rows[0]
        assert row["token_hash"] == hash_token(token)
        assert row["used_at"] is None
        secret = token.removeprefix("srt_")
        for value in row.values():
            assert secret not in str(value)
            assert token not in str(value)
