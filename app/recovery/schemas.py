"""Bodies of the recovery endpoints (the answer of a recovery is a registration's shape)."""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import StringConstraints

from app.schemas import ApiModel, Timestamp


class RecoveryChallengeIssued(ApiModel):
    agent_id: uuid.UUID
    # Sign `stella-cert-recovery:<agentId>:<challenge>` (UTF-8) with the agent's key.
    challenge: str
    expires_at: Timestamp


class RecoveryRequest(ApiModel):
    challenge: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    # base64url (padding optional) of the signature: ECDSA with SHA-256 (DER),
    # Ed25519, or RSA PKCS#1 v1.5 with SHA-256, by the certified key's type.
    signature: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    # Optional PEM PKCS#10 for the same key: checked, and nothing else taken from it.
    csr: Annotated[str, StringConstraints(max_length=16 * 1024)] | None = None
