"""Qiniu's routes, as one module-level router over what ``create_app`` puts in ``app.state``.

Handlers stay thin: authenticate, read the body, coerce it into a typed request (:mod:`tusou.api.qiniu`),
run the use case in a worker thread (decoding and embedding are CPU work that must not block the event
loop), and render Qiniu's JSON. ``app.state`` holds ``settings``, ``service``, ``keys``, ``limiter`` and
``wire``; see :func:`tusou.api.app.create_app`.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tusou.api import qiniu, schemas
from tusou.api.auth import BAD_TOKEN, claimed_access_key
from tusou.api.guard import TenantSlots, read_signed_body
from tusou.api.limits import TOO_MANY_REQUESTS, RateLimiter
from tusou.config import Settings
from tusou.errors import AuthError, QiniuError, RateLimited
from tusou.images import CODES
from tusou.service import Service
from tusou.store.keys import KeyStore

T = TypeVar("T")
# Threads of the shared pool one access key may hold at once (run_light).
LIGHT_PER_TENANT = 8

router = APIRouter()


# --- app.state, typed -----------------------------------------------------------------------------------
def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def service_of(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:  # only before the lifespan has built it
        raise QiniuError(503, "starting")
    return service


def wire_of(request: Request) -> qiniu.Wire:
    wire: qiniu.Wire = request.app.state.wire
    return wire


async def run_heavy(request: Request, fn: Callable[..., T], tenant: str, *args: Any) -> T:
    """Calls that process images (new, add, search) get their own few threads (``heavy_threads``), so they
    cannot take the whole shared pool and make info/list/image/delete queue behind them (bench/load.py:
    info p50 1549 -> 17 ms under 200 clients); one tenant holds at most ``heavy_per_tenant`` of them."""
    state = request.app.state
    if getattr(state, "heavy", None) is None:  # made on first use, inside the event loop
        state.heavy = anyio.CapacityLimiter(settings_of(request).heavy_threads)
        state.heavy_tenants = TenantSlots(settings_of(request).heavy_per_tenant)
    async with state.heavy_tenants.hold(tenant):
        return await anyio.to_thread.run_sync(fn, tenant, *args, limiter=state.heavy)


# --- request plumbing -----------------------------------------------------------------------------------
async def authenticate(request: Request) -> str:
    """The request's access key (its tenant), after its signature; 401/403/413/429 otherwise."""
    settings = settings_of(request)
    keys: KeyStore = request.app.state.keys
    # An unknown or malformed key is refused before the body is read: strangers cannot make the
    # server buffer up to max_body_bytes per connection.
    claimed = claimed_access_key(request.headers.get("authorization"))
    if keys.secret_for(claimed) is None:
        reason = "revoked access key" if keys.is_revoked(claimed) else "unknown access key"
        raise AuthError(401, BAD_TOKEN, reason)
    access_key, body = await read_signed_body(request, settings, keys.secret_for)
    request._body = body  # Starlette's own cache: body_of() reads the verified bytes
    # After the signature: nobody can drain another key's bucket by naming its access key.
    limiter: RateLimiter = request.app.state.limiter
    if not limiter.allow(access_key):
        raise RateLimited(TOO_MANY_REQUESTS, limiter.retry_after(access_key))
    return access_key


async def run_light(request: Request, tenant: str, fn: Callable[..., T], *args: Any) -> T:
    """Work that is not image work (parsing a body, delete, list, info, ...) on the thread pool every tenant
    shares (anyio's, 40 threads), one key holding at most ``LIGHT_PER_TENANT`` of them at once: its other
    requests wait without a thread. One key's 45 deletes of 100,000 ids used to hold another key's ``info``
    for 23 s."""
    state = request.app.state
    if getattr(state, "light_tenants", None) is None:  # made on first use, inside the event loop
        state.light_tenants = TenantSlots(LIGHT_PER_TENANT)
    async with state.light_tenants.hold(tenant):
        return await run_in_threadpool(fn, *args)


