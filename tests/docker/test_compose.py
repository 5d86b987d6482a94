"""docker/: no Docker engine runs here, so check the files say what the Procfile says."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from app.metrics import collector, instruments

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


def metric_names() -> set[str]:
    """Every metric family /metrics exposes, by its exposition name."""
    names = set(collector.FAMILIES)
    for metric in vars(instruments).values():
        if isinstance(metric, MetricWrapperBase):
            kind = metric._type
            names.add(f"{metric._name}_total" if kind == "counter" else metric._name)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (ROOT / "docker" / "grafana" / "dashboards" / "stella.json").read_text()
    )
    return loaded


def dashboard_queries() -> list[str]:
    return [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]


class TestMetrics:
    def test_prometheus_scrapes_the_web_process_over_tls_with_the_token_and_flower(
        self,
    ) -> None:
        config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        web = jobs["stella-web"]
        assert web["scheme"] == "https"
        assert web["metrics_path"] == "/metrics"
        assert web["static_configs"][0]["targets"] == ["web:8443"]
        # The token comes from a file, never inline in the config.
        assert web["authorization"]["type"] == "Bearer"
        assert "credentials" not in web["authorization"]
        assert web["authorization"]["credentials_file"] == "/run/secrets/stella-admin-token"
        assert "insecure_skip_verify" not in web["tls_config"]
        ca_file = web["tls_config"]["ca_file"]
        assert jobs["stella-flower"]["static_configs"][0]["targets"] == ["flower:5555"]

        services = compose()["services"]
        prometheus = services["prometheus"]
        assert "stella-admin-token" in prometheus["secrets"]
        assert compose()["secrets"]["stella-admin-token"]["environment"] == "STELLA_ADMIN_TOKEN"
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in prometheus["volumes"]}
        assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
        assert mounts["/etc/prometheus/stella-ca"] == "stella-ca"
        assert ca_file == "/etc/prometheus/stella-ca/ca.pem"
        # Prometheus sees the CA certificate, never the PKI directory with the keys.
        assert "stella-data" not in mounts.values()
        export = services["ca-export"]
        assert "/var/lib/stella/pki/ca.pem" in " ".join(command_of(export))
        assert (
            prometheus["depends_on"]["ca-export"]["condition"] == "service_completed_successfully"
        )
        assert "flower" in prometheus["depends_on"]

    def test_grafana_is_provisioned_with_the_dashboard(self) -> None:
        grafana = compose()["services"]["grafana"]
        mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in grafana["volumes"]}
        assert mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards"
        assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
        providers = yaml.safe_load(
            (ROOT / "docker/grafana/provisioning/dashboards/stella.yml").read_text()
        )
        assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
        sources = yaml.safe_load(
            (ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text()
        )
        uids = {source["uid"] for source in sources["datasources"]}
        for panel in dashboard()["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] in uids, panel["title"]

    def test_the_dashboard_shows_every_stella_metric_and_only_real_ones(self) -> None:
        queries = " ".join(dashboard_queries())
        used = set(re.findall(r"\bstella_[a-z_]+", queries))
        # A histogram is queried through its _bucket or _count series.
        used = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
        assert used == metric_names()
        assert "flower_task_runtime_seconds_bucket" in queries
        assert "flower_events_total" in queries
