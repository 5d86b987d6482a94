"""Fan-out survives a crash: a stalled expansion is re-driven by the sweep, idempotently.

Real processes only: `stella worker` (SIGKILLed halfway through an expansion),
`stella beat` (its redrive sweep), the app over mutual TLS, on the embedded
(filesystem) broker and on Redis, against SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlmodel import col

from app.agents import service as agents_service
from app.agents.schemas import AgentRegister
from app.db import transaction
from app.models import Dispatch, Task
from app.models.types import utcnow
from app.tokens import service as tokens_service
from tests.conftest import REDIS_URL, Stack, operator_client, start_stack, truncate
from tests.processes import StellaProcess, settings_env, start_worker

pytestmark = pytest.mark.slow

FLEET_SIZE = 40
BATCH_SIZE = 5
# Fast knobs: 8 committed batches 0.3 s apart (about 2.5 s per expansion), a
# dispatch idle for 2 s counts as stalled, and beat sweeps every second.
FAST_FANOUT: dict[str, Any] = {
    "fanout_batch_size": BATCH_SIZE,
    "fanout_batch_interval": 0.3,
    "dispatch_stall_after": 2,
    "sweep_interval": 1,
}
SECRET = "s3cr3t-fanout-registry-password-93be1f"
MARKER = "payload-marker-5d0c27a1"

Spawn = Callable[..., StellaProcess]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["embedded", "redis"])
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def stack_without_worker(tmp: Path, database_url: str, broker: str) -> Iterator[Stack]:
    """The app on `broker` with the fast fan-out knobs, emptied tables, and no worker:
    the test starts (and kills) its own."""
    with contextmanager(start_stack)(
        tmp, database_url, broker=broker, worker=False, **FAST_FANOUT
    ) as stack:
        truncate(stack.runtime)
        yield stack


@pytest.fixture
def stack(tmp_path: Path, database_url: str, broker: str) -> Iterator[Stack]:
    with stack_without_worker(tmp_path, database_url, broker) as running:
        yield running


@pytest.fixture
def operator(stack: Stack) -> Iterator[httpx.Client]:
    with operator_client(stack) as client:
        yield client


@pytest.fixture
def spawn(stack: Stack) -> Iterator[Spawn]:
    """Start `stella` processes on the stack's settings; all are stopped at teardown."""
    processes: list[StellaProcess] = []

    def _spawn(kind: str, *args: str, name: str | None = None) -> StellaProcess:
        log = stack.tmp / f"{name or kind}-{len(processes)}.log"
        if kind == "worker":
            process = start_worker(stack.settings, log, name=name or f"w{len(processes)}")
        else:
            process = StellaProcess(kind, *args, env=settings_env(stack.settings), log=log).start()
        processes.append(process)
        return process

    yield _spawn
    for process in reversed(processes):
        process.stop()


# --- helpers -------------------------------------------------------------------------------


def register_fleet(stack: Stack, count: int = FLEET_SIZE, capability: str = "docker") -> set[str]:
    """`count` online agents registered through the service, in one transaction (fast)."""
    agent_ids: set[str] = set()
    with transaction(stack.runtime.engine) as session:
        for index in range(count):
            token, _ = tokens_service.create_token(session=session, settings=stack.settings)
            registered = agents_service.register(
                session=session,
                runtime=stack.runtime,
                token=token,
                request=AgentRegister(
                    name=f"{capability}-{index:03d}", version="1.0.0", capabilities=[capability]
                ),
            )
            agent_ids.add(str(registered.agent_id))
    return agent_ids


def post_dispatch(operator: httpx.Client, **body: Any) -> str:
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.pull",
            "payload": {"image": "myapp", "marker": MARKER},
            "target": {"capability": "docker"},
            **body,
        },
    )
    assert response.status_code == 202, response.text
    dispatch_id: str = response.json()["dispatchId"]
    return dispatch_id


def tasks_per_agent(stack: Stack, dispatch_id: str) -> Counter[str]:
    with stack.runtime.engine.connect() as connection:
        agent_ids = connection.execute(
            select(col(Task.agent_id)).where(col(Task.dispatch_id) == uuid.UUID(dispatch_id))
        ).scalars()
        return Counter(str(agent_id) for agent_id in agent_ids)


