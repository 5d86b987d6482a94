"""The real agent process against the real `stella dev --tls` (web, worker, beat)."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx

from tests.agent.helpers import install_fake_docker, kill_quietly
from tests.agent.test_end_to_end import CREDENTIALS, DIGEST, PASSWORD
from tests.conftest import free_port
from tests.processes import STELLA, StellaProcess


def _wait_for(log: Path, pattern: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(1) if found.groups() else found.group(0)
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in:\n{log.read_text()}")


def test_an_agent_on_stella_dev_pulls_with_its_password_on_stdin_only(tmp_path: Path) -> None:
    data_dir, port, log = tmp_path / "var", free_port(), tmp_path / "dev.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("STELLA_", "FAKE_DOCKER"))}
    with log.open("wb") as output:
        dev = subprocess.Popen(
            [STELLA, "dev", "--tls", "--port", str(port)],
            env=clean | {"STELLA_DATA_DIR": str(data_dir)},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    fake = install_fake_docker(tmp_path)
    agent: StellaProcess | None = None
    try:
        admin = _wait_for(log, r"admin token: (\S+)", dev)
        _wait_for(log, r"stella@\S+ ready", dev)
        ca_file = data_dir / "pki" / "ca.pem"
        server = f"https://localhost:{port}"
        operator = httpx.Client(
            base_url=server,
            verify=ssl.create_default_context(cafile=str(ca_file)),
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        with operator:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if operator.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            token = operator.post("/api/v1/registration-tokens", json={}).json()["token"]
            state = tmp_path / "state"
            agent = StellaProcess(
                "agent",
                "run",
                "--server",
                server,
                "--token",
                token,
                "--name",
                "dev-edge",
                "--capability",
                "docker",
                "--state-dir",
                str(state),
                "--ca",
                str(ca_file),
                env=clean | {"PATH": f"{fake.bin_dir}:{clean.get('PATH', '/usr/bin:/bin')}"},
                log=tmp_path / "agent.log",
            ).start()
            agent.wait_for("task stream connected")
            agent_id = json.loads((state / "agent.json").read_text())["agentId"]

            created = operator.post(
                "/api/v1/tasks",
                json={
                    "taskType": "docker.pull",
                    "payload": {"image": "registry.example.com/team/app", "digest": DIGEST},
                    "credentials": CREDENTIALS,
                    "target": {"agentId": agent_id},
                },
            )
            assert created.status_code == 201, created.text
            task_id = created.json()["tasks"][0]["taskId"]
            deadline = time.monotonic() + 30
            while (view := operator.get(f"/api/v1/tasks/{task_id}").json())["status"] not in (
                "succeeded",
                "failed",
            ):
                assert time.monotonic() < deadline, view
                time.sleep(0.1)

        assert view["status"] == "succeeded", view
        assert view["progress"] == 100
        assert any("Pull complete" in line["message"] for line in view["logs"])
        login = next(call for call in fake.calls() if call["argv"][0] == "login")
        assert login["stdin"] == PASSWORD + "\n"
        assert "--password-stdin" in login["argv"]
        for call in fake.calls():
            assert PASSWORD not in " ".join(call["argv"])
        assert PASSWORD not in agent.output()
        assert PASSWORD not in log.read_text()
    finally:
        if agent is not None:
            agent.stop()
        kill_quietly(fake.pids_started())
        os.killpg(dev.pid, signal.SIGINT)
        dev.wait(timeout=30)
