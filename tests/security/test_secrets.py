"""Secrets stay secret: a canary credential is found only where its agent receives it.

One run, shared by the tests of this module: real `stella serve --tls`,
`stella worker`, `stella beat` and `stella flower` processes, all at debug
level with their output in files, on a private PostgreSQL database and a
private Redis key prefix. Agents register; an operator dispatches a task
with a canary credential to one agent and another by selector (fanned out
by the worker); the agents receive them by heartbeat, poll and task stream
and complete them; the operator reads every answer the API has. Meanwhile
a MONITOR connection records every command sent to Redis (Celery messages
and events included) and a PSUBSCRIBE one every message published under
the prefix. Then every place is searched for the canaries, plain, hex and
base64 (see tests/security/leaks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import col

from app.db import transaction
from app.models import Dispatch, Task
from app.tasks import service as tasks_service
from app.tasks.schemas import TaskCreate
from pki import private_key_pem
from tests.conftest import ADMIN_TOKEN, REDIS_URL, free_port, service_unavailable
from tests.processes import StellaProcess
from tests.security.leaks import (
    RedisTap,
    Secrets,
    pem_body_lines,
    pg_dump,
    pg_dump_binary,
    redis_dump,
)
from tests.stream.helpers import (
    SharedBackend,
    StreamAgent,
    client_context,
    connect_stream,
    receive,
    shared_backend,
    wait_healthy,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CANARY_DIRECT = f"canary-{uuid.uuid4().hex}"
CANARY_FANOUT = f"canary-{uuid.uuid4().hex}"
OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CANARIES = Secrets({"direct canary": CANARY_DIRECT, "fan-out canary": CANARY_FANOUT})


def credentials(canary: str) -> dict[str, str]:
    return {"registry.username": "deployer", "registry.password": canary}


# --- the run -------------------------------------------------------------------------------


@dataclass
class Agent:
    """A registered agent, with every secret it was given."""

    stream: StreamAgent
    registration_token: str
    key_pem: str
    http: httpx.Client

    @property
    def id(self) -> str:
        return self.stream.id


@dataclass
class Run:
    backend: SharedBackend
    base_url: str
    ca_file: Path
    agents: dict[str, Agent]
    direct_task: str
    fanout_tasks: dict[str, str]  # agent name -> task id
    dispatch_id: str
    # What each agent received: (agent name, where) -> the answer's text.
    deliveries: dict[tuple[str, str], str] = field(default_factory=dict)
    # Every answer an operator got, and every other agent answer: where -> text.
    operator_answers: dict[str, str] = field(default_factory=dict)
    agent_answers: dict[str, str] = field(default_factory=dict)
    stored: dict[str, bytes | None] = field(default_factory=dict)  # row -> credentials column
    dumps: dict[str, bytes] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    redis: dict[str, bytes] = field(default_factory=dict)
    flower: dict[str, str] = field(default_factory=dict)
    expand_job: dict[str, Any] = field(default_factory=dict)
    key_probes: dict[str, tuple[int, str]] = field(default_factory=dict)
    openapi_paths: list[str] = field(default_factory=list)


def wait_until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)
    return result


def register(
    base_url: str, ca_file: Path, operator: httpx.Client, tmp: Path, capability: str
) -> Agent:
    token_answer = operator.post("/api/v1/registration-tokens", json={})
    assert token_answer.status_code == 201, token_answer.text
    registration_token = token_answer.json()["token"]
    answer = httpx.post(
        f"{base_url}/api/v1/agents/register",
        json={"name": f"{capability}-{uuid.uuid4().hex[:8]}", "capabilities": [capability]},
        headers={"X-Agent-Token": registration_token},
        verify=client_context(ca_file),
    )
    assert answer.status_code == 201, answer.text
    data = answer.json()
    cert_file, key_file = tmp / f"{data['agentId']}.pem", tmp / f"{data['agentId']}.key"
    cert_file.write_text(data["certificate"]["cert"])
    key_file.touch(mode=0o600)
    key_file.write_text(data["certificate"]["key"])
    stream = StreamAgent(data["agentId"], data["token"], cert_file, key_file)
    http = httpx.Client(
        base_url=base_url,
        verify=client_context(ca_file, stream),
        headers={"Authorization": f"Bearer {stream.token}"},
        timeout=30,
    )
    return Agent(stream, registration_token, data["certificate"]["key"], http)


def stream_messages(run_base: str, ca_file: Path, agent: StreamAgent, count: int) -> list[str]:
    """The first `count` messages of the agent's task stream (none: listen for a second)."""

    async def listen() -> list[str]:
        messages: list[str] = []
        async with connect_stream(run_base, ca_file, agent) as websocket:
            if count == 0:
                with contextlib.suppress(TimeoutError):
                    messages.append(json.dumps(await receive(websocket, timeout=1)))
            while len(messages) < count:
                messages.append(json.dumps(await receive(websocket)))
        return messages

    return asyncio.run(listen())


