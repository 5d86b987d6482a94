"""The real `stella serve --tls` process, driven as an operator and an agent would."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from websockets.asyncio.client import connect

from pki import generate_agent_key, issue_client_certificate, load_or_create_pki, private_key_pem
from tests.conftest import free_port
from tests.metrics.helpers import Samples, parse, total, value

STELLA = str(Path(sys.executable).with_name("stella"))
ADMIN = "serve-test-admin-token"


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env |= {"STELLA_DATA_DIR": str(data_dir), "STELLA_ADMIN_TOKEN": ADMIN}
    return env


def _stella(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STELLA, *args], env=_env(data_dir), capture_output=True, text=True, timeout=60, check=False
    )


class Served:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.url = f"https://127.0.0.1:{port}"
        self.ca_file = data_dir / "pki" / "ca.pem"

    def context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        return context


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`stella db upgrade`, then `stella serve --tls --workers 2` on the embedded defaults."""
    data_dir = tmp_path_factory.mktemp("served")
    upgraded = _stella(data_dir, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    port = free_port()
    log = data_dir / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [STELLA, "serve", "--tls", "--port", str(port), "--workers", "2"],
            env=_env(data_dir),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    served = Served(data_dir, port)
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{served.url}/healthz", verify=served.context()).status_code == 200:
                break
        except (httpx.ConnectError, httpx.ReadError, FileNotFoundError, ssl.SSLError):
            pass
        assert time.monotonic() < deadline, "stella serve did not come up"
        time.sleep(0.2)
    yield served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert "Traceback" not in log.read_text()


class TestServeTls:
    def test_agent_lifecycle_over_mutual_tls(self, served: Served, tmp_path: Path) -> None:
        created = _stella(served.data_dir, "tokens", "create", "--ttl", "600")
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()

        registered = httpx.post(
            f"{served.url}/api/v1/agents/register",
            json={"name": "served-agent", "capabilities": ["docker"]},
            headers={"X-Agent-Token": token},
            verify=served.context(),
        )
        assert registered.status_code == 201, registered.text
        body = registered.json()
        cert, key = tmp_path / "agent.pem", tmp_path / "agent.key"
        cert.write_text(body["certificate"]["cert"])
        key.write_text(body["certificate"]["key"])
        assert body["certificate"]["ca"] == served.ca_file.read_text()
        bearer = {"Authorization": f"Bearer {body['token']}"}
        heartbeat_url = f"{served.url}/api/v1/agents/{body['agentId']}/heartbeat"

        # Keep-alive over two web processes: every request sees the certificate.
        with httpx.Client(verify=served.context(cert, key), headers=bearer) as agent:
            for _ in range(6):
                answer = agent.post(heartbeat_url, json={"status": "healthy"})
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"tasks": []}
            own = agent.get(f"{served.url}/api/v1/agents/{body['agentId']}")
            assert own.status_code == 200
            assert own.json()["name"] == "served-agent"

        # The JWT alone, over TLS without a client certificate: refused.
        alone = httpx.post(
            heartbeat_url, json={"status": "healthy"}, headers=bearer, verify=served.context()
        )
        assert alone.status_code == 401
        assert alone.headers["content-type"] == "application/problem+json"
        assert "client certificate" in alone.json()["detail"]

    def test_certificate_from_another_ca_fails_the_handshake(
        self, served: Served, tmp_path: Path
    ) -> None:
        # The server answers a client it trusts: a refusal below is the certificate's doing.
        assert httpx.get(f"{served.url}/healthz", verify=served.context()).status_code == 200
        foreign = load_or_create_pki(tmp_path / "foreign-pki")
        key = generate_agent_key()
        cert = issue_client_certificate(
            foreign, agent_id=uuid.uuid4(), public_key=key.public_key(), ttl=dt.timedelta(hours=1)
        )
        (tmp_path / "f.pem").write_bytes(cert.public_bytes(Encoding.PEM))
        (tmp_path / "f.key").write_text(private_key_pem(key))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(
                f"{served.url}/healthz",
                verify=served.context(tmp_path / "f.pem", tmp_path / "f.key"),
            )

    def test_operator_api_and_ca_download(self, served: Served) -> None:
        ca = httpx.get(f"{served.url}/api/v1/pki/ca.pem", verify=served.context())
        assert ca.text == served.ca_file.read_text()
        listed = httpx.get(
            f"{served.url}/api/v1/agents",
            headers={"Authorization": f"Bearer {ADMIN}"},
            verify=served.context(),
        )
        assert listed.status_code == 200
        unauthorized = httpx.get(f"{served.url}/api/v1/agents", verify=served.context())
        assert unauthorized.status_code == 401


