"""Many simulated agents in one asyncio process, over the public API only.

Each simulated agent generates its own EC P-256 key, registers with a CSR
(single-use token from a file or minted through the operator API), then
heartbeats over its own mutual-TLS client (one `SSLContext` per agent, shared
by its HTTP client and its task stream; connections kept alive). Tasks come
from the heartbeat answers (and, with `stream`, from a task stream per agent)
and are completed at once with `{"simulated": true}` (or after
`task_seconds`). A 401/403 (agent deleted) stops that agent; other failures
are retried with backoff and jitter.

Usage::

    summary = await simulate(SimOptions(server=url, agents=100, admin_token=t, ca_file=ca))
    print(json.dumps(summary))

Nothing here imports the server: this is a load generator for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import resource
import signal
import ssl
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import connect

from agent import __version__
from agent.client import API, CredentialsRefused, ServerUnavailable, TaskStream
from agent.runner import backoff_delay
from agent.state import StateDir

SIMULATED_RESULT: dict[str, Any] = {"simulated": True}


class SimulationError(Exception):
    """The simulation cannot start (no tokens, unreadable files, bad options)."""


@dataclass
class SimOptions:
    server: str
    agents: int
    token_file: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    name_prefix: str = "sim-"
    capabilities: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_interval: float | None = None  # None: the server's config.heartbeatInterval
    jitter: float = 0.1  # each sleep is the interval times 1 ± jitter
    stream: bool = False
    task_seconds: float = 0.0
    report_every: float = 5.0
    duration: float | None = None  # None: until SIGINT/SIGTERM
    register_concurrency: int = 50
    request_timeout: float = 30.0
    shutdown_grace: float = 5.0
    start_index: int = 1
    # Idle connections are dropped after this; below the server's keep-alive
    # (STELLA_KEEP_ALIVE_TIMEOUT, 75 s), so that a request never races the server
    # closing the connection it reuses.
    keepalive: float = 60.0


def read_token_file(path: Path, needed: int) -> list[str]:
    """One token per line (blank lines and `#` comments skipped); at least `needed`."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SimulationError(f"cannot read {path}: {exc}") from exc
    tokens = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(tokens) < needed:
        raise SimulationError(f"{path} holds {len(tokens)} token(s); {needed} are needed")
    return tokens[:needed]


# --- statistics ----------------------------------------------------------------------------


