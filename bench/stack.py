"""The processes a benchmark runs against, as in production.

`BenchStack` owns a fresh PostgreSQL database, a Redis key prefix of its
own, a data directory with the PKI, one Celery worker and beat. Web
servers are started per scenario (`web`), as are the ceilings (`ceiling`):
a bare FastAPI app served with the very same uvicorn TLS settings.

Everything is named after this process id, so two harnesses on one
machine never share a database, a port or a Redis key.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from pydantic import SecretStr
from sqlalchemy import Engine, make_url, text

from app.db import make_engine
from app.migrate import upgrade
from app.settings import Settings
from pki import CertificateAuthority, load_or_create_pki
from tests.processes import StellaProcess, settings_env

POSTGRES_URL = os.environ.get(
    "STELLA_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("STELLA_BENCH_REDIS", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "bench-admin-token"
TABLES = ("task_logs", "tasks", "dispatches", "agents", "registration_tokens")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class WebServer:
    """One `stella serve --tls` (or a ceiling) listening on `url`."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    stella: StellaProcess | None = None  # `stella serve` (a ceiling has none): restartable

    @property
    def pids(self) -> list[int]:
        """The server's process and its uvicorn worker processes."""
        root = self.process.pid
        found = [root]
        with contextlib.suppress(FileNotFoundError):
            children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
            found += [int(pid) for pid in children]
        return found


@dataclass
class BenchStack:
    """Database, Redis, PKI, worker and beat; web servers on demand."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="stella-bench-")))
    name: str = field(default_factory=lambda: f"stella_bench_{os.getpid()}")
    # Settings of every process of the stack (e.g. short intervals for a soak).
    overrides: dict[str, Any] = field(default_factory=dict)
    settings: Settings = field(init=False)
    ca: CertificateAuthority = field(init=False)
    engine: Engine = field(init=False)
    _background: list[StellaProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.database_url = str(make_url(POSTGRES_URL).set(database=self.name))
        self.settings = Settings(
            data_dir=self.workdir / "data",
            database_url=self.database_url,
            broker_url=REDIS_URL,
            redis_url=REDIS_URL,
            broker_key_prefix=f"{self.name}:",
            admin_token=SecretStr(ADMIN_TOKEN),
            **self.overrides,
        )

    # --- life ------------------------------------------------------------------------------

    def start(self) -> BenchStack:
        self._create_database()
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.ca = load_or_create_pki(self.settings.resolved_pki_dir)
        self.engine = make_engine(self.database_url)
        upgrade(self.engine)
        env = self.env()
        worker = StellaProcess(
            "worker",
            "--concurrency",
            "1",
            "--hostname",
            f"{self.name}@%h",
            env=env,
            log=self.workdir / "worker.log",
        ).start()
        beat = StellaProcess("beat", env=env, log=self.workdir / "beat.log").start()
        self._background += [worker, beat]
        worker.wait_for(" ready.", timeout=60)
        return self

    def stop(self) -> None:
        for process in self._background:
            process.stop()
        self._background.clear()
        with contextlib.suppress(Exception):
            self.engine.dispose()
        self._drop_database()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BenchStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a `stella` process of this stack."""
        return settings_env(self.settings) | extra

    # --- web servers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def web(
        self, *, workers: int = 2, log_level: str = "warning", **env: str
    ) -> Iterator[WebServer]:
        """`stella serve --tls --workers N` on a free port, ready to serve."""
        port = free_port()
        log = self.workdir / f"web-{port}.log"
        process = StellaProcess(
            "serve",
            "--tls",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            log_level,
            env=self.env(**env),
            log=log,
        ).start()
        assert process.process is not None
        server = WebServer(
            url=f"https://127.0.0.1:{port}", process=process.process, log=log, stella=process
        )
        try:
            self._wait_ready(server, "/healthz")
            yield server
        finally:
            process.stop()

    # --- faults ----------------------------------------------------------------------------

    def restart_web(self, server: WebServer) -> None:
        """SIGKILL the web server (its workers too), start it again on the same port, ready."""
        assert server.stella is not None
        server.stella.kill()
        server.stella.start()
        assert server.stella.process is not None
        server.process = server.stella.process
        self._wait_ready(server, "/healthz")

    def restart(self, role: str, timeout: float = 60) -> None:
        """SIGKILL the worker or the beat (its children too) and start it again.

        The worker is waited for until it consumes again; the log is
        appended to, so that means one more " ready." than before.
        """
        process = next(p for p in self._background if p.args[0] == role)
        ready = process.output().count(" ready.")
        process.kill()
        process.start()
        if role != "worker":
            return
        deadline = time.monotonic() + timeout
        while process.output().count(" ready.") <= ready:
            assert process.process is not None
            if process.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start again:\n{process.output()}")
            time.sleep(0.1)

    @property
    def logs(self) -> list[Path]:
        """Every log Stella's processes wrote (web servers, worker, beat)."""
        return sorted(p for p in self.workdir.glob("*.log") if not p.name.startswith("ceiling-"))

    @contextlib.contextmanager
    def ceiling(self, app: str, *, workers: int = 2) -> Iterator[WebServer]:
        """A bare FastAPI app (`module:factory`) under the same uvicorn TLS settings."""
        port = free_port()
        log = self.workdir / f"ceiling-{port}.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.ceilings",
                    app,
                    "--port",
                    str(port),
                    "--workers",
                    str(workers),
                ],
                env=self.env(),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = WebServer(url=f"https://127.0.0.1:{port}", process=process, log=log)
        try:
            self._wait_ready(server, "/ready")
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            process.wait(timeout=20)

    def _wait_ready(self, server: WebServer, path: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=self.server_context()) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(server.url + path).status_code < 500:
                        return
                alive = server.process.poll()
                if alive is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server on {server.url} did not start:\n{server.log.read_text()}"
                    )
                time.sleep(0.1)

    # --- clients ---------------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """What a client needs to trust the server (no client certificate)."""
        return ssl.create_default_context(cafile=str(self.ca.files.ca_cert))

    def operator(self, server: WebServer, **kwargs: object) -> httpx.Client:
        return httpx.Client(
            base_url=server.url,
            verify=self.server_context(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            **kwargs,  # type: ignore[arg-type]
        )

    # --- data ------------------------------------------------------------------------------

    def clear(self) -> None:
        """Empty every table (between scenarios)."""
        with self.engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(TABLES)}"))

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        url = make_url(POSTGRES_URL)
        return psycopg.connect(
            host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
        )

    def _create_database(self) -> None:
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{self.name}"')

    def _drop_database(self) -> None:
        with contextlib.suppress(psycopg.Error), self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
