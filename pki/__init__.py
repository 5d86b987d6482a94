"""Stella's certificate authority, as a library: no database, no HTTP.

- `keys`: key generation, PEM I/O, public-key thumbprints (RFC 7638).
- `authority`: the CA on disk (bootstrap, load) and the signing keys beside it.
- `issue`: agent client certificates and the server certificate.
- `csr`: checking a PKCS#10 request before its key is certified.
- `verify`: checking a presented client certificate against the CA.
- `task_signing`: the server's Ed25519 task-signing keys beside the CA, and their rotation.
"""

from pki.authority import CertificateAuthority, PkiError, PkiFiles, load_or_create_pki
from pki.csr import CsrError, public_key_from_csr
from pki.issue import issue_client_certificate, issue_server_certificate
from pki.keys import (
    AgentPublicKey,
    generate_agent_key,
    jwk_thumbprint,
    load_public_key_pem,
    private_key_pem,
    public_key_pem,
)
from pki.verify import CertificateRejected, ClientIdentity, verify_client_certificate

__all__ = [
    "AgentPublicKey",
    "CertificateAuthority",
    "CertificateRejected",
    "ClientIdentity",
    "CsrError",
    "PkiError",
    "PkiFiles",
    "generate_agent_key",
    "issue_client_certificate",
    "issue_server_certificate",
    "jwk_thumbprint",
    "load_or_create_pki",
    "load_public_key_pem",
    "private_key_pem",
    "public_key_from_csr",
    "public_key_pem",
    "verify_client_certificate",
]
