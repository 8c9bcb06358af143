"""Qiniu request signatures: verify incoming requests, sign outgoing ones.

Framework-free on purpose: the HTTP layer turns its request into a :class:`SignedRequest` and calls
:func:`verify`; tusou's own clients (CLI, bench) call :func:`sign_qiniu` / :func:`sign_qbox`. The authority is
COMPAT.md, section Signatures, and the official ``qiniu`` Python SDK 7.18.0 (``qiniu/auth.py``), which this
module matches byte for byte.

Two schemes exist:

``Authorization: Qiniu <AK>:<Sign>`` signs::

    METHOD SP path ["?" query] LF "Host: " host [LF "Content-Type: " ct]
    {LF X-Qiniu-Name ": " value} LF LF [body]

``Authorization: QBox <AK>:<Sign>`` (older) signs ``path ["?" query] LF [body]``.

Real clients disagree on details, so :func:`verify` computes a small, bounded set of candidate strings (see
:func:`_qiniu_candidates`) and accepts the request when any of them matches. Each comparison is constant-time.

Nothing here logs; the secret never leaves :func:`_hmac_sign` and never appears in an error.
"""

from __future__ import annotations

import hmac
import re
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from hashlib import sha1
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from tusou.errors import AuthError

__all__ = [
    "AuthError",
    "SignedRequest",
    "verify",
    "StreamVerifier",
    "sign_qiniu",
    "sign_qbox",
    "qiniu_string_to_sign",
    "qbox_string_to_sign",
    "canonical_header_name",
    "DATE_HEADER",
    "DATE_FORMAT",
]

DATE_HEADER = "X-Qiniu-Date"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")

_X_QINIU_PREFIX = "x-qiniu-"
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
_OCTET = "application/octet-stream"

# The header-name token characters the SDK's ``canonical_mime_header_key`` (and Go's textproto) accept; a name
# with any other character is left exactly as written.
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

BAD_TOKEN = "bad token"


@dataclass(frozen=True)
class SignedRequest:
    """What the verifier needs from an HTTP request, exactly as it came over the wire."""

    method: str
    raw_path: str  # percent-encoded, as on the wire (ASGI ``scope["raw_path"]`` decoded as latin-1)
    query: str  # raw query string without "?"; "" when none
    headers: Mapping[str, str]  # any case; must include Host
    # A body can be hundreds of MB: keep it out of reprs (tracebacks, logs).
    body: bytes = field(default=b"", repr=False)


# ----------------------------------------------------------------------------------------------------------
# Building the strings to sign


def canonical_header_name(name: str) -> str:
    """``x-qiniu-date`` -> ``X-Qiniu-Date``, as the SDKs spell the X-Qiniu-* names they sign."""
    if not name or any(ch not in _TOKEN_CHARS for ch in name):
        return name
    out = []
    upper = True
    for ch in name:
        out.append(ch.upper() if upper else ch.lower())
        upper = ch == "-"
    return "".join(out)


def _wire(s: str) -> bytes:
    """The bytes a wire string stood for.

    ASGI servers hand over raw paths and header values as latin-1 text, so encoding back to latin-1 gives the
    exact bytes the client signed (UTF-8 header values included). Text that cannot be latin-1 was never wire
    text (a caller passed real Unicode), and UTF-8 is what the SDKs would have signed for it.
    """
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


def _x_qiniu_block(headers: Mapping[str, str]) -> bytes:
    """Each X-Qiniu-* header as ``"\\nName: value"``, canonical name, sorted by name then value (as Go)."""
    items = sorted(
        (canonical_header_name(k), v)
        for k, v in headers.items()
        if k.lower().startswith(_X_QINIU_PREFIX) and len(k) > len(_X_QINIU_PREFIX)
    )
    return b"".join(b"\n" + _wire(k) + b": " + _wire(v) for k, v in items)


