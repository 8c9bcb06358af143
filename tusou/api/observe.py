"""Operability, additive to Qiniu's API: ``GET /metrics`` (Prometheus), ``GET /healthz`` and an access log.

Everything here is wired by one call, :func:`install`, from ``create_app``. Nothing here may reveal
tenant data: metrics are labelled by route *template* (group ids are user data and unbounded), method,
status code and error kind only; the access log carries the access key id but never a signature, a secret,
a body or a query string (those may carry image data or list markers).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tusou import __version__
from tusou.config import Settings
from tusou.images import CODES, ImageError
from tusou.service import Observer, Service

access_log = logging.getLogger("tusou.access")
log = logging.getLogger("tusou.api.observe")

# Methods outside this set are client-chosen strings: one label value for all keeps the series bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Access keys are token_urlsafe strings; anything else in the header is logged as "?" so that a client cannot
# inject newlines or megabytes into the log.
_ACCESS_KEY_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# Batch writes of up to 1000 URLs legitimately take a minute: the default buckets stop at 10 s.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_EMBED_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Group/image totals read the store (two count queries on Milvus): an unauthenticated scraper hammering
# /metrics must not turn into store load, so the totals are reused for this long.
_TOTALS_TTL_S = 15.0
_HEALTH_TIMEOUT_S = 5.0
_UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/image/group/{group_id}/add``), never the raw path."""
    route = scope.get("route")
    if route is None:
        return _UNMATCHED
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else _UNMATCHED


def access_key_of(authorization: str) -> str:
    """The access key id of a Qiniu/QBox Authorization header: the part before ':', never the signature.

    Other schemes (``Bearer <metrics token>``) give "-": the whole credential would sit before any ':'.
    """
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme not in ("Qiniu", "QBox") or ":" not in credential:
        return "-"
    key = credential.strip().split(":", 1)[0]
    return key if _ACCESS_KEY_RE.fullmatch(key) else "?"


class _StoreTotals(Collector):
    """``tusou_groups`` and ``tusou_images``: totals over every tenant, computed on scrape, cached briefly.

    One read of the store's own totals (``Service.totals``: every tenant, revoked keys' data included).
    Only sums leave this class.
    """

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._cached: tuple[float, int, int] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        totals = self._totals()
        if totals is None:
            return  # absent rather than a misleading 0; the store's health is /healthz's business
        groups, images = totals
        yield GaugeMetricFamily("tusou_groups", "Groups in the store, all tenants together.", value=groups)
        yield GaugeMetricFamily("tusou_images", "Images in the store, all tenants together.", value=images)

    def _totals(self) -> tuple[int, int] | None:
        with self._lock:  # concurrent scrapes share one read instead of each doing it
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < _TOTALS_TTL_S:
                return self._cached[1], self._cached[2]
            service = self._app.state.service
            if service is None:
                return None  # still starting
            try:
                groups, images = service.totals()
            except Exception:
                # Logged without the exception text: a store message may name a tenant or group.
                log.warning("metrics: could not count groups and images (store unavailable?)")
                return None
            self._cached = (now, groups, images)
            return groups, images


