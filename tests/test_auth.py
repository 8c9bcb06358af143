"""tusou.api.auth against the official SDK's vectors and the installed ``qiniu`` SDK itself."""

from __future__ import annotations

import json
import logging
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import qiniu
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Tusou
from tusou.api.auth import (
    AuthError,
    SignedRequest,
    _qiniu_candidates,
    canonical_header_name,
    qbox_string_to_sign,
    qiniu_string_to_sign,
    sign_qbox,
    sign_qiniu,
    verify,
)

# Signature test vectors (requests signed by the official qiniu SDK 7.18.0).
VECTORS_PATH = Path(__file__).resolve().parent / "data" / "signature-vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))

AK, SK = "MY_ACCESS_KEY", "MY_SECRET_KEY"
SECRETS = {AK: SK}
NOW = datetime(2024, 1, 1, 0, 5, tzinfo=UTC)  # the vectors' X-Qiniu-Date is 2024-01-01T00:00:00Z


def secret_for(ak: str) -> str | None:
    return SECRETS.get(ak)


def from_vector(v: dict[str, Any], **changes: Any) -> SignedRequest:
    parts = urlsplit(v["url"])
    headers = dict(v["headers_signed_by_sdk"])
    headers["Host"] = v["host_header_sent"]
    headers["Authorization"] = v["authorization"]
    body = v["body"].encode("utf-8") if v["body"] is not None else b""
    fields: dict[str, Any] = dict(
        method=v["method"], raw_path=parts.path, query=parts.query, headers=headers, body=body
    )
    fields.update(changes)
    return SignedRequest(**fields)


def check(req: SignedRequest, **kw: Any) -> str:
    kw.setdefault("now", NOW)
    return verify(req, secret_for, **kw)


def refused(req: SignedRequest, status: int = 401, **kw: Any) -> AuthError:
    with pytest.raises(AuthError) as exc:
        check(req, **kw)
    assert exc.value.status == status
    if status == 401:
        assert exc.value.message == "bad token"
    return exc.value


def vector_ids(v: dict[str, Any]) -> str:
    return str(v["name"])


def with_header(req: SignedRequest, name: str, value: str | None) -> SignedRequest:
    headers = {k: v for k, v in req.headers.items() if k.lower() != name.lower()}
    if value is not None:
        headers[name] = value
    return SignedRequest(req.method, req.raw_path, req.query, headers, req.body)


def flip(s: str, i: int = -1) -> str:
    """``s`` with the character at ``i`` replaced by a different one."""
    i %= len(s)
    return s[:i] + ("B" if s[i] == "A" else "A") + s[i + 1 :]


# ----------------------------------------------------------------------------------------------------------
# The vectors


@pytest.mark.parametrize("v", VECTORS, ids=vector_ids)
def test_vector_verifies(v: dict[str, Any]) -> None:
    assert check(from_vector(v)) == AK


@pytest.mark.parametrize("v", VECTORS, ids=vector_ids)
def test_vector_verifies_with_asgi_lowercase_headers(v: dict[str, Any]) -> None:
    req = from_vector(v)
    lower = {k.lower(): val for k, val in req.headers.items()}
    assert check(SignedRequest(req.method, req.raw_path, req.query, lower, req.body)) == AK


@pytest.mark.parametrize("v", VECTORS, ids=vector_ids)
def test_string_to_sign_matches_sdk(v: dict[str, Any]) -> None:
    parts = urlsplit(v["url"])
    body = v["body"].encode("utf-8") if v["body"] is not None else b""
    if v["scheme"] == "Qiniu":
        data = qiniu_string_to_sign(
            v["method"], parts.path, parts.query, parts.netloc, v["headers_signed_by_sdk"], body
        )
    else:
        ct = v["headers_signed_by_sdk"].get("Content-Type")
        data = qbox_string_to_sign(parts.path, parts.query, body, ct)
    assert data == v["string_to_sign"].encode("utf-8")


