"""A fake `docker` for the agent's tests, a runner of the real agent, small builders.

`install_fake_docker(tmp)` writes an executable `docker` into `tmp/bin` that
records each call (argv, stdin, DOCKER_CONFIG) as one JSON line and prints a
few plausible lines. Environment knobs, read by the fake at each call:

- FAKE_DOCKER_SLEEP: seconds `pull` and `run` sleep (writing their pid first);
- FAKE_DOCKER_FAIL: a subcommand that exits 1 with an error on stderr.

`run` keeps the container it "creates" (id and labels) before it sleeps, as
the daemon does; `ps --filter label=K=V --format F` lists them, running.

`AgentRunner` starts and restarts `stella agent run` against a server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.processes import StellaProcess

FAKE_DOCKER = """#!{python}
import json, os, sys, time
record, pids = {record!r}, {pids!r}
argv = sys.argv[1:]
data = "" if sys.stdin is None or sys.stdin.closed else sys.stdin.read()
with open(record, "a") as out:
    out.write(json.dumps({{"argv": argv, "stdin": data,
                          "config": os.environ.get("DOCKER_CONFIG")}}) + "\\n")
command = argv[0] if argv else ""
if os.environ.get("FAKE_DOCKER_FAIL") == command:
    print(f"Error response from daemon: {{command}} failed", file=sys.stderr)
    sys.exit(1)
containers = os.path.join(os.path.dirname(record), "docker-containers.jsonl")
if command == "run":
    labels = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--label"]
    with open(containers, "a") as out:
        out.write(json.dumps({{"id": "c0ffee" * 4, "labels": labels}}) + "\\n")
sleep = float(os.environ.get("FAKE_DOCKER_SLEEP") or 0)
if command in ("pull", "run") and sleep:
    with open(pids, "a") as out:
        out.write(f"{{os.getpid()}}\\n")
    print("waiting", flush=True)
    time.sleep(sleep)
if command == "login":
    print("Login Succeeded")
elif command == "pull":
    print(f"Pulling from {{argv[-1]}}")
    print("a1b2c3: Pull complete")
    print(f"Status: Downloaded newer image for {{argv[-1]}}")
elif command == "image":
    print("sha256:" + "1" * 64)
elif command == "run":
    if "--cidfile" in argv:
        with open(argv[argv.index("--cidfile") + 1], "w") as out:
            out.write("c0ffee" * 4)
    print("c0ffee" * 4)
elif command == "ps":
    wanted = argv[argv.index("--filter") + 1].removeprefix("label=")
    form = argv[argv.index("--format") + 1]
    known = open(containers).read().splitlines() if os.path.exists(containers) else []
    for row in map(json.loads, known):
        if wanted in row["labels"]:
            detach = dict(label.split("=", 1) for label in row["labels"]).get("stella.detach")
            for field, value in (("{{{{.ID}}}}", row["id"]), ("{{{{.State}}}}", "running"),
                                 ("{{{{.Status}}}}", "Up 2 seconds"),
                                 ('{{{{.Label "stella.detach"}}}}', detach or "")):
                form = form.replace(field, value)
            print(form)
elif command == "compose":
    print("Container web-1  Started", file=sys.stderr)
"""


@dataclass
class FakeDocker:
    bin_dir: Path
    record: Path
    pids: Path

    def calls(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def pids_started(self) -> list[int]:
        if not self.pids.exists():
            return []
        return [int(line) for line in self.pids.read_text().split()]


def install_fake_docker(tmp: Path) -> FakeDocker:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = FakeDocker(bin_dir=bin_dir, record=tmp / "docker-calls.jsonl", pids=tmp / "pids")
    script = bin_dir / "docker"
    script.write_text(
        FAKE_DOCKER.format(python=sys.executable, record=str(fake.record), pids=str(fake.pids))
    )
    script.chmod(0o755)
    return fake


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def kill_quietly(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def certificate_for(key: ec.EllipticCurvePrivateKey, *, cn: str = "agent") -> str:
    """A self-signed certificate for `key` (the state directory checks only the key)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


class AgentRunner:
    """Starts and restarts `stella agent run` on one state directory."""

    def __init__(
        self, server: str, ca_file: Path, tmp: Path, fake: FakeDocker, *, name: str = "edge-e2e"
    ) -> None:
        self.server, self.ca_file, self.tmp, self.fake, self.name = server, ca_file, tmp, fake, name
        self.state_dir = tmp / "state"
        self.processes: list[StellaProcess] = []

    def start(self, *, token: str | None = None, **env: str) -> StellaProcess:
        args = ["agent", "run", "--server", self.server, "--name", self.name]
        args += ["--capability", "docker", "--label", "site=lab"]
        args += ["--state-dir", str(self.state_dir), "--ca", str(self.ca_file)]
        args += ["--shutdown-grace", "1"]
        if token is not None:
            args += ["--token", token]
        clean = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("STELLA_", "FAKE_DOCKER"))
        }
        clean["PATH"] = f"{self.fake.bin_dir}:{clean.get('PATH', '/usr/bin:/bin')}"
        log = self.tmp / f"{self.name}-{len(self.processes)}.log"  # one per run: wait_for reads it
        process = StellaProcess(*args, env={**clean, **env}, log=log).start()
        self.processes.append(process)
        return process

    @property
    def agent_id(self) -> str:
        agent_id: str = json.loads((self.state_dir / "agent.json").read_text())["agentId"]
        return agent_id

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        kill_quietly(self.fake.pids_started())