class Metrics:
    """One app's metrics in its own registry (tests build many apps in one process)."""

    def __init__(self, app: FastAPI) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tusou_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tusou_http_request_duration_seconds",
            "HTTP request latency (until the response is sent) by method, route template and status code.",
            ["method", "route", "status"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.embedded = Counter(
            "tusou_images_embedded",
            "Images run through the model; purpose is index (new/add) or query (search).",
            ["purpose"],
            registry=self.registry,
        )
        self.embed_latency = Histogram(
            "tusou_embed_batch_duration_seconds",
            "Model time per batch (a batch may hold images of several requests).",
            ["purpose"],
            buckets=_EMBED_BUCKETS,
            registry=self.registry,
        )
        self.image_errors = Counter(
            "tusou_image_errors",
            "URIs that could not become an image, by ImageError kind (docs/errors.md).",
            ["kind"],
            registry=self.registry,
        )
        for kind in CODES:  # every kind present from the start, so rate() works on the first error
            self.image_errors.labels(kind=kind)
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (read from /proc: Linux only).
        ProcessCollector(registry=self.registry)
        self.registry.register(_StoreTotals(app))

    def count_image_error(self, exc: ImageError) -> None:
        self.image_errors.labels(kind=exc.kind if exc.kind in CODES else "other").inc()


# --- hooks into the service ----------------------------------------------------------------------------
# The service reports through its ``observer`` (tusou.service.Observer); this one feeds the app's metrics.
# It is set on the instance, never the class or module, which other apps in the same process share.


class MetricsObserver(Observer):
    """The service's observer hook, feeding ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def embedded(self, purpose: str, count: int, seconds: float) -> None:
        self.metrics.embed_latency.labels(purpose=purpose).observe(seconds)
        self.metrics.embedded.labels(purpose=purpose).inc(count)

    def image_failed(self, error: ImageError) -> None:
        self.metrics.count_image_error(error)


def instrument_service(service: Service | None, metrics: Metrics) -> None:
    """Count embeddings and per-image errors of ``service`` into ``metrics`` (idempotent)."""
    if service is not None and not isinstance(service.observer, MetricsObserver):
        service.observer = MetricsObserver(metrics)


# --- middleware ----------------------------------------------------------------------------------------
class ObserveMiddleware:
    """Times every HTTP request, counts it by route template and status, and writes one access log line.

    Pure ASGI (not BaseHTTPMiddleware) so that bodies stream through untouched. Installed outside
    RequestIdMiddleware, so it sees the X-Reqid that one adds to the response.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        reqid = "-"
        bytes_in = bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def observing_send(message: Message) -> None:
            nonlocal status, reqid, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-reqid":
                        reqid = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, observing_send)
        finally:
            self._record(scope, status, reqid, bytes_in, bytes_out, time.perf_counter() - start)

    def _record(
        self, scope: Scope, status: int, reqid: str, bytes_in: int, bytes_out: int, elapsed: float
    ) -> None:
        method = scope.get("method", "")
        method = method if method in _METHODS else "OTHER"
        # The router fills scope["route"] on the shared scope dict while matching; read it after the call.
        route = route_template(scope)
        if self.metrics is not None:
            labels = {"method": method, "route": route, "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.latency.labels(**labels).observe(elapsed)
        authorization = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        # Route template, not path: no group ids, and no query string (list markers) is ever logged.
        access_log.info(
            "%s %s %d %.1fms reqid=%s ak=%s in=%d out=%d",
            method,
            route,
            status,
            elapsed * 1000,
            reqid,
            access_key_of(authorization),
            bytes_in,
            bytes_out,
        )


# --- /healthz ------------------------------------------------------------------------------------------
class _HealthCheck:
    """A trivial store read on its own daemon thread, at most one at a time: a hung store makes probes fail
    (503 after a timeout) instead of piling up threads or blocking shutdown; probes arriving meanwhile wait
    on the same read."""

    def __init__(self) -> None:
        self._inflight: Future[None] | None = None
        self._lock = threading.Lock()

    def _submit(self, fn: Callable[[], object]) -> Future[None]:
        with self._lock:
            if self._inflight is None or self._inflight.done():
                future: Future[None] = Future()

                def run() -> None:
                    try:
                        fn()
                    except BaseException as exc:  # noqa: BLE001 - handed to the waiting probe
                        future.set_exception(exc)
                    else:
                        future.set_result(None)

                threading.Thread(target=run, name="healthz", daemon=True).start()
                self._inflight = future
            return self._inflight

    async def __call__(self, fn: Callable[[], object]) -> None:
        future = self._submit(fn)
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), _HEALTH_TIMEOUT_S)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the access log and metrics middleware, ``GET /metrics`` and ``GET /healthz`` to ``app``.

    Call after ``app.state.service`` is assigned (it may still be None: it is then instrumented when the
    lifespan has built it).
    """
    metrics = Metrics(app) if settings.metrics else None
    app.add_middleware(ObserveMiddleware, metrics=metrics)
    if metrics is not None:
        instrument_service(app.state.service, metrics)
        inner_lifespan = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: Any) -> Any:
            async with inner_lifespan(a) as state:
                instrument_service(app.state.service, metrics)  # built by the lifespan when not given
                yield state

        app.router.lifespan_context = lifespan

        token = (settings.metrics_token or "").encode()

        async def metrics_endpoint(request: Request) -> Response:
            if token:
                given = request.headers.get("authorization", "").encode("latin-1")
                # Constant time, so the token cannot be guessed byte by byte from response times.
                if not secrets.compare_digest(given, b"Bearer " + token):
                    return JSONResponse(
                        {"error": "bad token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                    )
            # The totals collector reads the store: keep that off the event loop.
            body = await run_in_threadpool(generate_latest, metrics.registry)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        # Out of the OpenAPI document: it describes Qiniu's API for clients; these are for operators.
        app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

    health = _HealthCheck()

    async def healthz(request: Request) -> JSONResponse:
        service = request.app.state.service
        if service is None:
            return JSONResponse({"error": "starting"}, status_code=503)
        try:
            await health(service.health)
        except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
            # The detail goes to the log, not to an unauthenticated caller.
            log.warning("healthz: store read failed: %s", type(exc).__name__)
            return JSONResponse({"error": "store unavailable"}, status_code=503)
        body = {
            "status": "ok",
            "version": __version__,
            "model": service.embedder.model_id,
            "store": settings.store,
        }
        return JSONResponse(body)

    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
