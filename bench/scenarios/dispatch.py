"""Goal 4: from POST /api/v1/tasks to `task_assigned` on the agent's socket.

One agent: its task stream is open on `stella serve --tls --workers 2`,
and the operator dispatches to it one task at a time (with registry
credentials, as a `docker.pull` has). Latency runs from just before the
POST is written to the moment the socket yields the `task_assigned` for
the task the 201 names; the message often arrives before the 201 does.
Goals: p50 under 10 ms, p99 under 50 ms.

Fan-out: 1,000 agents with open streams, one selector dispatch (202),
expanded by the Celery worker. The figure is the time from the 202 to the
last of the 1,000 `task_assigned` messages; goal under 2 s. The worker's
first expansion (cold code paths) is spent beforehand on a one-agent
selector. Quick mode fans out once to 200 agents (instead of three times
to 1,000): 1,000 open streams cost the server seconds of CPU before any
dispatch (connecting, and each stream's periodic re-check), more than the
quick run's time allows. Its figure is named for what it measured,
`fanout_200_s`, and held to the goal's rate, 0.4 s; `fanout_1000_s`
comes from full runs only.

Ceilings. One agent: on the bare app under the same uvicorn TLS settings,
a POST that parses the same body and answers a fixed 201, then the same
`task_assigned` message echoed on a WebSocket: the transport a dispatch
cannot avoid (one HTTP exchange and one message down a socket; here one
up as well). Fan-out: the same open streams each answering one `sync` at
once; Stella answers it without the database, so it is what one message
to every agent costs this server and this client, dispatch work aside
(as many more connections to the bare app would cost seconds and measure
the same transport).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from websockets.exceptions import ConnectionClosed

from bench.fleet import SimAgent, provision
from bench.http1 import Connection
from bench.results import Check, ScenarioResult
from bench.servers import web_and_ceiling
from bench.stack import ADMIN_TOKEN, BenchStack, WebServer
from bench.taskstream import StreamClient, open_many, open_stream, stream_url

NAME = "dispatch"
TITLE = "Dispatch to connected agents"
FANOUT = 1000
QUICK_FANOUT = 200
FANOUT_GOAL_S = 2.0  # for FANOUT agents; a smaller fan-out is held to the same rate
WARMUP = 20
DELIVERY_TIMEOUT = 10.0  # one task's arrival
FANOUT_TIMEOUT = 30.0  # the last of a fan-out's arrivals
FANOUT_LABELS = {"bench": "fanout"}
SINGLE_LABELS = {"bench": "single"}
TOUCH = text("UPDATE agents SET last_heartbeat = now() WHERE version = 'bench'")


@dataclass(frozen=True)
class Fanout:
    last_s: float  # the 202 to the last arrival
    median_s: float  # the 202 to the median arrival
    missing: int  # agents whose task did not come within FANOUT_TIMEOUT


def run(stack: BenchStack, *, quick: bool) -> ScenarioResult:
    samples = 100 if quick else 500
    rounds = 1 if quick else 3
    single = provision(stack, 1, prefix="one", labels=SINGLE_LABELS)[0]
    fleet = provision(stack, QUICK_FANOUT if quick else FANOUT, prefix="fan", labels=FANOUT_LABELS)
    with web_and_ceiling(stack) as (web, ceiling):
        return asyncio.run(
            _measure(stack, web, ceiling, single, fleet, samples=samples, rounds=rounds)
        )


async def _measure(
    stack: BenchStack,
    web: WebServer,
    ceiling: WebServer,
    single: SimAgent,
    fleet: list[SimAgent],
    *,
    samples: int,
    rounds: int,
) -> ScenarioResult:
    operator = _operator(stack, web)
    bare = _operator(stack, ceiling)
    stream = await open_stream(stream_url(web.url, single), single)
    echo = await open_stream(_echo_url(ceiling), single)
    latencies, bare_latencies = await _one_agent(stack, operator, bare, stream, echo, samples)
    # The worker's first expansion, untimed: its cold start is not the fan-out's.
    await _fanout(stack, operator, [stream], SINGLE_LABELS, round_=0)
    await stream.close()
    await echo.close()

    streams = await open_many([(stream_url(web.url, agent), agent) for agent in fleet])
    bare_fanout = await _sync_all(streams)  # also: every stream is served
    fanouts = [
        await _fanout(stack, operator, streams, FANOUT_LABELS, round_=k)
        for k in range(1, rounds + 1)
    ]
    lost = [client for client in streams if client.closed.is_set()]
    await asyncio.gather(*(client.close() for client in streams))
    await operator.close()
    await bare.close()

    notes = [
        f"one agent: {samples} dispatches after {WARMUP} unmeasured; fan-out: {len(fleet)} "
        f"agents, median of {rounds} fan-out(s).",
        "ceiling: a POST answered with a fixed 201 then one WebSocket echo, on the bare app; "
        f"fan-out ceiling: the same {len(fleet)} open streams each answering one `sync` at "
        "once (the stream's transport alone, no dispatch work).",
    ]
    if lost:
        notes.append(f"the server closed {len(lost)} streams, the first with {lost[0].why()}")
    missing = max(fanout.missing for fanout in fanouts)
    if missing:
        notes.append(f"{missing} agents never received a fan-out task within {FANOUT_TIMEOUT} s")
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        figures={
            "dispatch_p50_ms": _percentile(latencies, 50),
            "dispatch_p99_ms": _percentile(latencies, 99),
            f"fanout_{len(fleet)}_s": statistics.median(f.last_s for f in fanouts),
            f"fanout_{len(fleet)}_median_s": statistics.median(f.median_s for f in fanouts),
        },
        checks=[
            Check("dispatch_p50_ms", 10, higher_is_better=False, unit=" ms"),
            Check("dispatch_p99_ms", 50, higher_is_better=False, unit=" ms"),
            Check(
                f"fanout_{len(fleet)}_s",
                FANOUT_GOAL_S * len(fleet) / FANOUT,
                higher_is_better=False,
                unit=" s",
                # Not met yet (README): quick mode holds the smaller fleet to
                # the whole fleet's 2 s.
                quick_goal=FANOUT_GOAL_S,
            ),
        ],
        ceiling={
            "dispatch_p50_ms": _percentile(bare_latencies, 50),
            "dispatch_p99_ms": _percentile(bare_latencies, 99),
            f"fanout_{len(fleet)}_s": bare_fanout,
        },
        notes=notes,
    )


# --- one agent -----------------------------------------------------------------------------


async def _one_agent(
    stack: BenchStack,
    operator: Connection,
    bare: Connection,
    stream: StreamClient,
    echo: StreamClient,
    samples: int,
) -> tuple[list[float], list[float]]:
    """Dispatch latencies and ceiling latencies (ms), taken in turns so they share the noise."""
    _touch(stack)
    agent_id = stream.agent.agent_id
    latencies: list[float] = []
    bare_latencies: list[float] = []
    for index in range(WARMUP + samples):
        body = _task_body({"seq": index}, {"agentId": str(agent_id)})
        latency, message = await _dispatch_once(operator, stream, body)
        bare_latency = await _bare_once(bare, echo, body, message)
        if index >= WARMUP:
            latencies.append(latency)
            bare_latencies.append(bare_latency)
    return latencies, bare_latencies


async def _dispatch_once(
    operator: Connection, stream: StreamClient, body: bytes
) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = await operator.request("POST", "/api/v1/tasks", body)
    if response.status != 201:
        raise RuntimeError(f"dispatch refused: {response.status} {response.body[:300]!r}")
    task_id = json.loads(response.body)["tasks"][0]["taskId"]
    received = await stream.next_task(DELIVERY_TIMEOUT)
    if received.message["task"]["taskId"] != task_id:
        raise RuntimeError(f"expected task {task_id}, the stream sent {received.message}")
    return (received.at - started) * 1000, received.message


async def _bare_once(
    bare: Connection, echo: StreamClient, body: bytes, message: dict[str, Any]
) -> float:
    """The ceiling's POST, then the same `task_assigned` message echoed on its socket."""
    started = time.perf_counter()
    response = await bare.request("POST", "/api/v1/tasks", body)
    if response.status != 201:
        raise RuntimeError(f"ceiling refused: {response.status} {response.body[:300]!r}")
    await echo.send(message)
    received = await echo.next_task(DELIVERY_TIMEOUT)
    return (received.at - started) * 1000


