"""Signed tasks and signed receipts: the agent's side.

Tasks. The server signs every task it hands over with Ed25519, detached:
`task["signature"] = {"alg": "Ed25519", "kid", "value"}` over
`b"stella-task-v1\\n" + canonical JSON {agentId, kid, payload, taskId,
taskType, timeout}` (never the credentials, which travel only over this
agent's TLS channel). The agent pins the public keys its registration answer
listed (`taskSigningKeys`, kept in `task-signing-keys.json`), and learns of
a new key only from `GET /agents/{id}/task-signing-keys` over its own
mutual-TLS channel, which it asks when a task names a key it does not hold.
A task that is unsigned, signed by no announced key, or altered is not run:
it is completed as failed, "task signature invalid: ...".

Receipts. With each completion the agent sends a receipt signed with its own
key (the one its certificate certifies): base64url of the canonical JSON
`{"v": 1, "taskId", "agentId", "outcome", "resultDigest", "logsDigest",
"startedAt", "finishedAt"}` and its ECDSA P-256/SHA-256 signature (DER).
`resultDigest` is `sha256:<hex>` of the canonical JSON of the result (null
when none); `logsDigest` the SHA-256 of every log line the task produced, each
line's canonical JSON followed by a newline, in order.

The encodings match the server's (`app/signing/canonical.py`), which this
package does not import.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.state import StateDir, atomic_write

log = logging.getLogger("stella.agent")

KEYS_FILE = "task-signing-keys.json"
TASK_CONTEXT = b"stella-task-v1\n"
INVALID = "task signature invalid"

# Fetches the server's current keys over mTLS: a list, or None when the
# server signs no tasks (a server older than signed tasks: 404).
KeyFetcher = Callable[[], Awaitable[list[dict[str, Any]] | None]]


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
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def task_signing_input(task: dict[str, Any], *, agent_id: str, kid: str) -> bytes:
    body = {
        "agentId": str(uuid.UUID(agent_id)),
        "kid": kid,
        "payload": task.get("payload") or {},
        "taskId": str(uuid.UUID(str(task["taskId"]))),
        "taskType": task["taskType"],
        "timeout": int(task["timeout"]),
    }
    return TASK_CONTEXT + canonical_json(body)


class LogDigest:
    """SHA-256 over every log line of a task, as the receipt states it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, line: dict[str, str]) -> None:
        self._hash.update(canonical_json(line) + b"\n")

    def value(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    @classmethod
    def of(cls, lines: Any) -> LogDigest:
        """The digest of the lines a completion body carries (an outcome settled after a
        restart: the lines the agent saw before are gone with its previous run)."""
        digest = cls()
        for line in lines if isinstance(lines, list) else []:
            if isinstance(line, dict):
                digest.add(line)
        return digest


class TaskSignatures:
    """Checks tasks against the pinned server keys; signs this agent's receipts."""

    def __init__(self, state: StateDir, agent_id: str, fetch: KeyFetcher) -> None:
        self.state = state
        self.agent_id = agent_id
        self.fetch = fetch
        self.path = state.path / KEYS_FILE

    @staticmethod
    def pin(state: StateDir, keys: Any) -> None:
        """Keep the keys a registration (or the key endpoint) announced."""
        if isinstance(keys, list):
            atomic_write(state.path / KEYS_FILE, json.dumps({"keys": keys}, indent=2) + "\n")

    def pinned(self) -> dict[str, ed25519.Ed25519PublicKey] | None:
        """kid → key, or None when no key was ever pinned."""
        try:
            entries = json.loads(self.path.read_text())["keys"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s is unreadable (%s): every task will be refused", self.path, exc)
            return {}
        return _keys(entries)

    async def _refresh(self) -> dict[str, ed25519.Ed25519PublicKey] | None:
        keys = await self.fetch()
        if keys is None:
            return None
        self.pin(self.state, keys)
        return _keys(keys)

    async def problem(self, task: dict[str, Any]) -> str | None:
        """Why the task must not run, or None when its signature holds."""
        try:
            found = await self._key_for(task)
        except Exception as exc:  # the key endpoint failed: refuse rather than run unchecked
            return f"{INVALID}: could not fetch the server's task-signing keys: {exc}"
        if found is None or isinstance(found, str):
            return found  # None: the server signs no tasks (the seed's behaviour)
        key, signature = found
        try:
            key.verify(
                b64decode(str(signature.get("value"))),
                task_signing_input(task, agent_id=self.agent_id, kid=str(signature["kid"])),
            )
        except (InvalidSignature, ValueError, binascii.Error, KeyError, TypeError):
            return f"{INVALID}: the task does not match its signature (altered?)"
        return None

    async def _key_for(
        self, task: dict[str, Any]
    ) -> tuple[ed25519.Ed25519PublicKey, dict[str, Any]] | str | None:
        """The pinned key that must verify the task, a refusal, or None (nothing to check)."""
        keys = self.pinned()
        if keys is None:
            # Registered before the server signed tasks: pin what it announces now.
            try:
                keys = await self._refresh()
            except Exception as exc:
                log.warning("no task-signing key pinned, and none fetched (%s): running", exc)
                return None
            if keys is None:
                return None
        signature = task.get("signature")
        if not isinstance(signature, dict):
            return f"{INVALID}: the task is unsigned"
        if signature.get("alg") != "Ed25519":
            return f"{INVALID}: unsupported algorithm {signature.get('alg')!r}"
        kid = str(signature.get("kid"))
        if kid not in keys:
            keys = await self._refresh() or {}
        if kid not in keys:
            return f"{INVALID}: signed by key {kid!r}, which the server does not announce"
        return keys[kid], signature

    def receipt(
        self,
        *,
        task_id: str,
        body: dict[str, Any],
        logs: LogDigest,
        started_at: str,
        finished_at: str,
    ) -> dict[str, str]:
        """The signed receipt for the completion `body` about to be sent."""
        fields = {
            "v": 1,
            "taskId": task_id,
            "agentId": self.agent_id,
            "outcome": "succeeded" if body.get("success") else "failed",
            "resultDigest": digest(body.get("result")),
            "logsDigest": logs.value(),
            "startedAt": started_at,
            "finishedAt": finished_at,
        }
        signed = canonical_json(fields)
        key = self.state.load_or_create_key()
        signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return {"alg": "ES256", "signed": b64url(signed), "signature": b64url(signature)}


def _keys(entries: Any) -> dict[str, ed25519.Ed25519PublicKey]:
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for entry in entries if isinstance(entries, list) else []:
        try:
            if entry["alg"] == "Ed25519":
                raw = b64decode(str(entry["publicKey"]))
                keys[str(entry["kid"])] = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except (KeyError, TypeError, ValueError, binascii.Error):
            continue
    return keys
