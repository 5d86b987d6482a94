"""Goal 6: registrations with a CSR, at least 500 a second.

Everything a client would do ahead of time is done before the clock
starts: single-use tokens are minted through `app.tokens.service` (the
operator API would only add its own round trips), and each agent's P-256
key and CSR are made client-side, into ready request bodies. The bodies
are then fired from a fixed number of keep-alive connections at
`stella serve --tls --workers 2`, and the same bodies at the ceiling's
register endpoint (parses the body, answers a fixed 201).

A second figure opens a fresh TLS connection per registration, as
distinct agents do when they arrive; it shows what the handshakes cost
on top, against the ceiling served the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from app.db import transaction
from app.models import Agent
from app.tokens import service as tokens_service
from bench.http1 import Connection
from bench.results import Check, ScenarioResult
from bench.servers import web_and_ceiling
from bench.stack import BenchStack

NAME = "registration"
TITLE = "Registration with a CSR"
CONCURRENCY = 32  # connections in flight, as many agents arriving at once
WARMUP = 64  # per server: pools filled, code paths warm, before the clock starts
PATH = "/api/v1/agents/register"


@dataclass(frozen=True)
class Registration:
    token: str
    body: bytes


@dataclass(frozen=True)
class Burst:
    """What one burst of registrations achieved."""

    per_s: float
    failures: int
    first_failure: str
    sample: tuple[Registration, bytes] | None  # one accepted registration and its answer


def run(stack: BenchStack, *, quick: bool) -> ScenarioResult:
    count = 400 if quick else 3000
    fresh_count = 100 if quick else 1000
    total = 2 * WARMUP + count + fresh_count
    registrations = _prepare(stack, total)
    warm, keep_alive, fresh = (
        registrations[: 2 * WARMUP],
        registrations[2 * WARMUP : 2 * WARMUP + count],
        registrations[2 * WARMUP + count :],
    )

    # The ceiling spends no token, so it sees exactly the bodies Stella does;
    # each burst goes to the ceiling then to Stella, so both share the noise.
    with web_and_ceiling(stack) as (web, ceiling):
        _fire(ceiling.url, stack, warm[:WARMUP], fresh_tls=False)
        warmed = _fire(web.url, stack, warm[WARMUP:], fresh_tls=False)
        ceiling_keep = _fire(ceiling.url, stack, keep_alive, fresh_tls=False)
        measured = _fire(web.url, stack, keep_alive, fresh_tls=False)
        ceiling_fresh = _fire(ceiling.url, stack, fresh, fresh_tls=True)
        measured_fresh = _fire(web.url, stack, fresh, fresh_tls=True)

    notes = [
        f"{count} registrations from {CONCURRENCY} keep-alive connections, then {fresh_count} "
        f"with one new TLS connection each; P-256 CSRs made beforehand; "
        f"ceiling: the same bodies to a bare FastAPI register endpoint."
    ]
    failures = warmed.failures + measured.failures + measured_fresh.failures
    if failures:
        first = next(b.first_failure for b in (warmed, measured, measured_fresh) if b.failures)
        notes.append(f"{failures} registrations were refused, first: {first}")
    ceiling_failures = ceiling_keep.failures + ceiling_fresh.failures
    if ceiling_failures:
        notes.append(f"the ceiling refused {ceiling_failures} registrations")
    if measured.sample is not None and not _certifies_csr(*measured.sample):
        notes.append("a registration was answered with a certificate for another key")
    registered = _registered(stack)
    expected = WARMUP + count + fresh_count  # the ceiling registers nobody
    if registered != expected - failures:
        notes.append(f"{registered} agents in the database, {expected - failures} expected")
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        figures={
            "registrations_per_s": measured.per_s,
            "registrations_per_s_fresh_tls": measured_fresh.per_s,
            "registration_failures": float(failures),
        },
        # Not met yet (README): quick mode guards what main does now.
        checks=[
            Check("registrations_per_s", 500, higher_is_better=True, unit="/s", quick_goal=150)
        ],
        ceiling={
            "registrations_per_s": ceiling_keep.per_s,
            "registrations_per_s_fresh_tls": ceiling_fresh.per_s,
        },
        notes=notes,
    )


# --- preparation ---------------------------------------------------------------------------


def _prepare(stack: BenchStack, count: int) -> list[Registration]:
    """`count` fresh tokens, each with the body of a distinct agent and its CSR."""
    with transaction(stack.engine) as session:
        tokens = [
            tokens_service.create_token(session=session, settings=stack.settings)[0]
            for _ in range(count)
        ]
    stamp = time.time_ns()
    registrations = []
    for index, token in enumerate(tokens):
        name = f"reg-{stamp}-{index:05d}"
        body = {
            "name": name,
            "version": "bench",
            "capabilities": ["docker", "compose"],
            "labels": {"bench": "registration"},
            "csr": _csr(name),
        }
        registrations.append(Registration(token, json.dumps(body).encode()))
    return registrations


def _csr(name: str) -> str:
    """A P-256 key's PKCS#10 request, as the reference agent makes it."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def _certifies_csr(registration: Registration, answer: bytes) -> bool:
    """The answer certifies the CSR's key and hands out no private key."""
    csr = x509.load_pem_x509_csr(json.loads(registration.body)["csr"].encode())
    certificate = json.loads(answer)["certificate"]
    issued = x509.load_pem_x509_certificate(certificate["cert"].encode())
    return "key" not in certificate and issued.public_key() == csr.public_key()


def _registered(stack: BenchStack) -> int:
    with transaction(stack.engine) as session:
        return int(session.execute(select(func.count()).select_from(Agent)).scalar_one())


# --- load ----------------------------------------------------------------------------------


def _fire(url: str, stack: BenchStack, work: list[Registration], *, fresh_tls: bool) -> Burst:
    return asyncio.run(_burst(url, stack, work, fresh_tls=fresh_tls))


async def _burst(
    url: str, stack: BenchStack, work: list[Registration], *, fresh_tls: bool
) -> Burst:
    """Every registration of `work` through CONCURRENCY connections; the rate achieved."""
    context = stack.server_context()
    headers = {"Content-Type": "application/json"}
    connections = [Connection(url, context, headers) for _ in range(CONCURRENCY)]
    if not fresh_tls:
        # Handshakes before the clock: this figure is the registrations alone.
        await asyncio.gather(*(connection.connect() for connection in connections))
    queue = iter(work)
    failures: list[str] = []
    accepted: list[tuple[Registration, bytes]] = []

    async def client(connection: Connection) -> None:
        for item in queue:
            response = await connection.request(
                "POST", PATH, item.body, headers={"X-Agent-Token": item.token}
            )
            if fresh_tls:
                await connection.close()
            if response.status != 201:
                failures.append(f"{response.status} {response.body[:200]!r}")
            elif not accepted:
                accepted.append((item, response.body))

    started = time.perf_counter()
    await asyncio.gather(*(client(connection) for connection in connections))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(connection.close() for connection in connections))
    return Burst(
        per_s=len(work) / elapsed,
        failures=len(failures),
        first_failure=failures[0] if failures else "",
        sample=accepted[0] if accepted else None,
    )