# --- fan-out -------------------------------------------------------------------------------


async def _fanout(
    stack: BenchStack,
    operator: Connection,
    streams: list[StreamClient],
    labels: dict[str, str],
    *,
    round_: int,
) -> Fanout:
    """One selector dispatch to the agents with `labels`; when each of them got its task."""
    _touch(stack)
    body = _task_body({"round": round_}, {"capability": "docker", "labels": labels})
    response = await operator.request("POST", "/api/v1/tasks", body)
    accepted = time.perf_counter()
    if response.status != 202:
        raise RuntimeError(f"fan-out refused: {response.status} {response.body[:300]!r}")
    deadline = accepted + FANOUT_TIMEOUT

    async def arrival(client: StreamClient) -> float | None:
        try:
            while True:
                received = await client.next_task(max(deadline - time.perf_counter(), 0.001))
                if received.message["task"]["payload"].get("round") == round_:
                    return received.at - accepted
        except (TimeoutError, ConnectionError):
            return None  # closed by the server: missing, and why is in the notes

    arrivals = await asyncio.gather(*(arrival(client) for client in streams))
    arrived = [at for at in arrivals if at is not None]
    if not arrived:
        raise RuntimeError(f"no agent received fan-out round {round_}")
    return Fanout(
        last_s=max(arrived) if len(arrived) == len(streams) else FANOUT_TIMEOUT,
        median_s=statistics.median(arrived),
        missing=len(streams) - len(arrived),
    )


