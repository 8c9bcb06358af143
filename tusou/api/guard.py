"""Guards against one tenant (or a stranger) taking the server from the others (issue 10), at the HTTP layer.

- :class:`TenantSlots`: requests that process images (new, add, search) run on a few shared threads
  (``Settings.heavy_threads``); one access key may hold at most ``heavy_per_tenant`` of them at once. Its
  other requests wait without holding a thread, so a tenant sending many slow-URL requests cannot fill
  every heavy thread while another tenant's inline images wait.
- :class:`PathGuard` (ASGI): a path whose percent-escapes hide a separator (``%2F``, ``%5C``) or do not
  decode as UTF-8 (``%FE``) is refused with 400 before routing: the router would otherwise see
  ``shop%2Finfo`` as ``shop/info``, and ``%FE`` and ``%FF`` both as U+FFFD, i.e. the same group. Every
  response also says ``X-Content-Type-Options: nosniff``.
- :class:`ReqidH11Protocol`: uvicorn answers malformed raw HTTP (a bad request line, no Host, NUL in the
  path, a bad Content-Length) itself, before the app, with no ``X-Reqid``; the Qiniu SDK treats such a
  response as a failed connection. This subclass of uvicorn's h11 protocol adds the header, and answers
  a request line uvicorn cannot decode (non-ASCII bytes in the target) with the same 400 instead of
  dropping the connection. ``tusou serve`` runs uvicorn with it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol


def new_reqid() -> str:
    return secrets.token_urlsafe(12)


class TenantSlots:
    """Per-tenant caps on concurrent work, waited for asynchronously. Memory: one entry per tenant with a
    request in flight."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = max(1, per_tenant)
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        limiter = self._limiters.get(tenant)
        if limiter is None:
            limiter = self._limiters[tenant] = anyio.CapacityLimiter(self.per_tenant)
        self._users[tenant] = self._users.get(tenant, 0) + 1
        try:
            async with limiter:
                yield
        finally:
            self._users[tenant] -= 1
            if not self._users[tenant]:
                del self._users[tenant], self._limiters[tenant]


_HIDDEN_SEPARATORS = (b"%2f", b"%5c")
_NOSNIFF = (b"x-content-type-options", b"nosniff")


def path_problem(raw_path: bytes) -> str | None:
    """Why a raw (still percent-encoded) path is refused, or None."""
    lowered = raw_path.lower()
    if any(sep in lowered for sep in _HIDDEN_SEPARATORS):
        return "encoded separator"
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


class PathGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        if path_problem(raw_path) is not None:
            message = "invalid group id" if scope["path"].startswith("/v1/image/group") else "invalid path"
            body = json.dumps({"error": message}, separators=(",", ":")).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        _NOSNIFF,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == _NOSNIFF[0] for name, _ in headers):
                    headers.append(_NOSNIFF)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_nosniff)


class ReqidH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        import h11

        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"connection", b"close"),
            (b"x-reqid", new_reqid().encode()),
            _NOSNIFF,
        ]
        try:
            self.transport.write(
                self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request"))
            )
            self.transport.write(self.conn.send(h11.Data(data=msg.encode("ascii"))) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass  # h11 is past the point of answering (a response already started): just hang up
        self.transport.close()

    def handle_events(self) -> None:
        try:
            super().handle_events()
        except (UnicodeDecodeError, ValueError) as exc:
            # uvicorn decodes the target as ASCII: raw bytes >= 0x80 in it end up here, not in a 400.
            self.logger.warning("Invalid HTTP request received: %s", type(exc).__name__)
            self.send_400_response("Invalid HTTP request received.")


def uvicorn_options() -> dict[str, Any]:
    """What ``tusou serve`` passes to ``uvicorn.Config`` beyond host and port."""
    return {"http": ReqidH11Protocol}
