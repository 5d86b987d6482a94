"""Verdicts of agent authentication, kept per process so that a heartbeat costs no crypto.

Verifying an agent's JWT and client certificate costs two ECDSA checks
(~0.2 ms each), on every request, for credentials that change about once a
day. What is kept, bounded (oldest out first):

- tokens whose signature and claims verified, with their claims: a
  signature stays valid, so this needs no invalidation;
- certificates that verified against our CA, with their identity; the
  validity window is checked again on every use, so a kept certificate
  still expires on time;
- which agents are registered, with their key and the status last written
  for them (the heartbeat path only):
  this one changes, so it is dropped at once when the agent is deleted
  (`forget`, from the fleet events), entirely when events may have been
  missed (`forget_all`), and whenever a write-behind flush finds the agent
  gone.

Credential checks only add entries (atomic dict operations); the
registrations take a lock, since the web process that deletes an agent
forgets it from a worker thread, before the deletion is even answered.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.auth.agent_token import AgentClaims, AgentTokenSigner, InvalidAgentToken
from app.auth.client_cert import MalformedCertificate, load_certificate
from app.errors import Unauthorized
from pki import CertificateAuthority, CertificateRejected, ClientIdentity, verify_client_certificate


@dataclass(frozen=True)
class Registration:
    """What the heartbeat path knows of a registered agent."""

    key_thumbprint: str
    status: str


@dataclass(frozen=True)
class _Certified:
    identity: ClientIdentity
    not_before: dt.datetime


K = TypeVar("K")
V = TypeVar("V")


class _Bounded(Generic[K, V]):
    """A dict that forgets its oldest entries beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self.entries.get(key)

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = value
        while len(self.entries) > self.capacity:
            self.entries.pop(next(iter(self.entries)), None)


class AgentAuthCache:
    """Memoized credential checks, and the registered agents the heartbeat path knows."""

    def __init__(
        self, *, ca: CertificateAuthority, signer: AgentTokenSigner, capacity: int
    ) -> None:
        self._ca = ca
        self._signer = signer
        self._tokens: _Bounded[str, AgentClaims] = _Bounded(capacity)
        self._certificates: _Bounded[str, _Certified] = _Bounded(capacity)
        self._registered: _Bounded[uuid.UUID, Registration] = _Bounded(capacity)
        self._lock = threading.Lock()
        # Bumped by every forget: a lookup that started before one must not
        # put back what it read.
        self.epoch = 0

    # --- credentials (pure: the same verdict every time) -------------------------------------

    def check(
        self, token: str | None, certificate_pem: str | None, now: dt.datetime
    ) -> ClientIdentity:
        """The identity both credentials name; 401 when either is missing, bad or mismatched."""
        if not token:
            raise Unauthorized("agent token required (Authorization: Bearer ...)")
        claims = self._claims(token)
        if certificate_pem is None:
            raise Unauthorized("client certificate required (mutual TLS)")
        identity = self._identity(certificate_pem, now)
        if identity.agent_id != claims.agent_id or identity.key_thumbprint != claims.key_thumbprint:
            raise Unauthorized("client certificate and token belong to different agents")
        return identity

    def _claims(self, token: str) -> AgentClaims:
        claims = self._tokens.get(token)
        if claims is None:
            try:
                claims = self._signer.verify(token)
            except InvalidAgentToken as exc:
                raise Unauthorized("agent token is invalid") from exc
            self._tokens.put(token, claims)
        return claims

    def _identity(self, pem: str, now: dt.datetime) -> ClientIdentity:
        certified = self._certificates.get(pem)
        if certified is None:
            try:
                certificate = load_certificate(pem)
                identity = verify_client_certificate(self._ca, certificate, now=now)
            except MalformedCertificate as exc:
                raise Unauthorized(str(exc)) from exc
            except CertificateRejected as exc:
                raise Unauthorized(f"client certificate rejected: {exc}") from exc
            certified = _Certified(identity, certificate.not_valid_before_utc)
            self._certificates.put(pem, certified)
        elif not certified.not_before <= now <= certified.identity.not_after:
            raise Unauthorized(
                "client certificate rejected: certificate is expired or not yet valid"
            )
        return certified.identity

    # --- registrations (change: kept in step with the fleet events) -------------------------

    def registration(self, agent_id: uuid.UUID) -> Registration | None:
        """The agent's registration, if known here (None: ask the database)."""
        return self._registered.get(agent_id)

    def remember(self, agent_id: uuid.UUID, registration: Registration, *, epoch: int) -> None:
        """Record a registration read from the database when `epoch` was current."""
        with self._lock:
            if epoch == self.epoch:
                self._registered.put(agent_id, registration)

    def forget(self, agent_id: uuid.UUID) -> None:
        with self._lock:
            self.epoch += 1
            self._registered.entries.pop(agent_id, None)

    def forget_all(self) -> None:
        with self._lock:
            self.epoch += 1
            self._registered.entries.clear()
