"""The HTTP face of tusou: wiring of Qiniu's routes (:mod:`tusou.api.routes`), its wire format
(:mod:`tusou.api.qiniu`) and signatures over :class:`tusou.service.Service`.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tusou import __version__
from tusou.api import page, qiniu, routes
from tusou.api.guard import PathGuard
from tusou.api.limits import RateLimiter
from tusou.api.observe import access_key_of, route_template
from tusou.api.observe import install as install_observability
from tusou.config import Settings
from tusou.errors import AuthError, QiniuError, RateLimited
from tusou.service import Service, build_service
from tusou.store.keys import KeyStore

log = logging.getLogger("tusou.api")
_HTTP_MESSAGES = {404: "not found", 405: "method not allowed"}


class RequestIdMiddleware:
    """Every response carries ``X-Reqid``: Qiniu's SDK treats a response without one as failed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reqid = secrets.token_urlsafe(12)
        scope.setdefault("state", {})["reqid"] = reqid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-reqid", reqid.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class LogThrottle:
    """Lets ``burst`` log lines through at once and ``per_s`` a second after that, and counts the rest."""

    def __init__(
        self, per_s: float = 10, burst: int = 20, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._bucket = RateLimiter(per_s, burst, max_keys=1, clock=clock)
        self._lock = threading.Lock()
        self._dropped = 0

    def take(self) -> int | None:
        """None: leave this line out; else how many lines were left out since the last one let through."""
        with self._lock:
            if not self._bucket.allow(""):
                self._dropped += 1
                return None
            dropped, self._dropped = self._dropped, 0
            return dropped


async def qiniu_error(request: Request, exc: Exception) -> JSONResponse:
    """The one handler for refused requests: Qiniu's status and ``{"error": message}``."""
    if isinstance(exc, RateLimited):
        return error_response(429, exc.message, {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    if isinstance(exc, AuthError) and exc.reason:
        # The client gets Qiniu's bare "bad token"; the operator's log says why (never the signature). A
        # refusal needs no key, and the rate limit counts only verified requests: the lines are throttled so
        # that nobody fills the log's disk with bad signatures (the metrics still count every 401).
        throttle: LogThrottle | None = getattr(request.app.state, "refusal_log", None)
        dropped = throttle.take() if throttle is not None else 0
        if dropped is not None:
            ak = access_key_of(request.headers.get("authorization", ""))
            route = route_template(request.scope)
            more = f" ({dropped} more refusals not logged)" if dropped else ""
            log.warning("%d %s on %s: %s (ak=%s)%s", exc.status, exc.message, route, exc.reason, ak, more)
    if isinstance(exc, QiniuError):
        return error_response(exc.status, exc.message)
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, _HTTP_MESSAGES.get(exc.status_code, str(exc.detail)))
    return error_response(400, "invalid request")  # RequestValidationError: a path or query we cannot read


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    # This handler runs outside RequestIdMiddleware (Starlette's ServerErrorMiddleware): add the id here.
    reqid = request.scope.get("state", {}).get("reqid") or secrets.token_urlsafe(12)
    return JSONResponse({"error": "internal error"}, status_code=500, headers={"X-Reqid": reqid})


def create_app(
    settings: Settings,
    service: Service | None = None,
    keys: KeyStore | None = None,
    *,
    close_service: bool = False,
) -> FastAPI:
    """The ASGI app. Without ``service``/``keys`` it builds them from ``settings`` at start-up (and then
    closes them when it stops); given ones belong to the caller, unless ``close_service`` hands the given
    service over (``tusou serve``: uvicorn re-raises SIGTERM once it has stopped, so code after its
    ``run`` never runs; the lifespan's end does)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.service is None:
            app.state.service = await run_in_threadpool(build_service, settings)
        if app.state.keys is None:
            app.state.keys = KeyStore(settings.data / "keys.db")
        try:
            yield
        finally:
            if service is None or close_service:
                app.state.service.close()  # the service closes its store
            if keys is None:
                app.state.keys.close()

    app = FastAPI(
        title="tusou",
        version=__version__,
        description="Self-hosted search-by-image, wire-compatible with Qiniu's image search API.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN onto the origin of the web page, which holds
        # a secret key: off. The OpenAPI document stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        # A redirect to the slash-less path is built from the Host header (anyone's): 404 instead.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.keys = keys
    app.state.wire = qiniu.Wire(settings)
    app.state.refusal_log = LogThrottle()
    app.state.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.add_middleware(PathGuard)  # inside RequestIdMiddleware, so its 400s carry X-Reqid too
    app.add_middleware(RequestIdMiddleware)
    install_observability(app, settings)  # /metrics, /healthz, access log (docs/operations.md)
    for handled in (QiniuError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(handled, qiniu_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.include_router(routes.router)
    app.include_router(page.router)
    app.openapi = lambda: openapi(app, settings)  # type: ignore[method-assign]
    return app


def openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document: the routes, Qiniu's signature scheme, and request bodies with these limits."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    # FastAPI documents a 422 in its validation shape for every operation with parameters; tusou answers a
    # path or query it cannot read with 400 {"error": ...} (qiniu_error), and a search's 422 is its own.
    validation = {"$ref": "#/components/schemas/HTTPValidationError"}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.get("responses", {})
            answered = answers.get("422", {}).get("content", {}).get("application/json", {})
            if answered.get("schema") == validation:
                del answers["422"]
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {})["QiniuMac"] = {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "Qiniu <AccessKey>:<Sign> (or QBox), signed as Qiniu's SDKs sign.",
    }
    schemas_out = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas_out.pop(unused, None)
    for model in qiniu.request_models(settings):
        spec_model = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas_out.update(spec_model.pop("$defs", {}))
        schemas_out[model.__name__] = spec_model
    app.openapi_schema = spec
    return spec
