"""Prometheus metrics: definitions (`instruments`), the database-backed gauges
(`collector`), request timing (`middleware`), `GET /metrics` (`router`) and the
multiprocess directory of `stella serve` (`multiprocess`).

Kept free of imports: `stella serve` must set PROMETHEUS_MULTIPROC_DIR before
anything imports prometheus-client, which picks its value store on import.
"""