class Histogram:
    """Latencies in log buckets (2 % wide): constant memory, quantiles within 2 %."""

    FACTOR = 1.02

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        micros = max(seconds * 1e6, 1.0)
        self.buckets[int(math.log(micros, self.FACTOR))] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds (the bucket's upper bound), None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return min(self.FACTOR ** (bucket + 1) / 1e6, self.max)
        return self.max

    def merge(self, other: Histogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass
class Stats:
    agents: int
    registered: int = 0
    registration_failed: int = 0
    stopped: int = 0  # credentials refused (deleted) after registering
    heartbeats_sent: int = 0  # finished: ok + failed
    heartbeats_ok: int = 0
    heartbeats_failed: int = 0
    tasks_received: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0  # completion refused for good, or given up
    renewals: int = 0
    streams_open: int = 0
    stream_connects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    window: Histogram = field(default_factory=Histogram)
    started: float = field(default_factory=time.monotonic)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def heartbeat(self, seconds: float, ok: bool) -> None:
        self.heartbeats_sent += 1
        if ok:
            self.heartbeats_ok += 1
            self.latency.record(seconds)
            self.window.record(seconds)
        else:
            self.heartbeats_failed += 1

    def line(self) -> str:
        """One live summary line; resets the latency window."""
        window, self.window = self.window, Histogram()
        p50, p99 = _ms(window.quantile(0.5)), _ms(window.quantile(0.99))
        latency = "-" if p50 is None else f"p50 {p50:.1f} ms p99 {p99:.1f} ms"
        return (
            f"[{time.monotonic() - self.started:7.1f}s] "
            f"agents {self.registered}/{self.agents} registered"
            f" ({self.registration_failed} failed, {self.stopped} stopped)"
            f" | heartbeats {self.heartbeats_sent} sent {self.heartbeats_ok} ok"
            f" {self.heartbeats_failed} failed ({latency})"
            f" | tasks {self.tasks_received} received {self.tasks_completed} completed"
            f" | errors {sum(self.errors.values())}"
            + (f" | streams {self.streams_open}" if self.stream_connects else "")
        )

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        latency = self.latency
        return {
            "agents": self.agents,
            "registered": self.registered,
            "registrationFailed": self.registration_failed,
            # Still waiting for a registration slot or retrying when the run ended.
            "registrationPending": self.agents - self.registered - self.registration_failed,
            "stopped": self.stopped,
            "durationSeconds": round(elapsed, 3),
            "heartbeats": {
                "sent": self.heartbeats_sent,
                "ok": self.heartbeats_ok,
                "failed": self.heartbeats_failed,
                "perSecond": round(self.heartbeats_ok / elapsed, 2) if elapsed else 0.0,
                "latencyMs": {
                    "p50": _ms(latency.quantile(0.5)),
                    "p90": _ms(latency.quantile(0.9)),
                    "p99": _ms(latency.quantile(0.99)),
                    "max": _ms(latency.max) if latency.count else None,
                    "mean": _ms(latency.total / latency.count) if latency.count else None,
                },
            },
            "tasks": {
                "received": self.tasks_received,
                "completed": self.tasks_completed,
                "failed": self.tasks_failed,
                "unfinished": self.tasks_received - self.tasks_completed - self.tasks_failed,
            },
            "certificateRenewals": self.renewals,
            "streamConnects": self.stream_connects,
            "errors": sum(self.errors.values()),
            "errorKinds": dict(self.errors.most_common(20)),
        }


def format_summary(summary: dict[str, Any]) -> str:
    """The final summary for people."""
    beats, tasks = summary["heartbeats"], summary["tasks"]
    latency = {key: "-" if value is None else value for key, value in beats["latencyMs"].items()}
    lines = [
        f"simulated {summary['agents']} agents for {summary['durationSeconds']:.1f} s",
        f"  registered   {summary['registered']} ({summary['registrationFailed']} failed,"
        f" {summary['stopped']} stopped by the server)",
        f"  heartbeats   {beats['sent']} sent, {beats['ok']} ok, {beats['failed']} failed"
        f" ({beats['perSecond']}/s)",
        f"  latency ms   p50 {latency['p50']}  p90 {latency['p90']}  p99 {latency['p99']}"
        f"  max {latency['max']}",
        f"  tasks        {tasks['received']} received, {tasks['completed']} completed,"
        f" {tasks['failed']} failed, {tasks['unfinished']} unfinished",
        f"  errors       {summary['errors']}",
    ]
    lines += [f"    {count:6d}  {kind}" for kind, count in summary["errorKinds"].items()]
    return "\n".join(lines)


# --- the wire ------------------------------------------------------------------------------


class Refused(Exception):
    """A call answered with a status no retry will fix (other than 401/403)."""


def _check(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if response.is_success:
        return
    if status in (401, 403):
        raise CredentialsRefused(f"{what} {status}")
    if status >= 500 or status in (408, 429):
        raise ServerUnavailable(f"{what} {status}")
    raise Refused(f"{what} {status}")


def _kind(exc: BaseException) -> str:
    """A short error kind for the summary: `heartbeat 503`, `heartbeat ConnectError`, ..."""
    if isinstance(exc, CredentialsRefused | ServerUnavailable | Refused):
        return str(exc)
    return type(exc).__name__


class TokenSource:
    """Registration tokens: from a file, or minted one at a time by the operator API."""

    def __init__(self, tokens: list[str] | None, operator: httpx.AsyncClient | None) -> None:
        self.tokens = list(reversed(tokens)) if tokens is not None else None
        self.operator = operator

    async def take(self) -> str:
        """The next token (ServerUnavailable or httpx.HTTPError: try again later)."""
        if self.tokens is not None:
            return self.tokens.pop()
        assert self.operator is not None
        response = await self.operator.post(f"{API}/registration-tokens", json={})
        _check(response, "mint token")
        token: str = response.json()["token"]
        return token


def _verify_context(ca_pem: str | None) -> ssl.SSLContext:
    """Verify the server against the pinned CA (else the system store)."""
    return ssl.create_default_context(cadata=ca_pem)


class SimAgent:
    """One simulated agent: register, then heartbeat (and stream) until closed."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.options = sim.options
        self.stats = sim.stats
        self.name = f"{self.options.name_prefix}{index}"
        self.directory = sim.work_dir / str(index)
        self.agent_id = ""
        self.token = ""
        self.http: httpx.AsyncClient | None = None
        self.retired: list[httpx.AsyncClient] = []
        self.context: ssl.SSLContext | None = None
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.seen: set[str] = set()
        self.handlers: set[asyncio.Task[None]] = set()
        self.dead = False
        self.interval = 30.0

    # --- life -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                registered = await self._register()
            except Exception as exc:  # e.g. a malformed answer: this agent is lost, not the rest
                self.stats.registration_failed += 1
                self.stats.error(f"register: internal error: {type(exc).__name__}: {exc}"[:120])
                return
            if not registered:
                return
            loops = [asyncio.create_task(self._heartbeat_loop())]
            if self.options.stream:
                loops.append(asyncio.create_task(self._stream_loop()))
            try:
                await asyncio.gather(*loops)
            except CredentialsRefused as exc:
                self._stop(_kind(exc))
            except Exception as exc:  # a bug or a malformed answer: count it, stop this one
                self._stop(f"internal error: {type(exc).__name__}: {exc}"[:120])
            finally:
                for loop in loops:
                    loop.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
        finally:
            if self.dead:
                for handler in self.handlers:
                    handler.cancel()

    def _stop(self, why: str) -> None:
        if not self.dead:
            self.dead = True
            self.stats.stopped += 1
            self.stats.error(why)

    async def aclose(self) -> None:
        for client in [*self.retired, *([self.http] if self.http else [])]:
            await client.aclose()

    # --- registration ---------------------------------------------------------------------

    async def _register(self) -> bool:
        async with self.sim.register_slots:
            if self.sim.closing.is_set():
                return False
            token = await self._token()
            if token is None:
                self.stats.registration_failed += 1
                return False
            body = {
                "name": self.name,
                "version": __version__,
                "capabilities": self.options.capabilities,
                "labels": self.options.labels,
                "csr": StateDir.csr_pem(self.key, self.name),
            }
            # A failed registration spends no token: retry transient errors until closing.
            attempt = 0
            while True:
                try:
                    response = await self.sim.public.post(
                        f"{API}/agents/register", json=body, headers={"X-Agent-Token": token}
                    )
                    _check(response, "register")
                    break
                except (httpx.HTTPError, ServerUnavailable) as exc:
                    transient = isinstance(exc, ServerUnavailable)
                    self.stats.error(_kind(exc) if transient else f"register {_kind(exc)}")
                    await self.sim.sleep(backoff_delay(attempt, base=0.5, cap=30))
                    attempt += 1
                    if self.sim.closing.is_set():
                        self.stats.registration_failed += 1
                        return False
                except (CredentialsRefused, Refused) as exc:
                    # A bad or spent token, a taken name: no retry helps.
                    self.stats.registration_failed += 1
                    self.stats.error(_kind(exc))
                    return False
        data = response.json()
        self.agent_id = str(data["agentId"])
        self.token = str(data["token"])
        config = data.get("config") or {}
        self.interval = float(
            self.options.heartbeat_interval or config.get("heartbeatInterval") or 30
        )
        self.directory.mkdir(mode=0o700)
        key_file = self.directory / "key.pem"
        key_file.touch(mode=0o600)
        key_file.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._use_certificate(str(data["certificate"]["cert"]))
        self.stats.registered += 1
        return True

    async def _token(self) -> str | None:
        """A registration token, retried with backoff; None when refused or closing."""
        attempt = 0
        while not self.sim.closing.is_set():
            try:
                return await self.sim.tokens.take()
            except (httpx.HTTPError, ServerUnavailable) as exc:
                transient = isinstance(exc, ServerUnavailable)
                self.stats.error(_kind(exc) if transient else f"mint token {_kind(exc)}")
            except (CredentialsRefused, Refused) as exc:  # a wrong admin token
                self.stats.error(_kind(exc))
                return None
            await self.sim.sleep(backoff_delay(attempt, base=0.5, cap=30))
            attempt += 1
        return None

    def _use_certificate(self, pem: str) -> None:
        """Write the certificate, build this agent's context and a client that presents it."""
        cert_file = self.directory / "cert.pem"
        temp = self.directory / "cert.pem.tmp"
        temp.write_text(pem)
        temp.replace(cert_file)
        context = _verify_context(self.sim.ca_pem)
        context.load_cert_chain(str(cert_file), str(self.directory / "key.pem"))
        self.context = context
        if self.http is not None:
            self.retired.append(self.http)  # may carry a request in flight; closed at the end
        self.http = httpx.AsyncClient(
            base_url=self.options.server,
            verify=context,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=self.options.request_timeout,
            limits=httpx.Limits(
                max_connections=4,
                max_keepalive_connections=2,
                keepalive_expiry=self.options.keepalive,
            ),
        )

    # --- heartbeats -----------------------------------------------------------------------

    def _sleep_time(self) -> float:
        jitter = self.options.jitter
        return self.interval * random.uniform(1 - jitter, 1 + jitter)  # noqa: S311 - jitter

    async def _heartbeat_loop(self) -> None:
        body: dict[str, Any] = {
            "status": "healthy",
            "resourceUsage": {"cpu": 1.0, "memory": 10.0, "disk": 20.0},
        }
        if self.options.capabilities:
            body["capabilities"] = self.options.capabilities
        failures = 0
        while not self.sim.closing.is_set():
            body["runningTasks"] = len(self.handlers)
            assert self.http is not None
            started = time.perf_counter()
            try:
                response = await self.http.post(
                    f"{API}/agents/{self.agent_id}/heartbeat", json=body
                )
                _check(response, "heartbeat")
                answer = response.json()
            except CredentialsRefused:
                self.stats.heartbeat(time.perf_counter() - started, ok=False)
                raise
            except (httpx.HTTPError, ServerUnavailable, Refused, ValueError) as exc:
                self.stats.heartbeat(time.perf_counter() - started, ok=False)
                named = isinstance(exc, ServerUnavailable | Refused)
                self.stats.error(_kind(exc) if named else f"heartbeat {_kind(exc)}")
                # Retry soon, then back off, but never wait longer than the interval.
                delay = backoff_delay(failures, base=0.5, cap=self.interval)
                failures += 1
            else:
                self.stats.heartbeat(time.perf_counter() - started, ok=True)
                failures = 0
                for task in answer.get("tasks") or []:
                    self.accept(task)
                renewal = answer.get("certificateRenewal")
                if isinstance(renewal, dict) and renewal.get("cert"):
                    self._renew(str(renewal["cert"]))
                delay = self._sleep_time()
            await self.sim.sleep(delay)

    def _renew(self, pem: str) -> None:
        try:
            self._use_certificate(pem)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.stats.error(f"renewal {_kind(exc)}")
            return
        self.stats.renewals += 1

    # --- the task stream ------------------------------------------------------------------

    async def _stream_loop(self) -> None:
        url = self.options.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        attempt = 0
        while not self.sim.closing.is_set():
            try:
                async with connect(
                    f"{url}{API}/agents/{self.agent_id}/task-stream",
                    ssl=self.context if url.startswith("wss://") else None,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    open_timeout=self.options.request_timeout,
                    close_timeout=2,
                    max_size=8 * 1024 * 1024,
                ) as connection:
                    self.stats.stream_connects += 1
                    self.stats.streams_open += 1
                    attempt = 0
                    try:
                        await TaskStream(connection).run(self._on_message)
                    finally:
                        self.stats.streams_open -= 1
            except CredentialsRefused:
                raise
            except ServerUnavailable as exc:
                self.stats.error(str(exc)[:60])
            except Exception as exc:  # handshake refusals (InvalidStatus ...), network errors
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status in (401, 403):
                    raise CredentialsRefused(f"task stream {status}") from exc
                self.stats.error(f"task stream {_kind(exc)}")
            await self.sim.sleep(backoff_delay(attempt, base=1, cap=30))
            attempt += 1

    async def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "task_assigned" and isinstance(message.get("task"), dict):
            self.accept(message["task"])

    # --- tasks ----------------------------------------------------------------------------

    def accept(self, task: dict[str, Any]) -> None:
        task_id = task.get("taskId")
        if not isinstance(task_id, str) or task_id in self.seen:
            return
        self.seen.add(task_id)
        self.stats.tasks_received += 1
        handler = asyncio.create_task(self._complete(task_id))
        self.handlers.add(handler)
        self.sim.handlers.add(handler)
        handler.add_done_callback(self.handlers.discard)
        handler.add_done_callback(self.sim.handlers.discard)

    async def _complete(self, task_id: str) -> None:
        if self.options.task_seconds > 0:
            await asyncio.sleep(self.options.task_seconds)
        body = {"success": True, "result": SIMULATED_RESULT}
        for attempt in range(8):
            if self.dead:
                break
            assert self.http is not None
            try:
                response = await self.http.post(
                    f"{API}/agents/{self.agent_id}/tasks/{task_id}/complete", json=body
                )
                _check(response, "complete")
            except CredentialsRefused as exc:
                self._stop(_kind(exc))
                break
            except Refused as exc:  # 404/409: cancelled, timed out, not ours
                self.stats.error(_kind(exc))
                break
            except (httpx.HTTPError, ServerUnavailable) as exc:
                self.stats.error(
                    _kind(exc) if isinstance(exc, ServerUnavailable) else f"complete {_kind(exc)}"
                )
                await asyncio.sleep(backoff_delay(attempt, base=0.5, cap=10))
                continue
            self.stats.tasks_completed += 1
            return
        self.stats.tasks_failed += 1


class Simulation:
    """The fleet, its shared clients, the reporter and the stop logic."""

    def __init__(self, options: SimOptions, *, out: TextIO = sys.stderr) -> None:
        self.options = options
        self.out = out
        self.stats = Stats(agents=options.agents)
        self.closing = asyncio.Event()
        self.register_slots = asyncio.Semaphore(max(1, options.register_concurrency))
        self.handlers: set[asyncio.Task[None]] = set()
        if options.token_file is None and not options.admin_token:
            raise SimulationError("registration tokens: give --token-file or --admin-token")
        tokens = (
            read_token_file(options.token_file, options.agents)
            if options.token_file is not None
            else None
        )
        try:
            self.ca_pem = options.ca_file.read_text() if options.ca_file else None
            verify = _verify_context(self.ca_pem)
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise SimulationError(f"cannot use the CA file {options.ca_file}: {exc}") from exc
        limits = httpx.Limits(max_connections=max(1, options.register_concurrency))
        self.public = httpx.AsyncClient(
            base_url=options.server, verify=verify, timeout=options.request_timeout, limits=limits
        )
        self.operator: httpx.AsyncClient | None = None
        if tokens is None:
            self.operator = httpx.AsyncClient(
                base_url=options.server,
                verify=verify,
                headers={"Authorization": f"Bearer {options.admin_token}"},
                timeout=options.request_timeout,
                limits=limits,
            )
        self.tokens = TokenSource(tokens, self.operator)
        # Each agent's key and certificate files (load_cert_chain reads files); 0700.
        self._temp = tempfile.TemporaryDirectory(prefix="stella-simulate-")
        self.work_dir = Path(self._temp.name)

    async def sleep(self, seconds: float) -> None:
        """Sleep, or return early when the simulation is closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    async def _report_loop(self) -> None:
        while not self.closing.is_set():
            await self.sleep(self.options.report_every)
            print(self.stats.line(), file=self.out, flush=True)

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        _raise_open_files_limit(self.options.agents * (3 if self.options.stream else 2) + 64)
        start = self.options.start_index
        agents = [SimAgent(self, start + index) for index in range(self.options.agents)]
        runs = [asyncio.create_task(agent.run()) for agent in agents]
        reporter = asyncio.create_task(self._report_loop())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.duration)
        finally:
            self.closing.set()
            # Tasks already received are completed, within the grace.
            if self.handlers:
                await asyncio.wait(set(self.handlers), timeout=self.options.shutdown_grace)
            for handler in self.handlers:
                handler.cancel()
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, reporter, return_exceptions=True)
            for agent in agents:
                await agent.aclose()
            await self.aclose()
        return self.stats.summary()

    async def aclose(self) -> None:
        """Close the shared clients and remove the agents' key files."""
        await self.public.aclose()
        if self.operator is not None:
            await self.operator.aclose()
        self._temp.cleanup()


def _raise_open_files_limit(wanted: int) -> None:
    """Each agent keeps a connection (two with a stream): lift the soft limit if we can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def simulate(
    options: SimOptions, *, out: TextIO = sys.stderr, install_signals: bool = True
) -> dict[str, Any]:
    """Run the fleet until `duration` or SIGINT/SIGTERM; the final summary."""
    simulation = Simulation(options, out=out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if install_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        return await simulation.run(stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


__all__ = [
    "Histogram",
    "SimOptions",
    "SimulationError",
    "Stats",
    "format_summary",
    "read_token_file",
    "simulate",
]
