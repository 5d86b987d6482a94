"""Settings from the environment (prefix `STELLA_`), built once by `get_settings()`."""

from __future__ import annotations

import ipaddress
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; CONTRACT.md's settings table is the reference."""

    model_config = SettingsConfigDict(env_prefix="STELLA_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    broker_url: str | None = None
    redis_url: str | None = None
    admin_token: SecretStr | None = None
    pki_dir: Path | None = None

    heartbeat_interval: int = Field(30, ge=1)
    task_poll_interval: int = Field(5, ge=1)
    agent_log_level: Literal["debug", "info", "warning", "error"] = "info"
    offline_after_missed: int = Field(3, ge=1)
    sweep_interval: int | None = Field(None, ge=1)
    # Mass-offline guard: a sweep that would mark more than this percentage
    # of the live agents offline marks none and holds for the grace (0: off).
    offline_guard_percent: float = Field(0.0, ge=0, le=100)
    # Seconds the guard holds once engaged, after a mass silence or an outage
    # of the control plane (unset: the offline window).
    offline_guard_grace: int | None = Field(None, ge=1)
    # Heartbeats are written behind, one statement per web process per this
    # many seconds: the most a crashed web process can lose (0: write each
    # heartbeat in its own transaction).
    heartbeat_flush_interval: float = Field(1.0, ge=0, le=10)
    # How often each web process re-reads which agents have pending tasks,
    # in case a notification was lost (Redis unreachable when it was sent).
    pending_reconcile_interval: float = Field(30.0, gt=0, le=3600)
    # Verified tokens, certificates and registrations kept per web process.
    auth_cache_size: int = Field(200_000, ge=0)

    cert_ttl: int = Field(86400, ge=60)
    cert_renewal_window: int = Field(3600, ge=0)
    # Renew once this fraction of a certificate's lifetime has passed, give or
    # take a per-agent jitter (unset: within STELLA_CERT_RENEWAL_WINDOW of expiry).
    cert_renew_at: float | None = Field(None, gt=0, lt=1)
    # Seconds after its certificate expired during which an agent may still be
    # re-certified by proving possession of its key (0: off, locked out at expiry).
    cert_grace: int = Field(0, ge=0)
    registration_token_ttl: int = Field(86400, ge=60, le=86400)
    # Failed registrations (bad, used or expired token) one source address may
    # make per window of this many seconds; past them it is answered 429.
    registration_failure_limit: int = Field(10, ge=1)
    registration_failure_window: int = Field(60, ge=1, le=86400)

    server_names: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    trusted_proxies: Annotated[list[str], NoDecode] = []
    # Header a TLS-terminating proxy puts the verified client certificate in
    # (URL-encoded PEM, as nginx's $ssl_client_escaped_cert).
    client_cert_header: str = "X-Client-Cert"

    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Seconds an idle HTTP connection stays open. Longer than the heartbeat
    # interval, so that an agent's heartbeats share one TLS connection: a
    # handshake costs the server far more than a heartbeat does.
    keep_alive_timeout: int = Field(75, ge=1)
    task_default_timeout: int = Field(300, ge=1)
    # After `stella keys rotate-task-signing`, seconds the replaced task-signing
    # keys stay published, so that tasks signed before the switch still verify.
    task_signing_retire_after: int = Field(7 * 24 * 3600, ge=0)
    # A non-idempotent task whose agent is marked offline becomes `unknown`
    # (not failed, not timed out) until the agent reports what happened.
    outcome_unknown: bool = False

    # Fan-out: agents per committed batch, and an optional pause between
    # batches so that a dispatch to a large fleet does not hit every agent
    # (and the registry they pull from) in the same second.
    fanout_batch_size: int = Field(500, ge=1, le=5000)
    fanout_batch_interval: float = Field(0.0, ge=0, le=60)
    # A dispatch whose expansion made no progress for this long is re-driven.
    dispatch_stall_after: int = Field(60, ge=1)
    # Prefix for every broker key and pub/sub channel (Redis), to share one
    # Redis between installations.
    broker_key_prefix: str = ""

    # Task stream: the largest message an agent may send, how many messages a
    # second it may send on average (bursts up to `stream_burst`), and the
    # interval of WebSocket pings.
    stream_max_message_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    stream_messages_per_second: float = Field(50.0, gt=0)
    stream_burst: int = Field(200, ge=1)
    stream_ping_interval: float = Field(20.0, gt=0)
    # Log bytes kept per task; later lines are dropped behind one marker line.
    task_log_max_bytes: int = Field(1024 * 1024, ge=1024)

    # Audit events older than this many days are pruned by a sweep.
    audit_retention_days: int = Field(90, ge=1)
    # Refused authentications are counted in memory and written, coalesced,
    # once per this many seconds per web process (a flood costs no insert each).
    audit_flush_interval: float = Field(2.0, gt=0, le=60)

    # GET /metrics without the admin token (a scraper on a trusted network).
    metrics_public: bool = False

    # Log lines as JSON objects (for a collector) or as text (for a terminal).
    log_format: Literal["json", "text"] = "json"

    @field_validator("server_names", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)
        return value

    @property
    def resolved_pki_dir(self) -> Path:
        return self.pki_dir or self.data_dir / "pki"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'stella.db'}"

    @property
    def resolved_sweep_interval(self) -> int:
        return self.sweep_interval or self.heartbeat_interval

    @cached_property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in self.trusted_proxies)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
