"""A soak: a simulated fleet for a long while, with restarts injected, then the invariants.

    python -m bench.soak [--minutes 60] [--agents 300] [--restart-every 90] [--seed N]

Not part of CI nor of `python -m bench`. It runs a `BenchStack` (its own
PostgreSQL database and Redis prefix, a worker and a beat) and `stella
serve --tls` with short intervals, so that offline marks and timeouts
happen within minutes, and for `--minutes`:

- agents (own key, certificate and JWT; one keep-alive mTLS connection
  each) heartbeat every interval, complete each task handed to them after a
  short random delay and retry the completion until it is acknowledged;
  after a heartbeat that got no answer they list their open tasks once, as
  the reference agent does when it may have missed a delivery. A few go
  silent for a while (offline, then back), a few for good;
- an operator dispatches to one agent and by selector, retrying on 503,
  and puts a canary credential in some tasks;
- every `--restart-every` seconds one of web, worker and beat is killed
  with SIGKILL and started again (web on the same port).

Then dispatching stops, the agents drain, and the invariants are checked
against the database: no task lost or duplicated, none delivered twice nor
to another agent, each task's final state the one its agent was told, one
task per matching online agent for each selector dispatch, every agent's
final status right, and the canary in no log. One line of JSON on stdout;
exit 1 on any violation. The same JSON goes to bench/results/soak-<stamp>.json
(with the processes' logs beside it when it fails).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import random
import secrets
import shutil
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlmodel import col

from app.models import Agent, Dispatch, Task
from bench import loadgen
from bench.fleet import SimAgent, provision
from bench.http1 import Connection, Response
from bench.stack import ADMIN_TOKEN, BenchStack, WebServer

RESULTS = Path(__file__).parent / "results"

HEARTBEAT_INTERVAL = 2
# The offline window (12 s) outlasts a web restart plus a lost write-behind second, so an
# agent that keeps heartbeating is never marked offline by a restart; a silence of 20 s
# or more is.
OFFLINE_AFTER_MISSED = 6
WINDOW = HEARTBEAT_INTERVAL * OFFLINE_AFTER_MISSED
SETTINGS: dict[str, Any] = {
    "heartbeat_interval": HEARTBEAT_INTERVAL,
    "sweep_interval": 2,
    "offline_after_missed": OFFLINE_AFTER_MISSED,
    "dispatch_stall_after": 10,
}
TASK_TIMEOUT = 30  # seconds: a task held through a long silence times out
# Reachable seconds an agent needs within a task's timeout to report it: the random
# delay (3 s at most), a retry or two, a sweep interval of slack.
REPORT_SECONDS = 8.0
REQUEST_TIMEOUT = 15.0
DRAIN_SECONDS = 120.0  # at most, once dispatching stops
SETTLE_SECONDS = 30.0  # at most, for the agents' final statuses
TEMPORARY_SHARE = 0.08  # agents that go silent for a while, then come back
GONE_SHARE = 0.03  # agents that go silent for good
GROUPS = ("a", "b", "c", "d")
GPU_SHARE = 0.2
SELECTORS: tuple[dict[str, Any], ...] = (
    {"capability": "gpu"},
    {"labels": {"group": "b"}},
    {"capability": "gpu", "labels": {"group": "a"}},
    {"labels": {"group": "c", "zone": "z1"}},
)
SELECTOR_EVERY = 10.0  # seconds between selector dispatches
CANARY_SHARE = 0.1
HEARTBEAT = json.dumps(
    {"status": "healthy", "resourceUsage": {"cpu": 5.0, "memory": 20.0, "disk": 30.0}}
).encode()


class Unanswered(Exception):
    """A request that got no answer (connection refused, reset, timed out)."""


@dataclass(frozen=True)
class Silence:
    start: float
    end: float | None  # None: for good


@dataclass
class Ledger:
    """What the agents and the operator were told; the database is checked against it."""

    started: float = field(default_factory=time.monotonic)
    # task id -> (agent id, "heartbeat" | "poll", when) of every delivery
    deliveries: defaultdict[str, list[tuple[uuid.UUID, str, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    delivered_credentials: dict[str, Any] = field(default_factory=dict)
    acked: dict[str, uuid.UUID] = field(default_factory=dict)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    # Web restarts, (from, to); and those that outlasted the offline window
    web_down: list[tuple[float, float]] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)

    def web_reachable(self, start: float, end: float) -> float:
        """Seconds of [start, end] the web server was up."""
        down = sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.web_down)
        return end - start - down

    violations: list[str] = field(default_factory=list)

    def clock(self) -> float:
        return time.monotonic() - self.started

    def violation(self, text: str) -> None:
        self.violations.append(text)


@dataclass
class Op:
    """One operator request: its target, what it was told, and when."""

    op_id: str
    kind: str  # "direct" | "selector"
    target: dict[str, Any]
    canary: bool
    sent_at: float
    outcome: str = "unsent"  # created | accepted | refused | ambiguous
    dispatch_id: str | None = None
    done_at: float | None = None
    tasks: dict[str, str] = field(default_factory=dict)  # task id -> agent id


# --- the fleet ---------------------------------------------------------------------------


@dataclass
class Member:
    """One simulated agent of the soak."""

    sim: SimAgent
    group: str
    zone: str
    gpu: bool
    silences: list[Silence]

    @property
    def labels(self) -> dict[str, str]:
        return {"group": self.group, "zone": self.zone}

    @property
    def capabilities(self) -> list[str]:
        return ["docker", "gpu"] if self.gpu else ["docker"]

    @property
    def gone(self) -> bool:
        return bool(self.silences) and self.silences[-1].end is None

    def silent_at(self, at: float) -> bool:
        return any(s.start <= at and (s.end is None or at < s.end) for s in self.silences)

    def silent_during(self, start: float, end: float) -> bool:
        return any(s.start < end and (s.end is None or s.end > start) for s in self.silences)

    def matches(self, target: dict[str, Any]) -> bool:
        capability = target.get("capability")
        if capability is not None and capability not in self.capabilities:
            return False
        return all(self.labels.get(k) == v for k, v in (target.get("labels") or {}).items())


def plan_fleet(rng: random.Random, count: int, seconds: float) -> list[dict[str, Any]]:
    """Each agent's group, zone, capabilities and silences."""
    plans: list[dict[str, Any]] = [
        {
            "group": GROUPS[index % len(GROUPS)],
            "zone": rng.choice(("z1", "z2")),
            "gpu": rng.random() < GPU_SHARE,
            "silences": [],
        }
        for index in range(count)
    ]
    temporary = max(2, round(count * TEMPORARY_SHARE))
    gone = max(1, round(count * GONE_SHARE))
    chosen = rng.sample(range(count), min(count, temporary + gone))
    # One silence per ten minutes of run for each, each in its own slot, each back
    # at least 20 s before the end.
    slots = max(1, int(seconds // 600))
    usable = seconds - 20
    for index in chosen[:temporary]:
        for slot in range(slots):
            length = rng.uniform(WINDOW + 8, WINDOW + 33)
            low = max(0.1 * seconds, usable * slot / slots)
            high = max(low, usable * (slot + 1) / slots - length)
            start = rng.uniform(low, high)
            plans[index]["silences"].append(Silence(start, start + length))
    for index in chosen[temporary:]:
        start = rng.uniform(0.3 * seconds, seconds - WINDOW - 20)
        plans[index]["silences"].append(Silence(start, None))
    return plans


class FleetAgent:
    """Heartbeats, takes tasks from the answers, completes them; falls silent on plan."""

    def __init__(
        self, member: Member, server: WebServer, ledger: Ledger, seed: int, stop: asyncio.Event
    ) -> None:
        self.member = member
        self.stop = stop
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.agent_id = member.sim.agent_id
        self.base = f"/api/v1/agents/{self.agent_id}"
        self.conn = Connection(
            server.url,
            member.sim.ssl_context(),
            {"Authorization": member.sim.authorization, "Content-Type": "application/json"},
        )
        self.lock = asyncio.Lock()  # one request at a time on the one connection
        self.held: set[str] = set()
        self.finished: set[str] = set()
        self.completions: set[asyncio.Task[None]] = set()

    # --- transport ---

    async def request(
        self, method: str, path: str, body: bytes = b"", *, resend: bool = True
    ) -> Response:
        async with self.lock:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    return await self.conn.request(method, path, body, resend=resend)
            except Exception as exc:
                # A half-read answer would spoil the next one: start afresh.
                await self._close()
                raise Unanswered(str(exc) or type(exc).__name__) from exc

    async def _close(self) -> None:
        # A TLS close waits for the peer's answer: a peer gone silent must not hold us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.conn.close()

    async def _wait_heard(self) -> bool:
        """Sleep through the current silence; False when the soak stops first."""
        while self.member.silent_at(self.ledger.clock()):
            if self.stop.is_set():
                return False
            await _sleep(self.stop, 0.5)
        return not self.stop.is_set()

    # --- loops ---

    async def run(self) -> None:
        stop = self.stop
        await _sleep(stop, self.rng.uniform(0, HEARTBEAT_INTERVAL))
        missed = False  # a heartbeat without an answer may have handed over tasks
        while not stop.is_set():
            if self.member.silent_at(self.ledger.clock()):
                async with self.lock:
                    await self._close()
                if not await self._wait_heard():
                    return
                continue
            if not await self.heartbeat():
                missed = True
            elif missed:
                missed = not await self.poll()
            await _sleep(stop, HEARTBEAT_INTERVAL)

    async def heartbeat(self) -> bool:
        try:
            response = await self.request("POST", f"{self.base}/heartbeat", HEARTBEAT, resend=False)
        except Unanswered:
            self.ledger.counts["heartbeats_unanswered"] += 1
            return False
        if response.status != 200:
            self.ledger.counts[f"heartbeats_{response.status}"] += 1
            if response.status < 500:
                self.ledger.violation(
                    f"heartbeat of {self.member.sim.name} answered {response.status}: "
                    f"{response.body[:200]!r}"
                )
            return False
        self.ledger.counts["heartbeats"] += 1
        for task in json.loads(response.body).get("tasks", []):
            self.receive(task, "heartbeat")
        return True

    async def poll(self) -> bool:
        """List the open tasks: take the ones a lost heartbeat answer handed over."""
        try:
            response = await self.request("GET", f"{self.base}/tasks")
        except Unanswered:
            return False
        if response.status != 200:
            return False
        self.ledger.counts["polls"] += 1
        for task in json.loads(response.body).get("tasks", []):
            if task["taskId"] not in self.held and task["taskId"] not in self.finished:
                self.receive(task, "poll")
        return True

    def receive(self, task: dict[str, Any], via: str) -> None:
        task_id = str(task["taskId"])
        self.ledger.deliveries[task_id].append((self.agent_id, via, self.ledger.clock()))
        self.ledger.delivered_credentials[task_id] = task.get("credentials")
        if task_id in self.held or task_id in self.finished:
            return  # a second delivery: the check reports it
        self.held.add(task_id)
        completion = asyncio.create_task(self.complete(task_id))
        self.completions.add(completion)
        completion.add_done_callback(self.completions.discard)

    async def complete(self, task_id: str) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 3.0))
        body = json.dumps({"success": True, "result": {"by": self.member.sim.name}}).encode()
        while True:
            if not await self._wait_heard():
                return  # the soak is over: a gone agent's task stays with it
            try:
                response = await self.request("POST", f"{self.base}/tasks/{task_id}/complete", body)
            except Unanswered:
                self.ledger.counts["completions_unanswered"] += 1
                await asyncio.sleep(self.rng.uniform(0.5, 1.0))
                continue
            if response.status >= 500:
                self.ledger.counts[f"completions_{response.status}"] += 1
                if response.status != 503:
                    self.ledger.violation(
                        f"completion of {task_id} answered {response.status}: "
                        f"{response.body[:200]!r}"
                    )
                await asyncio.sleep(self.rng.uniform(0.5, 1.0))
                continue
            self.held.discard(task_id)
            self.finished.add(task_id)
            if response.status == 200:
                self.ledger.acked[task_id] = self.agent_id
            else:
                detail = json.loads(response.body).get("detail", "") if response.body else ""
                self.ledger.refused[task_id] = (response.status, str(detail))
            return

    async def close(self) -> None:
        for completion in list(self.completions):
            completion.cancel()
        await asyncio.gather(*self.completions, return_exceptions=True)
        await self._close()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# --- the operator ------------------------------------------------------------------------


