"""What the HIL Server's and the worker's Prometheus metrics share: a registry of the app's own (nothing global, so
tests can build several apps in one process) with the process collector in it, short ways to declare metrics in it,
and the text format `GET /metrics` serves. Needs the server extra (prometheus_client)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import generate_latest as _generate_latest

# The media type of render()'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST


class AppMetrics:
    """An app's metrics, in `registry` (a new one when None), with process_start_time_seconds, memory and open
    file descriptors (Linux) from the process collector."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=self.registry)

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (CONTENT_TYPE)."""
        return _generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "AppMetrics"]
