"""Guards against one tenant (or a stranger) taking the server from the others (issue 10), at the HTTP layer.

- :class:`TenantSlots`: requests that process images (new, add, search) run on a few shared threads
  (``Settings.heavy_threads``); one access key may hold at most ``heavy_per_tenant`` of them at once. Its
  other requests wait without holding a thread, so a tenant sending many slow-URL requests cannot fill
  every heavy thread while another tenant's inline images wait.
- :class:`PathGuard` (ASGI): a path whose percent-escapes hide a separator (``%2F``, ``%5C``) or do not
  decode as UTF-8 (``%FE``) is refused with 400 before routing: the router would otherwise see
  ``shop%2Finfo`` as ``shop/info``, and ``%FE`` and ``%FF`` both as U+FFFD, i.e. the same group. Every
  response also says ``X-Content-Type-Options: nosniff``.
- :func:`read_signed_body`: the body of a signed request is hashed as it streams, on a worker thread, and
  before the signature is known to be good at most ``pre_auth_body_bytes`` of it stay in memory (the rest
  goes to an unlinked temporary file in the data folder); only a verified body is read back for parsing.
  A known access key (keys are not secret) with a wrong signature and a 250 MB body used to cost ~480 MB
  of RSS and a 1 s stall of every other request while the HMACs ran on the event loop. QBox signatures,
  which never cover a JSON body, can be refused (``Settings.qbox``); under the Qiniu scheme a body the
  signature did not cover (no Content-Type, ``application/octet-stream``) is refused.
- :class:`ReqidH11Protocol`: uvicorn answers malformed raw HTTP (a bad request line, no Host, NUL in the
  path, a bad Content-Length) itself, before the app, with no ``X-Reqid``; the Qiniu SDK treats such a
  response as a failed connection. This subclass of uvicorn's h11 protocol adds the header, and answers
  a request line uvicorn cannot decode (non-ASCII bytes in the target) with the same 400 instead of
  dropping the connection. It also closes a connection that has not sent a whole request head within
  ``HEAD_TIMEOUT_S`` (slowloris). ``tusou serve`` runs uvicorn with it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from tusou.api.auth import BAD_TOKEN, SignedRequest, StreamVerifier
from tusou.config import Settings
from tusou.errors import AuthError, QiniuError
from tusou.files import private_dir

# How long a connection may take to send a whole request head (ReqidH11Protocol).
HEAD_TIMEOUT_S = 30.0
# Verified large bodies held in memory at once, server-wide: this many of the largest (BodyBudget), and
# how long one waits for its share before 503.
BODY_BUDGET_BODIES = 4
BODY_WAIT_S = 30.0
# A request body may take BODY_GRACE_S, then must keep an average of BODY_MIN_RATE bytes a second.
BODY_GRACE_S = 30.0
BODY_MIN_RATE = 1024
# Body bytes handed to the hashing thread at once: big enough that hashlib releases the GIL and thread
# hops are few, small enough to bound what is held per connection.
_HASH_STEP = 1 << 20


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


class BodyBudget:
    """Bytes of verified request bodies the whole server holds in memory at once (the event loop's only).

    A verified body is read back whole and kept until its request ends, and an add of 1000 images takes its
    time: without a bound, one key within its rate limit's burst (100 requests of up to 256 MB) could hold
    25 GB. Bodies larger than ``pre_auth_body_bytes`` take their size from this budget before they are read
    back from the spool file, waiting up to ``BODY_WAIT_S``, then 503 (clients retry); PathGuard gives it
    back when the request ends. One key holds at most half of it, so that it cannot keep every other key's
    large bodies out. Smaller bodies never wait.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.free = self.total
        self.per_key = max(1, self.total // 2)
        self._held: dict[str, int] = {}
        self._changed = anyio.Event()

    def _fits(self, key: str, need: int) -> bool:
        held = self._held.get(key, 0)
        # A key holding nothing always gets a body in once the budget has room (a body <= total / 2 as
        # sized by BODY_BUDGET_BODIES; larger ones still go alone).
        return self.free >= need and (held == 0 or held + need <= self.per_key)

    async def take(self, key: str, size: int, wait_s: float) -> int:
        need = min(max(0, size), self.total)
        with anyio.move_on_after(wait_s):
            while not self._fits(key, need):
                await self._changed.wait()
            self.free -= need
            self._held[key] = self._held.get(key, 0) + need
            return need
        raise QiniuError(503, "server busy: too many large requests, retry later")

    def give(self, key: str, size: int) -> None:
        self.free += size
        left = self._held.pop(key, 0) - size
        if left > 0:
            self._held[key] = left
        self._changed.set()
        self._changed = anyio.Event()


async def _hold_body(request: Request, settings: Settings, key: str, size: int) -> None:
    """Take ``size`` bytes of the app's BodyBudget for this request of ``key`` (given back by PathGuard)."""
    state = request.app.state
    if getattr(state, "body_budget", None) is None:  # made on first use, inside the event loop
        state.body_budget = BodyBudget(BODY_BUDGET_BODIES * settings.max_body_bytes)
    budget: BodyBudget = state.body_budget
    taken = await budget.take(key, size, BODY_WAIT_S)
    request.scope.setdefault("state", {})["body_held"] = (budget, key, taken)


def _give_body(scope: Scope) -> None:
    held = scope.get("state", {}).pop("body_held", None)
    if held is not None:
        budget, key, size = held
        budget.give(key, size)


async def read_signed_body(request: Request, settings: Settings, secret_for: Any) -> tuple[str, bytes]:
    """(access key, body) of a request whose signature verified; AuthError 401/403, QiniuError 400/413."""
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    head = SignedRequest(
        method=request.method,
        raw_path=raw_path.decode("latin-1"),
        query=request.scope.get("query_string", b"").decode("latin-1"),
        headers=dict(request.headers),
    )
    verifier = StreamVerifier(head, secret_for, public_host=settings.public_host)
    if verifier.scheme == "QBox" and not settings.qbox:
        raise AuthError(401, BAD_TOKEN, "QBox signatures are refused (TUSOU_QBOX=false)")
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise QiniuError(413, "request body too large")
    spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed below, whatever happens)
        max_size=settings.pre_auth_body_bytes, dir=str(private_dir(settings.data / "tmp"))
    )
    try:

        def take(data: bytes) -> None:
            verifier.update(data)
            spool.write(data)

        pending: list[bytes] = []
        held = size = 0
        started = time.monotonic()
        chunks = request.stream().__aiter__()
        try:
            while True:
                # Once BODY_GRACE_S have passed, the body must keep an average of BODY_MIN_RATE bytes a
                # second: a known access key (not a secret) trickling a byte now and then held a connection
                # and its request for as long as it liked.
                wait = started + BODY_GRACE_S + size / BODY_MIN_RATE - time.monotonic()
                try:
                    with anyio.fail_after(max(0.0, wait)):
                        chunk = await anext(chunks, b"")
                except TimeoutError:
                    raise QiniuError(408, "request body too slow") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise QiniuError(413, "request body too large")
                pending.append(chunk)
                held += len(chunk)
                if held >= _HASH_STEP:
                    await anyio.to_thread.run_sync(take, b"".join(pending))
                    pending, held = [], 0
        except ClientDisconnect:
            # The client hung up before its body was complete (a timeout, a cancelled upload): nothing failed
            # here, and nobody reads the answer; a 400, not an unexpected error's 500 and traceback.
            raise QiniuError(400, "request body incomplete") from None
        if pending:
            await anyio.to_thread.run_sync(take, b"".join(pending))
        small = size <= settings.pre_auth_body_bytes

        def check() -> tuple[bool, bytes | None]:
            spool.seek(0)
            body = spool.read() if small else None
            return verifier.finish(size, body, max_skew_s=settings.max_date_skew_s), body

        covered, kept = await anyio.to_thread.run_sync(check)
        if kept is None:  # a large body, verified: read back into memory under the server's budget
            await _hold_body(request, settings, verifier.access_key, size)
            spool.seek(0)
            kept = await anyio.to_thread.run_sync(spool.read)
        body = kept
    finally:
        spool.close()
    if size and not covered and verifier.scheme == "Qiniu":
        raise QiniuError(
            400, "request body not covered by the signature: send it with Content-Type: application/json"
        )
    return verifier.access_key, body


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

        try:
            await self.app(scope, receive, send_nosniff)
        finally:
            _give_body(scope)  # a large body's share of the BodyBudget, once its request has ended


class ReqidH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with an ``X-Reqid`` on its own 400s and a deadline for each request's head.

    uvicorn waits without limit for a request line and headers, and its keep-alive timeout restarts with
    every byte: a client needing no key held a connection (a file descriptor) for as long as it sent a byte
    now and then, and enough such clients use up the process's descriptors (slowloris). A connection that
    has not sent a whole request head within ``HEAD_TIMEOUT_S`` of opening, or of its previous answer, is
    closed."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is in hand: its head came in time (armed again when it is answered)
        if not self.transport.is_closing():
            self.transport.close()

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