def _qiniu_prefix(
    method: bytes, path: bytes, query: bytes, host: bytes, ct: bytes | None, xq: bytes
) -> bytes:
    # The SDKs add "?" only for a non-empty query (urlparse / Go's RawQuery drop a bare trailing "?").
    data = method + b" " + path + (b"?" + query if query else b"") + b"\nHost: " + host
    if ct:
        data += b"\nContent-Type: " + ct
    return data + xq + b"\n\n"


def _qiniu_signs_body(ct: str | None, body: bytes) -> bool:
    """The Python SDK's / COMPAT.md's rule: body signed when Content-Type is there and not octet-stream."""
    return bool(ct) and ct != _OCTET and bool(body)


def _go_signs_body(ct: str | None, body: bytes) -> bool:
    """The Go SDK's rule (``incBodyV2``): body signed only for exactly form or JSON."""
    return ct in (_FORM, _JSON) and bool(body)


def _qbox_signs_body(ct: str | None, body: bytes) -> bool:
    # Python ``Auth.token_of_request`` and Go ``incBody`` agree: exact form content type only.
    return ct == _FORM and bool(body)


def qiniu_string_to_sign(
    method: str,
    path: str,
    query: str,
    host: str,
    headers: Mapping[str, str],
    body: bytes = b"",
) -> bytes:
    """The canonical ``Qiniu`` string (the official SDK's variant) for a request; headers in any case."""
    lower = _lower_headers(headers)
    ct = lower.get("content-type")
    data = _qiniu_prefix(
        _wire(method),
        _wire(path),
        _wire(query),
        _wire(host),
        _wire(ct) if ct else None,
        _x_qiniu_block(lower),
    )
    return data + body if _qiniu_signs_body(ct, body) else data


def qbox_string_to_sign(path: str, query: str, body: bytes = b"", content_type: str | None = None) -> bytes:
    data = _wire(path) + (b"?" + _wire(query) if query else b"") + b"\n"
    return data + body if _qbox_signs_body(content_type, body) else data


def _hmac_sign(secret: bytes, data: bytes, tail: bytes = b"") -> bytes:
    mac = hmac.new(secret, data, sha1)
    if tail:
        mac.update(tail)
    return urlsafe_b64encode(mac.digest())  # padding kept, like every SDK


# ----------------------------------------------------------------------------------------------------------
# Candidate variants


def _split_port(host: str) -> tuple[str, str | None]:
    """``h:8000`` -> (h, "8000"); ``h`` -> (h, None); IPv6 literals keep their colons."""
    head, sep, port = host.rpartition(":")
    if sep and port.isdigit() and port.isascii() and (":" not in head or head.endswith("]")):
        return head, port
    return host, None


def _host_variants(host: str) -> list[str]:
    """The host strings clients sign for one Host value.

    - as sent;
    - without a port: ``:80`` and ``:443`` appended, because the Python SDK signs the URL's netloc (an
      explicit ``http://h:80/`` stays ``h:80``) while the HTTP client drops the default port from the Host
      header it sends; we do not know the scheme (TLS may end at a proxy), so both;
    - with a port: ``host:port:port``, the Node SDK's (``url.host`` already carries the port; it adds it
      again). Node's URL parser drops default ports, so this only arises for a port the Host header shows.
    """
    _, port = _split_port(host)
    if port is None:
        return [host, host + ":80", host + ":443"]
    return [host, f"{host}:{port}"]