@pytest.mark.parametrize("v", [v for v in VECTORS if v["scheme"] == "Qiniu"], ids=vector_ids)
def test_sign_qiniu_reproduces_sdk(v: dict[str, Any]) -> None:
    headers = dict(v["headers_signed_by_sdk"])
    date = headers.pop("X-Qiniu-Date", None)
    out = sign_qiniu(
        AK,
        SK,
        v["method"],
        v["url"],
        headers=headers,
        body=v["body"] or b"",
        date=datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) if date else None,
        add_date=date is not None,
    )
    assert out["Authorization"] == v["authorization"]


@pytest.mark.parametrize("v", [v for v in VECTORS if v["scheme"] == "QBox"], ids=vector_ids)
def test_sign_qbox_reproduces_sdk(v: dict[str, Any]) -> None:
    out = sign_qbox(
        AK, SK, v["url"], body=v["body"] or b"", content_type=v["headers_signed_by_sdk"].get("Content-Type")
    )
    assert out["Authorization"] == v["authorization"]


# ----------------------------------------------------------------------------------------------------------
# One changed byte fails


@pytest.mark.parametrize("v", VECTORS, ids=vector_ids)
def test_changed_signature_fails(v: dict[str, Any]) -> None:
    req = from_vector(v)
    auth = req.headers["Authorization"]
    for i in (-2, len(auth) - 10, auth.index(":") + 1):
        refused(with_header(req, "Authorization", flip(auth, i)))


@pytest.mark.parametrize(
    "v", [v for v in VECTORS if v["body"] and v["body"] in v["string_to_sign"]], ids=vector_ids
)
def test_changed_body_fails(v: dict[str, Any]) -> None:
    req = from_vector(v)
    body = bytearray(req.body)
    body[len(body) // 2] ^= 0x01
    refused(SignedRequest(req.method, req.raw_path, req.query, req.headers, bytes(body)))
    refused(SignedRequest(req.method, req.raw_path, req.query, req.headers, req.body + b" "))
    refused(SignedRequest(req.method, req.raw_path, req.query, req.headers, b""))


@pytest.mark.parametrize(
    "v", [v for v in VECTORS if v["body"] and v["body"] not in v["string_to_sign"]], ids=vector_ids
)
def test_unsigned_body_may_change(v: dict[str, Any]) -> None:
    # Octet-stream (Qiniu) and JSON (QBox) bodies are not signed by the SDK: that is the protocol.
    req = from_vector(v)
    assert check(SignedRequest(req.method, req.raw_path, req.query, req.headers, req.body + b"x")) == AK


@pytest.mark.parametrize("v", VECTORS, ids=vector_ids)
def test_changed_path_or_query_or_method_fails(v: dict[str, Any]) -> None:
    req = from_vector(v)
    refused(from_vector(v, raw_path=flip(req.raw_path)))
    refused(from_vector(v, raw_path=req.raw_path + "/"))
    refused(from_vector(v, raw_path=req.raw_path[:-1]))
    refused(from_vector(v, query=req.query + "&x=1" if req.query else "x=1"))
    if req.query:
        refused(from_vector(v, query=req.query.replace("limit=10", "limit=11")))
    if v["scheme"] == "Qiniu":  # QBox does not sign the method
        refused(from_vector(v, method="PUT" if req.method != "PUT" else "GET"))


@pytest.mark.parametrize("v", [v for v in VECTORS if v["scheme"] == "Qiniu"], ids=vector_ids)
def test_changed_signed_header_fails(v: dict[str, Any]) -> None:
    req = from_vector(v)
    refused(with_header(req, "Host", "ai.qiniuapi.co"))
    refused(with_header(req, "Host", "evil.example.com"))
    for name, value in v["headers_signed_by_sdk"].items():
        refused(with_header(req, name, flip(value)))
        refused(with_header(req, name, None))
    refused(with_header(req, "X-Qiniu-Extra", "1"))  # an added X-Qiniu-* header is signed too
    if "Content-Type" not in v["headers_signed_by_sdk"]:
        refused(with_header(req, "Content-Type", "application/json"))


def test_qbox_form_content_type_change_fails() -> None:
    v = next(v for v in VECTORS if v["name"] == "qbox_post_form_body_signed")
    refused(with_header(from_vector(v), "Content-Type", "application/json"))


@pytest.mark.parametrize("v", VECTORS, ids=vector_ids)
def test_wrong_secret_or_unknown_key_fails(v: dict[str, Any]) -> None:
    req = from_vector(v)
    for table in ({AK: "MY_SECRET_KEX"}, {AK: SK + " "}, {}, {AK: ""}):
        with pytest.raises(AuthError) as exc:
            verify(req, table.get, now=NOW)
        assert (exc.value.status, exc.value.message) == (401, "bad token")
        assert SK not in str(exc.value) and SK not in repr(exc.value)
    other = with_header(req, "Authorization", v["authorization"].replace(AK, "OTHER_KEY"))
    refused(other)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        " ",
        "Qiniu",
        "Qiniu ",
        "Bearer MY_ACCESS_KEY:zKodEhUGTqiyRjHAzGfdsHZSJcM=",
        "QiniuAdmin x:MY_ACCESS_KEY:zKodEhUGTqiyRjHAzGfdsHZSJcM=",
        "Qiniu MY_ACCESS_KEYzKodEhUGTqiyRjHAzGfdsHZSJcM=",
        "Qiniu :zKodEhUGTqiyRjHAzGfdsHZSJcM=",
        "Qiniu MY_ACCESS_KEY:",
        "Qiniu MY_ACCESS_KEY:zKodEhUGTqiyRjHAzGfdsHZSJcM=:e30=",  # upload-token shape
        "qiniu MY_ACCESS_KEY:zKodEhUGTqiyRjHAzGfdsHZSJcM=",
        "Qiniu MY_ACCESS_KEY:zKodEhUGTqiyRjHAzGfdsHZSJcM",  # padding dropped
        "Qiniu MY_ACCESS_KEY:签名",
    ],
)
def test_malformed_authorization_is_bad_token(value: str | None) -> None:
    req = with_header(from_vector(VECTORS[0]), "Authorization", value)
    refused(req)


