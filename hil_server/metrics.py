"""Prometheus metrics (`GET /metrics`) and the middleware that times HTTP requests.

Every app gets its own `CollectorRegistry` (tests build several apps in one process, so nothing is global).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from hil_protocol.metrics import CONTENT_TYPE, AppMetrics

from .matching import MatchedBy, Outcome
from .state import server_state

if TYPE_CHECKING:
    from .service import HilService

METRICS_PATH = "/metrics"
# Long polls hold a request for up to 60 s, so the buckets reach that far.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics(AppMetrics):
    """The app's Prometheus metrics. Implements the service's `ServiceMetrics`; `wecom_attempt` and
    `workers_changed` are handed to the robot client and the worker hub when they are built."""

    def __init__(self, *, version: str, mode: str, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.gauge("hil_info", "HIL Server version and mode", ["version", "mode"]).labels(version, mode).set(1)
        self.waiting = self.gauge("hil_waiting_sessions", "Questions waiting for a reply")
        self.replies_matched = self.counter(
            "hil_replies_matched", "Replies stored on a question, by how they were matched", ["method"]
        )
        self.hints_sent = self.counter(
            "hil_hints_sent", "Hints the robot posted (or failed to post) in a chat", ["kind", "result"]
        )
        self.callbacks = self.counter("hil_callbacks", "Robot callbacks handled, by outcome", ["outcome"])
        self.wecom_sends = self.counter(
            "hil_wecom_sends",
            "Send attempts to WeCom by errcode (direct mode; -1 network error, -2 unreadable answer, -4 invalid text)",
            ["errcode"],
        )
        self.worker_connections = self.gauge("hil_worker_connections", "Workers connected now (relay mode)")
        self.worker_connects = self.counter("hil_worker_connects", "Worker connections accepted (relay mode)")
        self.polls = self.counter("hil_polls", "Polls answered, short or long (?wait=N)", ["kind"])
        self.task_restarts = self.counter(
            "hil_background_restarts", "Background tasks restarted after a crash", ["task"]
        )
        self.http_duration = self.histogram(
            "hil_http_request_duration_seconds",
            "HTTP request duration by method and route template",
            ["method", "route"],
            DURATION_BUCKETS,
        )
        self.send_queue = self.gauge("hil_aibot_send_queue", "AI-bot messages waiting for WeCom's pace (AI-bot mode)")
        self._workers = 0

    def bind_send_queue(self, depth: Callable[[], int]) -> None:
        """The AI bot's queue depth, read at scrape time."""
        self.send_queue.set_function(depth)

    def bind(self, service: HilService) -> None:
        """Attach to one lifespan's service."""
        self.waiting.set_function(lambda: service.waiting_count)  # counted when scraped

    def callback(self, outcome: Outcome, matched_by: MatchedBy | None) -> None:
        self.callbacks.labels(outcome).inc()
        if matched_by is not None:  # a reply was stored on a question
            self.replies_matched.labels(matched_by).inc()

    def notice(self, kind: str, sent: bool) -> None:
        self.hints_sent.labels(kind, "sent" if sent else "failed").inc()

    def poll(self, held: bool) -> None:
        self.polls.labels("long" if held else "short").inc()

    def task_restarted(self, task: str) -> None:
        self.task_restarts.labels(task).inc()

    def wecom_attempt(self, errcode: int) -> None:
        """RobotSender.on_attempt: one call per attempt, 0 when WeCom took the message."""
        self.wecom_sends.labels(str(errcode)).inc()

    def workers_changed(self, count: int) -> None:
        """The worker hub's on_change. The hub reports every add as one more than the count it reported last (a
        replacement reports the removal first), so a rise is a new connection."""
        if count > self._workers:
            self.worker_connects.inc(count - self._workers)
        self._workers = count
        self.worker_connections.set(count)


def route_template(scope: Scope, routes: Iterable[BaseRoute]) -> str:
    """The matched route's path template (`/api/poll/{session_id}`), never the raw URL: bounded cardinality."""
    route = scope.get("route")  # set by FastAPI for its own routes, not for plain Starlette ones
    if route is None:
        for candidate in _flatten(routes):
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and route is None:
                route = candidate
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


def _flatten(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    # Newer FastAPI keeps an included router as one entry; our routers have no prefix, so their paths are absolute.
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            yield from _flatten(inner)
        else:
            yield route


class RequestTimer:
    """Pure ASGI middleware (no buffering, so long polls and uploads stream as before)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            method = scope.get("method", "")
            self.metrics.http_duration.labels(
                method if method in _METHODS else "other", route_template(scope, self.routes)
            ).observe(time.perf_counter() - start)


router = APIRouter()


@router.get(METRICS_PATH, include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format. Needs an API token (any valid one) when HIL_API_TOKENS is set (AuthMiddleware)."""
    state = server_state(request)
    await state["service"].count_waiting()  # the gauge is read at scrape time, from the repository
    return Response(state["metrics"].render(), media_type=CONTENT_TYPE)


__all__ = ["Metrics", "RequestTimer", "route_template", "router"]
