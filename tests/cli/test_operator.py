"""The operator CLI (`stella agents|tasks|tokens|audit`) as a process against a real TLS server.

Every command runs as `stella` would for an operator: a subprocess with STELLA_SERVER_URL,
STELLA_CA_FILE and the admin token in the environment (or a file), talking to the `stack`
over the wire. Agents are driven through the agent API and the task stream. Each run checks
that the admin token never appears in its output.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from pki import load_or_create_pki
from tests.conftest import ADMIN_TOKEN, AgentClient, Stack, free_port
from tests.tasks.helpers import LOGS, SECRET, Register, set_agent_status, view

STELLA = str(Path(sys.executable).with_name("stella"))
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _env(stack: Stack, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("STELLA_") and key not in ("COLUMNS", "FORCE_COLOR")
    }
    env |= {
        "STELLA_SERVER_URL": stack.base_url,
        "STELLA_CA_FILE": str(stack.ca_file),
        "STELLA_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    return env | extra


def _no_secret(*outputs: str, secrets: tuple[str, ...] = ()) -> None:
    for output in outputs:
        for secret in (ADMIN_TOKEN, *secrets):
            assert secret not in output


def stella(
    stack: Stack,
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    secrets: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [STELLA, *args],
        env=env or _env(stack),
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=stack.tmp,
    )
    _no_secret(result.stdout, result.stderr, secrets=secrets)
    return result


class Running:
    """A `stella` process whose stdout is read line by line while it runs."""

    def __init__(self, stack: Stack, *args: str) -> None:
        self.process = subprocess.Popen(
            [STELLA, *args],
            env=_env(stack),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=stack.tmp,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output():
            if self.process.poll() is not None and not self.reader.is_alive():
                raise AssertionError(f"exited before {needle!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} after {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            code = self.process.wait(timeout)
        finally:
            self.process.kill()
        self.reader.join(timeout=5)
        assert self.process.stderr is not None
        stderr = self.process.stderr.read()
        self.process.stderr.close()
        assert self.process.stdout is not None
        self.process.stdout.close()
        _no_secret(self.output(), stderr, secrets=(SECRET,))
        return code, self.output(), stderr


def _stream(stack: Stack, agent: AgentClient) -> Any:
    url = stack.base_url.replace("https://", "wss://") + f"/api/v1/agents/{agent.id}/task-stream"
    return connect(
        url,
        ssl=stack.ssl_context(agent.cert_file, agent.key_file),
        additional_headers={"Authorization": f"Bearer {agent.token}"},
        open_timeout=10,
    )


async def _assigned(websocket: ClientConnection, timeout: float = 30) -> dict[str, Any]:
    """The next task pushed to the agent."""
    while True:
        message = json.loads(await asyncio.wait_for(websocket.recv(), timeout))
        if message["type"] == "task_assigned":
            task: dict[str, Any] = message["task"]
            return task


async def _send(websocket: ClientConnection, **message: Any) -> None:
    await websocket.send(json.dumps(message))


async def _synced(websocket: ClientConnection) -> None:
    """Every message sent before is stored."""
    sync_id = str(uuid.uuid4())
    await _send(websocket, type="sync", syncId=sync_id)
    while True:
        message = json.loads(await asyncio.wait_for(websocket.recv(), 10))
        if message == {"type": "synced", "syncId": sync_id}:
            return


def _agent_ids(output: str) -> set[str]:
    return {agent["id"] for agent in json.loads(output)}


# --- agents --------------------------------------------------------------------------------


class TestAgentsList:
    def test_lists_registered_agents_as_a_table_and_as_json(
        self, stack: Stack, register: Register
    ) -> None:
        lab = register("lab-01", capabilities=["docker"], labels={"site": "lab"})
        prod = register("prod-01", capabilities=["compose"], labels={"site": "prod"})

        table = stella(stack, "agents", "list")
        assert table.returncode == 0, table.stderr
        assert "2 agent(s)" in table.stdout
        for agent in (lab, prod):
            assert agent.id in table.stdout
            assert agent.name in table.stdout
        assert "site=lab" in table.stdout
        assert "online" in table.stdout

        as_json = stella(stack, "agents", "list", "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert _agent_ids(as_json.stdout) == {lab.id, prod.id}

    def test_filters_by_status_capability_and_label(self, stack: Stack, register: Register) -> None:
        lab = register("lab-01", capabilities=["docker"], labels={"site": "lab", "tier": "a"})
        prod = register("prod-01", capabilities=["compose"], labels={"site": "prod"})
        gone = register("gone-01", capabilities=["docker"], labels={"site": "lab"})
        set_agent_status(stack, gone, "offline")

        def ids(*args: str) -> set[str]:
            result = stella(stack, "agents", "list", "--json", *args)
            assert result.returncode == 0, result.stderr
            return _agent_ids(result.stdout)

        assert ids("--capability", "compose") == {prod.id}
        assert ids("--label", "site=lab") == {lab.id, gone.id}
        assert ids("--label", "site=lab", "--label", "tier=a") == {lab.id}
        assert ids("--status", "offline") == {gone.id}
        assert ids("--status", "online", "--capability", "docker") == {lab.id}
        table = stella(stack, "agents", "list", "--status", "offline")
        assert gone.name in table.stdout
        assert lab.name not in table.stdout

    def test_all_follows_the_next_pages(self, stack: Stack, register: Register) -> None:
        agents = [register() for _ in range(5)]

        first = stella(stack, "agents", "list", "--limit", "2")
        assert first.returncode == 0, first.stderr
        assert "2 agent(s)" in first.stdout
        assert "--all" in first.stderr

        every = stella(stack, "agents", "list", "--limit", "2", "--all", "--json")
        assert every.returncode == 0, every.stderr
        assert _agent_ids(every.stdout) == {agent.id for agent in agents}
        assert every.stderr == ""


class TestAgentsShowAndDelete:
    def test_show(self, stack: Stack, register: Register) -> None:
        agent = register("show-01", capabilities=["docker"], labels={"site": "lab"})
        serial = view_agent(stack, agent.id)["certificate"]["serial"]

        shown = stella(stack, "agents", "show", agent.id)
        assert shown.returncode == 0, shown.stderr
        for expected in (agent.id, "show-01", "site=lab", "docker", serial, "online"):
            assert expected in shown.stdout

        as_json = stella(stack, "agents", "show", agent.id, "--json")
        assert json.loads(as_json.stdout) == view_agent(stack, agent.id)

    def test_delete_asks_first(self, stack: Stack, register: Register) -> None:
        agent = register("doomed-01")

        refused = stella(stack, "agents", "delete", agent.id, input="n\n")
        assert refused.returncode == 1
        assert "doomed-01" in refused.stderr  # the question names the agent
        assert view_agent(stack, agent.id)["name"] == "doomed-01"

        confirmed = stella(stack, "agents", "delete", agent.id, input="y\n")
        assert confirmed.returncode == 0, confirmed.stderr
        assert f"agent {agent.id} deleted" in confirmed.stdout
        assert agent_status_code(stack, agent.id) == 404

    def test_delete_with_yes_and_json(self, stack: Stack, register: Register) -> None:
        agent = register()
        deleted = stella(stack, "agents", "delete", agent.id, "--yes", "--json")
        assert deleted.returncode == 0, deleted.stderr
        assert json.loads(deleted.stdout) == {"deleted": True}
        assert agent_status_code(stack, agent.id) == 404


def view_agent(stack: Stack, agent_id: str) -> dict[str, Any]:
    with _operator(stack) as client:
        response = client.get(f"/api/v1/agents/{agent_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def agent_status_code(stack: Stack, agent_id: str) -> int:
    with _operator(stack) as client:
        return client.get(f"/api/v1/agents/{agent_id}").status_code


def _operator(stack: Stack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url,
        verify=stack.ssl_context(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )


# --- tasks ---------------------------------------------------------------------------------


class TestDispatchWait:
    def test_follows_progress_and_logs_of_one_agents_task_to_success(
        self, stack: Stack, register: Register
    ) -> None:
        agent = register("pull-01")

        async def drive() -> tuple[int, str, str]:
            async with _stream(stack, agent) as websocket:
                running = Running(
                    stack,
                    "tasks", "dispatch", "--type", "docker.pull",
                    "--payload", '{"image": "myapp", "tag": "v2.3.1"}',
                    "--credential", f"registry.password={SECRET}",
                    "--agent", agent.id, "--wait", "--poll-interval", "0.1",
                )  # fmt: skip
                task = await _assigned(websocket)
                # The credential reached its agent, and only its agent.
                assert task["credentials"] == {"registry.password": SECRET}
                task_id = task["taskId"]

                await _send(
                    websocket, type="task_progress", taskId=task_id, progress=40,
                    message="pulling layers",
                )  # fmt: skip
                await asyncio.to_thread(running.wait_for, "40% pulling layers")
                await _send(
                    websocket, type="task_log", taskId=task_id, level="info",
                    message="layer 1/3 done",
                )  # fmt: skip
                await asyncio.to_thread(running.wait_for, "layer 1/3 done")
                await _synced(websocket)
                assert "succeeded" not in running.output()  # still following

                done = agent.complete(task_id, result={"imageId": "sha256:abc123"}, logs=LOGS)
                assert done.status_code == 200, done.text
                return await asyncio.to_thread(running.finish)

        code, stdout, stderr = asyncio.run(drive())
        assert code == 0, stderr
        assert "running" in stdout
        assert "Image pulled" in stdout  # the completion's log lines too
        assert "succeeded" in stdout
        # Progress first, then the log line, then the end: in the order they happened.
        assert stdout.index("40% pulling") < stdout.index("layer 1/3 done")
        assert stdout.index("layer 1/3 done") < stdout.rindex("succeeded")

    def test_selector_waits_for_every_task_and_exits_3_when_one_fails(
        self, stack: Stack, register: Register
    ) -> None:
        good = register("lab-good", capabilities=["shell"], labels={"site": "lab"})
        bad = register("lab-bad", capabilities=["shell"], labels={"site": "lab"})
        register("elsewhere", capabilities=["shell"], labels={"site": "prod"})

        async def drive() -> tuple[int, str, str, str, str]:
            async with _stream(stack, good) as good_ws, _stream(stack, bad) as bad_ws:
                running = Running(
                    stack,
                    "tasks", "dispatch", "--type", "shell.exec",
                    "--payload", '{"command": "true"}',
                    "--capability", "shell", "--label", "site=lab",
                    "--wait", "--poll-interval", "0.1",
                )  # fmt: skip
                good_task = (await _assigned(good_ws))["taskId"]
                bad_task = (await _assigned(bad_ws))["taskId"]
                assert good.complete(good_task, logs=[LOGS[0]]).status_code == 200
                await asyncio.to_thread(running.wait_for, f"{good_task} succeeded")
                failed = bad.complete(
                    bad_task,
                    success=False,
                    error="exit status 1",
                    logs=[
                        {"timestamp": "2026-01-10T14:23:46Z", "level": "error", "message": "boom"}
                    ],
                )
                assert failed.status_code == 200, failed.text
                code, stdout, stderr = await asyncio.to_thread(running.finish)
                return code, stdout, stderr, good_task, bad_task

        code, stdout, stderr, good_task, bad_task = asyncio.run(drive())
        assert code == 3, stderr
        assert "dispatch" in stdout
        assert "2 task(s)" in stdout
        assert good_task in stdout
        assert bad_task in stdout
        assert "Pulling image..." in stdout
        assert "boom" in stdout
        assert f"task {bad_task} ended failed: exit status 1" in stderr
        assert good_task not in stderr

    def test_a_cancelled_task_ends_the_wait_with_3(self, stack: Stack, register: Register) -> None:
        agent = register()
        running = Running(
            stack, "tasks", "dispatch", "--type", "docker.pull", "--agent", agent.id,
            "--wait", "--poll-interval", "0.1",
        )  # fmt: skip
        running.wait_for("pending")
        task_id = running.output().split()[0]
        with _operator(stack) as client:
            assert client.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200
        code, stdout, stderr = running.finish()
        assert code == 3
        assert "cancelled" in stdout
        assert f"task {task_id} ended cancelled" in stderr

    def test_json_under_wait_is_one_document_of_the_final_views(
        self, stack: Stack, register: Register
    ) -> None:
        agent = register()
        running = Running(
            stack, "tasks", "dispatch", "--type", "docker.pull", "--agent", agent.id,
            "--wait", "--poll-interval", "0.1", "--json",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        tasks: list[dict[str, Any]] = []
        while not tasks:
            assert time.monotonic() < deadline, running.output()
            time.sleep(0.1)
            tasks = agent.heartbeat().json()["tasks"]
        assert agent.complete(tasks[0]["taskId"], result={"ok": 1}).status_code == 200
        code, stdout, stderr = running.finish()
        assert code == 0, stderr
        document = json.loads(stdout)
        assert [task["taskId"] for task in document["tasks"]] == [tasks[0]["taskId"]]
        assert document["tasks"][0]["status"] == "succeeded"
        assert document["tasks"][0]["result"] == {"ok": 1}


class TestTasksShowAndCancel:
    def test_dispatch_show_and_cancel(self, stack: Stack, register: Register) -> None:
        agent = register()
        payload = stack.tmp / f"payload-{uuid.uuid4().hex}.json"
        payload.write_text('{"image": "myapp", "tag": "v1"}')

        dispatched = stella(
            stack,
            "tasks", "dispatch", "--type", "docker.pull", "--payload", f"@{payload}",
            "--credential", f"registry.password={SECRET}", "--priority", "5",
            "--timeout", "120", "--agent", agent.id, "--json",
            secrets=(SECRET,),
        )  # fmt: skip
        assert dispatched.returncode == 0, dispatched.stderr
        task_id = json.loads(dispatched.stdout)["tasks"][0]["taskId"]
        delivered = agent.poll().json()["tasks"]
        assert delivered[0]["credentials"] == {"registry.password": SECRET}
        assert delivered[0]["payload"] == {"image": "myapp", "tag": "v1"}
        assert (delivered[0]["priority"], delivered[0]["timeout"]) == (5, 120)
        completed = agent.complete(task_id, result={"imageId": "sha256:abc123"}, logs=LOGS)
        assert completed.status_code == 200

        shown = stella(stack, "tasks", "show", task_id, secrets=(SECRET,))
        assert shown.returncode == 0, shown.stderr
        for expected in (task_id, agent.id, "docker.pull", "succeeded", "sha256:abc123", "120 s"):
            assert expected in shown.stdout
        for line in LOGS:
            assert line["message"] in shown.stdout
        with _operator(stack) as client:
            as_json = stella(stack, "tasks", "show", task_id, "--json", secrets=(SECRET,))
            assert json.loads(as_json.stdout) == view(client, task_id)

        finished = stella(stack, "tasks", "cancel", task_id)
        assert finished.returncode == 1
        assert "409 Conflict" in finished.stderr

        other = stella(stack, "tasks", "dispatch", "--type", "docker.pull", "--agent", agent.id)
        assert other.returncode == 0, other.stderr
        assert "pending" in other.stdout
        (other_id,) = set(UUID.findall(other.stdout)) - {agent.id}
        cancelled = stella(stack, "tasks", "cancel", other_id)
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"task {other_id} cancelled" in cancelled.stdout
        with _operator(stack) as client:
            assert view(client, other_id)["status"] == "cancelled"

    def test_refuses_a_target_that_is_both_or_neither(self, stack: Stack) -> None:
        both = stella(
            stack, "tasks", "dispatch", "--type", "x", "--agent", str(uuid.uuid4()),
            "--capability", "docker",
        )  # fmt: skip
        neither = stella(stack, "tasks", "dispatch", "--type", "x")
        for result in (both, neither):
            assert result.returncode == 2
            assert "--agent" in result.stderr

    def test_a_malformed_credential_is_refused_without_echoing_it(self, stack: Stack) -> None:
        result = stella(
            stack, "tasks", "dispatch", "--type", "x", "--agent", str(uuid.uuid4()),
            "--credential", SECRET,
            secrets=(SECRET,),
        )  # fmt: skip
        assert result.returncode == 2
        assert "key=value" in result.stderr


# --- tokens and audit ----------------------------------------------------------------------


class TestTokensCreateOverTheApi:
    def test_mints_a_token_the_server_accepts(self, stack: Stack) -> None:
        # No database settings in the environment: only the API can have minted it.
        result = stella(stack, "tokens", "create", "--ttl", "600")
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()
        assert token.startswith("srt_")
        assert "expires at" in result.stderr
        registered = httpx.post(
            f"{stack.base_url}/api/v1/agents/register",
            json={"name": "via-cli-token"},
            headers={"X-Agent-Token": token},
            verify=stack.ssl_context(),
        )
        assert registered.status_code == 201, registered.text
        assert not (stack.tmp / "var").exists()

    def test_json_and_a_refused_lifetime(self, stack: Stack) -> None:
        as_json = stella(stack, "tokens", "create", "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert set(json.loads(as_json.stdout)) == {"token", "expiresAt"}

        refused = stella(stack, "tokens", "create", "--ttl", "90000")
        assert refused.returncode == 1
        assert "422" in refused.stderr
        assert "ttlSeconds" in refused.stderr


class TestAuditList:
    def test_lists_events_newest_first(self, stack: Stack, register: Register) -> None:
        agent = register("audited-01")
        assert stella(stack, "agents", "delete", agent.id, "--yes").returncode == 0

        table = stella(stack, "audit", "list", "--agent", agent.id)
        assert table.returncode == 0, table.stderr
        assert "agent.deleted" in table.stdout
        assert "agent.registered" in table.stdout

        as_json = stella(stack, "audit", "list", "--action", "agent.deleted", "--json")
        events = json.loads(as_json.stdout)
        assert [event["agentId"] for event in events] == [agent.id]


# --- errors --------------------------------------------------------------------------------


class TestErrors:
    def test_an_unknown_id_is_a_404_message(self, stack: Stack) -> None:
        missing = str(uuid.uuid4())
        for group in ("agents", "tasks"):
            result = stella(stack, group, "show", missing)
            assert result.returncode == 1
            assert "404 Not Found" in result.stderr
            assert f"{group[:-1]} {missing} not found" in result.stderr
            assert result.stdout == ""

    def test_a_malformed_id_is_a_422_message(self, stack: Stack) -> None:
        result = stella(stack, "agents", "show", "not-an-id")
        assert result.returncode == 1
        assert "422 Unprocessable Content" in result.stderr

    def test_a_bad_admin_token_is_a_401_with_a_hint(self, stack: Stack, tmp_path: Path) -> None:
        wrong = "wrong-admin-token-" + uuid.uuid4().hex
        token_file = tmp_path / "admin-token"
        token_file.write_text(wrong + "\n")
        env = _env(stack)
        del env["STELLA_ADMIN_TOKEN"]
        by_file = stella(
            stack, "agents", "list", "--admin-token-file", str(token_file), env=env,
            secrets=(wrong,),
        )  # fmt: skip
        by_flag = stella(stack, "agents", "list", "--admin-token", wrong, secrets=(wrong,))
        for result in (by_file, by_flag):
            assert result.returncode == 1
            assert "401 Unauthorized" in result.stderr
            assert "hint: check the admin token" in result.stderr

        token_file.write_text(ADMIN_TOKEN)
        good = stella(stack, "agents", "list", "--admin-token-file", str(token_file), env=env)
        assert good.returncode == 0, good.stderr

    def test_no_server_is_exit_2(self, stack: Stack) -> None:
        result = stella(stack, "agents", "list", "--server", f"https://127.0.0.1:{free_port()}")
        assert result.returncode == 2
        assert "cannot reach https://127.0.0.1:" in result.stderr

    def test_a_server_our_ca_did_not_sign_is_exit_2(self, stack: Stack, tmp_path: Path) -> None:
        other_ca = load_or_create_pki(tmp_path / "other-pki").files.ca_cert
        result = stella(stack, "agents", "list", "--ca", str(other_ca))
        assert result.returncode == 2
        assert "TLS failed" in result.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr


class TestOverTheWireOnly:
    def test_the_api_commands_import_nothing_of_the_server(self) -> None:
        code = (
            "import sys, app.cli.agents, app.cli.tasks, app.cli.audit, app.cli.tokens; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('sqlalchemy', 'sqlmodel', 'fastapi', 'celery', 'pki') "
            "or m.endswith('.service') or m in ('app.db', 'app.runtime', 'app.settings')))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == "[]"
