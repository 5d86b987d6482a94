"""PostgreSQL stopped under a live fleet, then started again.

A private cluster (never the shared server), `stella serve --tls`, a worker
and beat with one-second heartbeat and sweep intervals. The database is
down for longer than three heartbeat intervals. What must hold:

- while it is down, calls answer 503 problem+json with Retry-After, never
  another 5xx, and the web process keeps running;
- once it is back, the same web process serves again by itself;
- no completion that was acknowledged is lost, and one refused while the
  database was down succeeds on retry;
- no agent that heartbeats promptly is marked offline because of the
  outage (the sweep's grace), while one that stayed silent still is.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.conftest import (
    ADMIN_TOKEN,
    REDIS_URL,
    dispatch,
    drop_redis_keys,
    free_port,
    require_redis,
)
from tests.faults.services import PrivatePostgres
from tests.processes import STELLA, StellaProcess, settings_env, start_worker
from tests.stream.helpers import StreamAgent, client_context, register_via_api, run, wait_healthy

pytestmark = pytest.mark.slow

INTERVAL = 1  # heartbeat and sweep, seconds
MISSED = 3  # offline after this many
OUTAGE = 2 * MISSED * INTERVAL + 1.0  # well over three intervals
RECOVERY = 20.0  # the web process must serve again within this, by itself
SWEPT = re.compile(r"sweeps\.mark_offline\[[^\]]+\] succeeded")


@dataclass
class Answer:
    at: float
    status: int
    headers: dict[str, str]
    body: str


@dataclass
class Heartbeats:
    """One agent heartbeating every INTERVAL in a thread, recording every answer."""

    agent: StreamAgent
    client: httpx.Client
    answers: list[Answer] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Heartbeats:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        path = f"/api/v1/agents/{self.agent.id}/heartbeat"
        while not self.stop.is_set():
            try:
                response = self.client.post(path, json={"status": "healthy"}, timeout=10)
            except httpx.TransportError as exc:
                self.answers.append(Answer(time.monotonic(), 0, {}, repr(exc)))
            else:
                self.answers.append(
                    Answer(
                        time.monotonic(),
                        response.status_code,
                        dict(response.headers),
                        response.text,
                    )
                )
                if response.status_code == 200:
                    self.delivered += [task["taskId"] for task in response.json()["tasks"]]
            self.stop.wait(INTERVAL)

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=15)
        self.client.close()


@dataclass
class Fleet:
    """The private database, and web, worker and beat processes that can be stopped."""

    postgres: PrivatePostgres
    settings: Settings
    port: int
    tmp: Path
    processes: dict[str, StellaProcess] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.settings.resolved_pki_dir / "ca.pem"

    def start(self) -> None:
        env = settings_env(self.settings)
        serve = ("serve", "--tls", "--port", str(self.port))
        web = StellaProcess(*serve, env=env, log=self.tmp / "web.log").start()
        self.processes["web"] = web
        wait_healthy(self.base_url, self.ca_file, web, timeout=60)
        name = f"outage-{uuid.uuid4().hex[:6]}"
        self.processes["worker"] = start_worker(self.settings, self.tmp / "worker.log", name=name)
        self.processes["beat"] = StellaProcess("beat", env=env, log=self.tmp / "beat.log").start()

    def stop(self) -> None:
        for name in ("beat", "worker", "web"):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop()

    def operator(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            verify=client_context(self.ca_file),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )

    def agent_client(self, agent: StreamAgent) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            verify=client_context(self.ca_file, agent),
            headers={"Authorization": f"Bearer {agent.token}"},
            timeout=10,
        )

    def register(self) -> StreamAgent:
        with self.operator() as operator:
            return register_via_api(self.base_url, self.ca_file, operator, self.tmp)

    def status(self, agent: StreamAgent) -> str:
        with self.operator() as operator:
            response = operator.get(f"/api/v1/agents/{agent.id}")
        assert response.status_code == 200, response.text
        status: str = response.json()["status"]
        return status

    def guard_reason(self) -> str | None:
        """Why the mass-offline guard holds the offline sweep (None: it does not, or no answer)."""
        with self.operator() as operator:
            response = operator.get("/api/v1/sweeps/guard")
        if response.status_code != 200:  # 503 until the web process has its database back
            return None
        reason: str | None = response.json()["reason"]
        return reason

    def watch_grace(self, prompt: list[StreamAgent], quitter: StreamAgent, up_at: float) -> None:
        """Prompt agents stay live through the grace; the silent one goes offline after it."""
        window = MISSED * INTERVAL
        seen: dict[str, set[str]] = {agent.id: set() for agent in prompt}
        guard_reasons: set[str | None] = set()
        while time.monotonic() < up_at + window + 4 * INTERVAL:
            for agent in prompt:
                seen[agent.id].add(self.status(agent))
            guard_reasons.add(self.guard_reason())
            time.sleep(0.25)
        assert all(statuses == {"online"} for statuses in seen.values()), seen
        # The grace is the mass-offline guard, engaged for the outage.
        assert "outage" in guard_reasons, guard_reasons
        wait_until(
            lambda: self.status(quitter) == "offline",
            window + 10,
            "an agent silent through the grace was never marked offline",
        )


@pytest.fixture(scope="module")
def fleet(
    private_postgres: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    require_redis()
    tmp = tmp_path_factory.mktemp("postgres-outage")
    prefix = f"stella-outage-{uuid.uuid4().hex[:8]}-"
    settings = Settings(
        data_dir=tmp / "data",
        database_url=private_postgres.url,
        admin_token=ADMIN_TOKEN,
        redis_url=REDIS_URL,
        broker_url=REDIS_URL,
        broker_key_prefix=prefix,
        heartbeat_interval=INTERVAL,
        offline_after_missed=MISSED,
        sweep_interval=INTERVAL,
    )
    upgraded = run(STELLA, "db", "upgrade", env=settings_env(settings))
    assert upgraded.returncode == 0, upgraded.stderr
    fleet = Fleet(private_postgres, settings, free_port(), tmp)
    try:
        fleet.start()
        # The control plane is up once its sweeps run: only then can it notice an outage.
        wait_until(
            lambda: SWEPT.search(fleet.processes["worker"].output()) is not None,
            30,
            "beat and worker never ran the offline sweep",
        )
        yield fleet
    finally:
        fleet.stop()
        drop_redis_keys(prefix)


def is_problem_503(answer: Answer) -> bool:
    return (
        answer.status == 503
        and answer.headers.get("content-type", "").startswith("application/problem+json")
        and answer.headers.get("retry-after", "").isdigit()
    )


def complete(client: httpx.Client, agent: StreamAgent, task_id: str) -> httpx.Response:
    return client.post(
        f"/api/v1/agents/{agent.id}/tasks/{task_id}/complete",
        json={"success": True, "result": {"done": task_id}},
    )


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


class TestPostgresOutage:
    def test_503_while_down_then_recovery_without_loss_or_false_offline(self, fleet: Fleet) -> None:
        prompt = [fleet.register() for _ in range(3)]
        quitter = fleet.register()
        beats = {agent.id: Heartbeats(agent, fleet.agent_client(agent)).start() for agent in prompt}
        beats[quitter.id] = Heartbeats(quitter, fleet.agent_client(quitter)).start()
        worker_agent, worker_beats = prompt[0], beats[prompt[0].id]
        operator = fleet.operator()
        try:
            task_ids = [
                dispatch(operator, {"agentId": worker_agent.id}).json()["tasks"][0]["taskId"]
                for _ in range(6)
            ]
            wait_until(
                lambda: set(worker_beats.delivered) >= set(task_ids),
                10,
                f"tasks not delivered by heartbeat: {worker_beats.answers[-3:]}",
            )
            with fleet.agent_client(worker_agent) as client:
                before = [complete(client, worker_agent, task_id) for task_id in task_ids[:3]]
                assert [r.status_code for r in before] == [200] * 3

                # --- the outage -------------------------------------------------------
                beats[quitter.id].halt()
                fleet.postgres.stop("immediate")
                down_at = time.monotonic()
                during = complete(client, worker_agent, task_ids[3])
                time.sleep(OUTAGE)
                fleet.postgres.start()
                up_at = time.monotonic()

                assert during.status_code == 503, during.text
                assert during.headers["content-type"].startswith("application/problem+json")
                assert during.headers["retry-after"].isdigit()

                # --- recovery, by itself ----------------------------------------------
                deadline = time.monotonic() + RECOVERY
                for task_id in task_ids[3:]:
                    while True:
                        response = complete(client, worker_agent, task_id)
                        if response.status_code == 200:
                            break
                        assert is_problem_503(
                            Answer(0, response.status_code, dict(response.headers), response.text)
                        ), response.text
                        assert time.monotonic() < deadline, "completions still refused"
                        time.sleep(0.2)
                web = fleet.processes["web"].process
                assert web is not None
                assert web.poll() is None, "the web process had to be restarted"

                fleet.watch_grace(prompt, quitter, up_at)
        finally:
            for heartbeats in beats.values():
                heartbeats.halt()
            operator.close()

        # Every heartbeat answer: 200, or 503 problem+json while the database was down.
        for agent in prompt:
            answers = beats[agent.id].answers
            assert all(a.status == 200 or is_problem_503(a) for a in answers), [
                (a.status, a.body[:200]) for a in answers if a.status != 200
            ]
            refused = [a for a in answers if a.status == 503]
            assert refused, "no heartbeat was refused while the database was down"
            assert all(down_at <= a.at <= up_at + RECOVERY for a in refused)
            assert any(a.status == 200 and a.at > up_at for a in answers), "never served again"

        # Nothing acknowledged is lost.
        for task_id in task_ids:
            with fleet.operator() as operator:
                response = operator.get(f"/api/v1/tasks/{task_id}")
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "succeeded"
            assert response.json()["result"] == {"done": task_id}


class TestServiceOutage:
    def test_no_prompt_agent_is_marked_offline_after_the_service_was_down(
        self, fleet: Fleet
    ) -> None:
        """Web, worker and beat all stopped for over three intervals, then started again."""
        prompt = [fleet.register() for _ in range(3)]
        quitter = fleet.register()
        beats = [Heartbeats(agent, fleet.agent_client(agent)).start() for agent in prompt]
        quitting = Heartbeats(quitter, fleet.agent_client(quitter)).start()
        try:
            wait_until(lambda: all(b.answers for b in beats), 10, "no heartbeat answered")
            quitting.halt()
            fleet.stop()
            time.sleep(OUTAGE)
            fleet.start()
            up_at = time.monotonic()
            fleet.watch_grace(prompt, quitter, up_at)
        finally:
            for heartbeats in beats:
                heartbeats.halt()
        for heartbeats in beats:
            assert any(a.status == 200 and a.at > up_at for a in heartbeats.answers)
