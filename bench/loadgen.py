"""Heartbeat load: raw HTTP/1.1 over keep-alive mutual TLS, one connection per agent.

The load shares two cores with the server it measures, so a request costs
the client as little as possible: each agent's request bytes are encoded
once, an answer is parsed only as far as its status line, Content-Length
and body, and no HTTP library sits in between. Each agent has a connection
of its own, opened with its own `SSLContext` (its client certificate), as
a real agent has.

Two ways to offer load, both on the event loop `run` starts (uvloop):

- `closed_loop`: every connection keeps one request in flight; the rate of
  answers in a fixed window is the server's throughput.
- `open_loop`: a fixed offered rate spread over the agents, each agent on
  its own periodic schedule. Latency runs from the *scheduled* send time,
  so a server that falls behind is charged for the queue it causes (no
  coordinated omission).

The server closes a keep-alive connection STELLA_KEEP_ALIVE_TIMEOUT (75 s)
after its last answer (and never before its first request). A connection
the server may close before its next send is therefore reopened before the
clock starts, never during a measurement, where a request racing the close
would fail for the client's
sake rather than the server's.

A `Ledger` keeps what the agents saw: per agent, the wall-clock send and
ack times of its last acknowledged heartbeat, and which agents each task
was delivered to. The scenario checks the database against it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import uvloop

from bench.fleet import SimAgent

HEARTBEAT = json.dumps(
    {
        "status": "healthy",
        "resourceUsage": {"cpu": 15.5, "memory": 45.2, "disk": 60.0},
        "capabilities": ["docker"],
        "runningTasks": 0,
    },
    separators=(",", ":"),
).encode()
NO_TASKS = b'{"tasks":[]}'
# `stella serve` keeps an idle connection STELLA_KEEP_ALIVE_TIMEOUT (75 s) open, and the
# ceiling the same; reopen anything that could idle close to that.
IDLE_LIMIT = 60.0
# An answer this late means the server hangs: the run stops rather than waits.
STUCK_AFTER = 60.0
# An open loop's sends still queued behind slow answers when it stops.
NOT_SENT = "not sent in time"
T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` on a fresh uvloop event loop (cheaper per request than asyncio's)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


class ProtocolError(Exception):
    """An answer this client cannot read as HTTP/1.1 with a Content-Length."""


def heartbeat_request(agent: SimAgent, host: str, port: int) -> bytes:
    """The agent's heartbeat, encoded once and sent as is every time."""
    head = (
        f"POST /api/v1/agents/{agent.agent_id}/heartbeat HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: {agent.authorization}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(HEARTBEAT)}\r\n\r\n"
    )
    return head.encode() + HEARTBEAT


def parse_response(buffer: bytearray) -> tuple[int, bytes, int, bool] | None:
    """(status, body, bytes used, server closes) of the first whole answer, or None yet."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    if not head.startswith(b"http/1.1 "):
        raise ProtocolError(f"not an HTTP/1.1 answer: {head[:40]!r}")
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        raise ProtocolError("answer without Content-Length")
    stop = head.find(b"\r\n", start + 2)
    length = int(head[start + 17 : stop if stop >= 0 else len(head)])
    total = end + 4 + length
    if len(buffer) < total:
        return None
    return int(head[9:12]), bytes(buffer[end + 4 : total]), total, b"\r\nconnection: close" in head


class _Client(asyncio.Protocol):
    """One connection's bytes: hands each whole answer to the request waiting for it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is a Transport in all but its class
        self.transport = cast(asyncio.Transport, transport)
        self.open = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = parse_response(self.buffer)
        except (ProtocolError, ValueError) as exc:
            waiter.set_exception(ProtocolError(str(exc)))
            self.close()
            return
        if parsed is None:
            return
        status, body, used, closing = parsed
        del self.buffer[:used]
        self.waiter = None
        if closing:
            self.close()
        waiter.set_result((status, body))

    def eof_received(self) -> bool | None:
        self.open = False  # the server closed it (keep-alive timeout): reopen before use
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost ({exc})"))
        self.waiter = None

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()


