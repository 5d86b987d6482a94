"""Tests for pki.authority: the CA directory, its bootstrap and the server certificate."""

from __future__ import annotations

import base64
import datetime as dt
import multiprocessing
import os
import shutil
import stat
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.authority import (
    SERVER_CERT_MIN_REMAINING,
    CertificateAuthority,
    PkiError,
    PkiFiles,
    load_or_create_pki,
)
from pki.issue import SERVER_CERT_LIFETIME

FLEET_FILES = ("ca_cert", "ca_key", "jwt_key", "credentials_key")
PRIVATE_FILES = ("ca_key", "jwt_key", "credentials_key")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every regular file of the directory but the lock, by name."""
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != ".lock"
    }


def _pem(label: str, der: bytes) -> bytes:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n".encode()


def _pkcs8(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _bootstrap_in_child(directory: str, barrier: Any, results: Any) -> None:
    """Run in a separate process: wait for the others, then bootstrap the same directory."""
    barrier.wait(timeout=60)
    try:
        ca = load_or_create_pki(Path(directory))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put(("error", repr(exc)))
    else:
        results.put(("ok", ca.cert_pem + ca.credentials_key.hex()))


class TestPkiFiles:
    def test_paths(self, tmp_path: Path) -> None:
        files = PkiFiles(tmp_path)
        assert files.ca_cert == tmp_path / "ca.pem"
        assert files.ca_key == tmp_path / "ca.key"
        assert files.jwt_key == tmp_path / "jwt-signing.key"
        assert files.credentials_key == tmp_path / "credentials.key"
        assert files.server_cert == tmp_path / "server.pem"
        assert files.server_key == tmp_path / "server.key"

    def test_fleet_files_exclude_the_server_certificate(self, tmp_path: Path) -> None:
        files = PkiFiles(tmp_path)
        assert files.fleet_files() == (
            files.ca_cert,
            files.ca_key,
            files.jwt_key,
            files.credentials_key,
        )


class TestLoadOrCreatePki:
    def test_first_start_creates_every_fleet_file(self, tmp_path: Path) -> None:
        directory = tmp_path / "var" / "pki"
        ca = load_or_create_pki(directory)
        files = PkiFiles(directory)
        assert ca.files == files
        for name in FLEET_FILES:
            assert getattr(files, name).is_file(), name
        assert not files.server_cert.exists()
        assert not files.server_key.exists()
        leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == []

    def test_private_files_are_mode_0600(self, tmp_path: Path) -> None:
        load_or_create_pki(tmp_path / "pki")
        files = PkiFiles(tmp_path / "pki")
        for name in PRIVATE_FILES:
            assert _mode(getattr(files, name)) == 0o600, name
        assert _mode(files.ca_cert) == 0o644

    def test_new_directory_is_private(self, tmp_path: Path) -> None:
        old = os.umask(0o022)
        try:
            load_or_create_pki(tmp_path / "pki")
        finally:
            os.umask(old)
        assert _mode(tmp_path / "pki") == 0o700

    def test_ca_certificate(self, ca: CertificateAuthority) -> None:
        cert = ca.cert
        assert cert.issuer == cert.subject
        cert.verify_directly_issued_by(cert)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca is True
        assert constraints.value.path_length == 0
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign
        assert usage.crl_sign
        assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=3000)
        assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC)
        assert ca.key.public_key() == cert.public_key()
        assert ca.cert_pem == cert.public_bytes(serialization.Encoding.PEM).decode()

    def test_signing_keys(self, ca: CertificateAuthority) -> None:
        assert isinstance(ca.jwt_key, ec.EllipticCurvePrivateKey)
        assert ca.jwt_key.curve.name == "secp256r1"
        assert ca.jwt_key.public_key() != ca.key.public_key()
        assert len(ca.credentials_key) == 32

    def test_every_directory_gets_its_own_ca(self, tmp_path: Path) -> None:
        first = load_or_create_pki(tmp_path / "a")
        second = load_or_create_pki(tmp_path / "b")
        assert first.cert.subject != second.cert.subject
        assert first.key.public_key() != second.key.public_key()
        assert first.credentials_key != second.credentials_key

    def test_second_load_returns_the_same_ca(self, tmp_path: Path) -> None:
        directory = tmp_path / "pki"
        first = load_or_create_pki(directory)
        before = _snapshot(directory)
        second = load_or_create_pki(directory)
        assert second.cert == first.cert
        assert second.key.private_numbers() == first.key.private_numbers()
        assert second.jwt_key.private_numbers() == first.jwt_key.private_numbers()
        assert second.credentials_key == first.credentials_key
        assert _snapshot(directory) == before

    def test_existing_empty_directory_is_a_first_start(self, tmp_path: Path) -> None:
        load_or_create_pki(tmp_path)
        assert PkiFiles(tmp_path).ca_cert.is_file()

    @pytest.mark.parametrize("missing", FLEET_FILES)
    def test_missing_fleet_file_is_refused_not_regenerated(
        self, tmp_path: Path, missing: str
    ) -> None:
        directory = tmp_path / "pki"
        load_or_create_pki(directory)
        files = PkiFiles(directory)
        gone = getattr(files, missing)
        gone.unlink()
        before = _snapshot(directory)

        for _ in range(2):  # a restart loop must not wear the refusal down
            with pytest.raises(PkiError) as excinfo:
                load_or_create_pki(directory)
            message = str(excinfo.value)
            assert str(gone) in message
            assert "incomplete" in message
            for other in files.fleet_files():
                if other != gone:
                    assert str(other) not in message

        assert not gone.exists()
        assert _snapshot(directory) == before

    def test_all_but_one_missing_is_refused(self, tmp_path: Path) -> None:
        directory = tmp_path / "pki"
        load_or_create_pki(directory)
        files = PkiFiles(directory)
        for path in (files.ca_cert, files.ca_key, files.jwt_key):
            path.unlink()
        with pytest.raises(PkiError) as excinfo:
            load_or_create_pki(directory)
        for path in (files.ca_cert, files.ca_key, files.jwt_key):
            assert str(path) in str(excinfo.value)
        assert _snapshot(directory) == {"credentials.key": files.credentials_key.read_bytes()}

    @pytest.mark.parametrize(
        ("name", "content"),
        [
            pytest.param("ca_key", b"not a key\n", id="ca.key-garbage"),
            pytest.param(
                "ca_key",
                b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n",
                id="ca.key-garbage-in-armor",
            ),
            pytest.param("ca_key", b"", id="ca.key-empty"),
            pytest.param("jwt_key", b"\x00\xff\x00\xff", id="jwt-signing.key-binary"),
            pytest.param("ca_cert", b"not a certificate\n", id="ca.pem-garbage"),
            pytest.param(
                "ca_cert",
                b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
                id="ca.pem-garbage-in-armor",
            ),
            pytest.param("credentials_key", b"not hex at all\n", id="credentials.key-not-hex"),
            pytest.param("credentials_key", b"00" * 16 + b"\n", id="credentials.key-16-bytes"),
            pytest.param("credentials_key", b"\xff\xfe\xfd", id="credentials.key-not-utf8"),
            pytest.param("credentials_key", b"", id="credentials.key-empty"),
        ],
    )
    def test_corrupt_file_is_a_pki_error(self, tmp_path: Path, name: str, content: bytes) -> None:
        directory = tmp_path / "pki"
        load_or_create_pki(directory)
        getattr(PkiFiles(directory), name).write_bytes(content)
        before = _snapshot(directory)
        with pytest.raises(PkiError):
            load_or_create_pki(directory)
        assert _snapshot(directory) == before

    def test_unreadable_key_is_a_pki_error(self, tmp_path: Path) -> None:
        # A directory where the key should be: unreadable even for root.
        directory = tmp_path / "pki"
        load_or_create_pki(directory)
        files = PkiFiles(directory)
        files.ca_key.unlink()
        files.ca_key.mkdir()
        with pytest.raises(PkiError, match="cannot read"):
            load_or_create_pki(directory)
        assert files.ca_key.is_dir()

    def test_encrypted_key_is_a_pki_error(self, tmp_path: Path) -> None:
        directory = tmp_path / "pki"
        ca = load_or_create_pki(directory)
        encrypted = ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        PkiFiles(directory).ca_key.write_bytes(encrypted)
        with pytest.raises(PkiError, match="cannot read"):
            load_or_create_pki(directory)

    def test_key_on_unsupported_curve_is_a_pki_error(self, tmp_path: Path) -> None:
        directory = tmp_path / "pki"
        load_or_create_pki(directory)
        der = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        p256 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
        assert der.count(p256) == 1
        unknown_curve = der.replace(p256, bytes.fromhex("06082a8648ce3d030163"))
        PkiFiles(directory).jwt_key.write_bytes(_pem("PRIVATE KEY", unknown_curve))
        with pytest.raises(PkiError, match="cannot read"):
            load_or_create_pki(directory)

    @pytest.mark.parametrize("name", ["ca_key", "jwt_key"])
    def test_non_ec_signing_key_is_a_pki_error(self, tmp_path: Path, name: str) -> None:
        directory = tmp_path / "pki"
        load_or_create_pki(directory)
        getattr(PkiFiles(directory), name).write_bytes(_pkcs8(ed25519.Ed25519PrivateKey.generate()))
        with pytest.raises(PkiError, match="must be EC keys"):
            load_or_create_pki(directory)

    def test_ca_key_from_another_ca_is_a_pki_error(self, tmp_path: Path) -> None:
        load_or_create_pki(tmp_path / "a")
        load_or_create_pki(tmp_path / "b")
        shutil.copyfile(PkiFiles(tmp_path / "b").ca_key, PkiFiles(tmp_path / "a").ca_key)
        before = _snapshot(tmp_path / "a")
        with pytest.raises(PkiError, match="does not belong to"):
            load_or_create_pki(tmp_path / "a")
        assert _snapshot(tmp_path / "a") == before

    def test_ca_cert_from_another_ca_is_a_pki_error(self, tmp_path: Path) -> None:
        load_or_create_pki(tmp_path / "a")
        load_or_create_pki(tmp_path / "b")
        shutil.copyfile(PkiFiles(tmp_path / "b").ca_cert, PkiFiles(tmp_path / "a").ca_cert)
        with pytest.raises(PkiError, match="does not belong to"):
            load_or_create_pki(tmp_path / "a")

    def test_concurrent_first_start_makes_one_ca(self, tmp_path: Path) -> None:
        directory = tmp_path / "pki"
        processes = 4
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(processes)
        results = context.Queue()
        workers = [
            context.Process(target=_bootstrap_in_child, args=(str(directory), barrier, results))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        try:
            outcomes = [results.get(timeout=60) for _ in range(processes)]
        finally:
            for worker in workers:
                worker.join(timeout=60)
            results.close()
            results.join_thread()
        assert [worker.exitcode for worker in workers] == [0] * processes
        assert [status for status, _ in outcomes] == ["ok"] * processes, outcomes
        assert len({fingerprint for _, fingerprint in outcomes}) == 1

        ca = load_or_create_pki(directory)
        assert outcomes[0][1] == ca.cert_pem + ca.credentials_key.hex()
        leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == []


def _server_cert(paths: tuple[Path, Path]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(paths[0].read_bytes())


def _names(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


class TestServerCertificateFiles:
    NAMES = ("stella.example.com", "localhost", "127.0.0.1", "::1")

    def test_issues_files(self, ca: CertificateAuthority) -> None:
        cert_path, key_path = ca.server_certificate_files(self.NAMES)
        assert cert_path == ca.files.server_cert
        assert key_path == ca.files.server_key
        assert _mode(key_path) == 0o600
        assert _mode(cert_path) == 0o644

    def test_server_certificate(self, ca: CertificateAuthority) -> None:
        paths = ca.server_certificate_files(self.NAMES)
        cert = _server_cert(paths)
        cert.verify_directly_issued_by(ca.cert)
        assert cert.issuer == ca.cert.subject
        assert _names(cert) == ({"stella.example.com", "localhost"}, {"127.0.0.1", "::1"})
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        key = serialization.load_pem_private_key(paths[1].read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key() == cert.public_key()
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert SERVER_CERT_LIFETIME <= lifetime <= SERVER_CERT_LIFETIME + dt.timedelta(minutes=2)

    def test_same_names_keep_the_certificate(self, ca: CertificateAuthority) -> None:
        ca.server_certificate_files(self.NAMES)
        before = _snapshot(ca.files.directory)
        inode = ca.files.server_cert.stat().st_ino
        ca.server_certificate_files(self.NAMES)
        ca.server_certificate_files(tuple(reversed(self.NAMES)))
        assert _snapshot(ca.files.directory) == before
        assert ca.files.server_cert.stat().st_ino == inode

    def test_stable_across_restarts(self, ca: CertificateAuthority) -> None:
        ca.server_certificate_files(self.NAMES)
        before = _snapshot(ca.files.directory)
        load_or_create_pki(ca.files.directory).server_certificate_files(self.NAMES)
        assert _snapshot(ca.files.directory) == before

    @pytest.mark.parametrize(
        "names",
        [
            ("stella.example.com", "localhost", "127.0.0.1"),
            ("stella.example.com", "localhost", "127.0.0.1", "::1", "10.0.0.7"),
            ("other.example.com", "localhost", "127.0.0.1", "::1"),
        ],
    )
    def test_new_names_reissue(self, ca: CertificateAuthority, names: tuple[str, ...]) -> None:
        old = _server_cert(ca.server_certificate_files(self.NAMES))
        old_key = ca.files.server_key.read_bytes()
        new = _server_cert(ca.server_certificate_files(names))
        assert new != old
        assert ca.files.server_key.read_bytes() != old_key
        dns, ips = _names(new)
        assert dns | ips == set(names)
        new.verify_directly_issued_by(ca.cert)

    def test_reissues_when_close_to_expiry(self, ca: CertificateAuthority) -> None:
        now = dt.datetime.now(dt.UTC)
        issued_at = now - (SERVER_CERT_LIFETIME - SERVER_CERT_MIN_REMAINING) - dt.timedelta(days=1)
        old = _server_cert(ca.server_certificate_files(self.NAMES, now=issued_at))
        assert old.not_valid_after_utc - now < SERVER_CERT_MIN_REMAINING
        new = _server_cert(ca.server_certificate_files(self.NAMES, now=now))
        assert new != old
        assert new.not_valid_after_utc - now > SERVER_CERT_MIN_REMAINING

    def test_keeps_a_certificate_with_time_left(self, ca: CertificateAuthority) -> None:
        now = dt.datetime.now(dt.UTC)
        issued_at = now - (SERVER_CERT_LIFETIME - SERVER_CERT_MIN_REMAINING) + dt.timedelta(days=1)
        old = _server_cert(ca.server_certificate_files(self.NAMES, now=issued_at))
        assert _server_cert(ca.server_certificate_files(self.NAMES, now=now)) == old

    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param(lambda f: f.server_cert.write_bytes(b"garbage"), id="corrupt-cert"),
            pytest.param(lambda f: f.server_cert.unlink(), id="missing-cert"),
            pytest.param(lambda f: f.server_key.unlink(), id="missing-key"),
        ],
    )
    def test_repairs_damaged_files(
        self, ca: CertificateAuthority, damage: Callable[[PkiFiles], object]
    ) -> None:
        ca.server_certificate_files(self.NAMES)
        damage(ca.files)
        paths = ca.server_certificate_files(self.NAMES)
        cert = _server_cert(paths)
        cert.verify_directly_issued_by(ca.cert)
        key = serialization.load_pem_private_key(paths[1].read_bytes(), password=None)
        assert key.public_key() == cert.public_key()

    def test_key_not_matching_the_certificate_is_replaced(self, ca: CertificateAuthority) -> None:
        # As left by a crash between writing server.key and server.pem.
        ca.server_certificate_files(self.NAMES)
        ca.files.server_key.write_bytes(_pkcs8(ec.generate_private_key(ec.SECP256R1())))
        paths = ca.server_certificate_files(self.NAMES)
        key = serialization.load_pem_private_key(paths[1].read_bytes(), password=None)
        assert key.public_key() == _server_cert(paths).public_key()

    def test_certificate_from_a_previous_ca_is_replaced(self, tmp_path: Path) -> None:
        # The operator wiped the fleet files to start over but left server.pem/.key.
        directory = tmp_path / "pki"
        old_ca = load_or_create_pki(directory)
        old_ca.server_certificate_files(self.NAMES)
        for path in old_ca.files.fleet_files():
            path.unlink()
        new_ca = load_or_create_pki(directory)
        assert new_ca.cert != old_ca.cert
        cert = _server_cert(new_ca.server_certificate_files(self.NAMES))
        assert cert.issuer == new_ca.cert.subject
        cert.verify_directly_issued_by(new_ca.cert)

    def test_no_names(self, ca: CertificateAuthority) -> None:
        with pytest.raises(ValueError, match="at least one name"):
            ca.server_certificate_files([])
        assert not ca.files.server_cert.exists()
