"""Checking a PKCS#10 certificate signing request from an agent.

Only the request's public key is used; its subject, extensions and any
request for CA powers are ignored by design (see `pki.issue`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pki.keys import AgentPublicKey

MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1")
_BEGIN = "-----BEGIN CERTIFICATE REQUEST-----"


class CsrError(ValueError):
    """The CSR cannot be certified; the message is safe to show the agent."""


def public_key_from_csr(pem: str) -> AgentPublicKey:
    """The public key of a well-formed, self-signed CSR with a key type we certify."""
    if len(pem) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    if pem.count("-----BEGIN ") != 1 or _BEGIN not in pem:
        raise CsrError("expected exactly one PEM block 'CERTIFICATE REQUEST'")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise CsrError("CSR is not a valid PEM-encoded PKCS#10 request") from exc
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm, x509.UnsupportedGeneralNameType) as exc:
        raise CsrError("CSR carries an unsupported public key") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise CsrError(f"EC curve {key.curve.name} is not allowed (P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CsrError("CSR key must be EC P-256/P-384, Ed25519 or RSA >= 2048 bits")
    if not csr.is_signature_valid:
        raise CsrError("CSR self-signature does not verify")
    return key
