"""Guessing registration tokens: failures from one address are limited (429 + Retry-After).

Each test speaks from its own loopback address (127.0.0.x, bound on the
client side), so that the counts of one test never reach another.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agents.helpers import race, registration_body
from tests.api.problems import assert_problem
from tests.conftest import (
    Stack,
    drop_redis_keys,
    mint_token,
    operator_client,
    require_redis,
    start_stack,
    truncate,
)

LIMIT = 5
WINDOW = 3  # seconds: short, so that tests can wait for its end
_addresses = (f"127.0.0.{n}" for n in itertools.count(10))


def guarded_settings(backend: str, prefix: str) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "registration_failure_limit": LIMIT,
        "registration_failure_window": WINDOW,
    }
    if backend == "postgresql":
        # The production pair: the count lives in Redis.
        settings |= {"redis_url": require_redis(), "broker_key_prefix": prefix}
    return settings


@pytest.fixture(scope="module")
def guarded_stack(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    prefix = f"stella-test-guessing-{os.getpid()}-"
    try:
        yield from start_stack(
            tmp_path_factory.mktemp("guessing"),
            database_url,
            worker=False,
            **guarded_settings(backend, prefix),
        )
    finally:
        if backend == "postgresql":
            drop_redis_keys(prefix)


@pytest.fixture
def stack(guarded_stack: Stack) -> Stack:
    truncate(guarded_stack.runtime)
    return guarded_stack


@pytest.fixture
def operator(stack: Stack) -> Iterator[httpx.Client]:
    with operator_client(stack) as client:
        yield client


@contextlib.contextmanager
def client_from(stack: Stack, address: str) -> Iterator[httpx.Client]:
    """A client whose connections come from `address`."""
    transport = httpx.HTTPTransport(verify=stack.ssl_context(), local_address=address)
    with httpx.Client(base_url=stack.base_url, transport=transport, timeout=30) as client:
        yield client


def register(client: httpx.Client, token: str | None, name: str) -> httpx.Response:
    headers = {} if token is None else {"X-Agent-Token": token}
    return client.post("/api/v1/agents/register", json=registration_body(name), headers=headers)


def use_up_failures(client: httpx.Client) -> None:
    for index in range(LIMIT):
        assert_problem(register(client, f"srt_guess-{index}", f"g{index}"), 401)


def assert_too_many(response: httpx.Response) -> None:
    body = assert_problem(response, 429)
    assert "too many failed registrations" in body["detail"]
    assert 1 <= int(response.headers["Retry-After"]) <= WINDOW


class TestTokenGuessing:
    def test_concurrent_wrong_tokens_get_401_then_429(self, stack: Stack) -> None:
        address = next(_addresses)

        def guess(index: int) -> httpx.Response:
            with client_from(stack, address) as client:
                return register(client, f"srt_guess-{index}", f"g{index}")

        responses = race(3 * LIMIT, guess)
        statuses = Counter(response.status_code for response in responses)
        assert statuses == {401: LIMIT, 429: 2 * LIMIT}, [r.text for r in responses]
        for response in responses:
            if response.status_code == 429:
                assert_too_many(response)
            else:
                assert_problem(response, 401)

    def test_a_valid_token_is_refused_until_the_window_ends_and_stays_unspent(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        token = mint_token(operator)
        with client_from(stack, next(_addresses)) as client:
            use_up_failures(client)
            assert_too_many(register(client, token, "patient"))
            threading.Event().wait(WINDOW + 0.5)
            response = register(client, token, "patient")
        assert response.status_code == 201, response.text

    def test_used_and_expired_tokens_count_as_failures(
        self, stack: Stack, operator: httpx.Client
    ) -> None:
        used = mint_token(operator)
        expired = mint_token(operator, ttlSeconds=1)
        threading.Event().wait(1.2)
        with client_from(stack, next(_addresses)) as client:
            assert register(client, used, "first").status_code == 201
            for index in range(LIMIT - 1):
                assert_problem(register(client, used, f"again-{index}"), 401)
            assert_problem(register(client, expired, "late"), 401)
            assert_too_many(register(client, used, "again"))

    def test_other_failures_do_not_count(self, stack: Stack, operator: httpx.Client) -> None:
        # Only a bad token is a guess: a taken name or a bad body spends nothing.
        token = mint_token(operator)
        with client_from(stack, next(_addresses)) as client:
            assert register(client, token, "taken").status_code == 201
            for _ in range(LIMIT + 1):
                assert_problem(register(client, mint_token(operator), "taken"), 409)
                assert_problem(register(client, mint_token(operator), ""), 422)
            assert register(client, mint_token(operator), "free").status_code == 201

    def test_another_address_is_unaffected(self, stack: Stack, operator: httpx.Client) -> None:
        with client_from(stack, next(_addresses)) as blocked:
            use_up_failures(blocked)
            assert_too_many(register(blocked, mint_token(operator), "blocked"))
        with client_from(stack, next(_addresses)) as other:
            assert_problem(register(other, "srt_wrong", "other"), 401)
            response = register(other, mint_token(operator), "other")
        assert response.status_code == 201, response.text


# The shared count needs Redis, which the PostgreSQL stacks use.
@pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_two_web_processes_share_the_count(backend: str, database_url: str, tmp_path: Path) -> None:
    """With Redis, failures at one web process count at every other."""
    prefix = f"stella-test-shared-guessing-{os.getpid()}-"
    settings = guarded_settings(backend, prefix)
    address = next(_addresses)
    try:
        with (
            contextlib.contextmanager(start_stack)(
                tmp_path / "a", database_url, worker=False, **settings
            ) as first,
            contextlib.contextmanager(start_stack)(
                tmp_path / "b", database_url, worker=False, **settings
            ) as second,
            client_from(first, address) as to_first,
            client_from(second, address) as to_second,
        ):
            for index in range(LIMIT - 2):
                assert_problem(register(to_first, f"srt_a{index}", "x"), 401)
            for index in range(2):
                assert_problem(register(to_second, f"srt_b{index}", "x"), 401)
            assert_too_many(register(to_first, "srt_c", "x"))
            assert_too_many(register(to_second, "srt_d", "x"))
    finally:
        drop_redis_keys(prefix)
