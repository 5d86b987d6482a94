"""What `GET /metrics` answers: this server's metrics in Prometheus text format."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, values
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from app.metrics.collector import DatabaseCollector
from app.settings import Settings


def registry_for(engine: Engine, settings: Settings) -> CollectorRegistry:
    """The registry one app scrapes: every web process's metrics, and the database's gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if values.ValueClass is not values.MutexValue:
        # Multiprocess mode (`stella serve`): the files of every worker, summed.
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(DatabaseCollector(engine, settings))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition; runs the database queries, so call it from a worker thread."""
    return generate_latest(registry)


class _ThisProcess(Collector):
    """The process-wide default registry (one web process: no multiprocess files)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
