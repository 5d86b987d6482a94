"""The CA and its sibling keys, kept as files in the PKI directory.

Files (private ones mode 0600):
  ca.pem / ca.key            the agent CA
  jwt-signing.key            ES256 key that signs agent tokens
  credentials.key            32 random bytes that encrypt task credentials at rest
  server.pem / server.key    the TLS server certificate, reissued when names change

A fresh directory gets all of them. A directory holding some but not all is
refused: silently making a new CA or signing key over an existing fleet would
lock every agent out, so an operator must restore the missing file instead.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import secrets
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.issue import issue_server_certificate, san_entries
from pki.keys import private_key_pem

CA_LIFETIME = dt.timedelta(days=3650)
# Reissue the server certificate at start when it has less than this left.
SERVER_CERT_MIN_REMAINING = dt.timedelta(days=30)

_PRIVATE_MODE = 0o600


class PkiError(Exception):
    """The PKI directory cannot be used as it is; the message says what to do."""


@dataclass(frozen=True)
class PkiFiles:
    """Where each file of the PKI directory lives."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def jwt_key(self) -> Path:
        return self.directory / "jwt-signing.key"

    @property
    def credentials_key(self) -> Path:
        return self.directory / "credentials.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def fleet_files(self) -> tuple[Path, ...]:
        """Files whose loss would orphan the fleet: never regenerated over the others."""
        return (self.ca_cert, self.ca_key, self.jwt_key, self.credentials_key)


@dataclass(frozen=True)
class CertificateAuthority:
    """The loaded CA, the token signing key and the credentials key.

    >>> pki = load_or_create_pki(Path("var/pki"))
    >>> cert = issue_client_certificate(pki, agent_id=..., public_key=..., ttl=...)
    """

    files: PkiFiles
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    jwt_key: ec.EllipticCurvePrivateKey
    credentials_key: bytes

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def server_certificate_files(
        self, names: Sequence[str], *, now: dt.datetime | None = None
    ) -> tuple[Path, Path]:
        """Paths of a server certificate for `names`, issuing a new one when needed."""
        now = now or dt.datetime.now(dt.UTC)
        with _directory_lock(self.files.directory):
            if not _server_cert_fits(self.files, self.cert, names, now):
                key = ec.generate_private_key(ec.SECP256R1())
                cert = issue_server_certificate(self, names=names, key=key, now=now)
                _write_private(self.files.server_key, _private_pem(key))
                _write_public(self.files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
        return self.files.server_cert, self.files.server_key


def load_or_create_pki(directory: Path) -> CertificateAuthority:
    """Load the PKI directory, creating every file on first start only."""
    files = PkiFiles(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _directory_lock(directory):
        present = [path for path in files.fleet_files() if path.exists()]
        if not present:
            _create(files)
        elif len(present) != len(files.fleet_files()):
            missing = sorted(str(p) for p in files.fleet_files() if p not in present)
            raise PkiError(
                f"PKI directory {directory} is incomplete: missing {', '.join(missing)}. "
                "Refusing to create new keys over an existing CA (every agent would be "
                "locked out); restore the missing files from backup."
            )
    return _load(files)


def _create(files: PkiFiles) -> None:
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stella"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Stella Agent CA {uuid.uuid4().hex[:8]}"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Keys first, certificate last: a crash midway leaves an incomplete
    # directory that the next start reports instead of papering over.
    _write_private(files.ca_key, _private_pem(key))
    _write_private(files.jwt_key, _private_pem(ec.generate_private_key(ec.SECP256R1())))
    _write_private(files.credentials_key, secrets.token_bytes(32).hex().encode())
    _write_public(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _load(files: PkiFiles) -> CertificateAuthority:
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        jwt_key = serialization.load_pem_private_key(files.jwt_key.read_bytes(), password=None)
        credentials_key = bytes.fromhex(files.credentials_key.read_text().strip())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: an encrypted key; UnsupportedAlgorithm: a key type or curve we cannot use.
        raise PkiError(f"cannot read the PKI directory {files.directory}: {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(
        jwt_key, ec.EllipticCurvePrivateKey
    ):
        raise PkiError(f"{files.directory}: CA and token signing keys must be EC keys")
    if ca_key.public_key() != cert.public_key():
        raise PkiError(f"{files.ca_key} does not belong to {files.ca_cert}")
    if len(credentials_key) != 32:
        raise PkiError(f"{files.credentials_key} must hold 32 bytes as hex")
    return CertificateAuthority(
        files=files, cert=cert, key=ca_key, jwt_key=jwt_key, credentials_key=credentials_key
    )


def _server_cert_fits(
    files: PkiFiles, ca_cert: x509.Certificate, names: Sequence[str], now: dt.datetime
) -> bool:
    if not (files.server_cert.exists() and files.server_key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        # Left over from a previous CA, or a key/cert pair split by a crash between writes.
        cert.verify_directly_issued_by(ca_cert)
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature, x509.ExtensionNotFound):
        return False
    if key.public_key() != cert.public_key():
        return False
    current = {str(entry.value) for entry in san}
    wanted = {str(entry.value) for entry in san_entries(names)}
    return current == wanted and cert.not_valid_after_utc - now > SERVER_CERT_MIN_REMAINING


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return private_key_pem(key).encode()


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, _PRIVATE_MODE)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (never world-readable for an instant), then renamed.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialize bootstrap across processes started together (web, worker, beat)."""
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
