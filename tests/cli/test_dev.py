"""`stella dev` on a fresh data dir: no Redis, no PostgreSQL, three processes, one Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx

from tests.cli.test_serve import STELLA
from tests.conftest import free_port


def _wait_for_line(log: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in:\n{log.read_text()}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class TestDev:
    def test_runs_web_worker_and_beat_and_stops_them_all_on_ctrl_c(self, tmp_path: Path) -> None:
        data_dir, port, log = tmp_path / "var", free_port(), tmp_path / "dev.log"
        # Services are found only through the environment: leave none of them in it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
        env["STELLA_DATA_DIR"] = str(data_dir)
        with log.open("wb") as output:
            dev = subprocess.Popen(
                [STELLA, "dev", "--port", str(port)],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            admin = _wait_for_line(log, r"admin token: (\S+)", dev).group(1)
            assert (data_dir / "admin-token").read_text().strip() == admin
            assert (data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
            _wait_for_line(log, r"broker:\s+filesystem://", dev)
            _wait_for_line(log, r"celery@\S+ ready|stella@\S+ ready", dev)
            context = ssl.create_default_context(cafile=str(data_dir / "pki" / "ca.pem"))
            base = f"https://localhost:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/readyz", verify=context).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)

            with httpx.Client(
                base_url=base, verify=context, headers={"Authorization": f"Bearer {admin}"}
            ) as operator:
                token = operator.post("/api/v1/registration-tokens", json={}).json()["token"]
                registered = operator.post(
                    "/api/v1/agents/register",
                    json={"name": "dev-agent", "capabilities": ["docker"]},
                    headers={"X-Agent-Token": token},
                )
                assert registered.status_code == 201, registered.text
                # The worker expands a selector dispatch over the embedded broker.
                accepted = operator.post(
                    "/api/v1/tasks",
                    json={"taskType": "docker.pull", "target": {"capability": "docker"}},
                )
                assert accepted.status_code == 202, accepted.text
                url = f"/api/v1/dispatches/{accepted.json()['dispatchId']}"
                deadline = time.monotonic() + 20
                while operator.get(url).json()["status"] != "done":
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
                assert len(operator.get(url).json()["tasks"]) == 1
        finally:
            # Ctrl-C in a terminal reaches the whole foreground process group.
            os.killpg(dev.pid, signal.SIGINT)
            dev.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _group_alive(dev.pid):
            assert time.monotonic() < deadline, "a child of stella dev outlived Ctrl-C"
            time.sleep(0.1)
        assert "Traceback" not in log.read_text(), log.read_text()
