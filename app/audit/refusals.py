"""Refused authentications, counted in memory and written behind, coalesced.

Refusals come on the hottest paths and may come as a flood (a fleet with a
stale token, a scanner guessing registration tokens): one INSERT each would
let the flood write the database as fast as it can send. Each web process
instead counts refusals by (reason, status, route, source, agent), and
writes one `auth.refused` event per key with its `count` every
STELLA_AUDIT_FLUSH_INTERVAL seconds. At most `capacity` keys are kept
between writes; refusals of further keys are only counted, into one
overflow event, so memory stays bounded whatever the flood.

`refused` takes a lock (it may be called from worker threads) and does no
I/O; the write runs in a worker thread. A failed write keeps its counts for
the next one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from app.audit import service
from app.db import transaction
from app.flush_loop import FlushLoop
from app.models.types import utcnow

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1000
OVERFLOW_REASON = "too many distinct refusals to itemize"


@dataclass(frozen=True)
class Refusal:
    """What refusals are coalesced by."""

    reason: str
    status: int
    route: str
    source: str | None = None
    agent_id: uuid.UUID | None = None


@dataclass
class _Tally:
    first: dt.datetime
    last: dt.datetime
    count: int

    def add(self, other: _Tally) -> None:
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.count += other.count


_OVERFLOW = Refusal(reason=OVERFLOW_REASON, status=0, route="*")


def refusal_of(
    scope: Mapping[str, Any], *, reason: str, status: int, route: str | None = None
) -> Refusal:
    """The refusal of the request (or WebSocket) `scope`: its route, client and agent.

    The route is its template (the matched route's, or `route`), never the
    raw path, and the agent is the one the path names, so that a flood of
    distinct URLs still shares few keys.
    """
    route = route or getattr(scope.get("route"), "path", None) or "?"
    method = scope.get("method") or ("WS" if scope.get("type") == "websocket" else "?")
    client = scope.get("client")
    agent_id: uuid.UUID | None = None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        agent_id = uuid.UUID(scope.get("path_params", {}).get("id"))
    return Refusal(
        reason=reason,
        status=status,
        route=f"{method} {route}",
        source=str(client[0]) if client else None,
        agent_id=agent_id,
    )


class RefusalRecorder:
    def __init__(
        self, engine: Engine, *, interval: float, capacity: int = DEFAULT_CAPACITY
    ) -> None:
        self._engine = engine
        self._capacity = capacity
        self._lock = threading.Lock()
        self._counts: dict[Refusal, _Tally] = {}
        self._overflow: _Tally | None = None
        self._loop = FlushLoop(self.flush, interval=interval, name="stella-refusal-recorder")

    def refused(self, refusal: Refusal, *, at: dt.datetime | None = None) -> None:
        """Count one refusal (no I/O: written by the next flush)."""
        at = at or utcnow()
        with self._lock:
            self._add(refusal, _Tally(at, at, 1))

    def _add(self, refusal: Refusal, tally: _Tally) -> None:
        kept = self._counts.get(refusal)
        if kept is not None:
            kept.add(tally)
        elif refusal is not _OVERFLOW and len(self._counts) < self._capacity:
            self._counts[refusal] = tally
        elif self._overflow is None:
            self._overflow = _Tally(tally.first, tally.last, tally.count)
        else:
            self._overflow.add(tally)

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        """Stop the loop and write what is left."""
        await self._loop.stop()

    async def flush(self) -> None:
        """Write the counted refusals now (an operator's read then sees them)."""
        with self._lock:
            batch, self._counts = self._counts, {}
            if self._overflow is not None:
                batch[_OVERFLOW] = self._overflow
                self._overflow = None
        if not batch:
            return
        try:
            await run_in_threadpool(self._write, batch)
        except Exception as exc:  # the database is down: keep the counts, retry next time
            log.warning("could not record %d refused authentications (%s)", len(batch), exc)
            with self._lock:
                for refusal, tally in batch.items():
                    self._add(refusal, tally)

    def _write(self, batch: dict[Refusal, _Tally]) -> None:
        with transaction(self._engine) as session:
            for refusal, tally in batch.items():
                service.record(
                    session=session,
                    action="auth.refused",
                    actor=service.ANONYMOUS,
                    agent_id=refusal.agent_id,
                    source=refusal.source,
                    detail=_detail(refusal, tally),
                    at=tally.first,
                    count=tally.count,
                )


def _detail(refusal: Refusal, tally: _Tally) -> dict[str, object]:
    last = service.timestamp(tally.last)
    if refusal is _OVERFLOW:
        return {"reason": refusal.reason, "overflow": True, "lastAt": last}
    return {
        "reason": refusal.reason,
        "status": refusal.status,
        "route": refusal.route,
        "lastAt": last,
    }
