"""The worker process's Runtime, built on first use (after the prefork fork)."""

from __future__ import annotations

from functools import lru_cache

from app.runtime import Runtime, build_runtime
from app.settings import get_settings


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    return build_runtime(get_settings())