def _qiniu_candidates(
    req: SignedRequest, lower: Mapping[str, str], public_host: str | None
) -> Iterator[tuple[bytes, bytes]]:
    """(prefix, body-or-empty) pairs, most likely first. At most 2 paths x 6 hosts x 2 body rules = 24.

    The body is kept apart so the caller feeds it to HMAC without copying a large body onto each prefix.
    """
    method = _wire(req.method)
    raw_path = _wire(req.raw_path)
    paths = [raw_path]
    # Go signs ``url.Path`` (decoded) while sending the escaped path, e.g. a group id with %2F or Chinese.
    decoded = unquote_to_bytes(raw_path)
    if decoded != raw_path:
        paths.append(decoded)
    query = _wire(req.query)

    hosts: list[str] = []
    for base in (lower.get("host", ""), public_host):
        if base is None:
            continue
        for h in _host_variants(base):
            if h not in hosts:
                hosts.append(h)

    ct = lower.get("content-type")
    ct_bytes = _wire(ct) if ct else None
    xq = _x_qiniu_block(lower)
    body_rules: list[bool] = []
    for rule in (_qiniu_signs_body(ct, req.body), _go_signs_body(ct, req.body)):
        if rule not in body_rules:
            body_rules.append(rule)

    for path in paths:
        for h in hosts:
            prefix = _qiniu_prefix(method, path, query, _wire(h), ct_bytes, xq)
            for signed in body_rules:
                yield prefix, (req.body if signed else b"")


def _qbox_candidates(req: SignedRequest, lower: Mapping[str, str]) -> Iterator[tuple[bytes, bytes]]:
    ct = lower.get("content-type")
    body = req.body if _qbox_signs_body(ct, req.body) else b""
    raw_path = _wire(req.raw_path)
    query = _wire(req.query)
    tail = b"?" + query + b"\n" if query else b"\n"
    yield raw_path + tail, body
    decoded = unquote_to_bytes(raw_path)
    if decoded != raw_path:
        yield decoded + tail, body


# ----------------------------------------------------------------------------------------------------------
# Verification


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # First occurrence wins, as Starlette's ``Headers[...]`` and Go's ``Header.Get`` read duplicates.
    out: dict[str, str] = {}
    for k, v in headers.items():
        out.setdefault(k.lower(), v)
    return out


def _parse_authorization(value: str | None) -> tuple[str, str, str]:
    """``"Qiniu AK:Sign"`` -> ("Qiniu", AK, Sign); anything else is a bad token."""
    if not value:
        raise AuthError(401, BAD_TOKEN, "no Authorization header")
    scheme, _, cred = value.strip().partition(" ")
    if scheme not in ("Qiniu", "QBox"):
        raise AuthError(401, BAD_TOKEN, "Authorization is not 'Qiniu AK:sign' or 'QBox AK:sign'")
    # rpartition: the signature (base64url) never has a colon, so an AK with one still parses.
    ak, sep, sign = cred.strip().rpartition(":")
    if not sep or not ak or not sign:
        raise AuthError(401, BAD_TOKEN, "malformed Authorization (no AK:sign)")
    return scheme, ak, sign


def claimed_access_key(authorization: str | None) -> str:
    """The access key an Authorization header claims (not yet verified); AuthError 401 if malformed.

    Lets the HTTP layer refuse an unknown key before it reads (and buffers) the request body.
    """
    return _parse_authorization(authorization)[1]


