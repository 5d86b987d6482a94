"""`stella flower` shows the workers and the jobs (events on), never a payload.

A real worker and a real Flower on the same broker; the test reads Flower's
HTTP API (FLOWER_UNAUTHENTICATED_API=true) as an operator's tooling would.
The database is a private SQLite file: Flower does not care which one it is.
"""

from __future__ import annotations

import ast
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import migrate
from app.db import make_engine
from app.jobs import make_celery, prepare_embedded_broker
from app.settings import Settings
from tests.conftest import ADMIN_TOKEN, Stack, free_port, operator_client, start_stack
from tests.processes import StellaProcess, settings_env
from tests.workers.test_fanout_crash import MARKER, SECRET, post_dispatch, register_fleet, wait_done


@pytest.fixture(params=["embedded", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The app and one worker on the broker under test, over a fresh SQLite database."""
    database_url = f"sqlite:///{tmp_path / 'flower.db'}"
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    engine.dispose()
    with contextmanager(start_stack)(tmp_path, database_url, broker=request.param) as running:
        yield running


@pytest.fixture
def flower(stack: Stack) -> Iterator[httpx.Client]:
    """`stella flower` on a free port; a client for its HTTP API."""
    port = free_port()
    process = StellaProcess(
        "flower",
        "--port",
        str(port),
        env=settings_env(stack.settings) | {"FLOWER_UNAUTHENTICATED_API": "true"},
        log=stack.tmp / "flower.log",
    ).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            poll(
                lambda: _answers(client, process),
                timeout=15,
                what=lambda: f"Flower answering HTTP:\n{process.output()}",
            )
            yield client
    finally:
        process.stop()


def _answers(client: httpx.Client, process: StellaProcess) -> bool:
    assert process.process is not None
    assert process.process.poll() is None, f"flower exited:\n{process.output()}"
    try:
        return client.get("/healthcheck").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def operator(stack: Stack) -> Iterator[httpx.Client]:
    with operator_client(stack) as client:
        yield client


def poll(check: Callable[[], Any], *, timeout: float, what: str | Callable[[], str]) -> Any:
    """`check()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not within {timeout}s: {what if isinstance(what, str) else what()}"
            )
        time.sleep(0.2)


def logs(stack: Stack) -> str:
    """The worker's and Flower's output, for a failure message."""
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}"
        for path in (stack.tmp / "worker.log", stack.tmp / "flower.log")
        if path.exists()
    )


def get_json(client: httpx.Client, path: str) -> Any:
    response = client.get(path)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
    return response.json()


@pytest.mark.slow
def test_flower_shows_the_worker_and_the_expand_job_with_ids_only(
    stack: Stack, flower: httpx.Client, operator: httpx.Client
) -> None:
    worker_prefix = f"w-{stack.tmp.name}@"  # how start_stack names its worker

    def our_worker() -> tuple[str, dict[str, Any]] | None:
        # Each refresh inspects the workers (replies wait up to Flower's 1 s
        # inspect timeout); the answers of earlier refreshes are kept.
        workers = get_json(flower, "/api/workers?refresh=1")
        for name, info in workers.items():
            if name.startswith(worker_prefix) and "registered" in info:
                return name, info
        return None

    worker_name, info = poll(
        our_worker, timeout=15, what=lambda: f"our worker in /api/workers\n{logs(stack)}"
    )
    assert "dispatch.expand" in info["registered"]
    assert "sweeps.redrive_dispatches" in info["registered"]
    # The worker's configuration is shown, never a secret of ours.
    assert ADMIN_TOKEN not in flower.get("/api/workers").text

    register_fleet(stack, count=3)
    dispatch_id = post_dispatch(operator, credentials={"registry.password": SECRET})
    wait_done(operator, dispatch_id, timeout=10)

    def expand_job() -> dict[str, Any] | None:
        tasks = get_json(flower, "/api/tasks?taskname=dispatch.expand")
        for task in tasks.values():
            if dispatch_id in str(task.get("args")) and task.get("state") == "SUCCESS":
                found: dict[str, Any] = task
                return found
        return None

    job = poll(
        expand_job, timeout=15, what=lambda: f"the dispatch.expand job in /api/tasks\n{logs(stack)}"
    )
    assert job["name"] == "dispatch.expand"
    # Its arguments are the dispatch id and nothing else.
    assert ast.literal_eval(job["args"]) in ([dispatch_id], (dispatch_id,))
    assert ast.literal_eval(job["kwargs"]) == {}
    assert job["result"] == "3"  # tasks it created
    assert job["worker"] == worker_name
    shown = flower.get("/api/tasks").text + flower.get(f"/api/task/info/{job['uuid']}").text
    assert dispatch_id in shown
    for secret in (SECRET, MARKER, "registry.password"):
        assert secret not in shown

    # Prometheus metrics: the job's events are counted; the worker is online once
    # Flower has seen one of its heartbeat events (every 2 s).
    online = f'flower_worker_online{{worker="{worker_name}"}} 1.0'

    def metrics_with_worker_online() -> str | None:
        text = flower.get("/metrics").text
        return text if online in text else None

    metrics = poll(metrics_with_worker_online, timeout=10, what=f"{online} in /metrics")
    assert 'task="dispatch.expand",type="task-succeeded"' in metrics
    # Heartbeats also make it alive in Flower's event state.
    assert get_json(flower, "/api/workers?status=1").get(worker_name) is True
    assert SECRET not in metrics

    # Queue lengths come from the broker itself: Redis only.
    queues = flower.get("/api/queues/length")
    if stack.settings.broker_url:
        assert queues.status_code == 200, queues.text
        assert {"name": "celery", "messages": 0} in queues.json()["active_queues"]
    else:
        assert queues.status_code == 404, queues.text


def test_first_binds_at_once_keep_every_binding_on_the_embedded_broker(tmp_path: Path) -> None:
    """Flower inspects from several threads at once, each binding its reply queue to
    `reply.celery.pidbox`; on a fresh embedded broker the exchange file does not exist
    yet. kombu's filesystem transport created it truncating, before taking the lock:
    bindings were lost (an inspect answered by nobody), the file read empty
    (JSONDecodeError) or stayed corrupt, so Flower showed no worker."""
    settings = Settings(data_dir=tmp_path)
    prepare_embedded_broker(settings, consumer=False)
    celery = make_celery(settings)
    threads_per_trial = 4

    def bind(exchange: str, index: int, barrier: threading.Barrier, errors: list[str]) -> None:
        with celery.connection_for_write() as connection:
            channel = connection.channel()
            barrier.wait(timeout=10)
            try:
                channel.exchange_declare(exchange=exchange, type="direct")
                channel.queue_declare(queue=f"{exchange}.{index}")
                channel.queue_bind(f"{exchange}.{index}", exchange=exchange, routing_key=str(index))
            except Exception as exc:  # collected, asserted below
                errors.append(repr(exc))

    for _ in range(20):
        exchange = f"reply.race-{uuid.uuid4().hex}"
        barrier = threading.Barrier(threads_per_trial)
        errors: list[str] = []
        threads = [
            threading.Thread(target=bind, args=(exchange, index, barrier, errors))
            for index in range(threads_per_trial)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert errors == []
        with celery.connection_for_read() as connection:
            table = connection.default_channel.get_table(exchange)
        assert sorted(binding.queue for binding in table) == [
            f"{exchange}.{index}" for index in range(threads_per_trial)
        ]
