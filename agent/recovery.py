"""Lockout-proof renewal, the agent's side: re-certified by proof of possession of its key.

An agent whose certificate expired (its host was off through the renewal
window) can make no mTLS call. Where the server allows it
(STELLA_CERT_GRACE), it asks `POST /agents/{id}/recover/challenge` without a
client certificate, signs `stella-cert-recovery:<agentId>:<challenge>` with
its key (ECDSA P-256, SHA-256) and redeems it at `POST /agents/{id}/recover`:
the answer, a new certificate for the same key and a new JWT, is stored in
the state directory as a renewal would be.

`ensure_certificate` runs at start, before anything else; `renew_if_lapsed`
before each heartbeat, for a certificate that lapsed while the agent ran
(the server unreachable through the whole renewal window). A refusal for
good (grace off, expired longer than the grace, the agent deleted) raises
`LockedOut`: the agent stops with a clear error and exit code 2, since no
retry can help; it must be registered again with a new token. An
unreachable server is retried with backoff.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import logging
import random
from typing import TYPE_CHECKING, Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.client import API, AgentError, CredentialsRefused, ServerUnavailable, tls_context
from agent.state import Identity, StateDir, atomic_write

if TYPE_CHECKING:
    from agent.runner import Options, Runner

log = logging.getLogger("stella.agent")

# A certificate this close to its end is treated as expired: the next call
# could be refused mid-flight, and our clock may run behind the server's.
EXPIRY_MARGIN = dt.timedelta(seconds=5)
# Refusals that are not for good (a challenge expired or used meanwhile) are
# retried this many times before the agent gives up.
MAX_REFUSALS = 3


class LockedOut(CredentialsRefused):
    """The server will not re-certify this agent: it must register again."""


def certificate_expiry(state: StateDir) -> dt.datetime:
    certificate = x509.load_pem_x509_certificate(state.cert_file.read_bytes())
    return certificate.not_valid_after_utc


def expired(state: StateDir, now: dt.datetime | None = None) -> bool:
    """Whether the stored certificate has expired (or is about to, within the margin)."""
    now = now or dt.datetime.now(dt.UTC)
    return certificate_expiry(state) <= now + EXPIRY_MARGIN


def signed_message(agent_id: str, challenge: str) -> bytes:
    return f"stella-cert-recovery:{agent_id}:{challenge}".encode()


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail") if isinstance(body, dict) else body)[:500]


def _check(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.is_success:
        data: dict[str, Any] = response.json()
        return data
    detail = f"{what}: {response.status_code} {_problem(response)}"
    if response.status_code in (403, 404):
        raise LockedOut(f"locked out: {detail}")
    if response.status_code >= 500 or response.status_code == 429:
        raise ServerUnavailable(detail)
    raise AgentError(detail)


async def recover(*, server: str, state: StateDir, identity: Identity) -> Identity:
    """One run of the challenge flow; the identity with its new JWT (certificate stored)."""
    key = state.load_or_create_key()
    server_ca = state.server_ca_file if state.server_ca_file.exists() else None
    path = f"{API}/agents/{identity.agent_id}"
    # No client certificate: ours has expired, and the handshake would refuse it.
    async with httpx.AsyncClient(
        base_url=server, verify=tls_context(server_ca), timeout=30
    ) as client:
        try:
            issued = _check(await client.post(f"{path}/recover/challenge"), "recovery challenge")
            challenge = str(issued["challenge"])
            signature = key.sign(
                signed_message(identity.agent_id, challenge), ec.ECDSA(hashes.SHA256())
            )
            body = {
                "challenge": challenge,
                "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
                "csr": state.csr_pem(key, identity.name),
            }
            answer = _check(await client.post(f"{path}/recover", json=body), "recovery")
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"recovery: {exc!r}") from exc
    certificate = answer["certificate"]
    state.replace_certificate(str(certificate["cert"]))  # refuses one for another key
    atomic_write(state.ca_file, str(certificate["ca"]))
    token = str(answer["token"])
    atomic_write(state.token_file, token)
    log.info("certificate recovered; valid until %s", certificate.get("expiresAt"))
    return dataclasses.replace(identity, token=token)


async def ensure_certificate(options: Options, state: StateDir, identity: Identity) -> Identity:
    """At start: recover a certificate that expired while the agent was away.

    Returns the identity to run with; raises `LockedOut` when the server
    refuses for good. Retries an unreachable server with backoff.
    """
    if not expired(state):
        return identity
    log.warning(
        "certificate expired at %s: asking the server to re-certify this agent's key",
        certificate_expiry(state).isoformat(),
    )
    attempt = refusals = 0
    while True:
        try:
            return await recover(server=options.server, state=state, identity=identity)
        except LockedOut:
            raise
        except ServerUnavailable as exc:
            log.warning("recovery failed, will retry: %s", exc)
        except AgentError as exc:
            refusals += 1
            if refusals >= MAX_REFUSALS:
                raise LockedOut(f"locked out: {exc}") from exc
            log.warning("recovery refused, will retry: %s", exc)
        ceiling = min(options.backoff_max, 2.0 ** min(attempt, 30))
        attempt += 1
        await asyncio.sleep(random.uniform(ceiling / 2, ceiling))  # noqa: S311 - jitter


async def renew_if_lapsed(runner: Runner) -> None:
    """While running: recover a certificate that lapsed (no renewal reached us in time).

    `LockedOut` stops the agent (it is a `CredentialsRefused`); an unreachable
    server is left to the next heartbeat.
    """
    if not expired(runner.state):
        return
    log.warning("certificate expired while running: recovering it")
    try:
        identity = await recover(
            server=runner.options.server, state=runner.state, identity=runner.identity
        )
    except LockedOut:
        raise
    except AgentError as exc:
        log.warning("recovery failed, will retry: %s", exc)
        return
    runner.identity = identity
    runner.client.identity = identity
    runner.client.reload_tls()
