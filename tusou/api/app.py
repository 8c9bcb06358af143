"""The HTTP face of tusou: Qiniu's routes, wire format and signatures over :class:`tusou.service.Service`.

Handlers stay thin: authenticate, parse the body, run the use case in a worker thread (decoding and
embedding are CPU work that must not block the event loop), and write Qiniu's JSON.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tusou import __version__
from tusou.api import schemas
from tusou.api.auth import BAD_TOKEN, SignedRequest, claimed_access_key, verify
from tusou.api.limits import TOO_MANY_REQUESTS, RateLimiter
from tusou.api.observe import install as install_observability
from tusou.config import Settings
from tusou.errors import AuthError, QiniuError
from tusou.service import KEEP, Service
from tusou.store.keys import KeyStore

log = logging.getLogger("tusou.api")

# Largest form value read as a Python literal (the SDK's str(dict) form encoding of nested values).
FORM_LITERAL_MAX = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


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


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused past ``limit`` bytes without reading it all into memory first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise QiniuError(413, "request body too large")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise QiniuError(413, "request body too large")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's own cache, so later readers see the same bytes
    return body


def _form_value(value: str) -> Any:
    # requests form-encodes nested values with str(): '{"uri": ...}' or "{'uri': ...}".
    if value[:1] in "{[":
        try:
            return _loads(value)
        except (ValueError, RecursionError):
            if len(value) > FORM_LITERAL_MAX:
                return value  # literal_eval is slow and memory-hungry on big input: never on untrusted bulk
            try:
                parsed = ast.literal_eval(value)
                json.dumps(parsed, allow_nan=False)  # only what JSON could have carried
                return parsed
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return value
    return value


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise.
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf, which no JSON response can carry back
        raise ValueError(f"{text} is out of range")
    return value


def _loads(text: str | bytes) -> Any:
    """Strict JSON: no NaN, no Infinity, no float that overflows, no unpaired surrogate."""
    value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if re.search(rb"\\u[dD][89a-fA-F]", raw):  # only pay for the check when surrogate escapes appear
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # "\ud800" alone parses to a str that no UTF-8 database or response can hold.
            raise ValueError("unpaired surrogate") from None
    return value


def parse_body(content_type: str, body: bytes) -> dict[str, Any]:
    """A request body as a dict, read by its Content-Type (JSON, or form-encoded as the Python SDK sends)."""
    if not body.strip():
        return {}
    media = content_type.split(";", 1)[0].strip().lower()
    if media == FORM_TYPE:
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError) as exc:
            raise QiniuError(400, "invalid body") from exc
        parsed: dict[str, Any] = {}
        for key, value in pairs:
            item = _form_value(value)
            if key.endswith("[]"):
                key = key[:-2]
                parsed.setdefault(key, [])
            if key in parsed:
                existing = parsed[key]
                parsed[key] = [*existing, item] if isinstance(existing, list) else [existing, item]
            else:
                parsed[key] = item
        return parsed
    try:
        parsed = _loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise QiniuError(400, "invalid body") from exc
    if not isinstance(parsed, dict):
        raise QiniuError(400, "invalid body")
    return parsed


def _as_list(value: Any) -> Any:
    """A form-encoded list of one entry arrives as that entry; anything else passes to validation."""
    return [value] if isinstance(value, dict) else value


def create_app(settings: Settings, service: Service | None = None, keys: KeyStore | None = None) -> FastAPI:
    """The ASGI app. Without ``service``/``keys`` it builds them from ``settings`` at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = service is None
        if app.state.service is None:
            from tusou.service import build_service

            app.state.service = await run_in_threadpool(build_service, settings)
        if app.state.keys is None:
            app.state.keys = KeyStore(settings.data / "keys.db")
        try:
            yield
        finally:
            if owned:
                app.state.service.close()
                app.state.service.store.close()

    app = FastAPI(
        title="tusou",
        version=__version__,
        description="Self-hosted search-by-image, wire-compatible with Qiniu's image search API.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.keys = keys
    app.add_middleware(RequestIdMiddleware)
    install_observability(app, settings)  # /metrics, /healthz, access log (docs/operations.md)

    @app.exception_handler(QiniuError)
    async def _qiniu_error(request: Request, exc: QiniuError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "not found", 405: "method not allowed"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        # This handler runs outside RequestIdMiddleware (Starlette's ServerErrorMiddleware): add the id here.
        reqid = request.scope.get("state", {}).get("reqid") or secrets.token_urlsafe(12)
        return JSONResponse({"error": "internal error"}, status_code=500, headers={"X-Reqid": reqid})

    limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    heavy: list[anyio.CapacityLimiter] = []  # made on first use, inside the event loop

    async def run_heavy(fn: Any, *args: Any) -> Any:
        # Calls that process images (new, add, search) get their own few threads, so they cannot take the
        # whole shared pool and make info/list/image/delete queue behind them (bench/load.py: info p50
        # 1549 -> 17 ms under 200 clients).
        if not heavy:
            heavy.append(anyio.CapacityLimiter(8))
        return await anyio.to_thread.run_sync(fn, *args, limiter=heavy[0])

    async def authenticate(request: Request) -> str:
        keys: KeyStore = request.app.state.keys
        # An unknown or malformed key is refused before the body is read: strangers cannot make the
        # server buffer up to max_body_bytes per connection.
        if keys.secret_for(claimed_access_key(request.headers.get("authorization"))) is None:
            raise AuthError(401, BAD_TOKEN)
        body = await read_body(request, settings.max_body_bytes)
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        signed = SignedRequest(
            method=request.method,
            raw_path=raw_path.decode("latin-1"),
            query=request.scope.get("query_string", b"").decode("latin-1"),
            headers=dict(request.headers),
            body=body,
        )
        access_key = verify(
            signed, keys.secret_for, public_host=settings.public_host, max_skew_s=settings.max_date_skew_s
        )
        # After the signature: nobody can drain another key's bucket by naming its access key.
        if not limiter.allow(access_key):
            raise QiniuError(429, TOO_MANY_REQUESTS)
        return access_key

    async def body_of(request: Request) -> dict[str, Any]:
        # Off the event loop: a large body takes real CPU to parse, and other tenants must not wait.
        return await run_in_threadpool(
            parse_body, request.headers.get("content-type", ""), await request.body()
        )

    def svc(request: Request) -> Service:
        return request.app.state.service

    async def batch_write(request: Request, write: Any, tenant: str, group_id: str) -> JSONResponse:
        """new and add: the body's ``data`` through ``write``, answered images[]/errors[] index for index."""
        body = await body_of(request)
        result = await run_heavy(write, tenant, group_id, _as_list(body.get("data", [])))
        return JSONResponse({"errors": result.errors, "images": result.images})

    security = [{"QiniuMac": []}]
    docs = {"responses": {400: {"model": schemas.ErrorResponse}, 401: {"model": schemas.ErrorResponse}}}

    def body_doc(model: type) -> dict[str, Any]:
        schema = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {
            "security": security,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        }

    @app.post(
        "/v1/image/group/{group_id}/new",
        summary="Create a group with images",
        responses={200: {"model": schemas.BatchResponse}, **docs["responses"]},
        openapi_extra=body_doc(schemas.BatchRequest),
    )
    async def new_group(group_id: str, request: Request, tenant: str = Depends(authenticate)) -> JSONResponse:
        return await batch_write(request, svc(request).new_group, tenant, group_id)

    @app.post(
        "/v1/image/group/{group_id}/remove",
        summary="Remove a group and its images",
        responses=docs["responses"],
        openapi_extra={"security": security},
    )
    async def remove_group(
        group_id: str, request: Request, tenant: str = Depends(authenticate)
    ) -> JSONResponse:
        await run_in_threadpool(svc(request).remove_group, tenant, group_id)
        return JSONResponse({})

    @app.post(
        "/v1/image/group/{group_id}/add",
        summary="Add images to a group",
        responses={200: {"model": schemas.BatchResponse}, **docs["responses"]},
        openapi_extra=body_doc(schemas.BatchRequest),
    )
    async def add_images(
        group_id: str, request: Request, tenant: str = Depends(authenticate)
    ) -> JSONResponse:
        return await batch_write(request, svc(request).add_images, tenant, group_id)

    @app.post(
        "/v1/image/group/{group_id}/delete",
        summary="Delete images from a group",
        responses=docs["responses"],
        openapi_extra=body_doc(schemas.DeleteRequest),
    )
    async def delete_images(
        group_id: str, request: Request, tenant: str = Depends(authenticate)
    ) -> JSONResponse:
        body = await body_of(request)
        images = body.get("images")
        if isinstance(images, str | int):
            images = [images]
        await run_in_threadpool(svc(request).delete_images, tenant, group_id, images)
        return JSONResponse({})

    @app.get(
        "/v1/image/group",
        summary="List groups",
        responses={200: {"model": schemas.GroupsResponse}, **docs["responses"]},
        openapi_extra={"security": security},
    )
    async def list_groups(request: Request, tenant: str = Depends(authenticate)) -> JSONResponse:
        groups = await run_in_threadpool(svc(request).list_groups, tenant)
        return JSONResponse({"code": 0, "message": "", "result": groups})

    @app.get(
        "/v1/image/group/{group_id}/info",
        summary="Count the images of a group",
        responses={200: {"model": schemas.InfoResponse}, **docs["responses"]},
        openapi_extra={"security": security},
    )
    async def group_info(
        group_id: str, request: Request, tenant: str = Depends(authenticate)
    ) -> JSONResponse:
        count = await run_in_threadpool(svc(request).group_count, tenant, group_id)
        return JSONResponse({"count": count})

    @app.get(
        "/v1/image/group/{group_id}",
        summary="List the images of a group, a page at a time",
        responses={200: {"model": schemas.ImagesResponse}, **docs["responses"]},
        openapi_extra={"security": security},
    )
    async def list_images(
        group_id: str,
        request: Request,
        marker: str = "",
        limit: str = "1000",
        tenant: str = Depends(authenticate),
    ) -> JSONResponse:
        try:
            count = int(limit) if limit != "" else 1000
        except ValueError as exc:
            raise QiniuError(400, "invalid limit") from exc
        page, next_marker = await run_in_threadpool(svc(request).list_images, tenant, group_id, marker, count)
        result = [{"id": img.id, "value": {"desc": img.desc, "label": img.label}} for img in page]
        return JSONResponse({"code": 0, "marker": next_marker, "message": "", "result": result})

    @app.post(
        "/v1/image/group/{group_id}/image",
        summary="One image's label and desc",
        responses={200: {"model": schemas.ImageResponse}, **docs["responses"]},
        openapi_extra=body_doc(schemas.ImageRequest),
    )
    async def get_image(group_id: str, request: Request, tenant: str = Depends(authenticate)) -> JSONResponse:
        body = await body_of(request)
        info = await run_in_threadpool(svc(request).get_image, tenant, group_id, body.get("id"))
        return JSONResponse({"desc": info.desc, "label": info.label})

    def search_args(body: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        data = body.get("data") or {}
        params = body.get("params") or {}
        if not isinstance(data, dict) or not isinstance(params, dict):
            raise QiniuError(400, "invalid body")
        extra: dict[str, Any] = {"labels": params.get("labels")}
        # Beyond Qiniu: {"data": {"id": ..., "group": ...}} searches with a stored image.
        if not data.get("uri") and data.get("id") is not None:
            extra["by_id"] = (data.get("group"), data.get("id"))
        return data.get("uri"), params, extra

    async def run_search(request: Request, tenant: str, groups: list[str] | None) -> list[dict[str, Any]]:
        """Both searches: the multi-group one names its groups in params, the legacy one in its path."""
        uri, params, extra = search_args(await body_of(request))
        return await run_heavy(
            partial(svc(request).search, **extra),
            tenant,
            params.get("groups") if groups is None else groups,
            uri,
            params.get("limit"),
            params.get("threshold"),
        )

    @app.post(
        "/v1/image/group/{group_id}/update",
        summary="Change an image's label and/or desc (tusou extension)",
        responses={200: {"model": schemas.ImageResponse}, **docs["responses"]},
        openapi_extra=body_doc(schemas.UpdateRequest),
    )
    async def update_image(
        group_id: str, request: Request, tenant: str = Depends(authenticate)
    ) -> JSONResponse:
        body = await body_of(request)
        info = await run_in_threadpool(
            svc(request).update_image,
            tenant,
            group_id,
            body.get("id"),
            body.get("label"),
            body["desc"] if "desc" in body else KEEP,
        )
        return JSONResponse({"desc": info.desc, "label": info.label})

    @app.post(
        "/v1/image/groups/search",
        summary="Search one or more groups with an image",
        responses={
            200: {"model": schemas.SearchResponse},
            406: {"model": schemas.ErrorResponse},
            **docs["responses"],
        },
        openapi_extra=body_doc(schemas.SearchRequest),
    )
    async def search(request: Request, tenant: str = Depends(authenticate)) -> JSONResponse:
        hits = await run_search(request, tenant, None)
        return JSONResponse({"code": 0, "message": "", "result": hits})

    @app.post(
        "/v1/image/group/{group_id}/search",
        summary="Search one group (Qiniu's older endpoint)",
        responses={
            200: {"model": schemas.SearchResponse},
            406: {"model": schemas.ErrorResponse},
            **docs["responses"],
        },
        openapi_extra=body_doc(schemas.LegacySearchRequest),
    )
    async def legacy_search(
        group_id: str, request: Request, tenant: str = Depends(authenticate)
    ) -> JSONResponse:
        hits = await run_search(request, tenant, [group_id])
        for hit in hits:
            hit.pop("group", None)
        return JSONResponse({"code": 0, "message": "", "result": hits})

    # --- built-in web page (tusou/web): static and unauthenticated, since it holds no data and every call it
    # makes is signed in the browser. Read once: the files ship as package data and do not change at run time.
    from importlib.resources import files as resource_files

    from fastapi.responses import HTMLResponse, Response

    web_dir = resource_files("tusou") / "web"
    web_page = (web_dir / "index.html").read_text("utf-8")
    web_sign_js = (web_dir / "sign.js").read_text("utf-8")
    # The secret key is typed into this page: scripts and fetches are limited to this origin, as defence in
    # depth (the page never puts API data into HTML). Images may come from anywhere (hits' thumbnails).
    web_headers = {
        "Content-Security-Policy": "default-src 'none'; script-src 'self' 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src * data: blob:; connect-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    @app.get("/", include_in_schema=False)
    async def web_index() -> HTMLResponse:
        return HTMLResponse(web_page, headers=web_headers)

    @app.get("/static/sign.js", include_in_schema=False)
    async def web_sign_script() -> Response:
        return Response(web_sign_js, media_type="text/javascript; charset=utf-8", headers=web_headers)

    # --- end of the web page routes

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = spec.setdefault("components", {})
        components.setdefault("securitySchemes", {})["QiniuMac"] = {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "Qiniu <AccessKey>:<Sign> (or QBox), signed as Qiniu's SDKs sign.",
        }
        schemas_out = components.setdefault("schemas", {})
        for model in (
            schemas.BatchRequest,
            schemas.DeleteRequest,
            schemas.ImageRequest,
            schemas.SearchRequest,
            schemas.LegacySearchRequest,
            schemas.UpdateRequest,
        ):
            spec_model = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas_out.update(spec_model.pop("$defs", {}))
            schemas_out[model.__name__] = spec_model
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    return app
