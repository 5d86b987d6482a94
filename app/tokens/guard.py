"""Registration-token guessing, rate-limited per source address.

Failed registrations (a bad, used or expired token) are counted per source
address in a fixed window. Past the limit, every registration from that
source is refused with 429 until the window ends, even one with a valid
token, so that a guesser learns nothing from its later guesses.

- `RedisFailureCounter`: one count per source shared by every web process
  (STELLA_REDIS_URL), in keys under the instance's key prefix.
- `LocalFailureCounter`: this process only, bounded in memory; also the
  fallback while Redis is unreachable.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol

import redis

from app.errors import TooManyRequests
from app.settings import Settings

log = logging.getLogger(__name__)

# Sources remembered at once by the in-process counter; the oldest window goes first.
MAX_LOCAL_SOURCES = 100_000


class FailureCounter(Protocol):
    def count(self, source: str) -> tuple[int, float]:
        """Failures of `source` in its current window, and the seconds left in it."""

    def add(self, source: str) -> tuple[int, float]:
        """Count one more failure; the new count and the seconds left in the window."""

    def close(self) -> None: ...


class LocalFailureCounter:
    """Fixed windows in this process's memory, at most `max_sources` of them."""

    def __init__(self, window: float, *, max_sources: int = MAX_LOCAL_SOURCES) -> None:
        self._window = window
        self._max_sources = max_sources
        self._lock = threading.Lock()
        # source -> (window end, failures); ordered by window end (insertion order).
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def count(self, source: str) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            ends, failures = self._windows.get(source, (now, 0))
        return failures, max(ends - now, 0.0)

    def add(self, source: str) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            ends, failures = self._windows.get(source, (now + self._window, 0))
            self._windows[source] = (ends, failures + 1)
            while len(self._windows) > self._max_sources:
                self._windows.popitem(last=False)
        return failures + 1, ends - now

    def _expire(self, now: float) -> None:
        while self._windows:
            oldest = next(iter(self._windows))
            if self._windows[oldest][0] > now:
                return
            del self._windows[oldest]

    def close(self) -> None:
        pass


class RedisFailureCounter:
    """Fixed windows in Redis (a counter whose key expires with its window)."""

    def __init__(self, url: str, *, prefix: str, window: int) -> None:
        self._client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        self._prefix = prefix
        self._window = window
        self._fallback = LocalFailureCounter(window)

    def _key(self, source: str) -> str:
        return f"{self._prefix}stella:registration-failures:{source}"

    def count(self, source: str) -> tuple[int, float]:
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._key(source))
                pipe.pttl(self._key(source))
                failures, ttl_ms = pipe.execute()
        except redis.RedisError as exc:
            log.warning("registration failures: Redis unavailable, counting locally: %s", exc)
            return self._fallback.count(source)
        return int(failures or 0), max(int(ttl_ms), 0) / 1000

    def add(self, source: str) -> tuple[int, float]:
        key = self._key(source)
        try:
            # One transaction: the key never exists without its expiry.
            with self._client.pipeline(transaction=True) as pipe:
                pipe.set(key, 0, ex=self._window, nx=True)
                pipe.incr(key)
                pipe.pttl(key)
                _, failures, ttl_ms = pipe.execute()
        except redis.RedisError as exc:
            log.warning("registration failures: Redis unavailable, counting locally: %s", exc)
            return self._fallback.add(source)
        return int(failures), max(int(ttl_ms), 0) / 1000

    def close(self) -> None:
        self._client.close()


class RegistrationGuard:
    """The rule: at most `limit` failed registrations per source and window."""

    def __init__(self, counter: FailureCounter, *, limit: int) -> None:
        self.counter = counter
        self.limit = limit

    def check(self, source: str) -> None:
        """Refuse (429) a source that has used up its failures for this window."""
        failures, left = self.counter.count(source)
        if failures >= self.limit:
            raise _refusal(left)

    def failed(self, source: str) -> None:
        """Count a failed registration; 429 when it is past the limit.

        The count is atomic, so concurrent guesses get at most `limit` 401s.
        """
        failures, left = self.counter.add(source)
        if failures > self.limit:
            raise _refusal(left)

    def close(self) -> None:
        self.counter.close()


def _refusal(seconds_left: float) -> TooManyRequests:
    return TooManyRequests(
        "too many failed registrations or recovery proofs from this address; retry later",
        retry_after=max(1, math.ceil(seconds_left)),
    )


def make_guard(settings: Settings) -> RegistrationGuard:
    """Shared through Redis where STELLA_REDIS_URL is set, else per process."""
    window = settings.registration_failure_window
    counter: FailureCounter = (
        RedisFailureCounter(settings.redis_url, prefix=settings.broker_key_prefix, window=window)
        if settings.redis_url
        else LocalFailureCounter(window)
    )
    return RegistrationGuard(counter, limit=settings.registration_failure_limit)


def source_address(scope: Mapping[str, Any], settings: Settings) -> str:
    """The address a request comes from: the TCP peer, or, when that peer is a
    trusted proxy, the last address it appended to X-Forwarded-For."""
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    if not settings.trusted_proxy_networks or not _trusted(peer, settings):
        return peer
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            forwarded = value.decode("latin-1").rsplit(",", 1)[-1].strip()
            try:
                return str(ipaddress.ip_address(forwarded))
            except ValueError:
                return peer
    return peer


def _trusted(peer: str, settings: Settings) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in settings.trusted_proxy_networks)
