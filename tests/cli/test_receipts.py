"""`stella receipts get|verify` and `stella keys`, as processes.

A receipt is made as the reference agent makes it, completed through the API of
the real TLS server, fetched with `stella receipts get`, and checked offline
with `stella receipts verify`, whole and tampered with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from agent.signatures import b64decode, b64url, canonical_json
from app.cli.main import cli
from pki import load_or_create_pki
from tests.conftest import ADMIN_TOKEN, Stack
from tests.signing.helpers import make_receipt
from tests.tasks.helpers import Register, delivered_task

STELLA = str(Path(sys.executable).with_name("stella"))


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("STELLA_")}
    return subprocess.run(
        [STELLA, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def _resigned_fields(document: dict[str, Any], **changes: Any) -> str:
    fields = json.loads(b64decode(document["signed"])) | changes
    return b64url(canonical_json(fields))


def test_a_fetched_receipt_verifies_offline_and_a_tampered_one_does_not(
    stack: Stack, operator: httpx.Client, register: Register, tmp_path: Path
) -> None:
    agent, other = register(), register()
    task_id = delivered_task(operator, agent)
    key = agent.registration["certificate"]["key"]
    receipt = make_receipt(key, task_id=task_id, agent_id=agent.id, result={"ok": 1})
    assert agent.complete(task_id, result={"ok": 1}, receipt=receipt).status_code == 200

    fetched = run(
        "receipts",
        "get",
        task_id,
        cwd=tmp_path,
        STELLA_SERVER_URL=stack.base_url,
        STELLA_CA_FILE=str(stack.ca_file),
        STELLA_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert ADMIN_TOKEN not in fetched.stdout + fetched.stderr
    document = json.loads(fetched.stdout)
    saved = tmp_path / "receipt.json"
    saved.write_text(fetched.stdout)
    # Offline: no server settings at all.
    verified = run("receipts", "verify", str(saved), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"valid: task {task_id} succeeded on agent {agent.id}")

    other_ca = load_or_create_pki(tmp_path / "other-pki").cert_pem
    tampered: dict[str, tuple[dict[str, Any], str]] = {
        "outcome": (
            document | {"receipt": document["receipt"] | {"outcome": "failed"}},
            "fields differ from what was signed: outcome",
        ),
        "digest": (
            document | {"receipt": document["receipt"] | {"resultDigest": "sha256:" + "0" * 64}},
            "fields differ from what was signed: resultDigest",
        ),
        "signed outcome": (
            document | {"signed": _resigned_fields(document, outcome="failed")},
            "the signature does not verify",
        ),
        "signed digest": (
            document | {"signed": _resigned_fields(document, logsDigest="sha256:" + "1" * 64)},
            "the signature does not verify",
        ),
        "other agent's certificate": (
            document | {"certificate": other.registration["certificate"]["cert"]},
            f"the certificate names agent '{other.id}'",
        ),
        "other agent's certificate and id": (
            document
            | {"certificate": other.registration["certificate"]["cert"], "agentId": other.id},
            "the certificate names agent",
        ),
        "wrong CA": (
            document | {"caCertificate": other_ca},
            "the agent certificate was not issued by the CA certificate",
        ),
    }
    for name, (changed, reason) in tampered.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(changed))
        # The command in-process (a process each would cost a second or more)...
        result = CliRunner().invoke(cli, ["receipts", "verify", str(path)])
        assert result.exit_code == 1, (name, result.output)
        assert result.output.startswith("invalid: "), (name, result.output)
        assert reason in result.output, (name, result.output)
    # ... and one of them as a process too.
    process = run("receipts", "verify", str(tmp_path / "outcome.json"), cwd=tmp_path)
    assert process.returncode == 1
    assert process.stdout.startswith("invalid: fields differ from what was signed: outcome")

    (tmp_path / "garbage.json").write_text("not json")
    unreadable = CliRunner().invoke(cli, ["receipts", "verify", str(tmp_path / "garbage.json")])
    assert unreadable.exit_code == 2
    assert "cannot read" in unreadable.output


def test_keys_rotate_adds_a_signing_key_and_keeps_the_old_one_listed(tmp_path: Path) -> None:
    env = {"STELLA_DATA_DIR": str(tmp_path)}
    listed = run("keys", "list", cwd=tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    ((old, state, *_),) = [line.split() for line in listed.stdout.splitlines()]
    assert state == "signing"
    rotated = run("keys", "rotate-task-signing", "--retire-after", "600", cwd=tmp_path, **env)
    assert rotated.returncode == 0, rotated.stderr
    assert "new task-signing key" in rotated.stdout
    rows = [line.split() for line in run("keys", "list", cwd=tmp_path, **env).stdout.splitlines()]
    assert (rows[0][0], rows[0][1]) == (old, "published")
    assert rows[1][1] == "signing"
    assert rows[1][0] != old
    assert "retires" in rows[0]
    private = tmp_path / "pki" / "task-signing.json"
    assert private.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in rotated.stdout + listed.stdout


def test_keys_rotate_refuses_a_pki_that_lost_its_signing_keys(tmp_path: Path) -> None:
    env = {"STELLA_DATA_DIR": str(tmp_path)}
    assert run("keys", "list", cwd=tmp_path, **env).returncode == 0
    (tmp_path / "pki" / "task-signing.json").unlink()
    result = run("keys", "rotate-task-signing", cwd=tmp_path, **env)
    assert result.returncode == 2
    assert "task-signing.json" in result.stderr