class AgentConnection:
    """One agent's keep-alive connection to one server, with its request pre-encoded."""

    def __init__(self, agent: SimAgent, context: ssl.SSLContext, host: str, port: int) -> None:
        self.agent = agent
        self.context = context
        self.host = host
        self.port = port
        self.request = heartbeat_request(agent, host, port)
        self.connects = 0
        # monotonic time of the last answer: uvicorn's keep-alive clock for this connection
        self.last_answer: float | None = None
        self._client: _Client | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.open

    async def connect(self) -> None:
        self.close()
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            _Client, self.host, self.port, ssl=self.context, server_hostname=self.host
        )
        self._client = client
        self.connects += 1
        self.last_answer = None

    async def heartbeat(self) -> tuple[int, bytes]:
        """(status, body) of one heartbeat; opens the connection first if the server closed it."""
        if not self.connected:
            await self.connect()
        client = self._client
        assert client is not None
        assert client.transport is not None
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        client.waiter = waiter
        client.transport.write(self.request)
        try:
            answer = await waiter
        except asyncio.CancelledError:
            self.close()  # an answer may still come: this connection cannot be reused
            raise
        self.last_answer = time.monotonic()
        return answer

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass
class Ledger:
    """What the agents were told: the truth the database is checked against afterwards."""

    # agent -> wall-clock (sent, acked) of its last heartbeat answered 200
    acked: dict[uuid.UUID, tuple[float, float]] = field(default_factory=dict)
    # agents whose later heartbeat got no answer: its effect may or may not be stored
    unanswered: set[uuid.UUID] = field(default_factory=set)
    # task id -> the agents whose heartbeat answers carried it
    deliveries: defaultdict[str, list[uuid.UUID]] = field(default_factory=lambda: defaultdict(list))

    def answered(
        self, agent_id: uuid.UUID, sent: float, acked: float, status: int, body: bytes
    ) -> None:
        if status != 200:
            return
        self.acked[agent_id] = (sent, acked)
        self.unanswered.discard(agent_id)
        if body != NO_TASKS:
            for task in json.loads(body).get("tasks", []):
                self.deliveries[str(task["taskId"])].append(agent_id)


async def _send(conn: AgentConnection, ledger: Ledger | None) -> tuple[int, bytes]:
    """One heartbeat into the ledger; status 0 when no answer came."""
    sent = time.time()
    try:
        status, body = await conn.heartbeat()
    except (OSError, ProtocolError):
        if ledger is not None:
            ledger.unanswered.add(conn.agent.agent_id)
        return 0, b""
    except asyncio.CancelledError:
        if ledger is not None:
            ledger.unanswered.add(conn.agent.agent_id)
        raise
    if ledger is not None:
        ledger.answered(conn.agent.agent_id, sent, time.time(), status, body)
    return status, body


async def _each(
    conns: Sequence[AgentConnection],
    action: Callable[[AgentConnection], Awaitable[None]],
    concurrency: int,
) -> None:
    """`action` on every connection, in order, at most `concurrency` at a time."""
    queue = iter(conns)

    async def worker() -> None:
        for conn in queue:
            await action(conn)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(conns)))))


async def once(
    conns: Sequence[AgentConnection], ledger: Ledger | None, *, concurrency: int = 64
) -> dict[str, int]:
    """One heartbeat per connection (warm-up, drain); returns the failures by kind."""
    failures: dict[str, int] = defaultdict(int)

    async def beat(conn: AgentConnection) -> None:
        async with asyncio.timeout(STUCK_AFTER):
            status, _ = await _send(conn, ledger)
            if status == 0:  # raced the keep-alive close: a second try on a fresh connection
                status, _ = await _send(conn, ledger)
        if status != 200:
            failures[_kind(status)] += 1

    await _each(conns, beat, concurrency)
    return dict(failures)


async def _reopen_idle(
    conns: Sequence[AgentConnection], offsets: Sequence[float], *, concurrency: int = 64
) -> int:
    """Reopen each connection the server may close before its first send (`offsets` from now)."""
    reopened = 0
    while True:
        start = time.monotonic() + 0.25  # the clock starts right after this returns
        stale = [
            conn
            for conn, offset in zip(conns, offsets, strict=True)
            if not conn.connected
            or (conn.last_answer is not None and start + offset - conn.last_answer > IDLE_LIMIT)
        ]
        if not stale:
            return reopened
        await _each(stale, AgentConnection.connect, concurrency)
        reopened += len(stale)


@dataclass
class LoadResult:
    """One measured run of load: answers, failures, latencies and the client's own cost."""

    offered_per_s: float | None  # None: closed loop
    agents: int
    seconds: float
    ok: int = 0
    failures: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies: list[float] = field(default_factory=list)  # seconds, every answer
    late_sends: list[float] = field(default_factory=list)  # seconds the client itself lagged
    client_cpu: float = 0.0  # this process's CPU time over wall time (1.0 = one core)
    reopened: int = 0  # before the clock started
    reconnects: int = 0  # while it ran: the server closed connections under load

    @property
    def achieved_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        """Requests the server failed: an error status or no answer (not the unsent backlog)."""
        return sum(n for kind, n in self.failures.items() if kind != NOT_SENT)

    def latency_ms(self, quantile: float) -> float:
        return percentile(self.latencies, quantile) * 1000

    def late_ms(self, quantile: float) -> float:
        return percentile(self.late_sends, quantile) * 1000

    def record(self, status: int, latency: float) -> None:
        if status == 200:
            self.ok += 1
        else:
            self.failures[_kind(status)] += 1
        if status:
            self.latencies.append(latency)


