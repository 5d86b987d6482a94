"""pki.task_signing: the task-signing keyring beside the CA, its bootstrap and rotation."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest

from pki.authority import PkiError, load_or_create_pki
from pki.task_signing import (
    PRIVATE_FILE,
    PUBLIC_FILE,
    load_or_create_task_signing,
    rotate_task_signing,
)

NOW = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_directory_gets_one_private_keyring_and_its_public_half(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    load_or_create_pki(directory)
    keyring = load_or_create_task_signing(directory)
    assert _mode(directory) == 0o700
    assert _mode(directory / PRIVATE_FILE) == 0o600
    assert _mode(directory / PUBLIC_FILE) == 0o644
    (key,) = keyring.all_keys()
    published = json.loads((directory / PUBLIC_FILE).read_text())["keys"]
    assert published == [key.public()]
    assert "PRIVATE" not in (directory / PUBLIC_FILE).read_text()
    assert keyring.published() == [key.public()]
    # The same keys on the next start.
    assert load_or_create_task_signing(directory).signing_key().kid == key.kid


def test_a_pki_made_before_signed_tasks_gets_a_key_on_start(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    load_or_create_pki(directory)  # the CA, JWT and credentials keys only, as before
    assert not (directory / PRIVATE_FILE).exists()
    assert load_or_create_task_signing(directory).signing_key().kid


def test_a_lost_private_keyring_is_refused_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    load_or_create_pki(directory)
    load_or_create_task_signing(directory)
    (directory / PRIVATE_FILE).unlink()
    with pytest.raises(PkiError, match=f"missing .*{PRIVATE_FILE}"):
        load_or_create_task_signing(directory)
    assert not (directory / PRIVATE_FILE).exists()  # nothing made over the pinned keys


def test_a_lost_public_half_is_rewritten_from_the_private_keyring(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    kid = load_or_create_task_signing(directory).signing_key().kid
    (directory / PUBLIC_FILE).unlink()
    assert load_or_create_task_signing(directory).signing_key().kid == kid
    assert json.loads((directory / PUBLIC_FILE).read_text())["keys"][0]["kid"] == kid


def test_an_unreadable_keyring_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    load_or_create_task_signing(directory)
    (directory / PRIVATE_FILE).write_text('{"keys": [{"kid": "x"}]}')
    with pytest.raises(PkiError, match="cannot read the task-signing keys"):
        load_or_create_task_signing(directory)


def test_rotation_signs_with_the_new_key_and_keeps_the_old_one_published(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "pki"
    keyring = load_or_create_task_signing(directory)
    old = keyring.signing_key()
    new = rotate_task_signing(directory, retire_after=dt.timedelta(hours=1))
    # The running process sees the change without a restart.
    assert keyring.signing_key().kid == new.kid != old.kid
    assert [key["kid"] for key in keyring.published()] == [old.kid, new.kid]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    assert [key["kid"] for key in keyring.published(later)] == [new.kid]
    retired = next(key for key in keyring.all_keys() if key.kid == old.kid)
    assert retired.retires_at is not None
    assert _mode(directory / PRIVATE_FILE) == 0o600


def test_a_delayed_rotation_publishes_first_and_signs_later(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    keyring = load_or_create_task_signing(directory)
    old = keyring.signing_key(NOW)
    new = rotate_task_signing(
        directory,
        retire_after=dt.timedelta(days=7),
        activate_after=dt.timedelta(minutes=10),
        now=NOW,
    )
    assert keyring.signing_key(NOW).kid == old.kid
    assert {key["kid"] for key in keyring.published(NOW)} == {old.kid, new.kid}
    assert keyring.signing_key(NOW + dt.timedelta(minutes=11)).kid == new.kid


def test_kids_are_key_thumbprints_and_signatures_verify(tmp_path: Path) -> None:
    keyring = load_or_create_task_signing(tmp_path / "pki")
    key = keyring.signing_key()
    signature = key.key.sign(b"message")
    key.key.public_key().verify(signature, b"message")
    assert len(key.kid) == 43  # base64url of a SHA-256
