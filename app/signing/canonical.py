"""The byte encodings that are signed, identical in the agent (`agent/signatures.py`).

Canonical JSON: keys sorted, no spaces, ASCII only, no NaN; a float with an
integral value is written as the integer (PostgreSQL's JSONB gives 1e3 back
as 1000, so the stored payload and the signed one must agree on it).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

TASK_CONTEXT = b"stella-task-v1\n"


def _normal(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        _normal(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def digest(value: Any) -> str:
    """`sha256:<hex>` of the canonical JSON of `value` (a receipt's result digest)."""
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()


def task_signing_input(
    *,
    task_id: uuid.UUID | str,
    agent_id: uuid.UUID | str,
    task_type: str,
    payload: dict[str, Any],
    timeout: int,
    kid: str,
) -> bytes:
    """What the server signs for a task: never its credentials (see README)."""
    body = {
        "agentId": str(uuid.UUID(str(agent_id))),
        "kid": kid,
        "payload": payload,
        "taskId": str(uuid.UUID(str(task_id))),
        "taskType": task_type,
        "timeout": int(timeout),
    }
    return TASK_CONTEXT + canonical_json(body)