@pytest.mark.parametrize("v", VECTORS, ids=vector_ids)
def test_valid_signature_under_another_scheme_is_bad_token(v: dict[str, Any]) -> None:
    cred = v["authorization"].split(" ", 1)[1]
    other = "QBox" if v["scheme"] == "Qiniu" else "Qiniu"
    for scheme in (other, v["scheme"].lower(), v["scheme"].upper(), "Bearer", "QiniuAdmin"):
        refused(with_header(from_vector(v), "Authorization", f"{scheme} {cred}"))


# ----------------------------------------------------------------------------------------------------------
# X-Qiniu-Date


def test_date_skew() -> None:
    req = from_vector(VECTORS[0])  # X-Qiniu-Date 20240101T000000Z
    signed_at = datetime(2024, 1, 1, tzinfo=UTC)
    assert check(req, now=signed_at + timedelta(minutes=14)) == AK
    assert check(req, now=signed_at - timedelta(minutes=14)) == AK
    assert check(req, now=signed_at + timedelta(minutes=15)) == AK  # "more than 15 minutes" is refused
    assert check(req, now=(signed_at + timedelta(minutes=14)).replace(tzinfo=None)) == AK  # naive = UTC
    for off in (16, -16, 60 * 24 * 365):
        err = refused(req, 403, now=signed_at + timedelta(minutes=off))
        assert err.message == "request date expired"
    refused(req, 403, now=signed_at + timedelta(minutes=3), max_skew_s=60)


