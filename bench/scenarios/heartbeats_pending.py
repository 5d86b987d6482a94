"""Scenario 2 of bench/scenarios/heartbeats.py: heartbeats while 1 % of agents hold a task.

Run by that module against the server, connections and ledger of scenario
1 (the agents and their handshakes are the slow part of both), so it is
not an entry of MODULES. 1 % of the agents get a task before the target
load starts and another 1 % while it runs, through the operator API. Each
task must come back in exactly one heartbeat answer, its own agent's; for
one that never came, the database tells a task never handed over (still
pending) from one handed to an answer that got lost (assigned).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from sqlalchemy import select
from sqlmodel import col

from app.models import Task
from bench import loadgen
from bench.fleet import SimAgent
from bench.loadgen import AgentConnection, Ledger, LoadResult
from bench.stack import ADMIN_TOKEN, BenchStack, WebServer

PENDING_EVERY = 100  # 1 % of the agents get a task, twice


@dataclass
class Verdict:
    """A fraction of things that were right, and what was wrong with the others."""

    fraction: float
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long it took to become right


async def run(
    stack: BenchStack,
    server: WebServer,
    conns: Sequence[AgentConnection],
    ledger: Ledger,
    *,
    rate: float,
    seconds: float,
    drain: float,
) -> tuple[LoadResult, Verdict]:
    """`rate` over every agent, 1 % holding a task at the start and 1 % more dispatched under it."""
    first = [conn.agent for conn in conns[::PENDING_EVERY]]
    second = [conn.agent for conn in conns[PENDING_EVERY // 2 :: PENDING_EVERY]]
    created: dict[str, uuid.UUID] = {}
    async with httpx.AsyncClient(
        base_url=server.url,
        verify=stack.server_context(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    ) as operator:
        created |= await _dispatch(operator, first)

        async def under_load() -> None:
            created.update(await _dispatch(operator, second))

        load = await loadgen.open_loop(
            conns,
            rate,
            seconds,
            ledger,
            during=under_load,
            during_at=0.3,
            drain=drain,
        )
    # A task dispatched late may still be on its way: a few more heartbeats for those agents.
    for _ in range(3):
        waiting = {agent for task, agent in created.items() if task not in ledger.deliveries}
        if not waiting:
            break
        await asyncio.sleep(0.3)
        await loadgen.once([c for c in conns if c.agent.agent_id in waiting], ledger)
    return load, await asyncio.to_thread(_delivered_once, stack, created, ledger)


async def _dispatch(
    operator: httpx.AsyncClient, agents: Sequence[SimAgent]
) -> dict[str, uuid.UUID]:
    """One task to each agent through the operator API: task id -> its agent."""
    slots = asyncio.Semaphore(8)

    async def one(agent: SimAgent) -> tuple[str, uuid.UUID]:
        async with slots:
            response = await operator.post(
                "/api/v1/tasks",
                json={
                    "taskType": "bench.noop",
                    "payload": {"scenario": "heartbeats"},
                    "target": {"agentId": str(agent.agent_id)},
                },
            )
        response.raise_for_status()
        return str(response.json()["tasks"][0]["taskId"]), agent.agent_id

    return dict(await asyncio.gather(*(one(agent) for agent in agents)))


def _delivered_once(stack: BenchStack, created: dict[str, uuid.UUID], ledger: Ledger) -> Verdict:
    """Each task in exactly one answer, its own agent's; the database tells missing from lost."""
    seen = ledger.deliveries
    once = [task for task, agent in created.items() if seen.get(task) == [agent]]
    problems = []
    twice = [task for task in created if len(seen.get(task, [])) > 1]
    if twice:
        problems.append(f"{len(twice)} task(s) delivered more than once, e.g. {twice[0]}")
    astray = [t for t, agent in created.items() if any(a != agent for a in seen.get(t, []))]
    if astray:
        problems.append(f"{len(astray)} task(s) delivered to another agent, e.g. {astray[0]}")
    unknown = [task for task in seen if task not in created]
    if unknown:
        problems.append(f"{len(unknown)} task(s) delivered that were never dispatched")
    missing = [uuid.UUID(task) for task in created if task not in seen]
    if missing:
        with stack.engine.connect() as connection:
            statuses = Counter(
                connection.execute(select(col(Task.status)).where(col(Task.id).in_(missing)))
                .scalars()
                .all()
            )
        problems.append(
            f"{len(missing)} task(s) never delivered; now in the database: {dict(statuses)} "
            "(pending: never handed over; assigned: handed to an answer that never came)"
        )
    return Verdict(len(once) / len(created) if created else 0.0, problems)