def stored_credentials(run_backend: SharedBackend, model: Any, row_id: str) -> bytes | None:
    with run_backend.runtime.engine.connect() as connection:
        value = connection.execute(
            select(col(model.credentials_encrypted)).where(col(model.id) == uuid.UUID(row_id))
        ).scalar_one()
    return bytes(value) if value is not None else None


def openapi_get_paths(operator: httpx.Client) -> list[str]:
    spec = operator.get("/openapi.json").json()
    return [path for path, operations in spec["paths"].items() if "get" in operations]


def fill_path(path: str, ids: dict[str, str]) -> str:
    """`path` with each `{param}` replaced by the id of what the segment before it names."""
    parts = path.split("/")
    for index, part in enumerate(parts):
        if part.startswith("{"):
            parts[index] = ids.get(parts[index - 1], str(uuid.uuid4()))
    return "/".join(parts)


def read_everything(run: Run, operator: httpx.Client, label: str) -> None:
    """Every GET of the operator API (OpenAPI's paths, filled with our ids), and more."""
    ids = {"agents": run.agents["solo"].id, "tasks": run.direct_task, "dispatches": run.dispatch_id}
    every_task = [run.direct_task, *run.fanout_tasks.values()]
    paths = [fill_path(path, ids) for path in openapi_get_paths(operator)]
    paths += [f"/api/v1/tasks/{task_id}" for task_id in every_task]
    paths += [f"/api/v1/agents/{agent.id}" for agent in run.agents.values()]
    paths += [f"/api/v1/tasks?agentId={agent.id}" for agent in run.agents.values()]
    paths += ["/api/v1/tasks?status=assigned", "/api/v1/tasks?status=succeeded"]
    for path in paths:
        answer = operator.get(path)
        assert answer.status_code < 500, f"{path}: {answer.status_code} {answer.text}"
        run.operator_answers[f"{label} GET {path}"] = answer.text


def start_flower(backend: SharedBackend, tmp: Path) -> tuple[StellaProcess, httpx.Client]:
    port = free_port()
    process = StellaProcess(
        "flower",
        "--port",
        str(port),
        "--",
        "--logging=debug",
        env=backend.env | {"FLOWER_UNAUTHENTICATED_API": "true"},
        log=tmp / "flower.log",
    ).start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def answers() -> bool:
        assert process.process is not None
        assert process.process.poll() is None, f"flower exited:\n{process.output()}"
        try:
            return client.get("/healthcheck").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, timeout=20, what="Flower answering")
    return process, client


def read_flower(run: Run, flower: httpx.Client) -> None:
    def expand_job() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks?taskname=dispatch.expand").json()
        for job in tasks.values():
            if run.dispatch_id in str(job.get("args")) and job.get("state") == "SUCCESS":
                found: dict[str, Any] = job
                return found
        return None

    run.expand_job = wait_until(expand_job, timeout=15, what="dispatch.expand in Flower")
    paths = ["/api/tasks", "/api/workers?refresh=1", "/api/workers", "/metrics"]
    paths += ["/api/queues/length", "/dashboard?json=1"]
    paths += [f"/api/task/info/{job_id}" for job_id in flower.get("/api/tasks").json()]
    for path in paths:
        run.flower[path] = flower.get(path).text