def percentile(values: Sequence[float], quantile: float) -> float:
    """Nearest-rank percentile (0 when there is nothing to rank)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))]


def _kind(status: int) -> str:
    return f"status {status}" if status else "no answer"


async def closed_loop(
    conns: Sequence[AgentConnection],
    seconds: float,
    ledger: Ledger | None,
    *,
    warmup: float = 1.0,
) -> LoadResult:
    """Each connection keeps one heartbeat in flight; counts the answers within a window.

    The window opens `warmup` seconds after the first sends and lasts
    `seconds`: the answers that arrive in it, over its length, are the rate.
    """
    result = LoadResult(offered_per_s=None, agents=len(conns), seconds=seconds)
    result.reopened = await _reopen_idle(conns, [0.0] * len(conns))
    connects = sum(conn.connects for conn in conns)
    opens = time.monotonic() + warmup
    closes = opens + seconds

    async def worker(conn: AgentConnection) -> None:
        while (sent := time.monotonic()) < closes:
            status, _ = await _send(conn, ledger)
            done = time.monotonic()
            if opens <= done <= closes:
                result.record(status, done - sent)

    cpu = time.process_time()
    async with asyncio.timeout(warmup + seconds + STUCK_AFTER):
        await asyncio.gather(*(worker(conn) for conn in conns))
    result.client_cpu = (time.process_time() - cpu) / (time.monotonic() - opens + warmup)
    result.reconnects = sum(conn.connects for conn in conns) - connects
    return result


async def open_loop(
    conns: Sequence[AgentConnection],
    rate: float,
    seconds: float,
    ledger: Ledger | None,
    *,
    during: Callable[[], Awaitable[object]] | None = None,
    during_at: float = 0.5,
    drain: float = 30.0,
) -> LoadResult:
    """`rate` heartbeats a second for `seconds`, agent i every len/rate s from offset i/rate.

    An agent whose answers come late sends its next heartbeat as soon as it
    has the previous answer, and that heartbeat's latency still counts from
    when it was due. Sends due at the end but not yet gone are sent until
    `drain` seconds later; any left then are failures ("not sent in time")
    at the latency they had reached. Requests in flight are always waited
    for: an answer nobody reads could carry a task. `during` runs
    `during_at` of the way through (e.g. a dispatch that must reach agents
    under load).
    """
    count = len(conns)
    interval = count / rate
    offsets = [index / rate for index in range(count)]
    result = LoadResult(offered_per_s=rate, agents=count, seconds=seconds)
    result.reopened = await _reopen_idle(conns, offsets)
    connects = sum(conn.connects for conn in conns)
    start = time.monotonic() + 0.05
    end = start + seconds
    last_answer = start

    async def agent(conn: AgentConnection, offset: float) -> None:
        nonlocal last_answer
        due = start + offset
        free = start  # when this agent's previous answer came
        while due < end:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if now > end + drain:
                break
            # The client's own lag: late against the schedule or its previous answer.
            result.late_sends.append(max(0.0, now - max(due, free)))
            status, _ = await _send(conn, ledger)
            free = last_answer = time.monotonic()
            result.record(status, last_answer - due)
            due += interval
        now = time.monotonic()
        while due < end:
            result.failures[NOT_SENT] += 1
            result.latencies.append(now - due)
            due += interval

    async def side() -> None:
        if during is not None:
            await asyncio.sleep(max(0.0, start + seconds * during_at - time.monotonic()))
            await during()

    cpu = time.process_time()
    agents = [agent(conn, offset) for conn, offset in zip(conns, offsets, strict=True)]
    # The bound only guards against a server that stopped answering altogether.
    async with asyncio.timeout(seconds + drain + STUCK_AFTER):
        await asyncio.gather(side(), *agents)
    result.seconds = max(seconds, last_answer - start)
    result.client_cpu = (time.process_time() - cpu) / (time.monotonic() - start)
    result.reconnects = sum(conn.connects for conn in conns) - connects
    return result


def close(conns: Sequence[AgentConnection]) -> None:
    for conn in conns:
        conn.close()
