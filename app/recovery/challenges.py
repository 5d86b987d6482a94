"""Recovery challenges: made and checked with a MAC, stored only once spent.

A challenge is `<expires>.<nonce>.<mac>`: the MAC (HMAC-SHA256, under a key
derived from the installation's credentials key) binds the expiry, the nonce
and the agent's id, so a challenge is good for one agent only, for
CHALLENGE_TTL, and cannot be forged. Asking for one writes nothing, so
nobody can flood the database through the unauthenticated endpoint, nor
spoil an agent's challenge by asking for another in its name; redeeming one
stores its nonce (`recovery_challenges`, unique), so each is spent once.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.errors import Unauthorized

CHALLENGE_TTL = dt.timedelta(seconds=60)
# Key separation: the credentials key itself never signs anything.
_KEY_INFO = b"stella recovery challenges v1"
_MAC_BYTES = 16


@dataclass(frozen=True)
class OpenedChallenge:
    nonce: str
    expires_at: dt.datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ChallengeCodec:
    def __init__(self, secret: bytes) -> None:
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(
            secret
        )

    def _mac(self, agent_id: uuid.UUID, body: str) -> str:
        digest = hmac.new(self._key, f"{agent_id}.{body}".encode(), hashlib.sha256).digest()
        return _b64(digest[:_MAC_BYTES])

    def issue(self, agent_id: uuid.UUID, now: dt.datetime) -> tuple[str, dt.datetime]:
        """A new challenge for `agent_id`, and when it expires (whole seconds)."""
        expires_at = (now + CHALLENGE_TTL).replace(microsecond=0)
        body = f"{int(expires_at.timestamp())}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._mac(agent_id, body)}", expires_at

    def open(self, agent_id: uuid.UUID, challenge: str, now: dt.datetime) -> OpenedChallenge:
        """The challenge's nonce and expiry; 401 unless it was made here, for this agent, and
        is still valid."""
        expires, _, rest = challenge.partition(".")
        nonce, _, mac = rest.partition(".")
        body = f"{expires}.{nonce}"
        if not (expires.isdigit() and nonce and mac):
            raise Unauthorized("the challenge is not one this server made: ask for a new one")
        if not hmac.compare_digest(mac, self._mac(agent_id, body)):
            raise Unauthorized(
                "the challenge was not made for this agent by this server: ask for a new one"
            )
        try:
            expires_at = dt.datetime.fromtimestamp(int(expires), tz=dt.UTC)
        except (OverflowError, ValueError, OSError) as exc:
            raise Unauthorized("the challenge is malformed: ask for a new one") from exc
        if expires_at <= now:
            raise Unauthorized("the challenge expired: ask for a new one")
        return OpenedChallenge(nonce=nonce, expires_at=expires_at)
