"""The server's task-signing keys: an Ed25519 keyring beside the CA.

Files in the PKI directory:
  task-signing.json      every key, private (mode 0600): kid, PEM, when it
                         starts signing and when it stops being published
  task-signing.pub.json  the public half, as agents are told (mode 0644)

Both are made on start when neither exists: on a fresh PKI directory, and on
one created before tasks were signed (its agents pinned no key, so a new one
locks nobody out). The public file without the private one means the keys
were lost: that start is refused, since every agent pinned the lost key.

A key id (`kid`) is the key's RFC 7638 thumbprint. The signing key is the
newest one whose `activatesAt` has come; `stella keys rotate-task-signing`
adds a key and gives the keys it replaces a `retiresAt`, until which they
stay published so that tasks signed before the switch still verify.
Processes re-read the keyring when its file changes, so a rotation needs no
restart.

Usage::

    keyring = load_or_create_task_signing(Path("var/pki"))
    key = keyring.signing_key()      # key.kid, key.key.sign(message)
    keyring.published()          # [{"kid", "alg", "publicKey", ...}]
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pki.authority import PkiError, _directory_lock, _write_atomic
from pki.keys import jwk_thumbprint, private_key_pem

log = logging.getLogger(__name__)

ALGORITHM = "Ed25519"
PRIVATE_FILE = "task-signing.json"
PUBLIC_FILE = "task-signing.pub.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _parse_time(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    key: ed25519.Ed25519PrivateKey
    activates_at: dt.datetime
    retires_at: dt.datetime | None = None

    @classmethod
    def generate(cls, activates_at: dt.datetime) -> SigningKey:
        key = ed25519.Ed25519PrivateKey.generate()
        return cls(kid=jwk_thumbprint(key.public_key()), key=key, activates_at=activates_at)

    def public(self) -> dict[str, str]:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        published = {
            "kid": self.kid,
            "alg": ALGORITHM,
            "publicKey": b64url(raw),
            "activatesAt": _iso(self.activates_at),
        }
        if self.retires_at is not None:
            published["retiresAt"] = _iso(self.retires_at)
        return published

    def stored(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "privateKey": private_key_pem(self.key),
            "activatesAt": _iso(self.activates_at),
            "retiresAt": _iso(self.retires_at) if self.retires_at else None,
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> SigningKey:
        key = serialization.load_pem_private_key(str(data["privateKey"]).encode(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("task-signing keys must be Ed25519")
        if jwk_thumbprint(key.public_key()) != data["kid"]:
            raise ValueError(f"kid {data['kid']} does not name its key")
        activates = _parse_time(data["activatesAt"])
        assert activates is not None
        return cls(
            kid=str(data["kid"]),
            key=key,
            activates_at=activates,
            retires_at=_parse_time(data.get("retiresAt")),
        )

    def published_at(self, now: dt.datetime) -> bool:
        return self.retires_at is None or now < self.retires_at


class TaskSigningKeyring:
    """The keyring of one PKI directory, re-read whenever its file changes."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / PRIVATE_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: tuple[SigningKey, ...] = ()
        self.all_keys()  # fail now, at start, on an unreadable file

    def all_keys(self) -> tuple[SigningKey, ...]:
        try:
            status = os.stat(self.path)
        except OSError as exc:
            if self._keys:
                return self._keys  # removed while running: keep signing with what we have
            raise PkiError(f"cannot read {self.path}: {exc}") from exc
        stamp = (status.st_mtime_ns, status.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._keys = _read_keys(self.path)
                except PkiError:
                    if not self._keys:
                        raise
                    # Being replaced, or damaged while we run: sign with what we have.
                    log.error("task-signing keys unreadable; keeping those loaded", exc_info=True)
                    return self._keys
                self._stamp = stamp
            return self._keys

    def signing_key(self, now: dt.datetime | None = None) -> SigningKey:
        now = now or dt.datetime.now(dt.UTC)
        active = [k for k in self.all_keys() if k.activates_at <= now and k.published_at(now)]
        if not active:  # every key retired or none active yet: the newest activated one
            active = [k for k in self.all_keys() if k.activates_at <= now] or list(self.all_keys())
        return max(active, key=lambda k: k.activates_at)

    def published(self, now: dt.datetime | None = None) -> list[dict[str, str]]:
        """The public keys agents should accept now, oldest first."""
        now = now or dt.datetime.now(dt.UTC)
        signing = self.signing_key(now).kid
        return [k.public() for k in self.all_keys() if k.published_at(now) or k.kid == signing]


def _read_keys(path: Path) -> tuple[SigningKey, ...]:
    try:
        data = json.loads(path.read_text())
        keys = tuple(SigningKey.from_stored(entry) for entry in data["keys"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PkiError(f"cannot read the task-signing keys {path}: {exc}") from exc
    if not keys:
        raise PkiError(f"{path} holds no task-signing key")
    return keys


def _write(directory: Path, keys: tuple[SigningKey, ...]) -> None:
    stored = {"keys": [k.stored() for k in keys]}
    _write_atomic(directory / PRIVATE_FILE, (json.dumps(stored, indent=2) + "\n").encode(), 0o600)
    public = {"keys": [k.public() for k in keys]}
    _write_atomic(directory / PUBLIC_FILE, (json.dumps(public, indent=2) + "\n").encode(), 0o644)


def load_or_create_task_signing(directory: Path) -> TaskSigningKeyring:
    """The keyring, made on a fresh or pre-existing PKI; refused when its private file is lost."""
    private, public = directory / PRIVATE_FILE, directory / PUBLIC_FILE
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _directory_lock(directory):
        if not private.exists():
            if public.exists():
                raise PkiError(
                    f"PKI directory {directory} is incomplete: missing {private} (its public "
                    f"half {public} is there). Every agent pinned those keys: restore the file "
                    "from backup rather than make new ones."
                )
            _write(directory, (SigningKey.generate(dt.datetime.now(dt.UTC)),))
        elif not public.exists():
            _write(directory, _read_keys(private))
    return TaskSigningKeyring(directory)


def rotate_task_signing(
    directory: Path,
    *,
    retire_after: dt.timedelta,
    activate_after: dt.timedelta = dt.timedelta(0),
    now: dt.datetime | None = None,
) -> SigningKey:
    """Add a key that signs from `now + activate_after`; the keys it replaces stay
    published for `retire_after` beyond that. Returns the new key."""
    now = now or dt.datetime.now(dt.UTC)
    with _directory_lock(directory):
        keys = _read_keys(directory / PRIVATE_FILE)
        new = SigningKey.generate(now + activate_after)
        retires = new.activates_at + retire_after
        kept = tuple(
            SigningKey(k.kid, k.key, k.activates_at, k.retires_at or retires)
            for k in keys
            # Keys retired long ago are dropped; nothing signed by them is still pending.
            if k.retires_at is None or k.retires_at > now - retire_after
        )
        _write(directory, (*kept, new))
    return new
