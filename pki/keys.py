"""Keys: generation, PEM encoding and RFC 7638 thumbprints.

Agents hold EC P-256 or Ed25519 keys (a CSR may also bring P-384 or RSA of
at least 2048 bits). The server never generates RSA keys: they cost ~80 ms.
"""

from __future__ import annotations

import base64
import hashlib
import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

AgentPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
AgentPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_JWK_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48)}


def generate_agent_key(kind: str = "ec") -> AgentPrivateKey:
    """A fresh agent key: `"ec"` for P-256 (the default) or `"ed25519"`."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported key kind {kind!r}")


def private_key_pem(key: AgentPrivateKey) -> str:
    """PKCS#8 PEM, unencrypted (the caller decides where it may go)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_key_pem(key: AgentPublicKey) -> str:
    """SubjectPublicKeyInfo PEM."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key_pem(pem: str) -> AgentPublicKey:
    """Load a public key stored by `public_key_pem`, refusing types we never certify."""
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise ValueError("unsupported public key type")
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_thumbprint(key: AgentPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the `cnf.jkt` of agent tokens.

    It names the key, not the certificate, so a renewed certificate for the
    same key keeps the agent's token valid.
    """
    members: dict[str, str]
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve, size = _JWK_CURVES[key.curve.name]
        numbers = key.public_numbers()
        members = {
            "crv": curve,
            "kty": "EC",
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    else:
        rsa_numbers = key.public_numbers()
        members = {
            "e": _b64url(rsa_numbers.e.to_bytes((rsa_numbers.e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": _b64url(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
        }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())
