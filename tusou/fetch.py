"""Download image URLs for the service: bounded in time, size, redirects, concurrency and addresses.

Everything here handles untrusted input: URLs from clients and bytes from arbitrary servers. The SSRF guard
sits at the one place a connection is made (:class:`_GuardedBackend`); the rules and error kinds are in
``docs/errors.md``. Turning the bytes into pixels is ``tusou.images``' job.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpcore
import httpx
from PIL import Image

from tusou.config import Settings
from tusou.images import MAX_URL_CHARS, ImageError, PixelBudget, decode_image, parse_data_uri

log = logging.getLogger(__name__)

# --- fetching --------------------------------------------------------------------------------------------
# The overall deadline of the fetch running in this thread. httpx has per-operation timeouts only (a
# server trickling a byte per second never trips a 10 s read timeout); our network streams read this and
# shrink every socket timeout to what is left, so the whole fetch ends at fetch_timeout_s.
_local = threading.local()


def _lookup(name: str, port: int, timeout: float | None) -> list[Any]:
    """``socket.getaddrinfo`` on a thread of its own, waited for at most ``timeout`` (then FutureTimeout).

    getaddrinfo has no timeout of its own, and a lookup the fetch stops waiting for runs on until the
    resolver gives up (glibc: 5 s x 2 tries x up to 3 name servers). On a shared pool of 8 threads, one
    tenant's URLs on a domain whose name server never answers kept every thread busy and everybody's
    downloads failed with "timeout resolving host". Here a lookup left behind holds only its own thread;
    each download slot leaves at most one behind per fetch deadline, so they stay few (16 slots, 10 s,
    a 30 s resolver: at most ~48 threads).
    """
    answer: Future[list[Any]] = Future()

    def run() -> None:
        try:
            answer.set_result(
                socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            )
        except BaseException as exc:  # handed to the waiting fetch, which judges it
            answer.set_exception(exc)

    threading.Thread(target=run, name="tusou-dns", daemon=True).start()
    return answer.result(timeout=timeout)


def _bounded(timeout: float | None, exc: type[Exception]) -> float | None:
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise exc("fetch deadline exceeded")
    return left if timeout is None else min(timeout, left)


_BLOCKED_NETS = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible form
        "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for anything that is not a plain public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Forms that embed an IPv4 address and can reach it: judge the embedded address.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _is_blocked(embedded)
    if any(ip.version == n.version and ip in n for n in _BLOCKED_NETS):
        return True
    return (
        not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
    )


class _Guard:
    """Resolves a host once and says which addresses may be connected to (SSRF guard)."""

    def __init__(self, allow: Iterable[str]) -> None:
        self._hosts: set[str] = set()
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow:
            entry = entry.strip()
            if not entry:
                continue
            try:
                self._nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self._hosts.add(entry.lower().rstrip("."))

    def _ip_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        cands = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            cands.append(ip.ipv4_mapped)
        return any(c.version == n.version and c in n for c in cands for n in self._nets)

    def resolve(self, host: str, port: int) -> list[str]:
        """Addresses of ``host`` that passed the guard, in resolver order. Raises ImageError."""
        name = host.strip("[]").lower().rstrip(".")
        # getaddrinfo has no timeout of its own (a slow authoritative server holds it 10-30 s): run it
        # aside and wait only for what is left of the fetch's deadline.
        deadline: float | None = getattr(_local, "deadline", None)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            infos = _lookup(name, port, left)
        except FutureTimeout as exc:
            raise ImageError("fetch_timeout", f"fetch failed: timeout resolving host {name}") from exc
        except (OSError, UnicodeError) as exc:
            raise ImageError("fetch_error", f"fetch failed: cannot resolve host {name}") from exc
        addrs: list[str] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            raw = str(sockaddr[0])
            ip = ipaddress.ip_address(raw.split("%", 1)[0])
            if name not in self._hosts and not self._ip_allowed(ip) and _is_blocked(ip):
                # Refuse the host if any of its addresses is private: a name that mixes public and private
                # answers is exactly what a rebinding attack looks like.
                # The address a name resolves to goes to the operator's log only: in the answer it would tell
                # any tenant where the server's internal names point (its network mapped one URL at a time).
                what = name
                if name != str(ip):
                    # DEBUG: a tenant can make one line per URL, and the log's disk is everyone's.
                    log.debug("fetch refused: %s resolves to %s, which is not a public address", name, ip)
                    what = f"{name} resolves to an address that"
                # The operator's way out is named: TUSOU_FETCH_ALLOW (Settings.fetch_allow).
                refused = f"fetch refused: {what} is not a public address (allow it with TUSOU_FETCH_ALLOW)"
                raise ImageError("fetch_refused", refused)
            if raw not in addrs:
                addrs.append(raw)
        if not addrs:
            raise ImageError("fetch_error", f"fetch failed: cannot resolve host {name}")
        return addrs


class _DeadlineStream(httpcore.NetworkStream):
    """Passes everything through, with every timeout cut to what is left of the fetch's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        inner = self._inner.start_tls(ssl_context, server_hostname, bounded)
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket layer, with the SSRF guard at the one place a connection is made.

    Why here: checking a URL's host and then letting the HTTP library resolve it again leaves a window for
    DNS rebinding (public answer for the check, 127.0.0.1 for the connect). Here the name is resolved once,
    every answer is checked, and the socket connects to one of those very addresses. Everything above the
    socket is untouched, so the Host header, TLS SNI and certificate checks still use the real host name,
    and every hop of a redirect goes through this check because every new connection does.
    """

    def __init__(self, guard: _Guard) -> None:
        self._guard = guard

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        addrs = self._guard.resolve(host, port)
        last: Exception | None = None
        for addr in addrs:
            try:
                stream = super().connect_tcp(addr, port, _bounded(timeout, httpcore.ConnectTimeout),
                                             local_address, socket_options)
            except httpcore.ConnectError as exc:  # try the next address, like socket.create_connection
                last = exc
                continue
            return _DeadlineStream(stream)
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise ImageError("fetch_refused", "fetch refused: unix sockets")


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, guard: _Guard, max_connections: int) -> None:
        super().__init__(http1=True, http2=False, trust_env=False)
        # httpx builds its httpcore pool without a way to pass a network backend; replace the pool with
        # the same one on our backend. Checked so an httpx upgrade that renames it fails loudly, not open.
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("unsupported httpx version: cannot install the fetch guard")
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            http1=True,
            http2=False,
            network_backend=_GuardedBackend(guard),
        )


_REDIRECTS = {301, 302, 303, 307, 308}
# How a request fails when the server closed its connection before answering it.
_NO_ANSWER = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class Fetcher:
    """Downloads image URLs for the service: bounded in time, size, redirects, concurrency and addresses."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._max_bytes = settings.fetch_max_bytes
        self._sem = threading.BoundedSemaphore(max(1, settings.fetch_max_concurrent))
        # Never keep cookies: one server's cookies must not follow a different client's later request.
        jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._client = httpx.Client(
            transport=_GuardedTransport(_Guard(settings.fetch_allow), max(1, settings.fetch_max_concurrent)),
            trust_env=False,  # an environment proxy would connect on our behalf, past the guard
            follow_redirects=False,  # followed by hand so every hop is validated and counted
            # httpx parses a redirect's Location even when not following it, and a data: URI fails its
            # URL parser; judge the Location first so the client gets the documented 400.
            event_hooks={"response": [_check_location]},
            cookies=jar,
            headers={
                "User-Agent": settings.fetch_user_agent,
                "Accept": "image/*,*/*;q=0.5",
                # Compressed bodies would let a small transfer expand past the byte cap in one chunk.
                "Accept-Encoding": "identity",
            },
        )

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str) -> bytes:
        first = _parse_http_url(url)
        timeout_s = self._settings.fetch_timeout_s
        # Waiting for a slot has its own bound (fetch_timeout_s) and does not eat into the download's time:
        # a queued image should not fail because others were slow.
        if not self._sem.acquire(timeout=timeout_s):
            raise ImageError("fetch_busy", "fetch busy: too many downloads, retry later")
        try:
            _local.deadline = time.monotonic() + timeout_s
            try:
                return self._fetch(first)
            except httpx.TimeoutException as exc:
                raise ImageError("fetch_timeout", f"fetch failed: timeout after {timeout_s:g} s") from exc
            except httpx.ConnectError as exc:
                raise ImageError("fetch_error", f"fetch failed: {_connect_reason(exc)}") from exc
            except (httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.DecodingError) as exc:
                raise ImageError("fetch_error", "fetch failed: bad http response") from exc
            except httpx.HTTPError as exc:
                raise ImageError("fetch_error", "fetch failed: connection error") from exc
            except ImageError:
                raise
            except Exception as exc:
                # Whatever else a hostile server manages to provoke stays one image's error, never a 500.
                log.warning("unexpected fetch failure: %s", type(exc).__name__)
                raise ImageError("fetch_error", "fetch failed: connection error") from exc
        finally:
            _local.deadline = None
            self._sem.release()

    def _fetch(self, url: httpx.URL) -> bytes:
        max_redirects = self._settings.fetch_max_redirects
        seen = {str(url)}
        for hop in range(max_redirects + 1):
            left = _bounded(self._settings.fetch_timeout_s, httpx.PoolTimeout)
            timeout = httpx.Timeout(left, connect=min(self._settings.fetch_connect_timeout_s, left or 0.0))
            request = self._client.build_request("GET", url, timeout=timeout)
            try:
                response = self._client.send(request, stream=True)
            except _NO_ANSWER:
                # The kept-alive connection this went out on was dropped by the server as it arrived (its
                # keep-alive timeout ran out): no answer came, so the GET goes again, once, on a new one.
                response = self._client.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    try:
                        nxt = response.url.join(location.strip())
                    except (httpx.InvalidURL, ValueError) as exc:
                        raise ImageError("fetch_error", "fetch failed: bad redirect location") from exc
                    url = _parse_http_url(str(nxt), redirect=True)
                    if str(url) in seen:
                        raise ImageError("fetch_redirects", "fetch failed: redirect loop")
                    if hop == max_redirects:
                        raise ImageError("fetch_redirects",
                                         f"fetch failed: too many redirects (max {max_redirects})")
                    seen.add(str(url))
                    continue
                if not 200 <= response.status_code < 300:
                    raise ImageError("fetch_http_status", f"fetch failed: http {response.status_code}")
                return self._read_body(response)
            finally:
                # Closing an unread (or partly read) body drops the connection rather than draining it.
                response.close()
        raise AssertionError("unreachable")

    def _read_body(self, response: httpx.Response) -> bytes:
        cap = self._max_bytes
        too_large = ImageError("image_too_large", f"image too large: more than {cap} bytes")
        length = response.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > cap:
            raise too_large  # refused before reading a byte of the body
        inflater = _inflater(response.headers.get("content-encoding", ""))
        body = bytearray()
        for chunk in response.iter_raw():
            if inflater is not None:
                try:
                    # max_length: a compressed chunk may not expand past the cap in one step.
                    chunk = inflater.decompress(chunk, cap + 1 - len(body))
                except zlib.error as exc:
                    raise ImageError("fetch_error", "fetch failed: bad content-encoding") from exc
            body += chunk
            if len(body) > cap:
                raise too_large  # stop reading here
        return bytes(body)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _check_location(response: httpx.Response) -> None:
    location = response.headers.get("location", "").strip()
    if response.status_code not in _REDIRECTS or not location:
        return
    scheme = _SCHEME.match(location)
    if scheme is not None and scheme.group(0).lower() not in ("http:", "https:"):
        raise ImageError("uri_invalid", "invalid redirect to: only http and https redirects are followed")
    try:
        response.url.join(location)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ImageError("fetch_error", "fetch failed: bad redirect location") from exc


