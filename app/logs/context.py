"""The request id of the work in hand, carried across threads, processes and the broker.

A web request gets one (its caller's `X-Request-ID`, when well formed, else a
new one); the tasks and dispatches it creates keep it in their rows, a Celery
job carries it in a message header, and every log line written meanwhile
names it. So one id finds the API call, the fan-out in the worker and each
delivery to an agent.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"
# The Celery message header that carries it to a worker.
JOB_HEADER = "stella_request_id"

# What a caller may choose: printable, short, no spaces or quotes (it is logged
# and echoed in a header).
_VALID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")

_current: ContextVar[str | None] = ContextVar("stella_request_id", default=None)


def current() -> str | None:
    return _current.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def accepted(value: str | None) -> str | None:
    """A caller's request id, if it is one we can log and echo safely."""
    if value and _VALID.fullmatch(value):
        return value
    return None


@contextmanager
def bound(request_id: str | None) -> Iterator[None]:
    """Within the block, log lines (and rows created) carry `request_id`."""
    token = _current.set(request_id)
    try:
        yield
    finally:
        _current.reset(token)


def bind(request_id: str | None) -> None:
    """Set the id for the rest of this context (a Celery job: until the next binds its own)."""
    _current.set(request_id)
