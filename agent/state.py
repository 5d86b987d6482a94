"""The agent's state directory: its identity and the tasks it holds.

Layout (directory mode 0700, every file mode 0600, every write atomic)::

    key.pem          EC P-256 private key, generated here; never sent anywhere
    cert.pem         the client certificate issued for that key (replaced on renewal)
    ca.pem           the CA that issued it, as the server sent it
    server-ca.pem    the trust anchor for the server (a copy of `--ca`), if given
    token            the agent JWT
    agent.json       agent id, name, server URL and the server's config
    tasks/<id>.json  a task this agent started and has not yet reported (no credentials)

Usage::

    state = StateDir(Path("/var/lib/stella-agent"))
    identity = state.load()          # None before the first registration
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FILE_MODE = 0o600
DIR_MODE = 0o700


class StateError(Exception):
    """The state directory is unusable (unreadable, inconsistent, or unsafe)."""


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a 0600 temporary file, fsync, then rename.

    A reader (or a crash) sees either the old content or the new, never a mix.
    """
    raw = data.encode() if isinstance(data, str) else data
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Identity:
    """Who this agent is, as the server registered it."""

    agent_id: str
    name: str
    server: str
    token: str = field(repr=False)  # the agent JWT: never in a repr or a log
    config: dict[str, Any]


class StateDir:
    """The files of one agent; see the module docstring for the layout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key_file = path / "key.pem"
        self.cert_file = path / "cert.pem"
        self.ca_file = path / "ca.pem"
        self.server_ca_file = path / "server-ca.pem"
        self.token_file = path / "token"
        self.identity_file = path / "agent.json"
        self.tasks_dir = path / "tasks"

    def ensure(self) -> None:
        """Create the directory (0700) and refuse one that others can read."""
        self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.tasks_dir.mkdir(mode=DIR_MODE, exist_ok=True)
        for directory in (self.path, self.tasks_dir):
            if directory.stat().st_mode & 0o077:
                os.chmod(directory, DIR_MODE)

    # --- the key ------------------------------------------------------------------------

    def load_or_create_key(self) -> ec.EllipticCurvePrivateKey:
        """The agent's private key, generated (EC P-256) and saved on first use."""
        if self.key_file.exists():
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise StateError(f"{self.key_file} is not an EC private key")
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(self.key_file, pem)
        return key

    @staticmethod
    def csr_pem(key: ec.EllipticCurvePrivateKey, name: str) -> str:
        """A PKCS#10 request for `key` (the server only takes its public key)."""
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    # --- identity -----------------------------------------------------------------------

    def load(self) -> Identity | None:
        """The saved identity, or None before the first registration."""
        if not self.identity_file.exists():
            return None
        missing = [
            f.name for f in (self.key_file, self.cert_file, self.token_file) if not f.exists()
        ]
        if missing:
            raise StateError(f"state directory {self.path} is missing {', '.join(missing)}")
        try:
            data = json.loads(self.identity_file.read_text())
            return Identity(
                agent_id=str(data["agentId"]),
                name=str(data["name"]),
                server=str(data["server"]),
                token=self.token_file.read_text().strip(),
                config=dict(data.get("config") or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{self.identity_file} is unreadable: {exc}") from exc

    def save_registration(
        self, *, server: str, name: str, registration: dict[str, Any]
    ) -> Identity:
        """Keep what `POST /agents/register` answered; agent.json goes last (the commit)."""
        certificate = registration["certificate"]
        self._check_for_our_key(certificate["cert"])
        atomic_write(self.cert_file, certificate["cert"])
        atomic_write(self.ca_file, certificate["ca"])
        atomic_write(self.token_file, registration["token"])
        identity = Identity(
            agent_id=str(registration["agentId"]),
            name=name,
            server=server,
            token=registration["token"],
            config=dict(registration.get("config") or {}),
        )
        self._write_identity(identity)
        return identity

    def _write_identity(self, identity: Identity) -> None:
        body = {
            "agentId": identity.agent_id,
            "name": identity.name,
            "server": identity.server,
            "config": identity.config,
        }
        atomic_write(self.identity_file, json.dumps(body, indent=2) + "\n")

    def replace_certificate(self, pem: str) -> None:
        """Apply a `certificateRenewal` atomically: the new certificate must be for our key."""
        self._check_for_our_key(pem)
        atomic_write(self.cert_file, pem)

    def _check_for_our_key(self, pem: str) -> None:
        try:
            certificate = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise StateError(f"the server sent an unreadable certificate: {exc}") from exc
        key = self.load_or_create_key()
        ours = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if ours != theirs:
            raise StateError("the certificate the server sent is not for this agent's key")

    def pin_server_ca(self, pem: bytes) -> None:
        """Keep the operator's trust anchor for the server (from `--ca`)."""
        x509.load_pem_x509_certificates(pem)  # refuse a file that is no certificate
        if not self.server_ca_file.exists() or self.server_ca_file.read_bytes() != pem:
            atomic_write(self.server_ca_file, pem)

    # --- held tasks ---------------------------------------------------------------------

    def _task_file(self, task_id: str) -> Path:
        # Task ids come from the server: only a UUID may become a file name.
        return self.tasks_dir / f"{uuid.UUID(task_id)}.json"

    def hold_task(self, task_id: str, task_type: str) -> None:
        """Record, before running it, that this agent started the task (and when)."""
        record = {
            "taskId": task_id,
            "taskType": task_type,
            "startedAt": dt.datetime.now(dt.UTC).isoformat(),
            "outcome": None,
        }
        atomic_write(self._task_file(task_id), json.dumps(record))

    def finish_task(self, task_id: str, outcome: dict[str, Any]) -> None:
        """Keep an outcome until the server has acknowledged it (and when the task started,
        for a receipt signed after a restart)."""
        record: dict[str, Any] = {"taskId": task_id, "outcome": outcome}
        with contextlib.suppress(FileNotFoundError, ValueError):
            started = json.loads(self._task_file(task_id).read_text()).get("startedAt")
            if isinstance(started, str):
                record["startedAt"] = started
        atomic_write(self._task_file(task_id), json.dumps(record))

    def release_task(self, task_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._task_file(task_id).unlink()

    def held_tasks(self) -> dict[str, dict[str, Any]]:
        """Task id → record for every task started and not yet reported."""
        held: dict[str, dict[str, Any]] = {}
        if not self.tasks_dir.exists():
            return held
        for path in sorted(self.tasks_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("taskId"), str):
                held[record["taskId"]] = record
        return held