class Operator:
    """Dispatches continually, to one agent and by selector; records what it was told."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        members: list[Member],
        ledger: Ledger,
        rng: random.Random,
        canary: str,
        rate: float,
    ) -> None:
        self.client = client
        self.members = members
        self.ledger = ledger
        self.rng = rng
        self.canary = canary
        self.rate = rate
        self.ops: dict[str, Op] = {}
        self.followers: set[asyncio.Task[None]] = set()

    async def run_direct(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            member = self.rng.choice(self.members)
            await self.dispatch("direct", {"agentId": str(member.sim.agent_id)})
            await _sleep(stop, self.rng.expovariate(self.rate))

    async def run_selectors(self, stop: asyncio.Event, follow_stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _sleep(stop, SELECTOR_EVERY * self.rng.uniform(0.5, 1.5))
            if stop.is_set():
                return
            op = await self.dispatch("selector", dict(self.rng.choice(SELECTORS)))
            if op is not None and op.dispatch_id is not None:
                follower = asyncio.create_task(self.follow(op, follow_stop))
                self.followers.add(follower)
                follower.add_done_callback(self.followers.discard)

    async def dispatch(self, kind: str, target: dict[str, Any]) -> Op | None:
        op = Op(
            op_id=uuid.uuid4().hex,
            kind=kind,
            target=target,
            canary=self.rng.random() < CANARY_SHARE,
            sent_at=self.ledger.clock(),
        )
        self.ops[op.op_id] = op
        body: dict[str, Any] = {
            "taskType": "soak.noop",
            "payload": {"op": op.op_id},
            "timeout": TASK_TIMEOUT,
            "target": target,
        }
        if op.canary:
            body["credentials"] = {"password": self.canary}
        response = await self._post(op, body)
        if response is None:
            return op
        if kind == "direct" and response.status_code == 201:
            op.outcome = "created"
            op.tasks = {t["taskId"]: t["agentId"] for t in response.json()["tasks"]}
        elif kind == "selector" and response.status_code == 202:
            op.outcome = "accepted"
            op.dispatch_id = response.json()["dispatchId"]
        else:
            op.outcome = "refused"
            self.ledger.violation(
                f"{kind} dispatch to {target} answered {response.status_code}: "
                f"{response.text[:200]}"
            )
        return op

    async def _post(self, op: Op, body: dict[str, Any]) -> httpx.Response | None:
        """The answer; None when refused with 503 throughout, or when the outcome is unknown."""
        unavailable = 0
        deadline = self.ledger.clock() + 60
        while self.ledger.clock() < deadline:
            try:
                response = await self.client.post("/api/v1/tasks", json=body)
            except httpx.ConnectError:  # never sent: the web server is restarting
                await asyncio.sleep(0.5)
                continue
            except httpx.TransportError:
                # Sent, no answer: it may or may not have been created. Not sent again,
                # as the API has no idempotency key; the check accounts for either.
                op.outcome = "ambiguous"
                return None
            if response.status_code != 503:
                return response
            unavailable += 1
            if unavailable >= 3:  # e.g. an offline agent: the next request picks another
                break
            await asyncio.sleep(min(1.0, float(response.headers.get("Retry-After", "1"))))
        op.outcome = "refused"
        return None

    async def follow(self, op: Op, stop: asyncio.Event) -> None:
        """Read the dispatch until it is done: the tasks it created."""
        while not stop.is_set():
            with contextlib.suppress(httpx.TransportError, ValueError):
                response = await self.client.get(f"/api/v1/dispatches/{op.dispatch_id}")
                if response.status_code == 200:
                    view = response.json()
                    op.tasks = {t["taskId"]: t["agentId"] for t in view["tasks"]}
                    if view["status"] == "done":
                        op.done_at = self.ledger.clock()
                        return
            await _sleep(stop, 1.0)


# --- the soak ----------------------------------------------------------------------------


@dataclass
class Options:
    minutes: float
    agents: int
    restart_every: float
    seed: int
    log_level: str


class Soak:
    def __init__(self, stack: BenchStack, server: WebServer, members: list[Member], opts: Options):
        self.stack = stack
        self.server = server
        self.members = members
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.ledger = Ledger()
        self.canary = f"soak-canary-{secrets.token_hex(12)}"
        self.restarts: list[dict[str, Any]] = []
        self.stop_agents = asyncio.Event()
        self.fleet = [
            FleetAgent(member, server, self.ledger, self.rng.randrange(2**32), self.stop_agents)
            for member in members
        ]

    async def run(self) -> dict[str, Any]:
        seconds = self.opts.minutes * 60
        stop_agents = self.stop_agents
        stop_ops, stop_follow = asyncio.Event(), asyncio.Event()
        async with httpx.AsyncClient(
            base_url=self.server.url,
            verify=self.stack.server_context(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=REQUEST_TIMEOUT,
        ) as client:
            operator = Operator(
                client,
                self.members,
                self.ledger,
                random.Random(self.rng.randrange(2**32)),
                self.canary,
                rate=max(0.5, len(self.members) / 50),
            )
            self.ledger.started = time.monotonic()
            agents = [asyncio.create_task(agent.run()) for agent in self.fleet]
            loops = [
                asyncio.create_task(operator.run_direct(stop_ops)),
                asyncio.create_task(operator.run_selectors(stop_ops, stop_follow)),
                asyncio.create_task(self.chaos(stop_ops)),
            ]
            await asyncio.sleep(seconds)
            stop_ops.set()
            await asyncio.gather(*loops)
            _log(f"dispatching stopped at {self.ledger.clock():.0f} s; draining")
            drained = await self.drain(operator)
            settled = await self._until(SETTLE_SECONDS, self._statuses_right)
            snapshot = await asyncio.to_thread(self.snapshot)
            stop_agents.set()
            stop_follow.set()
            await asyncio.gather(*agents, *operator.followers)
            await asyncio.gather(*(agent.close() for agent in self.fleet))
        return self.check(operator, snapshot, drained=drained, settled=settled)

    async def chaos(self, stop: asyncio.Event) -> None:
        roles = ("web", "worker", "beat")
        while True:
            await _sleep(stop, self.opts.restart_every)
            if stop.is_set():
                return
            role = self.rng.choice(roles)
            at = self.ledger.clock()
            try:
                if role == "web":
                    await asyncio.to_thread(self.stack.restart_web, self.server)
                else:
                    await asyncio.to_thread(self.stack.restart, role)
            except (RuntimeError, AssertionError) as exc:
                self.ledger.violation(f"{role} did not start again after SIGKILL: {exc}"[:2000])
                return
            took = self.ledger.clock() - at
            if role == "web":
                self.ledger.web_down.append((at, at + took))
            if role == "web" and took > WINDOW - HEARTBEAT_INTERVAL - 1:
                # No agent could be heard for a whole offline window: all may go offline.
                self.ledger.outages.append((at, at + took))
            self.restarts.append(
                {"role": role, "at_s": round(at, 1), "back_after_s": round(took, 1)}
            )
            _log(f"{role} killed at {at:.0f} s, back after {took:.1f} s")

    async def drain(self, operator: Operator) -> bool:
        """Until every dispatch is done and no task is open but on agents gone for good."""
        gone = {m.sim.agent_id for m in self.members if m.gone}

        def settled() -> bool:
            if any(op.dispatch_id and op.done_at is None for op in operator.ops.values()):
                return False
            if any(agent.held for agent in self.fleet if not agent.member.gone):
                return False
            with self.stack.engine.connect() as connection:
                open_agents = connection.execute(
                    select(col(Task.agent_id), col(Task.status)).where(
                        col(Task.status).in_(("pending", "assigned", "running"))
                    )
                ).all()
            # Pending work of a gone agent stays pending: tasks time out once delivered.
            return all(a in gone and s == "pending" for a, s in open_agents)

        return await self._until(DRAIN_SECONDS, lambda: asyncio.to_thread(settled))

    async def _until(self, seconds: float, done: Callable[[], Awaitable[bool]]) -> bool:
        deadline = self.ledger.clock() + seconds
        while True:
            if await done():
                return True
            if self.ledger.clock() > deadline:
                return False
            await asyncio.sleep(1.0)

    async def _statuses_right(self) -> bool:
        statuses = await asyncio.to_thread(self._statuses)
        return all(
            statuses.get(m.sim.agent_id) == ("offline" if m.gone else "online")
            for m in self.members
        )

    def _statuses(self) -> dict[uuid.UUID, str]:
        with self.stack.engine.connect() as connection:
            rows = connection.execute(select(col(Agent.id), col(Agent.status))).all()
            return {row[0]: row[1] for row in rows}

    def snapshot(self) -> dict[str, Any]:
        with self.stack.engine.connect() as connection:
            tasks = connection.execute(
                select(
                    col(Task.id),
                    col(Task.agent_id),
                    col(Task.dispatch_id),
                    col(Task.status),
                    col(Task.payload),
                    col(Task.result),
                )
            ).all()
            dispatches = connection.execute(
                select(col(Dispatch.id), col(Dispatch.status), col(Dispatch.payload))
            ).all()
        return {"tasks": tasks, "dispatches": dispatches, "agents": self._statuses()}

    # --- the invariants ---

    def check(
        self, operator: Operator, snapshot: dict[str, Any], *, drained: bool, settled: bool
    ) -> dict[str, Any]:
        ledger = self.ledger
        if not drained:
            ledger.violation(f"the fleet did not drain within {DRAIN_SECONDS:.0f} s")
        if not settled:
            ledger.violation(f"agents' statuses not right within {SETTLE_SECONDS:.0f} s")
        checker = Checker(ledger, self.members, operator.ops, snapshot, self.canary)
        checker.told()
        checker.delivered()
        checker.final_states()
        checker.agent_statuses()
        for leak in canary_leaks(self.stack.logs, self.canary):
            ledger.violation(f"canary credential in {leak}")
        counts = ledger.counts
        # Web workers the supervisor found dead and replaced (not counting our SIGKILLs,
        # which take the supervisor too): a worker crashing, or too slow to answer it.
        counts["web_workers_respawned"] = sum(
            log.read_text(errors="replace").count("] died")
            for log in self.stack.logs
            if log.name.startswith("web-")
        )
        counts["agents"] = len(self.members)
        counts["agents_silent_for_a_while"] = sum(
            1 for m in self.members if m.silences and not m.gone
        )
        counts["agents_gone"] = sum(1 for m in self.members if m.gone)
        counts["completions_acknowledged"] = len(ledger.acked)
        counts["canary_tasks"] = sum(len(op.tasks) for op in operator.ops.values() if op.canary)
        for restart in self.restarts:
            counts[f"restarts_{restart['role']}"] += 1
        return {
            "soak": "pass" if not ledger.violations else "fail",
            "minutes": self.opts.minutes,
            "agents": len(self.members),
            "restart_every_s": self.opts.restart_every,
            "seed": self.opts.seed,
            "violations": len(ledger.violations),
            "counts": dict(sorted(counts.items())),
        }


class Checker:
    """The invariants, each against the database's final rows."""

    def __init__(
        self,
        ledger: Ledger,
        members: list[Member],
        ops: dict[str, Op],
        snapshot: dict[str, Any],
        canary: str,
    ) -> None:
        self.ledger = ledger
        self.counts = ledger.counts
        self.bad = ledger.violation
        self.members = {m.sim.agent_id: m for m in members}
        self.ops = ops
        self.canary = canary
        self.tasks: dict[str, Any] = {str(row.id): row for row in snapshot["tasks"]}
        self.dispatches: dict[str, Any] = {str(row.id): row for row in snapshot["dispatches"]}
        self.statuses: dict[uuid.UUID, str] = snapshot["agents"]
        self.by_op: defaultdict[str, list[str]] = defaultdict(list)
        for task_id, row in self.tasks.items():
            self.by_op[str((row.payload or {}).get("op"))].append(task_id)

    def told(self) -> None:
        """What the operator was told exists, exactly once; nothing else exists."""
        for op in self.ops.values():
            self.counts[f"ops_{op.kind}_{op.outcome}"] += 1
            if op.outcome in ("created", "accepted"):
                for task_id, agent_id in op.tasks.items():
                    self.counts["tasks_told"] += 1
                    row = self.tasks.get(task_id)
                    if row is None:
                        self.bad(f"task {task_id} ({op.kind}) the operator was told of is lost")
                    elif str(row.agent_id) != agent_id:
                        self.bad(f"task {task_id} is stored for {row.agent_id}, told {agent_id}")
            if op.kind == "direct":
                self._direct(op)
            else:
                self._selector(op)
        unknown = [t for op_id, ids in self.by_op.items() if op_id not in self.ops for t in ids]
        if unknown:
            self.bad(f"{len(unknown)} stored task(s) of no operator request, e.g. {unknown[:3]}")

    def _direct(self, op: Op) -> None:
        found = self.by_op.get(op.op_id, [])
        if op.outcome == "ambiguous":  # the answer was lost: created once, or not at all
            self.counts["tasks_created_unacknowledged"] += len(found)
            if len(found) > 1:
                self.bad(f"direct op {op.op_id} (answer lost) has {len(found)} tasks")
        elif op.outcome == "created":
            if set(found) != set(op.tasks) or len(found) != 1:
                self.bad(f"direct op {op.op_id}: stored {found}, told {list(op.tasks)}")
        elif found:
            self.bad(f"direct op {op.op_id} ({op.outcome}) has {len(found)} task(s)")

    def _selector(self, op: Op) -> None:
        found = self.by_op.get(op.op_id, [])
        dispatches = {
            dispatch_id
            for dispatch_id, row in self.dispatches.items()
            if (row.payload or {}).get("op") == op.op_id
        }
        if op.outcome != "accepted":
            self.counts["tasks_created_unacknowledged"] += len(found)
            if op.outcome != "ambiguous" and (dispatches or found):
                self.bad(f"selector op {op.op_id} ({op.outcome}) created {len(found)} task(s)")
            if len(dispatches) > 1:
                self.bad(f"selector op {op.op_id} (answer lost) made {len(dispatches)} dispatches")
            return
        if op.dispatch_id is None or dispatches != {op.dispatch_id}:
            self.bad(f"selector op {op.op_id}: dispatches {dispatches}, told {op.dispatch_id}")
            return
        row = self.dispatches[op.dispatch_id]
        if row.status != "done" or op.done_at is None:
            self.bad(f"dispatch {op.dispatch_id} ended {row.status}")
            return
        if set(found) != set(op.tasks):
            self.bad(
                f"dispatch {op.dispatch_id}: {len(found)} task(s) stored, {len(op.tasks)} told"
            )
        agents = [self.tasks[t].agent_id for t in found]
        if len(agents) != len(set(agents)):
            self.bad(f"dispatch {op.dispatch_id} has two tasks for one agent")
        for agent_id in agents:
            member = self.members.get(agent_id)
            if member is None or not member.matches(op.target):
                self.bad(f"dispatch {op.dispatch_id} made a task for non-matching {agent_id}")
        # Online throughout: heard from just before the dispatch until it was done.
        start, end = op.sent_at - 5, op.done_at
        if any(a < end and b > start for a, b in self.ledger.outages):
            self.counts["dispatches_during_long_web_outage"] += 1
            return
        required = {
            m.sim.agent_id
            for m in self.members.values()
            if m.matches(op.target) and not m.silent_during(start, end)
        }
        missing = required - set(agents)
        if missing:
            self.bad(
                f"dispatch {op.dispatch_id} to {op.target} missed {len(missing)} online "
                f"matching agent(s), e.g. {sorted(map(str, missing))[:3]}"
            )
        self.counts["fanout_tasks"] += len(found)

    def delivered(self) -> None:
        """Each task delivered once, to its own agent, with its own credentials."""
        for task_id, deliveries in self.ledger.deliveries.items():
            self.counts["tasks_delivered"] += 1
            self.counts[f"delivered_by_{deliveries[0][1]}"] += 1
            row = self.tasks.get(task_id)
            if row is None:
                self.bad(f"delivered task {task_id} is not stored")
                continue
            if len(deliveries) > 1:
                self.bad(f"task {task_id} delivered {len(deliveries)} times: {deliveries}")
            if any(agent_id != row.agent_id for agent_id, _, _ in deliveries):
                self.bad(f"task {task_id} of {row.agent_id} delivered to {deliveries}")
            op = self.ops.get(str((row.payload or {}).get("op")))
            credentials = self.ledger.delivered_credentials.get(task_id)
            if op is not None and op.canary:
                self.counts["canary_deliveries"] += 1
                if credentials != {"password": self.canary}:
                    self.bad(f"task {task_id} carried the wrong credentials to its agent")
            elif credentials is not None:
                self.bad(f"task {task_id} was delivered with credentials it was never given")

    def final_states(self) -> None:
        """Every task's final state agrees with what its agent was told."""
        for task_id, row in self.tasks.items():
            self.counts[f"tasks_{row.status}"] += 1
            member = self.members.get(row.agent_id)
            if member is None:
                self.bad(f"task {task_id} belongs to no agent of the fleet ({row.agent_id})")
            else:
                self._final_state(task_id, row, member)
        for task_id, (status, detail) in self.ledger.refused.items():
            row = self.tasks.get(task_id)
            if row is None or row.status != "timed_out":
                self.bad(f"completion of {task_id} refused {status} ({detail})")

    def _final_state(self, task_id: str, row: Any, member: Member) -> None:
        ledger = self.ledger
        delivered = task_id in ledger.deliveries
        if task_id in ledger.acked:
            if row.status != "succeeded":
                self.bad(f"task {task_id}: completion acknowledged, stored {row.status}")
            elif row.result != {"by": member.sim.name}:
                self.bad(f"task {task_id}: stored result {row.result}")
        elif row.status == "timed_out" and delivered:
            # Legitimate only if its agent fell silent while holding it.
            at = ledger.deliveries[task_id][0][2]
            if member.silent_during(at - 1, at + TASK_TIMEOUT + 5):
                self.counts["timed_out_while_silent"] += 1
            elif ledger.web_reachable(at, at + TASK_TIMEOUT) < REPORT_SECONDS:
                # The web restart outlasted the task's timeout: nobody could report.
                self.counts["timed_out_while_web_down"] += 1
            else:
                self.bad(
                    f"task {task_id} timed out while its agent kept working "
                    f"({ledger.refused.get(task_id)})"
                )
        elif row.status == "pending" and member.gone:
            self.counts["pending_on_gone_agents"] += 1
        elif row.status == "succeeded" and member.gone and delivered:
            self.counts["succeeded_unacknowledged_gone"] += 1
        else:
            self.bad(
                f"task {task_id} ended {row.status}, delivered={delivered}, "
                f"refused={ledger.refused.get(task_id)}, agent silences={member.silences}"
            )

    def agent_statuses(self) -> None:
        """Heard to the end: online; silent for good: offline."""
        for member in self.members.values():
            want = "offline" if member.gone else "online"
            have = self.statuses.get(member.sim.agent_id)
            if have != want:
                self.bad(
                    f"agent {member.sim.name} is {have}, expected {want} "
                    f"(silences {member.silences})"
                )