class TestServeRefusesBrokenPki:
    def test_missing_ca_key_stops_the_start_with_a_clear_message(self, tmp_path: Path) -> None:
        load_or_create_pki(tmp_path / "pki")
        (tmp_path / "pki" / "ca.key").unlink()
        result = _stella(tmp_path, "serve", "--tls", "--port", str(free_port()))
        assert result.returncode == 2
        assert "ca.key" in result.stderr
        assert "Refusing to create new keys" in result.stderr
        assert not (tmp_path / "pki" / "ca.key").exists()


class TestServeMetrics:
    """Two web processes: every scrape, whichever process answers it, sums both."""

    def test_counters_and_live_gauges_sum_over_the_workers(
        self, served: Served, tmp_path: Path
    ) -> None:
        admin = {"Authorization": f"Bearer {ADMIN}"}

        def scrape() -> Samples:
            # A fresh connection each time: the kernel hands it to either worker.
            response = httpx.get(f"{served.url}/metrics", headers=admin, verify=served.context())
            assert response.status_code == 200, response.text
            return parse(response.text)

        port = served.url.rsplit(":", 1)[1]
        files = list((served.data_dir / "metrics" / port).glob("*.db"))
        assert len({path.stem.rsplit("_", 1)[1] for path in files}) >= 2, files

        before = scrape()
        minted = httpx.post(
            f"{served.url}/api/v1/registration-tokens",
            json={},
            headers=admin,
            verify=served.context(),
        )
        assert minted.status_code == 201, minted.text
        registered = httpx.post(
            f"{served.url}/api/v1/agents/register",
            json={"name": "metrics-agent", "capabilities": ["docker"]},
            headers={"X-Agent-Token": minted.json()["token"]},
            verify=served.context(),
        )
        assert registered.status_code == 201, registered.text
        body = registered.json()
        cert, key = tmp_path / "agent.pem", tmp_path / "agent.key"
        cert.write_text(body["certificate"]["cert"])
        key.write_text(body["certificate"]["key"])
        bearer = {"Authorization": f"Bearer {body['token']}"}
        for _ in range(12):
            answer = httpx.post(
                f"{served.url}/api/v1/agents/{body['agentId']}/heartbeat",
                json={"status": "healthy"},
                headers=bearer,
                verify=served.context(cert, key),
            )
            assert answer.status_code == 200, answer.text

        def moved(after: Samples, name: str) -> float:
            return total(after, name) - total(before, name)

        for _ in range(6):
            after = scrape()
            assert moved(after, "stella_heartbeats_received_total") == 12
            assert moved(after, "stella_heartbeat_duration_seconds_count") == 12
            assert moved(after, "stella_certificates_issued_total") == 1
            assert value(after, "stella_agents", status="online") >= 1

        streams = "stella_task_streams_open"

        async def with_stream_open() -> None:
            async with connect(
                f"{served.url.replace('https://', 'wss://')}/api/v1/agents/"
                f"{body['agentId']}/task-stream",
                ssl=served.context(cert, key),
                additional_headers=bearer,
                open_timeout=10,
            ):
                seen = [value(await asyncio.to_thread(scrape), streams) for _ in range(6)]
                assert seen == [value(before, streams) + 1] * 6

        asyncio.run(with_stream_open())
        deadline = time.monotonic() + 10
        while value(scrape(), streams) != value(before, streams):
            assert time.monotonic() < deadline, "the closed stream is still counted"
            time.sleep(0.1)
