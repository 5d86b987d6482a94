"""Shared pieces of the signing tests: checking a task's signature, making receipts."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.signatures import b64decode, b64url, canonical_json, digest, task_signing_input


def signature_holds(task: dict[str, Any], agent_id: str, keys: list[dict[str, Any]]) -> bool:
    """Whether the delivered `task` verifies with one of the published `keys`."""
    signature = task.get("signature")
    if not isinstance(signature, dict):
        return False
    for key in keys:
        if key["kid"] == signature["kid"]:
            public = ed25519.Ed25519PublicKey.from_public_bytes(b64decode(key["publicKey"]))
            try:
                public.verify(
                    b64decode(signature["value"]),
                    task_signing_input(task, agent_id=agent_id, kid=signature["kid"]),
                )
            except InvalidSignature:
                return False
            return True
    return False


def make_receipt(
    key_pem: str,
    *,
    task_id: str,
    agent_id: str,
    outcome: str = "succeeded",
    result: Any = None,
    alg: str = "ES256",
    **overrides: Any,
) -> dict[str, str]:
    """A receipt as the reference agent signs it, with `overrides` in the signed fields."""
    fields = {
        "v": 1,
        "taskId": task_id,
        "agentId": agent_id,
        "outcome": outcome,
        "resultDigest": digest(result),
        "logsDigest": digest([]),
        "startedAt": "2026-11-30T06:00:00+00:00",
        "finishedAt": "2026-11-30T06:00:05+00:00",
        **overrides,
    }
    signed = canonical_json(fields)
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return {
        "alg": alg,
        "signed": b64url(signed),
        "signature": b64url(key.sign(signed, ec.ECDSA(hashes.SHA256()))),
    }
