"""Goal 5: 10,000 idle task streams on one web process, under 30 KB of memory each.

One `stella serve --tls` process (`--workers 1`: uvicorn runs in the root
process) is warmed with a few streams of other agents (thread pool,
database pool, code paths; closed again), then its resident memory
(VmRSS) is read before and after N authenticated streams are open and the
figure has settled. Each stream is a distinct agent with its own
certificate and JWT, as a fleet is; "authenticated" means the stream got
as far as its agent's pub/sub channel. Full mode then holds the streams
through one keepalive ping round and reads the memory again: the figure is
(after - before) / N. The ceiling is the same measurement against a plain
FastAPI WebSocket endpoint served with the same uvicorn settings.

The streams come from `bench.wsclient` processes (bare framing, answering
pings), so the client's memory is never the server's. Their handshake is
the reference agent's: it offers permessage-deflate, as the `websockets`
client does by default, so whatever the server does with that offer is
measured too.

The goal sits below what TLS alone costs here: a bare uvloop server
holding idle mutual-TLS connections (P-256, TLS 1.3, no HTTP at all) keeps
about 38 KB each, mostly OpenSSL's per-connection state (the SSL object,
its memory BIOs, cipher contexts, the parsed client certificate) and one
resident page of uvloop's read buffer; plain TCP keeps about 1 KB.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis

from app.notify import agent_channel
from bench.fleet import SimAgent, provision
from bench.results import Check, ScenarioResult
from bench.stack import REDIS_URL, BenchStack, WebServer
from bench.stream_clients import StreamClients, rss_kb

NAME = "streams"
TITLE = "Idle task streams"
WARMUP = 64
CONCURRENCY = 64  # handshakes in flight per client process
GOAL_KB = 30
# About what main measures in quick mode now (1,000 streams): the goal is below
# what TLS alone costs a connection here (see above), so quick mode holds the
# figure to this instead and fails on a regression only.
QUICK_GOAL_KB = 75


@dataclass(frozen=True)
class Footprint:
    """What N idle streams cost one server process."""

    streams: int
    before_kb: int
    settled_kb: int  # all open, memory steady
    after_kb: int  # the same after a ping round (full mode), else settled_kb
    open_s: float
    dropped: int  # streams closed or lost while held
    pings: int  # keepalive pings the clients answered
    first_error: str

    @property
    def kb_per_stream(self) -> float:
        return (self.after_kb - self.before_kb) / self.streams if self.streams else 0.0


def run(stack: BenchStack, *, quick: bool) -> ScenarioResult:
    count = 1000 if quick else 10_000
    agents = provision(stack, count + WARMUP, prefix="stream")
    warm, fleet = agents[:WARMUP], agents[WARMUP:]
    processes = 1 if quick else 2
    hold_s = 0.0 if quick else stack.settings.stream_ping_interval + 5

    with stack.web(workers=1) as web:
        stella = _footprint(stack, web, warm, fleet, processes, hold_s, confirm=True)
    with stack.ceiling("heartbeat", workers=1) as bare:
        ceiling = _footprint(stack, bare, warm, fleet, processes, hold_s, confirm=False)

    notes = [
        f"{count} streams (own certificate and JWT each) on one web process, "
        f"{processes} client process(es) with {CONCURRENCY} handshakes in flight each; "
        f"VmRSS {stella.before_kb / 1024:.0f} MB before, {stella.settled_kb / 1024:.0f} MB "
        f"settled, {stella.after_kb / 1024:.0f} MB after; opened in {stella.open_s:.1f} s "
        f"(ceiling {ceiling.open_s:.1f} s)."
    ]
    if hold_s:
        notes.append(
            f"Held {hold_s:.0f} s after opening, so each stream was pinged at least once "
            f"({stella.pings} pings answered)."
        )
    for label, footprint in (("stella", stella), ("ceiling", ceiling)):
        if footprint.streams < count:
            notes.append(
                f"{label}: only {footprint.streams} of {count} streams opened "
                f"({footprint.first_error or 'no error reported'})"
            )
        if footprint.dropped:
            notes.append(f"{label}: {footprint.dropped} streams were dropped while held")
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        figures={
            "stream_kb_per_conn": stella.kb_per_stream,
            "streams_dropped": float(stella.dropped + count - stella.streams),
        },
        checks=[
            Check(
                "stream_kb_per_conn",
                GOAL_KB,
                higher_is_better=False,
                unit=" KB",
                quick_goal=QUICK_GOAL_KB,
            )
        ],
        ceiling={"stream_kb_per_conn": ceiling.kb_per_stream},
        notes=notes,
    )


def _footprint(
    stack: BenchStack,
    server: WebServer,
    warm: list[SimAgent],
    fleet: list[SimAgent],
    processes: int,
    hold_s: float,
    *,
    confirm: bool,
) -> Footprint:
    pid = server.pids[0]
    folder = stack.workdir / f"streams-{pid}"
    # Warm-up: pools and lazily built state exist before the baseline is read.
    with StreamClients(server.url, warm, folder / "warm", processes=1) as clients:
        clients.wait_open(len(warm), timeout=60)
        if confirm:
            _subscribed(stack, warm, timeout=30)
    if confirm:
        _subscribed(stack, [], timeout=30)
    before = _settled(pid, quiet_s=1.0, limit_s=10)

    started = time.monotonic()
    with StreamClients(
        server.url, fleet, folder / "fleet", processes=processes, concurrency=CONCURRENCY
    ) as clients:
        opened = clients.wait_open(len(fleet), timeout=600)
        if confirm:
            opened = _subscribed(stack, fleet, timeout=60)
        open_s = time.monotonic() - started
        settled = _settled(pid, quiet_s=2.0, limit_s=15)
        after = settled
        if hold_s:
            time.sleep(hold_s)
            after = _settled(pid, quiet_s=2.0, limit_s=15)
        tally = clients.tally()
    return Footprint(
        streams=opened,
        before_kb=before,
        settled_kb=settled,
        after_kb=after,
        open_s=open_s,
        dropped=tally.dropped,
        pings=tally.pings,
        first_error=tally.first_error,
    )


def _settled(pid: int, *, quiet_s: float, limit_s: float) -> int:
    """VmRSS once it moved less than 0.5 % over `quiet_s` (or after `limit_s`)."""
    deadline = time.monotonic() + limit_s
    window = max(2, int(quiet_s / 0.25))
    samples = [rss_kb(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.25)
        samples.append(rss_kb(pid))
        recent = samples[-window:]
        if len(recent) == window and max(recent) - min(recent) <= 0.005 * max(recent):
            break
    return samples[-1]


def _subscribed(stack: BenchStack, agents: list[SimAgent], *, timeout: float) -> int:
    """How many of these agents' channels are subscribed (their streams passed auth),
    waiting up to `timeout` for exactly these to be."""
    prefix = stack.settings.broker_key_prefix
    anyone = uuid.UUID(int=0)
    pattern = agent_channel(prefix, anyone).replace(str(anyone), "*")
    wanted = {agent_channel(prefix, agent.agent_id) for agent in agents}
    client = redis.Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + timeout
    try:
        while True:
            channels = {_text(name) for name in client.pubsub_channels(pattern)}
            if channels == wanted or time.monotonic() > deadline:
                return len(channels & wanted)
            time.sleep(0.25)
    finally:
        client.close()


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name