def _inflater(encoding: str) -> Any:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=31)
    if enc == "deflate":
        return zlib.decompressobj()
    raise ImageError("fetch_error", f"fetch failed: unsupported content-encoding {enc[:20]}")


def _parse_http_url(url: str, *, redirect: bool = False) -> httpx.URL:
    where = "redirect to" if redirect else "uri"
    if len(url) > MAX_URL_CHARS:
        raise ImageError("uri_invalid", f"invalid {where}: longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
        # httpx decodes IDNA host names lazily: a malformed one (xn--zz-.com) fails here, not above.
        host = parsed.host
    except (httpx.InvalidURL, ValueError, TypeError) as exc:  # idna.IDNAError is a ValueError
        raise ImageError("uri_invalid", f"invalid {where}: bad url") from exc
    if parsed.scheme not in ("http", "https"):
        if redirect:
            raise ImageError("uri_invalid", "invalid redirect to: only http and https redirects are followed")
        raise ImageError("uri_invalid", "invalid uri: only http, https and data are supported")
    if not host:
        raise ImageError("uri_invalid", f"invalid {where}: no host")
    return parsed


def _connect_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "certificate" in text or "ssl" in text or "tls" in text:
        return "tls error"
    if "refused" in text:
        return "connection refused"
    return "cannot connect"


# --- entry points ----------------------------------------------------------------------------------------
def read_uri_bytes(uri: str, fetcher: Fetcher) -> bytes:
    """The bytes behind a Qiniu ``uri``: a base64 data uri or an http(s) URL."""
    if not isinstance(uri, str):
        raise ImageError("uri_invalid", "invalid uri: must be a string")
    uri = uri.strip()
    if not uri:
        raise ImageError("uri_invalid", "invalid uri: empty")
    scheme = uri.partition(":")[0].lower() if ":" in uri else ""
    if scheme == "data":
        return parse_data_uri(uri)
    if scheme in ("http", "https"):
        return fetcher.fetch(uri)
    raise ImageError("uri_invalid", "invalid uri: only http, https and data are supported")


def load_image(
    uri: str, fetcher: Fetcher, min_short: int | None = None, budget: PixelBudget | None = None
) -> Image.Image:
    """A Qiniu ``uri`` -> validated RGB image (:func:`tusou.images.decode_image`). Raises ImageError only."""
    return decode_image(read_uri_bytes(uri, fetcher), min_short, budget)
