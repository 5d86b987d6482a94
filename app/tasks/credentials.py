"""Task credentials at rest: AES-256-GCM, bound to the row that holds them.

The associated data is the owning row's id, so a ciphertext copied onto
another task does not decrypt there.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"
_NONCE_BYTES = 12


class CredentialCipher:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt(self, credentials: dict[str, Any], *, owner: uuid.UUID) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        plaintext = json.dumps(credentials, separators=(",", ":")).encode()
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, owner.bytes)

    def decrypt(self, blob: bytes, *, owner: uuid.UUID) -> dict[str, Any]:
        if blob[:1] != _VERSION:
            raise ValueError("unknown credentials format")
        nonce, ciphertext = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, owner.bytes)
        except InvalidTag as exc:
            raise ValueError("credentials do not decrypt for this owner") from exc
        value = json.loads(plaintext)
        assert isinstance(value, dict)
        return value
