"""Heartbeats from a fleet of simulated agents: throughput, latency, no effect lost.

The issue's two heartbeat scenarios, run against one server in one go
(provisioning the agents and their TLS handshakes are the slow part; doing
them once keeps the quick mode short):

1. No agent has pending work. Throughput is a closed loop on the same
   agents' connections against the ceiling (bench/ceilings.py: the same
   body parsing, no auth, no database, the same uvicorn TLS settings and
   worker count) and against stella; the goal is their ratio. Latency is
   an open loop at steps of the 3,333/s target (the curve); the goal is
   the p99 at the target, offered over every agent's connection.
2. The target load again, with 1 % of the agents holding a pending task
   and 1 % more getting one while it runs: each task must come back in
   exactly one heartbeat answer, its own agent's (heartbeats_pending.py).

After each, once the write-behind window has passed, every agent's stored
`last_heartbeat` must lie between the send and the ack of the last
heartbeat it saw acknowledged: an acknowledged heartbeat whose effect never
reached the database, or was overwritten by an older one, fails that.

    python -m bench --quick --only heartbeats
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlmodel import col

from app.models import Agent
from bench import loadgen
from bench.fleet import SimAgent, provision
from bench.loadgen import AgentConnection, Ledger, LoadResult
from bench.results import Check, CurvePoint, ScenarioResult
from bench.scenarios import heartbeats_pending
from bench.scenarios.heartbeats_pending import Verdict
from bench.stack import BenchStack, WebServer

NAME = "heartbeats"
TARGET_RATE = 3_333.0  # heartbeats/s: 10,000 agents every 3 s
WORKERS = 2  # uvicorn workers, the same for stella and its ceiling
TOLERANCE = 0.05  # seconds of slack on the stored heartbeat time


@dataclass(frozen=True)
class Plan:
    agents: int
    # Closed loops: requests in flight (one per connection). The best of several, as a
    # server whose requests wait on I/O needs more in flight to reach its peak.
    concurrency: tuple[int, ...]
    closed_seconds: float  # after a warm-up of a third as long
    steps: tuple[float, ...]  # open loop, as fractions of TARGET_RATE; 1.0 is the goal's
    step_seconds: float
    pending_seconds: float
    drain: float  # how long an open loop still sends what fell due during its run
    rounds: int  # closed loops on ceiling and stella, alternating


FULL = Plan(
    agents=10_000,
    concurrency=(200, 1000),
    closed_seconds=10.0,
    steps=(0.25, 0.5, 0.75, 1.0, 1.25),
    step_seconds=15.0,
    pending_seconds=20.0,
    drain=30.0,
    rounds=2,
)
# Bounded even when the server cannot keep up: the drain is cut short.
QUICK = Plan(
    agents=500,
    concurrency=(128,),
    closed_seconds=1.5,
    steps=(0.5, 1.0),
    step_seconds=2.0,
    pending_seconds=3.0,
    drain=1.0,
    rounds=2,
)


@dataclass
class Outcome:
    closed_loops: list[tuple[LoadResult, LoadResult]]  # (ceiling, stella)
    steps: list[LoadResult]
    persisted: Verdict
    pending: LoadResult
    delivered: Verdict
    pending_persisted: Verdict

    # The best of each, not a mean: other work on a shared machine only ever slows a run.
    @property
    def ceiling(self) -> LoadResult:
        return max((pair[0] for pair in self.closed_loops), key=_rate)

    @property
    def closed(self) -> LoadResult:
        return max((pair[1] for pair in self.closed_loops), key=_rate)


def _rate(result: LoadResult) -> float:
    return result.achieved_per_s


def run(stack: BenchStack, *, quick: bool) -> ScenarioResult:
    plan = QUICK if quick else FULL
    agents = provision(stack, plan.agents)
    # Both servers up at once, so the closed loops on each run back to back (less drift
    # between them). They start side by side while the agents' contexts (ms each) are made.
    with contextlib.ExitStack() as servers:
        with ThreadPoolExecutor(2) as pool:
            starting = [
                pool.submit(servers.enter_context, server)
                for server in (
                    stack.web(workers=WORKERS),
                    stack.ceiling("heartbeat", workers=WORKERS),
                )
            ]
            contexts = [agent.ssl_context() for agent in agents]
        server, ceiling = (future.result() for future in starting)
        outcome = loadgen.run(_measure(stack, server, ceiling, agents, contexts, plan))
    return _result(plan, outcome)


def _connections(
    server: WebServer, agents: Sequence[SimAgent], contexts: Sequence[ssl.SSLContext]
) -> list[AgentConnection]:
    url = urlsplit(server.url)
    assert url.hostname is not None
    assert url.port is not None
    return [
        AgentConnection(agent, context, url.hostname, url.port)
        for agent, context in zip(agents, contexts, strict=True)
    ]


async def _measure(
    stack: BenchStack,
    server: WebServer,
    ceiling: WebServer,
    agents: Sequence[SimAgent],
    contexts: Sequence[ssl.SSLContext],
    plan: Plan,
) -> Outcome:
    conns = _connections(server, agents, contexts)
    most = max(plan.concurrency)
    bare = _connections(ceiling, agents[:most], contexts[:most])
    ledger = Ledger()
    try:
        # Each agent once: opens its connection (the TLS handshake), proves the setup
        # (mTLS, auth) and warms whatever the server caches.
        _require_ok(await loadgen.once(bare, None), "ceiling")
        _require_ok(await loadgen.once(conns, ledger), "stella")
        closed_loops = await _throughput(bare, conns, ledger, plan)
        steps = []
        for share in plan.steps:
            rate = TARGET_RATE * share
            # At very low rates, fewer agents: each still sends every IDLE_LIMIT s at most,
            # so the keep-alive never closes a connection and no step measures handshakes.
            count = min(len(conns), int(rate * loadgen.IDLE_LIMIT))
            steps.append(
                await loadgen.open_loop(
                    conns[:count], rate, plan.step_seconds, ledger, drain=plan.drain
                )
            )
        persisted = await _persisted(stack, ledger)
        pending, delivered = await heartbeats_pending.run(
            stack,
            server,
            conns,
            ledger,
            rate=TARGET_RATE,
            seconds=plan.pending_seconds,
            drain=plan.drain,
        )
        pending_persisted = await _persisted(stack, ledger)
    finally:
        loadgen.close(conns)
        loadgen.close(bare)
    return Outcome(closed_loops, steps, persisted, pending, delivered, pending_persisted)


async def _throughput(
    bare: Sequence[AgentConnection],
    conns: Sequence[AgentConnection],
    ledger: Ledger,
    plan: Plan,
) -> list[tuple[LoadResult, LoadResult]]:
    """(ceiling, stella) closed loops at each concurrency, each pair back to back.

    Rounds alternate which goes first (ABBA), so drift on a shared machine
    falls on both alike.
    """
    warmup = plan.closed_seconds / 3
    pairs = []
    for round_ in range(plan.rounds):
        for count in plan.concurrency:
            ceiling_first = round_ % 2 == 0
            runs: dict[bool, LoadResult] = {}
            for is_ceiling in (ceiling_first, not ceiling_first):
                targets, book = (bare, None) if is_ceiling else (conns, ledger)
                runs[is_ceiling] = await loadgen.closed_loop(
                    targets[:count], plan.closed_seconds, book, warmup=warmup
                )
            pairs.append((runs[True], runs[False]))
    return pairs


def _require_ok(failures: dict[str, int], server: str) -> None:
    if failures:
        raise RuntimeError(f"warm-up heartbeats to the {server} failed: {failures}")


# --- no effect lost ------------------------------------------------------------------------


async def _persisted(stack: BenchStack, ledger: Ledger) -> Verdict:
    """Is each agent's stored heartbeat its last acknowledged one, once the window has passed?

    Polled from the moment the load stops: `seconds` is how long the
    database took to catch up. The verdict is the check at the end of the
    write-behind window (+1 s), so a late flush of older values still fails.
    """
    window = float(getattr(stack.settings, "heartbeat_flush_interval", 0.0)) + 1.0
    started = time.monotonic()
    caught_up: float | None = None
    while True:
        verdict = await asyncio.to_thread(_check_persisted, stack, ledger)
        waited = time.monotonic() - started
        if caught_up is None and verdict.fraction >= 1.0:
            caught_up = waited
        if waited >= window:
            verdict.seconds = caught_up if caught_up is not None else waited
            return verdict
        await asyncio.sleep(min(0.2, window - waited))


def _check_persisted(stack: BenchStack, ledger: Ledger) -> Verdict:
    now = time.time()
    with stack.engine.connect() as connection:
        stored = dict(
            connection.execute(select(col(Agent.id), col(Agent.last_heartbeat))).tuples().all()
        )
    wrong: list[str] = []
    for agent_id, (sent, acked) in ledger.acked.items():
        # A later heartbeat that got no answer may or may not have landed since.
        latest = now if agent_id in ledger.unanswered else acked
        when = stored.get(agent_id)
        at = when.timestamp() if when is not None else float("nan")
        if not sent - TOLERANCE <= at <= latest + TOLERANCE:
            wrong.append(
                f"agent {agent_id}: stored {at - sent:+.3f} s from the send of its last "
                f"acknowledged heartbeat (acked at {acked - sent:+.3f} s)"
            )
    right = len(ledger.acked) - len(wrong)
    fraction = right / len(stored) if stored else 0.0
    problems = [f"{len(wrong)} agent(s) with a stored heartbeat not their last acknowledged"]
    return Verdict(fraction, problems + wrong[:3] if wrong else [])


# --- the report ----------------------------------------------------------------------------


def _result(plan: Plan, outcome: Outcome) -> ScenarioResult:
    target = outcome.steps[plan.steps.index(1.0)]
    half = outcome.steps[plan.steps.index(0.5)]
    measured = [pair[1] for pair in outcome.closed_loops] + [*outcome.steps, outcome.pending]
    figures = {
        "heartbeat_ratio": outcome.closed.achieved_per_s / outcome.ceiling.achieved_per_s,
        "heartbeats_per_s": outcome.closed.achieved_per_s,
        "heartbeat_p99_ms": target.latency_ms(0.99),
        "heartbeat_p50_ms": target.latency_ms(0.50),
        "heartbeat_p99_ms_half_load": half.latency_ms(0.99),
        "heartbeats_persisted": outcome.persisted.fraction,
        "heartbeat_persist_lag_s": outcome.persisted.seconds,
        "heartbeat_errors": float(sum(result.errors for result in measured)),
        "pending_delivered_once": outcome.delivered.fraction,
        "pending_p99_ms": outcome.pending.latency_ms(0.99),
        "pending_heartbeats_persisted": outcome.pending_persisted.fraction,
    }
    # At 3,333/s two cores shared with the load generator run at or past their
    # capacity, and a short quick run measures mostly its own ramp: quick mode
    # holds the latency at half that load instead.
    checks = [
        Check("heartbeat_ratio", 0.6, higher_is_better=True),
        Check("heartbeat_p99_ms", 100.0, higher_is_better=False, unit=" ms", full_only=True),
        Check("heartbeat_p99_ms_half_load", 100.0, higher_is_better=False, unit=" ms"),
        Check("heartbeats_persisted", 1.0, higher_is_better=True),
        Check("pending_delivered_once", 1.0, higher_is_better=True),
        Check("pending_p99_ms", 100.0, higher_is_better=False, unit=" ms", full_only=True),
        Check("pending_heartbeats_persisted", 1.0, higher_is_better=True),
    ]
    curve = [
        CurvePoint(
            offered_per_s=step.offered_per_s or 0.0,
            achieved_per_s=step.achieved_per_s,
            p50_ms=step.latency_ms(0.50),
            p99_ms=step.latency_ms(0.99),
        )
        for step in outcome.steps
    ]
    return ScenarioResult(
        name=NAME,
        title=f"Heartbeats ({plan.agents:,} agents; then 1 % with a pending task)",
        figures=figures,
        checks=checks,
        ceiling={"heartbeats_per_s": outcome.ceiling.achieved_per_s},
        curve=curve,
        notes=_notes(plan, outcome),
    )


def _notes(plan: Plan, outcome: Outcome) -> list[str]:
    loops = "; ".join(
        f"{bare.agents} in flight: ceiling {bare.achieved_per_s:,.0f}/s, "
        f"stella {stella.achieved_per_s:,.0f}/s"
        for bare, stella in outcome.closed_loops
    )
    cpu = max(result.client_cpu for pair in outcome.closed_loops for result in pair)
    notes = [
        f"closed loops of {plan.closed_seconds:g} s, {WORKERS} workers each, best taken: "
        f"{loops}; the load generator used up to {cpu:.0%} of a core",
    ]
    if cpu > 0.9:
        notes.append("the load generator was near a full core: a rate may be its limit")
    labelled = [(f"{pair[1].agents} in flight", pair[1]) for pair in outcome.closed_loops]
    labelled += [(f"{step.offered_per_s:,.0f}/s", step) for step in outcome.steps]
    labelled += [(f"{outcome.pending.offered_per_s:,.0f}/s with tasks", outcome.pending)]
    for what, result in labelled:
        if result.failures:
            notes.append(f"{what}: failures {dict(result.failures)}")
        if result.reconnects:
            notes.append(f"{what}: {result.reconnects} connection(s) reopened during the run")
        if result.late_sends and result.late_ms(0.99) > 10:
            notes.append(
                f"{what}: the load generator lagged {result.late_ms(0.99):.0f} ms (p99) "
                "behind its schedule; counted in the latency"
            )
    notes += outcome.persisted.problems
    notes += outcome.delivered.problems
    notes += [f"with tasks: {problem}" for problem in outcome.pending_persisted.problems]
    return notes