async def body_of(request: Request, tenant: str) -> qiniu.Body:
    # Off the event loop: a large body takes real CPU to parse, and other tenants must not wait.
    return await run_light(
        request,
        tenant,
        qiniu.parse_body,
        request.headers.get("content-type", ""),
        await request.body(),
        wire_of(request).max_body_values,
    )


def answer(content: dict[str, Any]) -> JSONResponse:
    return JSONResponse(content)


def json_body(body: bytes) -> Response:
    """A JSON body already written (the bytes ``answer`` would send for it)."""
    return Response(body, media_type="application/json")


# --- OpenAPI helpers ------------------------------------------------------------------------------------
SECURITY: list[dict[str, list[str]]] = [{"QiniuMac": []}]
# What any signed request may answer: a bad request, a bad token, a stale X-Qiniu-Date, a body too slow
# (408) or over the limit (413), the rate limit, a server busy or still starting (503), a full disk (507).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse} for status in (400, 401, 403, 408, 413, 429, 503, 507)
}
# A search also answers 406 for its params, and a query image's failure with that image's code.
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    **{status: {"model": schemas.ErrorResponse} for status in sorted({406, *CODES.values()})},
}


def ok(model: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model}, **ERRORS}


def body_doc(name: str) -> dict[str, Any]:
    """A request body documented by one of :func:`tusou.api.qiniu.request_models`, by name."""
    schema = {"$ref": f"#/components/schemas/{name}"}
    return {
        "security": SECURITY,
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
    }


SIGNED = {"security": SECURITY}
Tenant = Depends(authenticate)