async def _sync_all(streams: list[StreamClient]) -> float:
    """Seconds until every stream has answered one `sync`, all sent at once.

    Stella answers a sync without touching the database, so this is what
    one message each way on every socket costs this server and this client.
    """
    started = time.perf_counter()

    async def answered(client: StreamClient) -> float | None:
        try:
            await client.send({"type": "sync", "syncId": "bench"})
            return (await client.next_of("synced", FANOUT_TIMEOUT)).at - started
        except (ConnectionClosed, ConnectionError, TimeoutError):
            return None  # counted with the lost streams

    answers = [at for at in await asyncio.gather(*map(answered, streams)) if at is not None]
    if not answers:
        raise RuntimeError("no stream answered a sync")
    return max(answers)


# --- helpers -------------------------------------------------------------------------------


def _operator(stack: BenchStack, server: WebServer) -> Connection:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    return Connection(server.url, stack.server_context(), headers)


def _echo_url(ceiling: WebServer) -> str:
    return f"{ceiling.url.replace('https://', 'wss://', 1)}/bench/echo"


def _task_body(mark: dict[str, int], target: dict[str, object]) -> bytes:
    """A `docker.pull` with registry credentials; `mark` tells its arrival from others."""
    return json.dumps(
        {
            "taskType": "docker.pull",
            "payload": {"image": "registry.example.com/app", "tag": "v2.3.1", **mark},
            "credentials": {"registry.username": "bench", "registry.password": "bench-secret"},
            "target": target,
        }
    ).encode()


def _touch(stack: BenchStack) -> None:
    """The bench agents heartbeat, as live agents do, so no sweep takes them offline."""
    with stack.engine.begin() as connection:
        connection.execute(TOUCH)


def _percentile(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]