def canary_leaks(logs: list[Path], canary: str) -> list[str]:
    """Where the canary (plain, or inside base64 at any alignment) appears in the logs."""
    secret = canary.encode()
    forms = [secret, *base64_forms(secret)]
    leaks = []
    for path in logs:
        data = path.read_bytes()
        leaks += [f"{path.name} ({form[:12]!r}...)" for form in forms if form in data]
    return leaks


def base64_forms(secret: bytes) -> list[bytes]:
    """The base64 characters that encode `secret` wherever it starts within a longer value."""
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret)
        start = -(-shift * 8 // 6)  # the first character made of the secret's bits only
        end = (shift + len(secret)) * 8 // 6
        forms.append(encoded[start:end])
    return forms


# --- entry -------------------------------------------------------------------------------


def _log(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


def build_fleet(stack: BenchStack, rng: random.Random, count: int, seconds: float) -> list[Member]:
    plans = plan_fleet(rng, count, seconds)
    members: list[Member] = []
    kinds: defaultdict[tuple[str, str, bool], list[dict[str, Any]]] = defaultdict(list)
    for plan in plans:
        kinds[(plan["group"], plan["zone"], plan["gpu"])].append(plan)
    for (group, zone, gpu), same in kinds.items():
        sims = provision(
            stack,
            len(same),
            prefix=f"soak-{group}-{zone}-{'gpu' if gpu else 'cpu'}",
            labels={"group": group, "zone": zone},
            capabilities=["docker", "gpu"] if gpu else ["docker"],
        )
        members += [
            Member(sim, group, zone, gpu, plan["silences"])
            for sim, plan in zip(sims, same, strict=True)
        ]
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--restart-every", type=float, default=90.0, help="seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--log-level", default="info", help="of the web server")
    args = parser.parse_args(argv)
    if args.minutes < 2 or args.agents < 20:
        parser.error("at least 2 minutes and 20 agents")
    opts = Options(
        minutes=args.minutes,
        agents=args.agents,
        restart_every=args.restart_every,
        seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
        log_level=args.log_level,
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    _log(f"seed {opts.seed}; {opts.agents} agents for {opts.minutes:g} min")
    with BenchStack(overrides=SETTINGS) as stack:
        # The server first: agents written before it listens would go stale meanwhile.
        with stack.web(workers=2, log_level=opts.log_level) as server:
            rng = random.Random(opts.seed)
            members = build_fleet(stack, rng, opts.agents, opts.minutes * 60)
            soak = Soak(stack, server, members, opts)
            result = loadgen.run(soak.run())
        result["seconds"] = round(time.monotonic() - started)
        result["restarts"] = soak.restarts
        result["first_violations"] = soak.ledger.violations[:50]
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"soak-{stamp}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        if soak.ledger.violations:
            keep = RESULTS / f"soak-{stamp}-logs"
            keep.mkdir(exist_ok=True)
            for log in stack.logs:
                shutil.copy(log, keep / log.name)
    for violation in soak.ledger.violations[:20]:
        _log(f"violation: {violation}")
    _log(f"wrote {path}")
    line = {k: v for k, v in result.items() if k not in ("restarts", "first_violations")}
    print(json.dumps(line, separators=(",", ":")))
    return 1 if soak.ledger.violations else 0


if __name__ == "__main__":
    sys.exit(main())