def test_no_date_header_is_fine_whenever() -> None:
    v = next(v for v in VECTORS if v["name"] == "qiniu_post_json_no_date")
    assert check(from_vector(v), now=datetime(2031, 6, 1, tzinfo=UTC)) == AK


@pytest.mark.parametrize(
    "date", ["20241301T000000Z", "2024-01-01T00:00:00Z", "", "20240101T000000", "1704067200"]
)
def test_malformed_date_is_403_when_signed(date: str) -> None:
    # The date is signed, so a malformed one needs a valid signature to reach the date check.
    headers = sign_qiniu(
        AK, SK, "GET", "http://h/v1/image/group", headers={"X-Qiniu-Date": date}, add_date=False
    )
    req = SignedRequest("GET", "/v1/image/group", "", {**headers, "Host": "h"}, b"")
    refused(req, 403)


def test_qbox_ignores_unsigned_date() -> None:
    # Under QBox X-Qiniu-Date is not signed, so it cannot prove freshness either way.
    v = next(v for v in VECTORS if v["name"] == "qbox_get_with_query")
    req = with_header(from_vector(v), "X-Qiniu-Date", "19990101T000000Z")
    assert check(req) == AK


# ----------------------------------------------------------------------------------------------------------
# Host variants


def sdk_token(
    method: str, host: str | None, url: str, headers: dict[str, str], body: bytes | None = None
) -> str:
    """A signature made by the SDK's own ``token_of_request`` with an explicit host string."""
    mac = qiniu.QiniuMacAuth(AK, SK)
    token = mac.token_of_request(
        method, host, url, mac.qiniu_headers(headers), headers.get("Content-Type"), body
    )
    return f"Qiniu {token}"


def test_public_host() -> None:
    headers = sign_qiniu(AK, SK, "GET", "https://search.example.com/v1/image/group", date=NOW)
    req = SignedRequest("GET", "/v1/image/group", "", {**headers, "Host": "127.0.0.1:8000"}, b"")
    refused(req)
    assert check(req, public_host="search.example.com") == AK
    refused(req, public_host="other.example.com")
    # The SDK signs an explicit default port; the public host is configured without it.
    headers = sign_qiniu(AK, SK, "GET", "https://search.example.com:443/v1/image/group", date=NOW)
    req = SignedRequest("GET", "/v1/image/group", "", {**headers, "Host": "10.0.0.5"}, b"")
    assert check(req, public_host="search.example.com") == AK
    # A public host with a non-default port.
    headers = sign_qiniu(AK, SK, "GET", "http://search.example.com:8443/v1/image/group", date=NOW)
    req = SignedRequest("GET", "/v1/image/group", "", {**headers, "Host": "10.0.0.5:8000"}, b"")
    assert check(req, public_host="search.example.com:8443") == AK
    refused(req, public_host="search.example.com")


def test_node_host_port_port() -> None:
    headers = {"Content-Type": "application/json", "X-Qiniu-Date": "20240101T000000Z"}
    body = b'{"data":{"uri":"http://example.com/q.jpg"}}'
    auth = sdk_token(
        "POST", "127.0.0.1:8000:8000", "http://127.0.0.1:8000/v1/image/groups/search", headers, body
    )
    req = SignedRequest(
        "POST",
        "/v1/image/groups/search",
        "",
        {**headers, "Host": "127.0.0.1:8000", "Authorization": auth},
        body,
    )
    assert check(req) == AK
    refused(with_header(req, "Host", "127.0.0.1:8001"))


def test_ipv6_host_with_port() -> None:
    headers = sign_qiniu(AK, SK, "GET", "http://[::1]:8000/v1/image/group", date=NOW)
    req = SignedRequest("GET", "/v1/image/group", "", {**headers, "Host": "[::1]:8000"}, b"")
    assert check(req) == AK


