"""`bench.wsclient` processes, driven from the harness; and a process's resident memory.

The client runs in processes of its own so that the measured server and
the harness never share an interpreter with 10,000 client sockets, and so
that its pongs keep coming while the harness sleeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.fleet import SimAgent


def rss_kb(pid: int) -> int:
    """VmRSS of `pid`, in KB (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass(frozen=True)
class Tally:
    """The sum of the client processes' last reports."""

    total: int
    open: int
    failed: int
    dropped: int  # closed by the server, or lost, after opening
    pings: int
    first_error: str


class StreamClients:
    """One stream per agent, split over `processes` clients, until the `with` ends."""

    def __init__(
        self,
        url: str,
        agents: list[SimAgent],
        folder: Path,
        *,
        processes: int = 1,
        concurrency: int = 64,
        deflate: bool = True,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._reports: list[dict[str, Any]] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._threads: list[threading.Thread] = []
        self._logs: list[IO[bytes]] = []
        for index in range(processes):
            share = agents[index::processes]
            path = folder / f"agents-{index}.json"
            path.write_text(
                json.dumps(
                    {
                        "ca": str(share[0].ca_file) if share else "",
                        "agents": [[str(a.agent_id), a.token, str(a.credentials)] for a in share],
                    }
                )
            )
            log = (folder / f"client-{index}.log").open("ab")
            self._logs.append(log)
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.wsclient",
                    str(path),
                    "--url",
                    url,
                    "--concurrency",
                    str(concurrency),
                    *([] if deflate else ["--no-deflate"]),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            self._processes.append(process)
            self._reports.append({})
            thread = threading.Thread(target=self._follow, args=(index, process.stdout))
            thread.start()
            self._threads.append(thread)

    def _follow(self, index: int, stdout: IO[str] | None) -> None:
        assert stdout is not None
        for line in stdout:
            self._reports[index] = json.loads(line)

    def tally(self) -> Tally:
        reports = list(self._reports)
        return Tally(
            total=sum(r.get("total", 0) for r in reports),
            open=sum(r.get("open", 0) for r in reports),
            failed=sum(r.get("failed", 0) for r in reports),
            dropped=sum(r.get("lost", 0) + sum(r.get("closed", {}).values()) for r in reports),
            pings=sum(r.get("pings", 0) for r in reports),
            first_error=next((r["first_error"] for r in reports if r.get("first_error")), ""),
        )

    def wait_open(self, count: int, *, timeout: float) -> int:
        """Wait until `count` streams are open or given up on; how many are open."""
        deadline = time.monotonic() + timeout
        while True:
            tally = self.tally()
            if tally.open + tally.failed + tally.dropped >= count:
                return tally.open
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._processes):
                return tally.open
            time.sleep(0.1)

    def close(self) -> None:
        """Close every stream (each client's stdin) and wait for the clients to exit."""
        for process in self._processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self._processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join()
        for log in self._logs:
            log.close()

    def __enter__(self) -> StreamClients:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