def probe_for_keys(run: Run, base_url: str, ca_file: Path) -> None:
    """GET where a key file might be served, anonymously and as the operator."""
    names = ["ca.key", "jwt-signing.key", "credentials.key", "server.key", "ca.pem"]
    prefixes = ["/", "/api/v1/pki/", "/pki/", "/var/pki/", "/static/", "/api/v1/"]
    paths = [prefix + name for prefix in prefixes for name in names]
    paths += ["/api/v1/pki/..%2fca.key", "/api/v1/pki/%2e%2e/ca.key", "/api/v1/pki/jwks.json"]
    paths += ["/.well-known/jwks.json", "/api/v1/pki", "/api/v1/pki/"]
    with httpx.Client(base_url=base_url, verify=client_context(ca_file), timeout=30) as client:
        for path in paths:
            for who, headers in (("anonymous", {}), ("operator", OPERATOR)):
                answer = client.get(path, headers=headers)
                run.key_probes[f"GET {path} {who}"] = (answer.status_code, answer.text)
        run.openapi_paths = list(client.get("/openapi.json").json()["paths"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The whole run, its processes stopped (so their logs complete) and Redis recorded."""
    tmp = tmp_path_factory.mktemp("secrets")
    # Beat sweeps every second, so that its sweeps run (and log) during the run.
    with shared_backend(tmp, "secrets", sweep_interval=1) as backend:
        dump_binary = pg_dump_binary(str(backend.settings.database_url))
        if dump_binary is None:
            service_unavailable("no pg_dump on this machine")
        assert dump_binary is not None
        monitor = RedisTap(REDIS_URL, "MONITOR")
        pubsub = RedisTap(REDIS_URL, "PSUBSCRIBE", f"{backend.prefix}*")
        processes: list[StellaProcess] = []
        flower_client: httpx.Client | None = None
        try:
            port = free_port()
            base_url = f"https://127.0.0.1:{port}"
            ca_file = backend.runtime.ca.files.ca_cert
            web = StellaProcess(
                *("serve", "--tls", "--port", str(port), "--log-level", "debug"),
                env=backend.env,
                log=tmp / "web.log",
            ).start()
            processes.append(web)
            worker = StellaProcess(
                *("worker", "--concurrency", "1", "--loglevel", "DEBUG"),
                *("--hostname", f"secrets-{os.getpid()}@%h"),
                env=backend.env,
                log=tmp / "worker.log",
            ).start()
            processes.append(worker)
            beat = StellaProcess(
                "beat", "--loglevel", "DEBUG", env=backend.env, log=tmp / "beat.log"
            ).start()
            processes.append(beat)
            flower, flower_client = start_flower(backend, tmp)
            processes.append(flower)
            wait_healthy(base_url, ca_file, web)
            worker.wait_for(" ready.")
            with httpx.Client(
                base_url=base_url,
                verify=client_context(ca_file),
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=30,
            ) as operator:
                run = _scenario(backend, base_url, ca_file, operator, flower_client, dump_binary)
            # A few more sweeps and worker heartbeats (events) on the record.
            time.sleep(1.5)
        finally:
            if flower_client is not None:
                flower_client.close()
            for process in reversed(processes):
                process.stop()
            recorded = {"MONITOR": monitor.close(), "PSUBSCRIBE": pubsub.close()}
        run.logs = {process.log.stem: process.output() for process in processes}
        run.redis = recorded | {
            f"key {key}": value for key, value in redis_dump(REDIS_URL, backend.prefix).items()
        }
        yield run


def _scenario(
    backend: SharedBackend,
    base_url: str,
    ca_file: Path,
    operator: httpx.Client,
    flower: httpx.Client,
    dump_binary: str,
) -> Run:
    capabilities = {"solo": "solo", "fleet-1": "fleet", "fleet-2": "fleet", "bystander": "other"}
    agents = {
        name: register(base_url, ca_file, operator, backend.tmp, capability)
        for name, capability in capabilities.items()
    }
    try:
        direct = operator.post(
            "/api/v1/tasks",
            json={
                "taskType": "docker.pull",
                "payload": {"image": "myapp"},
                "credentials": credentials(CANARY_DIRECT),
                "target": {"agentId": agents["solo"].id},
            },
        )
        assert direct.status_code == 201, direct.text
        fanout = operator.post(
            "/api/v1/tasks",
            json={
                "taskType": "docker.pull",
                "payload": {"image": "myapp"},
                "credentials": credentials(CANARY_FANOUT),
                "target": {"capability": "fleet"},
            },
        )
        assert fanout.status_code == 202, fanout.text
        dispatch_id = fanout.json()["dispatchId"]

        def expanded() -> dict[str, Any] | None:
            body: dict[str, Any] = operator.get(f"/api/v1/dispatches/{dispatch_id}").json()
            return body if body["status"] == "done" else None

        done = wait_until(expanded, timeout=15, what="the fan-out")
        by_agent = {task["agentId"]: task["taskId"] for task in done["tasks"]}
        assert set(by_agent) == {agents["fleet-1"].id, agents["fleet-2"].id}
        run = Run(
            backend=backend,
            base_url=base_url,
            ca_file=ca_file,
            agents=agents,
            direct_task=direct.json()["tasks"][0]["taskId"],
            fanout_tasks={name: by_agent[agents[name].id] for name in ("fleet-1", "fleet-2")},
            dispatch_id=dispatch_id,
        )
        run.operator_answers["POST /api/v1/tasks (agent)"] = direct.text
        run.operator_answers["POST /api/v1/tasks (selector)"] = fanout.text

        # At rest, before anyone received them.
        run.stored["dispatch"] = stored_credentials(backend, Dispatch, dispatch_id)
        for task_id in (run.direct_task, *run.fanout_tasks.values()):
            run.stored[f"task {task_id}"] = stored_credentials(backend, Task, task_id)
        database_url = str(backend.settings.database_url)
        run.dumps["pending"] = pg_dump(dump_binary, database_url)
        read_everything(run, operator, "pending")

        # Delivery: heartbeat and poll for the direct task, the stream for the fan-out.
        solo = agents["solo"]
        run.deliveries["solo", "heartbeat"] = solo.http.post(
            f"/api/v1/agents/{solo.id}/heartbeat", json={"status": "healthy"}
        ).text
        run.deliveries["solo", "poll"] = solo.http.get(f"/api/v1/agents/{solo.id}/tasks").text
        for name in ("fleet-1", "fleet-2"):
            (message,) = stream_messages(base_url, ca_file, agents[name].stream, 1)
            run.deliveries[name, "stream"] = message
            agent = agents[name]
            run.deliveries[name, "poll"] = agent.http.get(f"/api/v1/agents/{agent.id}/tasks").text
        bystander = agents["bystander"]
        run.agent_answers["bystander heartbeat"] = bystander.http.post(
            f"/api/v1/agents/{bystander.id}/heartbeat", json={"status": "healthy"}
        ).text
        run.agent_answers["bystander poll"] = bystander.http.get(
            f"/api/v1/agents/{bystander.id}/tasks"
        ).text
        run.agent_answers["bystander stream"] = "\n".join(
            stream_messages(base_url, ca_file, bystander.stream, 0)
        )
        # Another agent's tasks, with the bystander's own credentials.
        run.agent_answers["bystander reads solo's tasks"] = bystander.http.get(
            f"/api/v1/agents/{solo.id}/tasks"
        ).text
        run.agent_answers["bystander reads solo"] = bystander.http.get(
            f"/api/v1/agents/{solo.id}"
        ).text
        read_everything(run, operator, "assigned")

        # Completion.
        tasks = {"solo": run.direct_task, **run.fanout_tasks}
        for name, task_id in tasks.items():
            agent = agents[name]
            answer = agent.http.post(
                f"/api/v1/agents/{agent.id}/tasks/{task_id}/complete",
                json={
                    "success": True,
                    "result": {"imageId": "sha256:abc123"},
                    "logs": [{"timestamp": "2026-01-10T14:23:45Z", "message": "Image pulled"}],
                },
            )
            assert answer.status_code == 200, answer.text
            run.agent_answers[f"{name} complete"] = answer.text
        read_everything(run, operator, "succeeded")
        read_flower(run, flower)
        probe_for_keys(run, base_url, ca_file)
        run.dumps["succeeded"] = pg_dump(dump_binary, database_url)
        return run
    finally:
        for agent in agents.values():
            agent.http.close()


# --- the tests -----------------------------------------------------------------------------
def pki_secrets(run: Run) -> Secrets:
    """The private keys of the PKI directory."""
    files = run.backend.runtime.ca.files
    named = {"credentials key": files.credentials_key.read_text().strip()}
    for path in (files.ca_key, files.jwt_key, files.server_key):
        for index, line in enumerate(pem_body_lines(path.read_text())):
            named[f"{path.name} line {index}"] = line
    for key in run.backend.runtime.task_keys.all_keys():
        for index, line in enumerate(pem_body_lines(private_key_pem(key.key))):
            named[f"task-signing key {key.kid} line {index}"] = line
    return Secrets(named)


def infrastructure_secrets(run: Run) -> Secrets:
    """Every other secret of the run: the admin token, each agent's, the PKI's keys."""
    named = {"admin token": ADMIN_TOKEN}
    for name, agent in run.agents.items():
        named[f"{name}'s JWT"] = agent.stream.token
        named[f"{name}'s registration token"] = agent.registration_token
        for index, line in enumerate(pem_body_lines(agent.key_pem)):
            named[f"{name}'s key line {index}"] = line
    return Secrets(named) | pki_secrets(run)


class TestAtRest:
    def test_every_row_holds_ciphertext_that_only_the_key_opens(self, run: Run) -> None:
        cipher = run.backend.runtime.cipher
        expected = {f"task {run.direct_task}": CANARY_DIRECT}
        expected |= {f"task {task_id}": CANARY_FANOUT for task_id in run.fanout_tasks.values()}
        for row, canary in expected.items():
            blob = run.stored[row]
            assert blob is not None, f"{row} stored no credentials"
            assert CANARIES.found(blob) == [], row
            owner = uuid.UUID(row.split()[1])
            assert cipher.decrypt(blob, owner=owner) == credentials(canary)
        # The dispatch holds them encrypted too, as long as it holds them at all.
        dispatch_blob = run.stored["dispatch"]
        if dispatch_blob is not None:
            assert CANARIES.found(dispatch_blob) == []
            owner = uuid.UUID(run.dispatch_id)
            assert cipher.decrypt(dispatch_blob, owner=owner) == credentials(CANARY_FANOUT)

    def test_pg_dump_holds_no_secret(self, run: Run) -> None:
        for when, dump in run.dumps.items():
            # Not vacuous: the dump has the tasks, and the pending one their ciphertext.
            assert run.direct_task.encode() in dump, when
            assert b"credentials_encrypted" in dump, when
        assert CANARIES.found_in(run.dumps) == {}
        assert infrastructure_secrets(run).found_in(run.dumps) == {}


# How a debug-level line shows in the JSON logs every process writes.
DEBUG_LINE = '"level": "debug"'


class TestLogs:
    def test_every_process_logged_at_debug_level(self, run: Run) -> None:
        assert set(run.logs) == {"web", "worker", "beat", "flower"}
        web, worker, beat, flower = (run.logs[name] for name in ("web", "worker", "beat", "flower"))
        assert f"/api/v1/agents/{run.agents['solo'].id}/heartbeat" in web
        assert DEBUG_LINE in web
        assert "Redis pub/sub connected" in web  # the service's own lines, not only uvicorn's
        assert "dispatch.expand" in worker
        assert run.dispatch_id in worker
        assert DEBUG_LINE in worker
        assert "sweeps." in beat
        assert DEBUG_LINE in beat
        assert DEBUG_LINE in flower  # tornado's debug lines, through the same JSON handler

    def test_no_log_line_holds_a_secret(self, run: Run) -> None:
        assert CANARIES.found_in(run.logs) == {}
        assert infrastructure_secrets(run).found_in(run.logs) == {}


class TestRedis:
    def test_recorded_what_went_through_it(self, run: Run) -> None:
        monitor, published = run.redis["MONITOR"], run.redis["PSUBSCRIBE"]
        # Celery's job message (its headers name the job) and the agents' events.
        assert b"dispatch.expand" in monitor
        assert run.dispatch_id.encode() in monitor
        assert f"stella:agent:{run.agents['solo'].id}".encode() in published
        # Celery events on the prefix's fanout.
        assert b"celeryev" in published
        assert b"task.sent" in published  # the web process's
        assert b"task.multi" in published  # the worker's, batched
        assert b"worker.heartbeat" in published
        assert any(place.startswith("key ") for place in run.redis)

    def test_no_key_command_or_message_holds_a_secret(self, run: Run) -> None:
        assert CANARIES.found_in(run.redis) == {}
        assert infrastructure_secrets(run).found_in(run.redis) == {}


class TestFlower:
    def test_its_api_shows_the_job_with_ids_only(self, run: Run) -> None:
        assert run.dispatch_id in run.flower["/api/tasks"]
        assert run.expand_job["name"] == "dispatch.expand"
        assert CANARIES.found_in(run.flower) == {}
        assert infrastructure_secrets(run).found_in(run.flower) == {}


class TestAnswers:
    def test_operators_never_see_the_credentials(self, run: Run) -> None:
        assert any("/api/v1/tasks/" in place for place in run.operator_answers)
        assert any("/api/v1/dispatches/" in place for place in run.operator_answers)
        assert CANARIES.found_in(run.operator_answers) == {}
        secrets_of_others = infrastructure_secrets(run)
        assert secrets_of_others.found_in(run.operator_answers) == {}

    def test_only_the_assigned_agent_receives_the_plaintext(self, run: Run) -> None:
        own = {"solo": "direct canary", "fleet-1": "fan-out canary", "fleet-2": "fan-out canary"}
        for (name, where), answer in run.deliveries.items():
            found = {hit.split(" (")[0] for hit in CANARIES.found(answer)}
            assert found == {own[name]}, f"{name}'s {where}: {found}"
            canary = CANARY_DIRECT if name == "solo" else CANARY_FANOUT
            compact = json.dumps(credentials(canary), separators=(",", ":"))
            assert f'"credentials":{compact}' in answer.replace(", ", ",").replace(": ", ":")
        assert CANARIES.found_in(run.agent_answers) == {}


class TestWrongCredentialsKey:
    """A web process whose credentials key is not the one the rows were encrypted with."""

    def test_delivery_is_an_explicit_error_and_the_task_stays_pending(
        self, run: Run, tmp_path: Path
    ) -> None:
        canary = f"canary-{uuid.uuid4().hex}"
        solo = run.agents["solo"]
        with transaction(run.backend.runtime.engine) as session:
            task = tasks_service.create_for_agent(
                session=session,
                settings=run.backend.settings,
                cipher=run.backend.runtime.cipher,
                notifier=run.backend.runtime.notifier,
                agent_id=uuid.UUID(solo.id),
                spec=TaskCreate.model_validate(
                    {
                        "taskType": "docker.pull",
                        "payload": {"image": "myapp"},
                        "credentials": credentials(canary),
                        "target": {"agentId": solo.id},
                    }
                ),
            )
            task_id = str(task.id)

        # The same CA, token key and server certificate; another credentials key.
        pki = tmp_path / "pki"
        shutil.copytree(run.backend.runtime.ca.files.directory, pki)
        (pki / "credentials.key").unlink()
        fd = os.open(pki / "credentials.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_bytes(32).hex().encode())
        os.close(fd)
        port = free_port()
        base_url = f"https://127.0.0.1:{port}"
        env = run.backend.env | {"STELLA_PKI_DIR": str(pki)}
        with StellaProcess(
            *("serve", "--tls", "--port", str(port), "--log-level", "debug"),
            env=env,
            log=tmp_path / "web.log",
        ) as web:
            wait_healthy(base_url, run.ca_file, web)
            with httpx.Client(
                base_url=base_url,
                verify=client_context(run.ca_file, solo.stream),
                headers={"Authorization": f"Bearer {solo.stream.token}"},
                timeout=30,
            ) as agent:
                answers = [
                    agent.get(f"/api/v1/agents/{solo.id}/tasks"),
                    agent.post(f"/api/v1/agents/{solo.id}/heartbeat", json={"status": "healthy"}),
                ]
            log = web.output()
        for answer in answers:
            assert answer.status_code == 500, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert "credentials key" in answer.json()["detail"]
            assert canary not in answer.text
        assert f"credentials of task {task_id} do not decrypt" in log
        assert Secrets({"canary": canary}).found(log) == []
        # Nothing was handed over: the task is still pending, and decrypts with the right key.
        with run.backend.runtime.engine.connect() as connection:
            status = connection.execute(
                select(col(Task.status)).where(col(Task.id) == uuid.UUID(task_id))
            ).scalar_one()
        assert status == "pending"
        blob = stored_credentials(run.backend, Task, task_id)
        assert blob is not None
        owner = uuid.UUID(task_id)
        assert run.backend.runtime.cipher.decrypt(blob, owner=owner) == credentials(canary)


class TestKeys:
    def test_private_key_files_are_mode_0600(self, run: Run) -> None:
        files = run.backend.runtime.ca.files
        for path in (files.ca_key, files.jwt_key, files.credentials_key, files.server_key):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(files.directory.stat().st_mode) & 0o077 == 0

    def test_no_path_serves_a_key(self, run: Run) -> None:
        for place, (status, text) in run.key_probes.items():
            if place.startswith("GET /api/v1/pki/ca.pem "):
                assert status == 200, text
            else:
                assert status in (401, 403, 404, 405), (place, status, text)
            assert "PRIVATE KEY" not in text, place
        assert pki_secrets(run).found_in({k: v[1] for k, v in run.key_probes.items()}) == {}
        assert [path for path in run.openapi_paths if "pki" in path] == ["/api/v1/pki/ca.pem"]
        # Public keys only: the agents' task-signing keys to pin (private ones: probed above).
        assert [path for path in run.openapi_paths if "key" in path.lower()] == [
            "/api/v1/agents/{id}/task-signing-keys"
        ]