def task_count(stack: Stack, dispatch_id: str) -> int:
    with stack.runtime.engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count())
                .select_from(Task)
                .where(col(Task.dispatch_id) == uuid.UUID(dispatch_id))
            ).scalar_one()
        )


def dispatch_status(stack: Stack, dispatch_id: str) -> str:
    with stack.runtime.engine.connect() as connection:
        status: str = connection.execute(
            select(col(Dispatch.status)).where(col(Dispatch.id) == uuid.UUID(dispatch_id))
        ).scalar_one()
    return status


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)


def wait_done(operator: httpx.Client, dispatch_id: str, timeout: float) -> dict[str, Any]:
    """GET /api/v1/dispatches/{id} until it is done."""
    deadline = time.monotonic() + timeout
    while True:
        response = operator.get(f"/api/v1/dispatches/{dispatch_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] == "done":
            return body
        assert time.monotonic() < deadline, f"dispatch not done after {timeout}s: {body['status']}"
        time.sleep(0.1)


def assert_one_task_per_agent(
    stack: Stack, operator: httpx.Client, dispatch_id: str, fleet: set[str]
) -> None:
    per_agent = tasks_per_agent(stack, dispatch_id)
    assert set(per_agent) == fleet
    assert set(per_agent.values()) == {1}, per_agent.most_common(3)
    assert sum(per_agent.values()) == len(fleet)
    body = wait_done(operator, dispatch_id, timeout=1)
    assert len(body["tasks"]) == len(fleet)
    assert {task["agentId"] for task in body["tasks"]} == fleet


def message_text(raw: bytes) -> str:
    """A broker message as text, with its base64-encoded body decoded too."""
    text = raw.decode(errors="replace")
    try:
        message = json.loads(text)
    except ValueError:
        return text
    if (
        isinstance(message, dict)
        and isinstance(message.get("body"), str)
        and message.get("properties", {}).get("body_encoding") == "base64"
    ):
        text += "\n" + base64.b64decode(message["body"]).decode(errors="replace")
    return text


def embedded_broker_messages(stack: Stack) -> dict[str, str]:
    """Every file under the embedded broker's folder: relative path -> text."""
    root = stack.settings.data_dir / "broker"
    return {
        str(path.relative_to(root)): message_text(path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def redis_broker_values(stack: Stack) -> dict[str, str]:
    """Every key under the stack's prefix: key (and field) -> text, whatever its type."""
    prefix = stack.settings.broker_key_prefix
    assert prefix
    # decode_responses=False: every value is bytes (redis-py types them bytes | str).
    client: Any = redis.Redis.from_url(REDIS_URL)
    values: dict[str, str] = {}
    try:
        for raw_key in client.scan_iter(match=f"{prefix}*", count=1000):
            key = raw_key.decode()
            kind = client.type(raw_key).decode()
            items: list[tuple[str, bytes]]
            if kind == "list":
                items = [(f"[{i}]", v) for i, v in enumerate(client.lrange(raw_key, 0, -1))]
            elif kind == "hash":
                items = [(f"[{f.decode()}]", v) for f, v in client.hgetall(raw_key).items()]
            elif kind == "set":
                items = [(f"{{{i}}}", v) for i, v in enumerate(client.smembers(raw_key))]
            elif kind == "zset":
                items = [(f"<{i}>", v) for i, v in enumerate(client.zrange(raw_key, 0, -1))]
            elif kind == "string":
                items = [("", client.get(raw_key) or b"")]
            else:
                items = [("", kind.encode())]
            for suffix, value in items:
                values[key + suffix] = message_text(value)
    finally:
        client.close()
    return values


def broker_contents(stack: Stack, broker: str) -> dict[str, str]:
    return embedded_broker_messages(stack) if broker == "embedded" else redis_broker_values(stack)


def holding(contents: dict[str, str], needle: str) -> list[str]:
    return [where for where, text in contents.items() if needle in text]


# --- tests ---------------------------------------------------------------------------------


class TestStalledExpansion:
    """A worker SIGKILLed mid-expansion; beat's redrive sweep finishes the dispatch."""

    def test_is_driven_again_and_creates_each_task_exactly_once(
        self, stack: Stack, operator: httpx.Client, spawn: Spawn, broker: str
    ) -> None:
        fleet = register_fleet(stack)
        doomed = spawn("worker", name="doomed")
        dispatch_id = post_dispatch(operator)

        # Halfway: some batches committed, not all. Kill the worker outright.
        wait_until(
            lambda: task_count(stack, dispatch_id) >= 2 * BATCH_SIZE,
            timeout=15,
            what="the first batches",
        )
        doomed.kill()
        stuck = task_count(stack, dispatch_id)
        assert 0 < stuck < FLEET_SIZE
        assert dispatch_status(stack, dispatch_id) == "expanding"

        # What became of the job's message: gone from the queue on both brokers. The
        # filesystem transport deleted its file when the worker took it (lost for good);
        # Redis keeps it in the unacked hash, restored only after visibility_timeout (1 h).
        contents = broker_contents(stack, broker)
        queued = [where for where in holding(contents, dispatch_id) if "unacked" not in where]
        assert queued == [], contents
        unacked = [where for where in holding(contents, dispatch_id) if "unacked" in where]
        if broker == "redis":
            assert unacked, f"the killed worker's message is not in the unacked hash: {contents}"
        else:
            assert unacked == []

        # Nothing moves without a worker: still stuck a moment later.
        time.sleep(0.5)
        assert task_count(stack, dispatch_id) == stuck
        assert dispatch_status(stack, dispatch_id) == "expanding"

        spawn("beat")  # first: it starts while the worker does
        worker = spawn("worker", name="rescuer")
        done = wait_done(operator, dispatch_id, timeout=15)
        assert done["status"] == "done"
        assert_one_task_per_agent(stack, operator, dispatch_id, fleet)
        if broker == "redis":
            # The rescue was the sweep's: the original message is still parked, unacked.
            parked = holding(broker_contents(stack, broker), dispatch_id)
            assert [where for where in parked if where in unacked], "the message came back"
        assert "re-driving 1 stalled dispatches" in worker.output()

    def test_a_wakeup_that_never_reached_a_worker_is_redriven(
        self, stack: Stack, operator: httpx.Client, spawn: Spawn, broker: str
    ) -> None:
        fleet = register_fleet(stack, count=12)
        # As `create` leaves it, minus the enqueue: the broker lost the wake-up.
        dispatch_id = uuid.uuid4()
        long_ago = utcnow() - dt.timedelta(seconds=30)
        with transaction(stack.runtime.engine) as session:
            session.add(
                Dispatch(
                    id=dispatch_id,
                    status="pending",
                    target={"capability": "docker"},
                    task_type="docker.pull",
                    payload={"image": "myapp"},
                    created_at=long_ago,
                    updated_at=long_ago,
                )
            )
        assert holding(broker_contents(stack, broker), str(dispatch_id)) == []

        spawn("beat")
        worker = spawn("worker")
        wait_done(operator, str(dispatch_id), timeout=15)
        assert_one_task_per_agent(stack, operator, str(dispatch_id), fleet)
        assert "re-driving 1 stalled dispatches" in worker.output()


class TestBrokerCarriesIdsOnly:
    def test_no_payload_and_no_credentials_on_the_broker(
        self, stack: Stack, operator: httpx.Client, broker: str
    ) -> None:
        register_fleet(stack, count=3)
        dispatch_id = post_dispatch(operator, credentials={"registry.password": SECRET})
        # No worker: the wake-up sits in the broker, as every consumer would read it.
        wait_until(
            lambda: bool(holding(broker_contents(stack, broker), dispatch_id)),
            timeout=5,
            what="the wake-up message on the broker",
        )
        contents = broker_contents(stack, broker)
        assert holding(contents, SECRET) == []
        assert holding(contents, MARKER) == []
        assert holding(contents, "registry.password") == []
