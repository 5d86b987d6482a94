"""docker/: no Docker engine runs here, so check the files say what the Procfile says."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def procfile() -> dict[str, list[str]]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = shlex.split(command)
    return processes


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
    return loaded


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


class TestProcfile:
    def test_runs_web_worker_beat_and_flower_as_stella_subcommands(self) -> None:
        processes = procfile()
        assert {"web", "worker", "beat", "flower"} <= processes.keys()
        for command in processes.values():
            assert command[0] == "stella"
        assert processes["web"][:2] == ["stella", "serve"]
        assert "--tls" in processes["web"]


class TestCompose:
    def test_every_procfile_process_runs_with_the_same_command(self) -> None:
        services = compose()["services"]
        for name, command in procfile().items():
            assert command_of(services[name]) == command, name

    def test_brings_its_own_postgresql_and_redis_with_health_checks(self) -> None:
        services = compose()["services"]
        for name in ("postgres", "redis", "web", "worker"):
            assert "healthcheck" in services[name], name
        for name in ("web", "worker", "beat"):
            depends = services[name]["depends_on"]
            assert depends["postgres"]["condition"] == "service_healthy"
            assert depends["redis"]["condition"] == "service_healthy"
            assert depends["release"]["condition"] == "service_completed_successfully"

    def test_processes_share_one_configuration_and_data_volume(self) -> None:
        services = compose()["services"]
        environments = [services[name]["environment"] for name in ("web", "worker", "beat")]
        assert all(env == environments[0] for env in environments)
        assert environments[0]["STELLA_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environments[0]["STELLA_BROKER_URL"].startswith("redis://")
        for name in ("web", "worker", "beat"):
            assert "stella-data:/var/lib/stella" in services[name]["volumes"]


class TestDockerfile:
    def test_is_multi_stage_and_runs_as_a_non_root_user(self) -> None:
        lines = (ROOT / "docker" / "Dockerfile").read_text().splitlines()
        assert sum(line.startswith("FROM ") for line in lines) >= 2
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users
        assert users[-1] not in ("root", "0")

    def test_copies_every_package_the_image_needs(self) -> None:
        text = (ROOT / "docker" / "Dockerfile").read_text()
        for package in ("app", "pki", "workers", "beat", "migrations"):
            assert f"COPY {package} ./{package}" in text, package
