"""agent/state.py: file modes, atomic writes, reuse on restart."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.state import StateDir, StateError, atomic_write
from tests.agent.helpers import certificate_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def registered(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "state")
    state.ensure()
    key = state.load_or_create_key()
    state.save_registration(
        server="https://stella:8443",
        name="edge-1",
        registration={
            "agentId": "7d0c1d9e-5a39-4c4c-9c59-111111111111",
            "token": "jwt.token.value",
            "config": {"heartbeatInterval": 30, "taskPollInterval": 5},
            "certificate": {"cert": certificate_for(key), "ca": certificate_for(key, cn="ca")},
        },
    )
    return state


class TestRegistration:
    def test_every_file_is_0600_and_the_directory_0700(self, tmp_path: Path) -> None:
        state = registered(tmp_path)
        assert mode(state.path) == 0o700
        files = [state.key_file, state.cert_file, state.ca_file, state.token_file]
        for path in [*files, state.identity_file]:
            assert mode(path) == 0o600, path

    def test_a_restart_reuses_key_and_identity(self, tmp_path: Path) -> None:
        first = registered(tmp_path)
        key = first.load_or_create_key()
        again = StateDir(first.path)
        identity = again.load()
        assert identity is not None
        assert identity.agent_id == "7d0c1d9e-5a39-4c4c-9c59-111111111111"
        assert identity.token == "jwt.token.value"
        assert identity.config["heartbeatInterval"] == 30
        assert again.load_or_create_key().private_numbers() == key.private_numbers()

    def test_nothing_registered_loads_as_none(self, tmp_path: Path) -> None:
        assert StateDir(tmp_path / "empty").load() is None

    def test_a_certificate_for_another_key_is_refused(self, tmp_path: Path) -> None:
        state = StateDir(tmp_path / "state")
        state.ensure()
        state.load_or_create_key()
        stranger = certificate_for(ec.generate_private_key(ec.SECP256R1()))
        with pytest.raises(StateError, match="not for this agent's key"):
            state.save_registration(
                server="https://s",
                name="n",
                registration={
                    "agentId": "x",
                    "token": "t",
                    "certificate": {"cert": stranger, "ca": stranger},
                },
            )
        assert state.load() is None

    def test_a_half_written_state_is_reported(self, tmp_path: Path) -> None:
        state = registered(tmp_path)
        state.token_file.unlink()
        with pytest.raises(StateError, match="missing token"):
            state.load()

    def test_the_csr_carries_our_key(self, tmp_path: Path) -> None:
        state = StateDir(tmp_path / "state")
        state.ensure()
        key = state.load_or_create_key()
        csr = x509.load_pem_x509_csr(state.csr_pem(key, "edge-1").encode())
        assert csr.is_signature_valid
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == key.public_key().public_numbers()


class TestRenewal:
    def test_replaces_the_certificate_atomically_with_mode_0600(self, tmp_path: Path) -> None:
        state = registered(tmp_path)
        renewed = certificate_for(state.load_or_create_key(), cn="renewed")
        state.replace_certificate(renewed)
        assert state.cert_file.read_text() == renewed
        assert mode(state.cert_file) == 0o600
        assert sorted(p.name for p in state.path.iterdir() if p.name.startswith(".")) == []

    def test_a_renewal_for_another_key_keeps_the_old_certificate(self, tmp_path: Path) -> None:
        state = registered(tmp_path)
        before = state.cert_file.read_text()
        with pytest.raises(StateError):
            state.replace_certificate(certificate_for(ec.generate_private_key(ec.SECP256R1())))
        assert state.cert_file.read_text() == before

    def test_a_failed_write_leaves_the_old_file_and_no_temporary(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        target = tmp_path / "cert.pem"
        atomic_write(target, "old")

        def broken_replace(src: str, dst: str) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, "new")
        assert target.read_text() == "old"
        assert os.listdir(tmp_path) == ["cert.pem"]


class TestHeldTasks:
    def test_hold_finish_release(self, tmp_path: Path) -> None:
        state = registered(tmp_path)
        task_id = str(uuid.uuid4())
        state.hold_task(task_id, "docker.pull")
        assert state.held_tasks()[task_id]["outcome"] is None
        state.finish_task(task_id, {"success": True})
        assert state.held_tasks()[task_id]["outcome"] == {"success": True}
        assert mode(state.tasks_dir / f"{task_id}.json") == 0o600
        state.release_task(task_id)
        assert state.held_tasks() == {}

    def test_only_uuids_become_file_names(self, tmp_path: Path) -> None:
        state = registered(tmp_path)
        with pytest.raises(ValueError, match="badly formed"):
            state.hold_task("../../etc/passwd", "docker.pull")
