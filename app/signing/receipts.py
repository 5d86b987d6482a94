"""Receipts: an agent's signed account of how it ended a task.

The agent signs, with the key its certificate certifies, the canonical JSON
`{"v": 1, "taskId", "agentId", "outcome", "resultDigest", "logsDigest",
"startedAt", "finishedAt"}` and sends it with its completion. Here it is
checked against the agent's certified key and the completion it came with
(a bad one is a 422), then kept with the certificate of that moment, so that
anyone holding the CA certificate can check it later without this server.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from sqlmodel import Session

from app.db import insert_ignoring_conflicts
from app.errors import InvalidInput, NotFound
from app.models import Agent, TaskReceipt
from app.signing.canonical import digest
from app.signing.schemas import ReceiptIn, ReceiptView
from pki import AgentPublicKey, load_public_key_pem

RECEIPT_VERSION = 1
_FIELDS = ("taskId", "agentId", "outcome", "resultDigest", "logsDigest", "startedAt", "finishedAt")


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def algorithm_for(key: AgentPublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256"  # ECDSA with SHA-256, DER-encoded signature
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    return "RS256"  # PKCS#1 v1.5 with SHA-256


def signature_verifies(key: AgentPublicKey, signature: bytes, signed: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signed)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


def parse_signed(signed: bytes) -> dict[str, Any]:
    """The receipt's fields from its signed bytes; ValueError when they are not a receipt."""
    fields = json.loads(signed)
    if not isinstance(fields, dict) or fields.get("v") != RECEIPT_VERSION:
        raise ValueError("not a version 1 receipt")
    for name in _FIELDS:
        if not isinstance(fields.get(name), str):
            raise ValueError(f"{name} is missing")
    return fields


def verify(
    *,
    agent: Agent,
    task_id: uuid.UUID,
    success: bool,
    result: dict[str, Any] | None,
    receipt: ReceiptIn,
) -> TaskReceipt:
    """The receipt as it will be kept, once it proves to be this agent's account of this
    completion; 422 otherwise."""
    try:
        signed = b64decode(receipt.signed)
        signature = b64decode(receipt.signature)
        fields = parse_signed(signed)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"receipt is malformed: {type(exc).__name__}") from exc
    key = load_public_key_pem(agent.public_key_pem)
    if receipt.alg != algorithm_for(key):
        raise InvalidInput(f"receipt algorithm {receipt.alg!r} does not fit the agent's key")
    if not signature_verifies(key, signature, signed):
        raise InvalidInput("receipt signature does not verify with the agent's certified key")
    outcome = "succeeded" if success else "failed"
    mismatches = [
        name
        for name, expected in (
            ("taskId", str(task_id)),
            ("agentId", str(agent.id)),
            ("outcome", outcome),
            ("resultDigest", digest(result)),
        )
        if fields[name] != expected
    ]
    if mismatches:
        raise InvalidInput(f"receipt does not match the completion: {', '.join(mismatches)}")
    return TaskReceipt(
        task_id=task_id,
        agent_id=agent.id,
        signed=receipt.signed,
        signature=receipt.signature,
        algorithm=receipt.alg,
        certificate_pem=agent.cert_pem,
    )


def store(*, session: Session, receipt: TaskReceipt) -> None:
    """Keep the receipt; a repeated completion keeps the first one."""
    insert_ignoring_conflicts(
        session,
        TaskReceipt,
        [receipt.model_dump()],
        conflict_columns=("task_id",),
        returning=("task_id",),
    )


def view(*, session: Session, task_id: uuid.UUID, ca_pem: str) -> ReceiptView:
    """The receipt with the certificates that prove it; 404 when the task has none."""
    row = session.get(TaskReceipt, task_id)
    if row is None:
        raise NotFound(f"task {task_id} has no receipt")
    return ReceiptView(
        task_id=row.task_id,
        agent_id=row.agent_id,
        receipt=json.loads(b64decode(row.signed)),
        signed=row.signed,
        signature=row.signature,
        algorithm=row.algorithm,
        certificate=row.certificate_pem,
        ca_certificate=ca_pem,
        received_at=row.received_at,
    )
