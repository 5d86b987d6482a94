"""Agent JWTs: ES256, signed with the PKI directory's signing key.

A token is bound to the agent's public key (`cnf.jkt`, RFC 7638), not to a
certificate, so that renewals keep it valid; on its own it is worthless,
because every agent call must also present a certificate for that key. It
carries no expiry: it is revoked by deleting the agent, which every request
checks against the database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from pki import jwk_thumbprint

ISSUER = "stella"
AUDIENCE = "stella-agent"
ALGORITHM = "ES256"


@dataclass(frozen=True)
class AgentClaims:
    agent_id: uuid.UUID
    key_thumbprint: str


class InvalidAgentToken(Exception):
    """The token is not one we issued to an agent, or was tampered with."""


class AgentTokenSigner:
    """Signs and verifies agent tokens with one ES256 key (its thumbprint is the `kid`)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self._public_key = key.public_key()
        self.key_id = jwk_thumbprint(self._public_key)

    def issue(self, *, agent_id: uuid.UUID, key_thumbprint: str, issued_at: int) -> str:
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": str(agent_id),
            "iat": issued_at,
            "jti": uuid.uuid4().hex,
            "cnf": {"jkt": key_thumbprint},
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.key_id})

    def verify(self, token: str) -> AgentClaims:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("kid") != self.key_id:
                raise InvalidAgentToken("token was signed with an unknown key")
            # Exactly one algorithm: no `none`, no HS256-with-the-public-key confusion.
            claims = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["sub", "iss", "aud", "iat", "cnf"]},
            )
            agent_id = uuid.UUID(claims["sub"])
            thumbprint = claims["cnf"]["jkt"]
        except (jwt.PyJWTError, ValueError, KeyError, TypeError) as exc:
            raise InvalidAgentToken("token is invalid") from exc
        if not isinstance(thumbprint, str):
            raise InvalidAgentToken("token is not bound to a key")
        return AgentClaims(agent_id=agent_id, key_thumbprint=thumbprint)