@pytest.mark.parametrize("scheme,port", [("http", 80), ("https", 443)])
def test_sdk_default_port_in_url_not_in_host_header(scheme: str, port: int) -> None:
    # requests/http.client drop the default port from Host; the SDK signs the URL's netloc with it.
    url = f"{scheme}://ai.qiniuapi.com:{port}/v1/image/group"
    req = sdk_request(requests.Request("GET", url))
    assert req.headers["Host"] == "ai.qiniuapi.com"
    assert check(req, now=None) == AK


def test_candidate_count_is_bounded() -> None:
    body = b'{"a":1}'
    headers = {
        "Host": "ai.qiniuapi.com",
        "Content-Type": "application/json; charset=utf-8",
        "Authorization": "Qiniu a:b",
    }
    req = SignedRequest("POST", "/v1/image/group/%E5%9B%BE", "", headers, body)
    lower = {k.lower(): v for k, v in headers.items()}
    assert len(list(_qiniu_candidates(req, lower, "search.example.com"))) <= 24


# ----------------------------------------------------------------------------------------------------------
# Path and body variants

CHINESE_GROUP = "图片/组"  # "/" inside an id travels as %2F


def test_encoded_and_decoded_path_variants() -> None:
    from urllib.parse import quote

    raw = "/v1/image/group/" + quote(CHINESE_GROUP, safe="") + "/image"
    assert "%2F" in raw and "%E5" in raw
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Qiniu-Date": "20240101T000000Z"}
    for signed_path in (raw, "/v1/image/group/" + CHINESE_GROUP + "/image"):  # SDK/encoded, Go/decoded
        auth = sdk_token("GET", "ai.qiniuapi.com", "http://ai.qiniuapi.com" + signed_path, headers)
        req = SignedRequest(
            "GET", raw, "", {**headers, "Host": "ai.qiniuapi.com", "Authorization": auth}, b""
        )
        assert check(req) == AK
        # A wire path that decodes to something else does not verify under either variant.
        refused(SignedRequest("GET", raw.replace("%2F", "%2f%2F"), "", req.headers, b""))
    # QBox, decoded path (Go's ``collectData`` signs url.Path).
    token = qiniu.Auth(AK, SK).token_of_request("http://ai.qiniuapi.com/v1/image/group/" + CHINESE_GROUP)
    req = SignedRequest(
        "GET",
        "/v1/image/group/" + quote(CHINESE_GROUP, safe=""),
        "",
        {"Host": "x", "Authorization": f"QBox {token}"},
    )
    assert check(req) == AK


def test_go_body_rule_for_content_type_with_parameters() -> None:
    body = b'{"id":"img-1"}'
    url = "http://ai.qiniuapi.com/v1/image/group/g/image"
    for ct, sign_body, ok in [
        ("application/json; charset=utf-8", True, True),  # Python/Node rule: signed
        ("application/json; charset=utf-8", False, True),  # Go rule: only exact json/form signed
        ("application/json", False, False),  # every client signs an exact-json body
        ("application/x-www-form-urlencoded", False, False),
    ]:
        headers = {"Content-Type": ct}
        auth = sdk_token("POST", "ai.qiniuapi.com", url, headers, body if sign_body else None)
        req = SignedRequest(
            "POST",
            "/v1/image/group/g/image",
            "",
            {**headers, "Host": "ai.qiniuapi.com", "Authorization": auth},
            body,
        )
        if ok:
            assert check(req) == AK, ct
        else:
            refused(req)


def test_octet_stream_body_signed_is_refused() -> None:
    # Nobody signs an octet-stream body, so a signature that covers one is not a variant we accept.
    import base64
    import hashlib
    import hmac

    body = b"\x00\x01binary"
    data = b"POST /v1/image/group/g/add\nHost: h\nContent-Type: application/octet-stream\n\n" + body
    sign = base64.urlsafe_b64encode(hmac.new(SK.encode(), data, hashlib.sha1).digest()).decode()
    headers = {"Host": "h", "Content-Type": "application/octet-stream", "Authorization": f"Qiniu {AK}:{sign}"}
    refused(SignedRequest("POST", "/v1/image/group/g/add", "", headers, body))