def _check_date(value: str, now: datetime | None, max_skew_s: int) -> None:
    # A malformed date answers 403, not 401: this runs only after the signature matched, so the keys are
    # right and a 401 would send the client hunting for a credential problem it does not have. Qiniu
    # treated the date as a freshness check (403), and a garbled one is simply not fresh.
    value = value.strip()
    if not _DATE_RE.fullmatch(value):
        raise AuthError(403, "invalid X-Qiniu-Date")
    try:
        when = datetime.strptime(value, DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:  # e.g. month 13
        raise AuthError(403, "invalid X-Qiniu-Date") from None
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if abs(now - when) > timedelta(seconds=max_skew_s):
        raise AuthError(403, "request date expired")


def _mismatch_reason(req: SignedRequest, lower: Mapping[str, str], key: bytes, given: bytes) -> str:
    """Why a Qiniu signature did not match, for the log: a host mismatch when the request verifies for a
    host a proxy or the client would plausibly have signed instead (X-Forwarded-Host, a loopback alias),
    else a bad signature (wrong secret, or the path, query, headers or body changed on the way)."""
    host = lower.get("host", "")
    _, port = _split_port(host)
    suffix = f":{port}" if port else ""
    others = [lower.get("x-forwarded-host", "").split(",")[0].strip()]
    others += [alias + suffix for alias in ("localhost", "127.0.0.1", "[::1]")]
    for other in dict.fromkeys(h for h in others if h and h != host):
        if any(
            hmac.compare_digest(_hmac_sign(key, prefix, tail), given)
            for prefix, tail in _qiniu_candidates(req, {**lower, "host": other}, None)
        ):
            return (
                f"host mismatch: signed for {other!r} but the request's Host is {host!r} "
                "(behind a proxy, set TUSOU_PUBLIC_HOST to the signed host)"
            )
    return "bad signature (wrong secret key, or the request changed after it was signed)"


def verify(
    req: SignedRequest,
    secret_for: Callable[[str], str | None],
    *,
    public_host: str | None = None,
    max_skew_s: int = 900,
    now: datetime | None = None,
) -> str:
    """Return the request's access key, or raise :class:`AuthError` (401 bad token, 403 stale date).

    ``secret_for`` maps an access key to its secret key, ``None`` when unknown. ``public_host`` is the
    host[:port] clients sign when a proxy rewrites Host (``Settings.public_host``).
    """
    lower = _lower_headers(req.headers)
    scheme, ak, sign = _parse_authorization(lower.get("authorization"))
    secret = secret_for(ak)
    if not secret:
        raise AuthError(401, BAD_TOKEN, "unknown or revoked access key")
    key = secret.encode("utf-8", "surrogatepass")
    given = sign.encode("utf-8", "surrogatepass")

    candidates = (
        _qiniu_candidates(req, lower, public_host) if scheme == "Qiniu" else _qbox_candidates(req, lower)
    )
    # Stopping at the first match is fine: it reveals which variant the client used, nothing about the secret.
    if not any(hmac.compare_digest(_hmac_sign(key, prefix, tail), given) for prefix, tail in candidates):
        raise AuthError(401, BAD_TOKEN, _mismatch_reason(req, lower, key, given) if scheme == "Qiniu" else "")

    # Only the Qiniu scheme signs X-Qiniu-Date; under QBox it is unauthenticated, so it proves no freshness
    # and is ignored rather than trusted. Absent is fine: older SDKs and clients that turned it off omit it.
    if scheme == "Qiniu":
        date = lower.get(DATE_HEADER.lower())
        if date is not None:
            _check_date(date, now, max_skew_s)
    return ak


class StreamVerifier:
    """:func:`verify` for a body that arrives in pieces: every candidate's HMAC is fed as the body streams
    (:meth:`update`, from any one thread at a time), so a large body is never held or hashed in one go,
    and the request is judged at the end (:meth:`finish`).

    Knows which candidate matched, hence whether the signature covered the body (``covered``): under the
    Qiniu scheme a body without Content-Type or with ``application/octet-stream`` is not signed, and
    under QBox a JSON body never is.
    """

    def __init__(
        self, head: SignedRequest, secret_for: Callable[[str], str | None], *, public_host: str | None = None
    ) -> None:
        self._head = head
        self._lower = _lower_headers(head.headers)
        self.scheme, self.access_key, sign = _parse_authorization(self._lower.get("authorization"))
        secret = secret_for(self.access_key)
        if not secret:
            raise AuthError(401, BAD_TOKEN, "unknown or revoked access key")
        self._key = secret.encode("utf-8", "surrogatepass")
        self._given = sign.encode("utf-8", "surrogatepass")
        self._public_host = public_host

        def candidates(body: bytes) -> Iterator[tuple[bytes, bytes]]:
            probe = replace(head, body=body)
            if self.scheme == "Qiniu":
                return _qiniu_candidates(probe, self._lower, public_host)
            return _qbox_candidates(probe, self._lower)

        # A one-byte probe body tells the candidates that sign a body from those that leave it out.
        self._signing: list[Any] = []
        self._not_signing: list[bytes] = []
        for prefix, tail in candidates(b"\x00"):
            if tail:
                self._signing.append(hmac.new(self._key, prefix, sha1))
            else:
                self._not_signing.append(prefix)
        self._empty = [prefix for prefix, _ in candidates(b"")]

    def update(self, chunk: bytes) -> None:
        for mac in self._signing:
            mac.update(chunk)

    def finish(self, size: int, body: bytes | None = None, *, max_skew_s: int = 900) -> bool:
        """Check the signature of a body of ``size`` bytes; returns whether it covered the body (True when
        empty). Raises :class:`AuthError` like :func:`verify`. ``body``, when still at hand, only refines
        the reason logged for a mismatch."""
        given = self._given
        covered: bool | None = None
        if size == 0:
            if any(hmac.compare_digest(_hmac_sign(self._key, p), given) for p in self._empty):
                covered = True
        elif any(hmac.compare_digest(urlsafe_b64encode(m.digest()), given) for m in self._signing):
            covered = True
        elif any(hmac.compare_digest(_hmac_sign(self._key, p), given) for p in self._not_signing):
            covered = False
        if covered is None:
            reason = "bad signature (wrong secret key, or the request changed after it was signed)"
            if self.scheme == "Qiniu" and body is not None:
                reason = _mismatch_reason(replace(self._head, body=body), self._lower, self._key, given)
            raise AuthError(401, BAD_TOKEN, reason if self.scheme == "Qiniu" else "")
        if self.scheme == "Qiniu":
            date = self._lower.get(DATE_HEADER.lower())
            if date is not None:
                _check_date(date, None, max_skew_s)
        return covered


# ----------------------------------------------------------------------------------------------------------
# Signing (tusou's own clients, tests)


def sign_qiniu(
    access_key: str,
    secret_key: str,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | str = b"",
    date: datetime | None = None,
    add_date: bool = True,
) -> dict[str, str]:
    """The headers to send for a ``Qiniu``-signed request, like the official SDK's ``QiniuMacRequestsAuth``.

    ``url`` must be exactly what goes on the wire (path already percent-encoded). Returns ``headers`` plus
    ``Content-Type`` (defaulting to form, as the SDK does, so a body is covered by the signature),
    ``X-Qiniu-Date`` (``date`` or now, unless ``add_date`` is false) and ``Authorization``. The URL's netloc
    is signed as Host, as the SDK does; the verifier also accepts it with the default port dropped.
    """
    out = dict(headers or {})
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not any(k.lower() == "content-type" for k in out):
        out["Content-Type"] = _FORM
    if add_date:
        for k in [k for k in out if k.lower() == DATE_HEADER.lower()]:
            del out[k]
        out[DATE_HEADER] = (date or datetime.now(UTC)).astimezone(UTC).strftime(DATE_FORMAT)
    parts = urlsplit(url)
    data = qiniu_string_to_sign(method.upper(), parts.path or "/", parts.query, parts.netloc, out, body)
    out["Authorization"] = (
        f"Qiniu {access_key}:{_hmac_sign(secret_key.encode('utf-8'), data).decode('ascii')}"
    )
    return out


def sign_qbox(
    access_key: str, secret_key: str, url: str, *, body: bytes | str = b"", content_type: str | None = None
) -> dict[str, str]:
    """``{"Authorization": "QBox AK:Sign"}`` for a request, like the SDK's ``Auth.token_of_request``."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    parts = urlsplit(url)
    data = qbox_string_to_sign(parts.path or "/", parts.query, body, content_type)
    return {
        "Authorization": f"QBox {access_key}:{_hmac_sign(secret_key.encode('utf-8'), data).decode('ascii')}"
    }
