"""Task credentials at rest: encrypted in the row, bound to it, wiped when the task ends."""

from __future__ import annotations

import os
import uuid

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import col

from app.models import Task
from app.tasks.credentials import CredentialCipher
from tests.conftest import Stack
from tests.tasks.helpers import CREDENTIALS, SECRET, Register, create_task, delivered_task


def stored_ciphertext(stack: Stack, task_id: str) -> bytes | None:
    with stack.runtime.engine.connect() as connection:
        value: bytes | None = connection.execute(
            select(col(Task.credentials_encrypted)).where(col(Task.id) == uuid.UUID(task_id))
        ).scalar_one()
    return value


class TestCredentialsAtRest:
    """What the tasks table holds in `credentials_encrypted`."""

    def test_the_row_holds_ciphertext_not_the_secret(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(operator, agent, credentials=CREDENTIALS)
        blob = stored_ciphertext(stack, task_id)
        assert blob is not None
        blob = bytes(blob)
        assert SECRET.encode() not in blob
        assert b"registry.password" not in blob
        assert b"deployer" not in blob
        # It is the credentials, encrypted for this very row.
        assert stack.runtime.cipher.decrypt(blob, owner=uuid.UUID(task_id)) == CREDENTIALS
        # Delivery keeps them until the task ends.
        (delivered,) = agent.heartbeat().json()["tasks"]
        assert delivered["credentials"] == CREDENTIALS
        assert stored_ciphertext(stack, task_id) is not None

    def test_a_task_without_credentials_stores_none_and_delivers_none(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(operator, agent)
        assert stored_ciphertext(stack, task_id) is None
        (delivered,) = agent.heartbeat().json()["tasks"]
        assert "credentials" not in delivered

    @pytest.mark.parametrize("success", [True, False])
    def test_wiped_when_the_task_completes(
        self, stack: Stack, operator: httpx.Client, register: Register, success: bool
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent, credentials=CREDENTIALS)
        assert stored_ciphertext(stack, task_id) is not None
        assert agent.complete(task_id, success=success).status_code == 200
        assert stored_ciphertext(stack, task_id) is None

    @pytest.mark.parametrize("delivered", [False, True], ids=["pending", "assigned"])
    def test_wiped_when_the_task_is_cancelled(
        self, stack: Stack, operator: httpx.Client, register: Register, delivered: bool
    ) -> None:
        agent = register()
        make = delivered_task if delivered else create_task
        task_id = make(operator, agent, credentials=CREDENTIALS)
        assert operator.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200
        assert stored_ciphertext(stack, task_id) is None

    def test_wiped_when_the_agent_is_deleted(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent, credentials=CREDENTIALS)
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200
        assert stored_ciphertext(stack, task_id) is None


class TestCredentialCipher:
    """CredentialCipher: AES-256-GCM with the owner's id as associated data."""

    @pytest.fixture
    def cipher(self) -> CredentialCipher:
        return CredentialCipher(os.urandom(32))

    def test_round_trip(self, cipher: CredentialCipher) -> None:
        owner = uuid.uuid4()
        blob = cipher.encrypt(CREDENTIALS, owner=owner)
        assert SECRET.encode() not in blob
        assert cipher.decrypt(blob, owner=owner) == CREDENTIALS

    def test_refuses_a_ciphertext_moved_to_another_owner(self, cipher: CredentialCipher) -> None:
        blob = cipher.encrypt(CREDENTIALS, owner=uuid.uuid4())
        with pytest.raises(ValueError, match="owner"):
            cipher.decrypt(blob, owner=uuid.uuid4())

    def test_refuses_another_key(self, cipher: CredentialCipher) -> None:
        owner = uuid.uuid4()
        blob = CredentialCipher(os.urandom(32)).encrypt(CREDENTIALS, owner=owner)
        with pytest.raises(ValueError, match="owner"):
            cipher.decrypt(blob, owner=owner)

    def test_refuses_a_tampered_ciphertext(self, cipher: CredentialCipher) -> None:
        owner = uuid.uuid4()
        blob = bytearray(cipher.encrypt(CREDENTIALS, owner=owner))
        blob[20] ^= 0x01
        with pytest.raises(ValueError, match="owner"):
            cipher.decrypt(bytes(blob), owner=owner)

    def test_refuses_an_unknown_format(self, cipher: CredentialCipher) -> None:
        owner = uuid.uuid4()
        blob = cipher.encrypt(CREDENTIALS, owner=owner)
        with pytest.raises(ValueError, match="format"):
            cipher.decrypt(b"\x02" + blob[1:], owner=owner)

    def test_the_same_credentials_never_encrypt_alike(self, cipher: CredentialCipher) -> None:
        owner = uuid.uuid4()
        assert cipher.encrypt(CREDENTIALS, owner=owner) != cipher.encrypt(CREDENTIALS, owner=owner)