def test_qbox_form_with_charset_does_not_sign_body() -> None:
    # Both SDKs compare the content type exactly, so a parameterised form type leaves the body out.
    url = "http://ai.qiniuapi.com/v1/image/group/g/image"
    token = qiniu.Auth(AK, SK).token_of_request(url)
    headers = {"Host": "ai.qiniuapi.com", "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    req = SignedRequest(
        "POST", "/v1/image/group/g/image", "", {**headers, "Authorization": f"QBox {token}"}, b"id=1"
    )
    assert check(req) == AK


# ----------------------------------------------------------------------------------------------------------
# Real signing by the installed SDK


def wire_host(url: str) -> str:
    """The Host header http.client sends: the netloc with the scheme's default port dropped."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}[parts.scheme]
    return parts.hostname if parts.port in (None, default) else f"{parts.hostname}:{parts.port}"  # type: ignore[return-value]


def sdk_request(r: requests.Request, scheme: str = "Qiniu") -> SignedRequest:
    if scheme == "Qiniu":
        r.auth = qiniu.auth.QiniuMacRequestsAuth(qiniu.QiniuMacAuth(AK, SK))
    else:
        r.auth = qiniu.auth.RequestsAuth(qiniu.Auth(AK, SK))
    prep = r.prepare()
    assert prep.url is not None and prep.method is not None
    parts = urlsplit(prep.url)
    body = prep.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    headers = {**prep.headers, "Host": wire_host(prep.url)}
    return SignedRequest(prep.method, parts.path, parts.query, headers, body)


def test_sdk_get_with_query() -> None:
    r = requests.Request(
        "GET", "http://127.0.0.1:8000/v1/image/group/test-group", params={"marker": "", "limit": 10}
    )
    req = sdk_request(r)
    assert req.query == "marker=&limit=10" and "X-Qiniu-Date" in req.headers
    assert check(req, now=None) == AK
    refused(SignedRequest(req.method, req.raw_path, "marker=&limit=11", req.headers, req.body), now=None)


def test_sdk_post_json() -> None:
    payload = {"data": {"uri": "http://example.com/q.jpg"}, "params": {"groups": ["图片"], "limit": 5}}
    req = sdk_request(requests.Request("POST", "http://127.0.0.1:8000/v1/image/groups/search", json=payload))
    assert req.headers["Content-Type"] == "application/json"
    assert check(req, now=None) == AK
    refused(
        SignedRequest(req.method, req.raw_path, req.query, req.headers, req.body.replace(b"5", b"6")),
        now=None,
    )


def test_sdk_post_form_like_post_with_qiniu_mac() -> None:
    # ``qiniu.http._post_with_qiniu_mac(url, dict, auth)`` gives the dict to requests as ``data=``: a form.
    url = "http://127.0.0.1:8000/v1/image/group/" + "%E5%9B%BE%E7%89%87" + "/remove"
    req = sdk_request(requests.Request("POST", url, data={"images": ["a", "b"], "label": "猫"}))
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded" and req.body.startswith(
        b"images=a"
    )
    assert check(req, now=None) == AK
    refused(SignedRequest(req.method, req.raw_path, req.query, req.headers, req.body + b"&x=1"), now=None)


def test_sdk_chinese_path_requests_encodes() -> None:
    req = sdk_request(
        requests.Request("POST", "http://127.0.0.1:8000/v1/image/group/图片/new", json={"data": []})
    )
    assert req.raw_path == "/v1/image/group/%E5%9B%BE%E7%89%87/new"
    assert check(req, now=None) == AK


def test_sdk_qbox_token_of_request() -> None:
    auth = qiniu.Auth(AK, SK)
    url = "http://ai.qiniuapi.com/v1/image/group/test-group/image"
    for ct, body in [
        ("application/x-www-form-urlencoded", "id=img-1"),
        ("application/json", '{"id":"img-1"}'),
        (None, ""),
    ]:
        token = auth.token_of_request(url + "?x=1", body, ct)
        headers = {"Host": "ai.qiniuapi.com", "Authorization": f"QBox {token}"}
        if ct:
            headers["Content-Type"] = ct
        req = SignedRequest("POST", "/v1/image/group/test-group/image", "x=1", headers, body.encode())
        assert check(req) == AK
        refused(SignedRequest(req.method, req.raw_path, "x=2", headers, req.body))
    # And through the SDK's requests hook.
    req = sdk_request(requests.Request("POST", url, data={"id": "img-1"}), scheme="QBox")
    assert req.headers["Authorization"].startswith("QBox ")
    assert check(req) == AK
    refused(SignedRequest(req.method, req.raw_path, req.query, req.headers, b"id=img-2"))


def test_sign_qiniu_roundtrip_defaults() -> None:
    url = "http://127.0.0.1:8000/v1/image/group/g/add?x=%20y"
    body = b'{"data":[]}'
    headers = sign_qiniu(AK, SK, "post", url, headers={"Content-Type": "application/json"}, body=body)
    assert set(headers) == {"Content-Type", "X-Qiniu-Date", "Authorization"}
    req = SignedRequest(
        "POST", "/v1/image/group/g/add", "x=%20y", {**headers, "Host": "127.0.0.1:8000"}, body
    )
    assert check(req, now=None) == AK
    # Without a Content-Type the SDK's default (form) is added, so the body is covered.
    headers = sign_qiniu(AK, SK, "POST", url, body=b"a=1")
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    req = SignedRequest(
        "POST", "/v1/image/group/g/add", "x=%20y", {**headers, "Host": "127.0.0.1:8000"}, b"a=2"
    )
    refused(req, now=None)


def test_canonical_header_name() -> None:
    assert canonical_header_name("x-qiniu-date") == "X-Qiniu-Date"
    assert canonical_header_name("X-QINIU-AAA") == "X-Qiniu-Aaa"
    assert canonical_header_name("x-qiniu-a b") == "x-qiniu-a b"  # not a token: left alone, like the SDK
    for name in ("x-qiniu-date", "X-QINIU-ZZZ", "x-qiniu-foo-bar"):
        assert canonical_header_name(name) == qiniu.utils.canonical_mime_header_key(name)


def test_signed_request_repr_hides_body() -> None:
    req = SignedRequest("POST", "/", "", {}, b"secret-ish payload")
    assert "payload" not in repr(req)


# ----------------------------------------------------------------------------------------------------------
# Robustness

_auth_values = st.one_of(
    st.text(),
    st.builds(
        lambda s, a, b: f"{s} {a}:{b}", st.sampled_from(["Qiniu", "QBox", "qiniu", "X"]), st.text(), st.text()
    ),
    st.builds(
        lambda b: f"Qiniu {AK}:{b}",
        st.text(alphabet=string.ascii_letters + string.digits + "-_=:", max_size=40),
    ),
)


@settings(max_examples=300, deadline=None)
@given(auth=_auth_values, path=st.text(max_size=30), query=st.text(max_size=30), body=st.binary(max_size=64))
def test_verify_only_raises_auth_error_for_junk_authorization(
    auth: str, path: str, query: str, body: bytes
) -> None:
    headers = {"Host": "h", "Authorization": auth, "Content-Type": "application/json", "X-Qiniu-Date": "junk"}
    try:
        verify(SignedRequest("POST", path, query, headers, body), secret_for, public_host="p:1", now=NOW)
    except AuthError as e:
        assert e.status == 401 and e.message == "bad token"
    else:  # pragma: no cover - would need a forged HMAC
        raise AssertionError("junk authorization accepted")


@settings(max_examples=300, deadline=None)
@given(
    date=st.one_of(
        st.text(),
        st.from_regex(r"\A[0-9]{8}T[0-9]{6}Z\Z"),
        st.datetimes(timezones=st.just(UTC)).map(lambda d: d.strftime("%Y%m%dT%H%M%SZ")),
    )
)
def test_verify_only_raises_auth_error_for_junk_dates(date: str) -> None:
    # Signed, so every junk date actually reaches the date check.
    headers = sign_qiniu(
        AK, SK, "GET", "http://h/v1/image/group", headers={"X-Qiniu-Date": date}, add_date=False
    )
    req = SignedRequest("GET", "/v1/image/group", "", {**headers, "Host": "h"}, b"")
    try:
        assert verify(req, secret_for, now=NOW) == AK
    except AuthError as e:
        assert e.status == 403


def test_refusals_keep_bad_token_but_the_log_says_why(tusou: Tusou, caplog: pytest.LogCaptureFixture) -> None:
    key = tusou.keys.create("log")
    revoked = tusou.keys.create("old")
    tusou.keys.revoke(revoked.access_key)
    base = tusou.server.url
    port = urlsplit(base).port
    path = "/v1/image/group"

    def get(signed_url: str, access_key: str, secret_key: str, **headers: str) -> str:
        signed = sign_qiniu(access_key, secret_key, "GET", signed_url)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tusou.api"):
            resp = requests.get(base + path, headers={**signed, **headers}, timeout=30)
        assert resp.status_code == 401 and resp.json() == {"error": "bad token"}  # the wire says no more
        lines = [r.getMessage() for r in caplog.records if r.name == "tusou.api"]
        assert len(lines) == 1, lines
        assert signed["Authorization"].split(":")[-1] not in lines[0]  # never the signature
        return lines[0]

    assert "unknown access key" in get(base + path, "NOPE" * 10, key.secret_key)
    assert "revoked access key" in get(base + path, revoked.access_key, revoked.secret_key)
    assert "bad signature" in get(base + path, key.access_key, key.secret_key[::-1])
    mismatch = get(f"http://localhost:{port}{path}", key.access_key, key.secret_key)
    assert f"host mismatch: signed for 'localhost:{port}'" in mismatch and "TUSOU_PUBLIC_HOST" in mismatch
    proxied = get(
        "https://images.example" + path,
        key.access_key,
        key.secret_key,
        **{"X-Forwarded-Host": "images.example"},
    )
    assert "host mismatch: signed for 'images.example'" in proxied
    assert f"ak={key.access_key}" in proxied
    unsigned = requests.get(base + path, timeout=30)
    assert unsigned.status_code == 401 and unsigned.json() == {"error": "bad token"}


def test_refusals_are_logged_at_a_bounded_rate(tusou: Tusou, caplog: pytest.LogCaptureFixture) -> None:
    """A refusal needs no key and the rate limit counts only verified requests, so its log line is
    throttled: a burst of bad signatures writes a bounded number of lines, and the next line let through
    says how many were left out."""
    from tusou.api.app import LogThrottle

    now = [0.0]
    app = tusou.server.server.config.app
    app.state.refusal_log = LogThrottle(per_s=10, burst=5, clock=lambda: now[0])
    key = tusou.keys.create("flood")
    url = tusou.server.url + "/v1/image/group"
    signed = sign_qiniu(key.access_key, key.secret_key[::-1], "GET", url)
    with caplog.at_level(logging.WARNING, logger="tusou.api"):
        for _ in range(12):
            resp = requests.get(url, headers=signed, timeout=30)
            assert resp.status_code == 401 and resp.json() == {"error": "bad token"}
        lines = [r.getMessage() for r in caplog.records if r.name == "tusou.api"]
        assert len(lines) == 5 and all("bad signature" in line for line in lines), lines
        now[0] += 1.0  # a second later: ten more lines may go
        assert requests.get(url, headers=signed, timeout=30).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "tusou.api"]
    assert len(lines) == 6 and lines[-1].endswith("(7 more refusals not logged)"), lines

