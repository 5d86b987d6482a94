"""`stella tokens create` and `stella db upgrade` as processes."""

from __future__ import annotations

from pathlib import Path

from tests.cli.test_serve import _stella


class TestTokensCreate:
    def test_prints_a_token_that_is_stored_only_as_its_hash(self, tmp_path: Path) -> None:
        assert _stella(tmp_path, "db", "upgrade").returncode == 0
        result = _stella(tmp_path, "tokens", "create")
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()
        assert token.startswith("srt_")
        assert len(token) > 40
        assert "expires at" in result.stderr
        assert token.encode() not in (tmp_path / "stella.db").read_bytes()

    def test_rejects_a_lifetime_over_24_hours(self, tmp_path: Path) -> None:
        assert _stella(tmp_path, "db", "upgrade").returncode == 0
        result = _stella(tmp_path, "tokens", "create", "--ttl", "90000")
        assert result.returncode == 2
        assert "ttlSeconds must be between 1 and 86400" in result.stderr


class TestDbUpgrade:
    def test_is_idempotent(self, tmp_path: Path) -> None:
        first = _stella(tmp_path, "db", "upgrade")
        second = _stella(tmp_path, "db", "upgrade")
        assert first.returncode == 0, first.stderr
        assert second.returncode == 0, second.stderr
