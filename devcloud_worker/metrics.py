"""The worker's Prometheus metrics (`GET /metrics`), in a registry of its own per app (nothing global, so tests can
build several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from hil_protocol.metrics import AppMetrics
from hil_protocol.relay_frames import ACTION_SEND_HINT, ACTION_SEND_MESSAGE, ACTION_UPLOAD_IMAGE

# Label values for actions come from the server's frames: anything else is counted as "unknown", so a peer cannot
# grow the metric without bound.
ACTIONS = frozenset({ACTION_SEND_MESSAGE, ACTION_SEND_HINT, ACTION_UPLOAD_IMAGE})


def action_label(action: str) -> str:
    return action if action in ACTIONS else "unknown"


class WorkerMetrics(AppMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.spool_depth = self.gauge("hil_worker_spool_depth", "Callbacks spooled and not yet acknowledged")
        self.spool_dead = self.gauge(
            "hil_worker_spool_dead", "Callbacks set aside because they kept failing (spool table `dead`)"
        )
        self.link_up = self.gauge("hil_worker_link_up", "1 while the WebSocket to the HIL Server is open")
        self.reconnects = self.counter(
            "hil_worker_reconnects", "Times the link to the HIL Server opened again after it was lost"
        )
        self.connect_failures = self.counter(
            "hil_worker_connect_failures", "Attempts to open the link that failed (network or handshake)"
        )
        self.requests = self.counter(
            "hil_worker_requests", "Requests from the HIL Server by action and result", ["action", "result"]
        )
        self.callbacks = self.counter(
            "hil_worker_callbacks", "Robot callbacks received, by outcome (spooled, refused)", ["outcome"]
        )
        self.relayed = self.counter(
            "hil_worker_callbacks_relayed", "Spooled callbacks written to the link, by kind (first, resent)", ["kind"]
        )
        self.acked = self.counter("hil_worker_callbacks_acked", "Callbacks the HIL Server acknowledged")
        self.restarts = self.counter("hil_worker_task_restarts", "Background tasks restarted after a crash", ["task"])

    def bind(self, depth: Callable[[], float], dead: Callable[[], float]) -> None:
        """Read the spool's counts at scrape time."""
        self.spool_depth.set_function(depth)
        self.spool_dead.set_function(dead)
