"""agent/signatures.py: the agent's checks of signed tasks and its receipts, without a server.

The server's side of each encoding (app/signing/) is used as the reference, so
that the two copies cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentError
from agent.runner import Runner
from agent.signatures import (
    KEYS_FILE,
    LogDigest,
    TaskSignatures,
    canonical_json,
    digest,
    task_signing_input,
)
from agent.state import StateDir
from app.errors import InvalidInput
from app.models import Agent
from app.signing import canonical, receipts
from app.signing.schemas import ReceiptIn
from app.signing.tasks import sign_task
from pki import jwk_thumbprint, public_key_pem
from pki.task_signing import TaskSigningKeyring, load_or_create_task_signing, rotate_task_signing
from tests.agent.test_runner import ScriptedClient, build, run_until, wire_task

AGENT_ID = str(uuid.uuid4())
TRICKY_PAYLOADS: list[dict[str, Any]] = [
    {"image": "app", "n": 1.0, "big": 1e20, "small": 1.5e-7, "neg": -0.0},
    {"nested": {"b": [1, 2.5, {"z": None, "a": True}], "a": "é ✓ \u2028"}, "k": ""},
    {"int": 2**70, "list": [], "obj": {}},
]


@pytest.fixture
def keyring(tmp_path: Path) -> TaskSigningKeyring:
    return load_or_create_task_signing(tmp_path / "pki")


class Fetcher:
    """The key endpoint, scripted: what it answers and how often it was asked."""

    def __init__(self, answer: list[dict[str, Any]] | Exception | None) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> list[dict[str, Any]] | None:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def signed_task(
    keyring: TaskSigningKeyring, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    task_id = uuid.uuid4()
    payload = payload if payload is not None else {"image": "app"}
    signature = sign_task(
        keyring,
        task_id=task_id,
        agent_id=uuid.UUID(AGENT_ID),
        task_type="docker.pull",
        payload=payload,
        timeout=60,
    )
    # As it reaches the agent: through JSON.
    wire = {
        "taskId": str(task_id),
        "taskType": "docker.pull",
        "payload": payload,
        "timeout": 60,
        "priority": 0,
        "signature": signature,
    }
    loaded: dict[str, Any] = json.loads(json.dumps(wire))
    return loaded


def signatures_for(
    tmp_path: Path, pinned: list[dict[str, Any]] | None, fetcher: Fetcher
) -> TaskSignatures:
    state = StateDir(tmp_path / "state")
    state.ensure()
    if pinned is not None:
        TaskSignatures.pin(state, pinned)
    return TaskSignatures(state, AGENT_ID, fetcher)


@pytest.mark.parametrize("payload", TRICKY_PAYLOADS)
def test_both_sides_encode_alike(payload: dict[str, Any]) -> None:
    assert canonical_json(payload) == canonical.canonical_json(payload)
    assert digest(payload) == canonical.digest(payload)
    task_id = str(uuid.uuid4())
    task = {"taskId": task_id, "taskType": "t", "payload": payload, "timeout": 5}
    assert task_signing_input(task, agent_id=AGENT_ID, kid="k") == canonical.task_signing_input(
        task_id=task_id,
        agent_id=AGENT_ID,
        task_type="t",
        payload=payload,
        timeout=5,
        kid="k",
    )


@pytest.mark.parametrize("payload", TRICKY_PAYLOADS)
def test_a_signed_task_passes(
    tmp_path: Path, keyring: TaskSigningKeyring, payload: dict[str, Any]
) -> None:
    checks = signatures_for(tmp_path, keyring.published(), Fetcher(AssertionError("no fetch")))
    assert asyncio.run(checks.problem(signed_task(keyring, payload))) is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"payload": {"image": "evil"}}, "does not match its signature"),
        ({"taskType": "shell.exec"}, "does not match its signature"),
        ({"timeout": 6000}, "does not match its signature"),
        ({"taskId": str(uuid.uuid4())}, "does not match its signature"),
        ({"signature": None}, "the task is unsigned"),
        ({"signature": "AAAA"}, "the task is unsigned"),
    ],
)
def test_an_altered_or_unsigned_task_is_refused(
    tmp_path: Path, keyring: TaskSigningKeyring, change: dict[str, Any], problem: str
) -> None:
    checks = signatures_for(tmp_path, keyring.published(), Fetcher(keyring.published()))
    refused = asyncio.run(checks.problem(signed_task(keyring) | change))
    assert refused is not None
    assert refused.startswith("task signature invalid: ")
    assert problem in refused


def test_another_agents_task_is_refused(tmp_path: Path, keyring: TaskSigningKeyring) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    TaskSignatures.pin(state, keyring.published())
    other = TaskSignatures(state, str(uuid.uuid4()), Fetcher(keyring.published()))
    assert "does not match" in str(asyncio.run(other.problem(signed_task(keyring))))


def test_a_new_key_is_fetched_over_the_channel_and_pinned(
    tmp_path: Path, keyring: TaskSigningKeyring
) -> None:
    pinned = keyring.published()
    rotate_task_signing(keyring.path.parent, retire_after=dt.timedelta(hours=1))
    fetcher = Fetcher(keyring.published())
    checks = signatures_for(tmp_path, pinned, fetcher)
    task = signed_task(keyring)
    assert task["signature"]["kid"] not in {key["kid"] for key in pinned}
    assert asyncio.run(checks.problem(task)) is None
    assert fetcher.calls == 1
    saved = json.loads((tmp_path / "state" / KEYS_FILE).read_text())["keys"]
    assert task["signature"]["kid"] in {key["kid"] for key in saved}
    # Known now: no second fetch.
    assert asyncio.run(checks.problem(signed_task(keyring))) is None
    assert fetcher.calls == 1


def test_a_key_the_server_does_not_announce_is_refused(
    tmp_path: Path, keyring: TaskSigningKeyring
) -> None:
    other = load_or_create_task_signing(tmp_path / "other-pki")
    checks = signatures_for(tmp_path, keyring.published(), Fetcher(keyring.published()))
    refused = asyncio.run(checks.problem(signed_task(other)))
    assert refused is not None
    assert "which the server does not announce" in refused
    failing = signatures_for(tmp_path / "b", keyring.published(), Fetcher(OSError("down")))
    refused = asyncio.run(failing.problem(signed_task(other)))
    assert refused is not None
    assert "could not fetch the server's task-signing keys" in refused


def test_an_agent_that_pinned_nothing_pins_what_the_server_announces(
    tmp_path: Path, keyring: TaskSigningKeyring
) -> None:
    fetcher = Fetcher(keyring.published())
    checks = signatures_for(tmp_path, None, fetcher)
    assert asyncio.run(checks.problem(signed_task(keyring) | {"signature": None})) is not None
    assert fetcher.calls == 1
    assert (tmp_path / "state" / KEYS_FILE).exists()
    # A server that signs nothing (no key endpoint): the seed's behaviour.
    seed = signatures_for(tmp_path / "seed", None, Fetcher(None))
    assert asyncio.run(seed.problem(signed_task(keyring) | {"signature": None})) is None


def _agent_row(state: StateDir) -> Agent:
    public = state.load_or_create_key().public_key()
    return Agent(
        id=uuid.UUID(AGENT_ID),
        name="edge",
        public_key_pem=public_key_pem(public),
        key_thumbprint=jwk_thumbprint(public),
        cert_pem="-----BEGIN CERTIFICATE-----\n",
        cert_serial="1",
        cert_not_after=dt.datetime.now(dt.UTC),
    )


def test_the_agents_receipt_is_what_the_server_accepts(tmp_path: Path) -> None:
    checks = signatures_for(tmp_path, [], Fetcher(None))
    logs = LogDigest()
    logs.add({"timestamp": "t", "level": "info", "message": "pulled"})
    task_id = str(uuid.uuid4())
    body = {"success": True, "result": {"imageId": "sha256:1", "size": 3.0}}
    wire = checks.receipt(task_id=task_id, body=body, logs=logs, started_at="a", finished_at="b")
    agent = _agent_row(checks.state)
    result = json.loads(json.dumps(body["result"]))
    kept = receipts.verify(
        agent=agent,
        task_id=uuid.UUID(task_id),
        success=True,
        result=result,
        receipt=ReceiptIn.model_validate(wire),
    )
    fields = json.loads(receipts.b64decode(kept.signed))
    assert fields["logsDigest"] == logs.value() != digest([])
    assert (fields["startedAt"], fields["finishedAt"]) == ("a", "b")
    with pytest.raises(InvalidInput, match="outcome"):
        receipts.verify(
            agent=agent,
            task_id=uuid.UUID(task_id),
            success=False,
            result=result,
            receipt=ReceiptIn.model_validate(wire),
        )


def test_a_refused_receipt_does_not_lose_the_outcome(tmp_path: Path) -> None:
    class RefusesReceipts(ScriptedClient):
        async def complete(self, task_id: str, body: dict[str, Any]) -> None:
            if "receipt" in body:
                raise AgentError("complete: 422 receipt signature does not verify")
            await super().complete(task_id, body)

    client = RefusesReceipts()
    runner: Runner
    runner, state = build(tmp_path, client)
    client.open = [wire_task("signed?")]

    async def scenario() -> None:
        await (await run_until(runner, lambda: bool(client.completions)))

    asyncio.run(scenario())
    ((_, body),) = client.completions
    assert body["success"] is True
    assert "receipt" not in body
    assert state.held_tasks() == {}


def test_a_task_signed_before_a_rotation_still_passes_until_its_key_retires(
    tmp_path: Path, keyring: TaskSigningKeyring
) -> None:
    before = signed_task(keyring)
    rotate_task_signing(keyring.path.parent, retire_after=dt.timedelta(hours=1))
    fetcher = Fetcher(keyring.published())
    checks = signatures_for(tmp_path, keyring.published(), fetcher)
    assert asyncio.run(checks.problem(before)) is None
    # Once retired, the server no longer announces it: refused.
    retired = keyring.published(dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    gone = signatures_for(tmp_path / "later", retired, Fetcher(retired))
    refused = asyncio.run(gone.problem(before))
    assert refused is not None
    assert "does not announce" in refused
