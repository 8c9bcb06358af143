"""The built-in web page (tusou/web): static and unauthenticated, since it holds no data and every call it
makes is signed in the browser. Read once: the files ship as package data and do not change at run time.
Not part of the Qiniu API, so out of the OpenAPI document.
"""

from __future__ import annotations

from importlib.resources import files as resource_files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

_web_dir = resource_files("tusou") / "web"
_web_page = (_web_dir / "index.html").read_text("utf-8")
_web_sign_js = (_web_dir / "sign.js").read_text("utf-8")
# /docs: the API described from /openapi.json by a page of our own (FastAPI's Swagger UI loads from a CDN, so
# it was blank offline).
_web_docs = (_web_dir / "docs.html").read_text("utf-8")
# The secret key is typed into this page: scripts and fetches are limited to this origin, as defence in
# depth (the page never puts API data into HTML). Images may come from anywhere (hits' thumbnails).
WEB_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src * data: blob:; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/")
async def web_index() -> HTMLResponse:
    return HTMLResponse(_web_page, headers=WEB_HEADERS)


@router.get("/static/sign.js")
async def web_sign_script() -> Response:
    return Response(_web_sign_js, media_type="text/javascript; charset=utf-8", headers=WEB_HEADERS)


@router.get("/docs")
async def web_docs() -> HTMLResponse:
    return HTMLResponse(_web_docs, headers=WEB_HEADERS)