# --- routes ---------------------------------------------------------------------------------------------
@router.post(
    "/v1/image/group/{group_id}/new",
    summary="Create a group with images",
    responses=ok(schemas.BatchResponse),
    openapi_extra=body_doc("BatchRequest"),
)
async def new_group(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    new = wire_of(request).new_images(group_id, await body_of(request, tenant))
    return answer(qiniu.batch(await run_heavy(request, service_of(request).new_group, tenant, new)))


@router.post(
    "/v1/image/group/{group_id}/remove",
    summary="Remove a group and its images",
    responses=ERRORS,
    openapi_extra=SIGNED,
)
async def remove_group(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    await run_light(request, tenant, service_of(request).remove_group, tenant, qiniu.group_id(group_id))
    return answer(qiniu.EMPTY)


@router.post(
    "/v1/image/group/{group_id}/add",
    summary="Add images to a group",
    responses=ok(schemas.BatchResponse),
    openapi_extra=body_doc("BatchRequest"),
)
async def add_images(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    new = wire_of(request).new_images(group_id, await body_of(request, tenant))
    return answer(qiniu.batch(await run_heavy(request, service_of(request).add_images, tenant, new)))


@router.post(
    "/v1/image/group/{group_id}/delete",
    summary="Delete images from a group",
    responses=ERRORS,
    openapi_extra=body_doc("DeleteRequest"),
)
async def delete_images(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    delete = wire_of(request).delete_images(group_id, await body_of(request, tenant))
    await run_light(request, tenant, service_of(request).delete_images, tenant, delete)
    return answer(qiniu.EMPTY)


@router.post(
    "/v1/image/group/{group_id}/thumbs",
    summary="Small JPEG thumbnails of images, as data URIs (tusou extension, for the web page)",
    responses=ERRORS,
    openapi_extra=body_doc("DeleteRequest"),
)
async def thumbnails(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    # {"images": [ids]} as for delete -> {"thumbs": {id: "data:image/jpeg;base64,..."}}; ids without a kept
    # thumbnail (added before thumbnails, or with Settings.thumbnails off) are left out.
    wanted = wire_of(request).delete_images(group_id, await body_of(request, tenant))
    if len(wanted.ids) > qiniu.LIST_MAX_LIMIT:
        raise QiniuError(400, f"too many images, at most {qiniu.LIST_MAX_LIMIT}")
    found = await run_light(request, tenant, service_of(request).thumbnails, tenant, wanted)
    uris = {i: "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() for i, jpeg in found.items()}
    return answer({"thumbs": uris})


@router.get(
    "/v1/image/group", summary="List groups", responses=ok(schemas.GroupsResponse), openapi_extra=SIGNED
)
async def list_groups(request: Request, tenant: str = Tenant) -> JSONResponse:
    return answer(qiniu.groups(await run_light(request, tenant, service_of(request).list_groups, tenant)))


@router.get(
    "/v1/image/group/{group_id}/info",
    summary="Count the images of a group",
    responses=ok(schemas.InfoResponse),
    openapi_extra=SIGNED,
)
async def group_info(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    count = await run_light(
        request, tenant, service_of(request).group_count, tenant, qiniu.group_id(group_id)
    )
    return answer(qiniu.count(count))


@router.get(
    "/v1/image/group/{group_id}",
    summary="List the images of a group, a page at a time",
    responses=ok(schemas.ImagesResponse),
    openapi_extra=SIGNED,
)
async def list_images(
    group_id: str,
    request: Request,
    marker: str = "",
    limit: str = "1000",
    tags: str = "",
    tenant: str = Tenant,
) -> JSONResponse:
    listing = wire_of(request).list_images(group_id, marker, limit, tags)
    page = await run_light(request, tenant, service_of(request).list_images, tenant, listing)
    return answer(qiniu.page(page, listing.with_tags))


@router.post(
    "/v1/image/group/{group_id}/image",
    summary="One image's label and desc",
    responses=ok(schemas.ImageResponse),
    openapi_extra=body_doc("ImageRequest"),
)
async def get_image(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    ref = wire_of(request).image_ref(group_id, await body_of(request, tenant))
    info = await run_light(request, tenant, service_of(request).get_image, tenant, ref)
    return answer(qiniu.image(info, ref.with_tags))


@router.post(
    "/v1/image/group/{group_id}/update",
    summary="Change an image's label and/or desc (tusou extension)",
    responses=ok(schemas.ImageResponse),
    openapi_extra=body_doc("UpdateRequest"),
)
async def update_image(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    update = wire_of(request).update_image(group_id, await body_of(request, tenant))
    return answer(
        qiniu.image(await run_light(request, tenant, service_of(request).update_image, tenant, update))
    )


@router.post(
    "/v1/image/groups/search",
    summary="Search one or more groups with an image",
    responses={200: {"model": schemas.SearchResponse}, **SEARCH_ERRORS},
    openapi_extra=body_doc("SearchRequest"),
)
async def search(request: Request, tenant: str = Tenant) -> Response:
    query = wire_of(request).search(await body_of(request, tenant))
    search = service_of(request).search
    # The body is written in the worker thread too: a 10,000-hit answer is milliseconds of work.
    return json_body(await run_heavy(request, lambda t, q: qiniu.hits_body(search(t, q)), tenant, query))


@router.post(
    "/v1/image/group/{group_id}/search",
    summary="Search one group (Qiniu's older endpoint)",
    responses={200: {"model": schemas.SearchResponse}, **SEARCH_ERRORS},
    openapi_extra=body_doc("LegacySearchRequest"),
)
async def legacy_search(group_id: str, request: Request, tenant: str = Tenant) -> Response:
    query = wire_of(request).search(await body_of(request, tenant), group_id)
    search = service_of(request).search
    return json_body(
        await run_heavy(request, lambda t, q: qiniu.hits_body(search(t, q), with_group=False), tenant, query)
    )


@router.post(
    "/v1/image/group/{group_id}/duplicates",
    summary="Clusters of near-duplicates among a page of a group's images (tusou extension)",
    responses=ERRORS,
    openapi_extra=body_doc("DuplicatesRequest"),
)
async def duplicates(group_id: str, request: Request, tenant: str = Tenant) -> JSONResponse:
    find = wire_of(request).duplicates(group_id, await body_of(request, tenant))
    return answer(qiniu.duplicates(await run_heavy(request, service_of(request).duplicates, tenant, find)))
