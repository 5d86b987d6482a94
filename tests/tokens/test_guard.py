"""app.tokens.guard: failed registrations counted per source, in memory and in Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.errors import TooManyRequests
from app.settings import Settings
from app.tokens.guard import (
    LocalFailureCounter,
    RedisFailureCounter,
    RegistrationGuard,
    make_guard,
    source_address,
)
from tests.agents.helpers import race
from tests.conftest import REDIS_URL, drop_redis_keys, require_redis


def fail_until_refused(guard: RegistrationGuard, source: str, attempts: int) -> list[str]:
    """What each of `attempts` failed registrations from `source` is answered."""
    outcomes = []
    for _ in range(attempts):
        try:
            guard.check(source)
            guard.failed(source)
            outcomes.append("401")
        except TooManyRequests:
            outcomes.append("429")
    return outcomes


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    require_redis()
    prefix = f"stella-test-guard-{uuid.uuid4().hex}-"
    yield prefix
    drop_redis_keys(prefix)


class TestRegistrationGuard:
    @pytest.mark.parametrize("kind", ["local", "redis"])
    def test_failures_past_the_limit_are_refused_with_the_time_left(
        self, kind: str, request: pytest.FixtureRequest
    ) -> None:
        if kind == "redis":
            prefix = request.getfixturevalue("redis_prefix")
            counter: Any = RedisFailureCounter(REDIS_URL, prefix=prefix, window=30)
        else:
            counter = LocalFailureCounter(30)
        guard = RegistrationGuard(counter, limit=3)
        try:
            assert fail_until_refused(guard, "10.0.0.1", 5) == ["401"] * 3 + ["429"] * 2
            with pytest.raises(TooManyRequests) as refused:
                guard.check("10.0.0.1")
            assert refused.value.status == 429
            assert 1 <= int(refused.value.headers["Retry-After"]) <= 30
            # Another source has its own count.
            guard.check("10.0.0.2")
            assert fail_until_refused(guard, "10.0.0.2", 1) == ["401"]
        finally:
            guard.close()

    @pytest.mark.parametrize("kind", ["local", "redis"])
    def test_the_window_ends(self, kind: str, request: pytest.FixtureRequest) -> None:
        if kind == "redis":
            prefix = request.getfixturevalue("redis_prefix")
            counter: Any = RedisFailureCounter(REDIS_URL, prefix=prefix, window=1)
        else:
            counter = LocalFailureCounter(1)
        guard = RegistrationGuard(counter, limit=1)
        try:
            assert fail_until_refused(guard, "10.0.0.1", 2) == ["401", "429"]
            time.sleep(1.2)
            guard.check("10.0.0.1")
            assert fail_until_refused(guard, "10.0.0.1", 2) == ["401", "429"]
        finally:
            guard.close()

    @pytest.mark.parametrize("kind", ["local", "redis"])
    def test_concurrent_failures_get_exactly_the_limit_of_401s(
        self, kind: str, request: pytest.FixtureRequest
    ) -> None:
        if kind == "redis":
            prefix = request.getfixturevalue("redis_prefix")
            counter: Any = RedisFailureCounter(REDIS_URL, prefix=prefix, window=30)
        else:
            counter = LocalFailureCounter(30)
        guard = RegistrationGuard(counter, limit=5)
        try:
            outcomes = race(20, lambda _i: fail_until_refused(guard, "10.0.0.9", 1)[0])
        finally:
            guard.close()
        assert sorted(outcomes) == ["401"] * 5 + ["429"] * 15

    def test_redis_keys_live_under_the_prefix_and_expire(self, redis_prefix: str) -> None:
        guard = RegistrationGuard(
            RedisFailureCounter(REDIS_URL, prefix=redis_prefix, window=30), limit=3
        )
        try:
            guard.failed("10.0.0.1")
        finally:
            guard.close()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{redis_prefix}*"))
            assert keys == [f"{redis_prefix}stella:registration-failures:10.0.0.1".encode()]
            assert 0 < client.ttl(keys[0]) <= 30
        finally:
            client.close()

    def test_an_unreachable_redis_counts_in_memory(self) -> None:
        # Nothing listens on port 1: registrations go on, still limited per process.
        guard = RegistrationGuard(
            RedisFailureCounter("redis://127.0.0.1:1/0", prefix="x-", window=30), limit=2
        )
        try:
            assert fail_until_refused(guard, "10.0.0.1", 3) == ["401", "401", "429"]
        finally:
            guard.close()


class TestLocalFailureCounter:
    def test_keeps_at_most_max_sources(self) -> None:
        counter = LocalFailureCounter(60, max_sources=3)
        for index in range(5):
            counter.add(f"10.0.0.{index}")
        # The oldest windows were dropped to make room.
        assert counter.count("10.0.0.0")[0] == 0
        assert counter.count("10.0.0.1")[0] == 0
        assert [counter.count(f"10.0.0.{i}")[0] for i in (2, 3, 4)] == [1, 1, 1]


class TestMakeGuard:
    def test_settings_choose_the_counter_and_limit(self, tmp_path: Path) -> None:
        local = make_guard(Settings(data_dir=tmp_path, registration_failure_limit=7))
        shared = make_guard(Settings(data_dir=tmp_path, redis_url=REDIS_URL))
        try:
            assert isinstance(local.counter, LocalFailureCounter)
            assert local.limit == 7
            assert isinstance(shared.counter, RedisFailureCounter)
            assert shared.limit == 10
        finally:
            local.close()
            shared.close()


class TestSourceAddress:
    def scope(self, peer: str, forwarded: str | None = None) -> dict[str, Any]:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        return {"client": (peer, 50000), "headers": headers}

    def test_the_peer_when_no_proxy_is_trusted(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path)
        assert source_address(self.scope("192.0.2.7", "203.0.113.1"), settings) == "192.0.2.7"

    def test_the_address_a_trusted_proxy_appended(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path, trusted_proxies=["10.0.0.0/8"])
        # The client may forge the left part; only the proxy's own entry counts.
        scope = self.scope("10.1.2.3", "198.51.100.9, 203.0.113.1")
        assert source_address(scope, settings) == "203.0.113.1"
        assert source_address(self.scope("10.1.2.3"), settings) == "10.1.2.3"
        assert source_address(self.scope("10.1.2.3", "not-an-ip"), settings) == "10.1.2.3"

    def test_an_untrusted_peer_cannot_claim_another_address(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path, trusted_proxies=["10.0.0.0/8"])
        assert source_address(self.scope("192.0.2.7", "203.0.113.1"), settings) == "192.0.2.7"
