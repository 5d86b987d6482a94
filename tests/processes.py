"""Real `stella` processes for tests: worker, beat, Flower, serve.

Each runs in its own process group with its output in a log file, so a
test can wait for a line, read what happened, or kill it outright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from app.settings import Settings

STELLA = str(Path(sys.executable).with_name("stella"))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a `stella` process build these same settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STELLA_")}
    for name in settings.model_fields_set:
        value: Any = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(value)
        env[f"STELLA_{name.upper()}"] = str(value)
    return env


class StellaProcess:
    """`stella ARGS...` in its own process group, logging to `log`."""

    def __init__(self, *args: str, env: dict[str, str], log: Path) -> None:
        self.args = args
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StellaProcess:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [STELLA, *self.args],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, timeout: float = 30) -> None:
        """Wait until `text` appears in the log (fail early if the process died)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"stella {' '.join(self.args)} exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {text!r} from stella {' '.join(self.args)}:\n{self.output()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup, no acknowledgements."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> StellaProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_worker(settings: Settings, log: Path, *, name: str) -> StellaProcess:
    """A real Celery worker (prefork, one child), ready to consume."""
    worker = StellaProcess(
        "worker",
        "--concurrency",
        "1",
        "--hostname",
        f"{name}@%h",
        env=settings_env(settings),
        log=log,
    ).start()
    worker.wait_for(" ready.")
    return worker
