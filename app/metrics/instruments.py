"""Every Prometheus metric of the web process, defined once.

Counters and histograms live in the process that records them; under
`stella serve --workers N` prometheus-client's multiprocess mode (files in
`PROMETHEUS_MULTIPROC_DIR`, see `app.metrics.multiprocess`) sums them over
the workers at scrape time. Facts of the database (agents by status, tasks
by state, certificates due for renewal) are not kept here at all: the
`DatabaseCollector` reads them when scraped, so every web process reports
the same truth.

Labels are bounded: route templates, methods from a fixed set, status
classes and fixed path names; never a raw path, an id or a token.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from app.models.types import utcnow

HEARTBEATS_RECEIVED = Counter(
    "stella_heartbeats_received",
    "Heartbeats accepted, by the path that answered them (fast_lane or full).",
    ["path"],
)
HEARTBEAT_DURATION = Histogram(
    "stella_heartbeat_duration_seconds",
    "Time to answer a heartbeat request, by the path that answered it.",
    ["path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
REQUEST_DURATION = Histogram(
    "stella_http_request_duration_seconds",
    "Time to answer an API request, by route template, method and status class.",
    ["route", "method", "status"],
)
TASK_DELIVERY = Histogram(
    "stella_task_delivery_seconds",
    "From a task's creation to its hand-over, by how it was handed over (stream, heartbeat).",
    ["path"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
TASK_STREAMS_OPEN = Gauge(
    "stella_task_streams_open",
    "Task streams open now (summed over live web processes).",
    multiprocess_mode="livesum",
)
CERTIFICATES_ISSUED = Counter(
    "stella_certificates_issued",
    "Agent certificates issued at registration.",
)
CERTIFICATES_RENEWED = Counter(
    "stella_certificates_renewed",
    "Agent certificates signed on a heartbeat (renewals signed ahead by the sweep are not here).",
)

# The route label of a request no route matched: one series, whatever the path.
UNMATCHED_ROUTE = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The method, or "other": a client may send any token as its method."""
    return method if method in _METHODS else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def observe_deliveries(path: str, created: Iterable[dt.datetime | None]) -> None:
    """Dispatch-to-delivery latency of tasks just handed over on `path`."""
    now = utcnow()
    histogram = TASK_DELIVERY.labels(path)
    for created_at in created:
        if created_at is not None:
            histogram.observe(max((now - created_at).total_seconds(), 0.0))
