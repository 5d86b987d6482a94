"""The server's signature on a task, made once when the task is created."""

from __future__ import annotations

import uuid
from typing import Any

from app.signing.canonical import task_signing_input
from app.signing.schemas import PublishedKey
from pki.task_signing import ALGORITHM, TaskSigningKeyring, b64url


def sign_task(
    keyring: TaskSigningKeyring,
    *,
    task_id: uuid.UUID,
    agent_id: uuid.UUID,
    task_type: str,
    payload: dict[str, Any],
    timeout: int,
) -> dict[str, str]:
    """`{"alg", "kid", "value"}`: the detached signature a delivery carries."""
    key = keyring.signing_key()
    message = task_signing_input(
        task_id=task_id,
        agent_id=agent_id,
        task_type=task_type,
        payload=payload,
        timeout=timeout,
        kid=key.kid,
    )
    return {"alg": ALGORITHM, "kid": key.kid, "value": b64url(key.key.sign(message))}


def published_keys(keyring: TaskSigningKeyring) -> list[PublishedKey]:
    """The public keys agents should accept now (registration answer, key endpoint)."""
    return [PublishedKey.model_validate(key) for key in keyring.published()]
