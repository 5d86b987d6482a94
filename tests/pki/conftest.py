"""Fixtures shared by the pki tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from pki.authority import CertificateAuthority, load_or_create_pki


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """A freshly bootstrapped CA in its own directory."""
    return load_or_create_pki(tmp_path / "pki")


@pytest.fixture(scope="session")
def rsa_2048_key() -> rsa.RSAPrivateKey:
    """RSA generation is slow: one 2048-bit key for the whole run."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)
