"""Fuzzing over HTTP: schemathesis from the app's own OpenAPI, and Hypothesis on the parsers behind it.

Every request is correctly signed (``sign_qiniu`` over the exact bytes sent), so junk reaches the handlers
rather than stopping at the 401. The server runs in this process under the loopback tripwire of
``test_hostile.NetGuard``: generated ``http://`` uris can never resolve or connect past loopback.

What must hold for every request: no 500, a JSON body, ``{"error": "<text>"}`` on any 4xx/5xx, an X-Reqid.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from bench.crash import SignedClient
from tests.conftest import Tusou, data_uri, jpeg
from tests.test_hostile import NetGuard
from tusou.api.auth import sign_qiniu
from tusou.config import Settings
from tusou.embed.base import Embedder
from tusou.images import ImageError, parse_data_uri

FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # CI runs the same cases each time; a failure reproduces
    database=None,
)
# The parser tests are cheap (a millisecond or two a request): more cases for the same time budget.
FUZZ_MANY = settings(FUZZ, max_examples=100)


class Server:
    def __init__(self, running: Tusou, guard: NetGuard) -> None:
        self.running = running
        self.guard = guard
        key = running.keys.create("fuzz")
        self.ak, self.sk = key.access_key, key.secret_key
        self.url = running.server.url
        self.client = SignedClient(self.url, self.ak, self.sk)
        self.session = requests.Session()

    def send(self, method: str, path_and_query: str, body: bytes = b"", headers: dict[str, str] | None = None,
             sign: bool = True) -> requests.Response:
        """Send exactly these bytes; sign them first unless told not to."""
        url = self.url + path_and_query
        hdrs = dict(headers or {})
        if sign:
            hdrs = sign_qiniu(self.ak, self.sk, method, url, headers=hdrs, body=body)
        req = requests.Request(method, url, data=body or None, headers=hdrs).prepare()
        req.url = url  # requests may re-quote; the signature covers what we built
        return self.session.send(req, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[Server]:
    guard = NetGuard()
    guard.install()
    data = Path(tmp_path_factory.mktemp("fuzz")) / "data"
    # No rate limit: the fuzzer sends far more than a client would, and 429s would hide the handlers.
    running = Tusou(Settings(data=data, rate_limit_per_s=0, fetch_timeout_s=2.0), embedder)
    running.server.__enter__()
    try:
        srv = Server(running, guard)
        from tests import imagegen

        image = data_uri(jpeg(imagegen.scene(1, (64, 48))))
        for group in ("g1", "fz"):
            resp = srv.client.post(f"/v1/image/group/{group}/new",
                                   {"data": [{"uri": image, "attribute": {"id": "i1"}}]})
            assert resp.status_code == 200
        yield srv
    finally:
        running.close()
        guard.uninstall()
    assert guard.blocked == [], "a fuzzed request made tusou leave loopback"


def check_response(resp: requests.Response, what: Any) -> None:
    assert resp.status_code != 500, (what, resp.text[:500])
    assert resp.headers.get("X-Reqid"), what
    body = resp.json()  # raises if not JSON
    if resp.status_code >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], (what, body)


# --- schemathesis -------------------------------------------------------------------------------------------
_REQUEST_KEYS = {"method", "url", "headers", "params", "data", "json", "cookies", "files"}


def fuzz_operation(server: Server, op: Any, sent: dict[str, int]) -> None:
    strategies = [op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)]
    if "{group_id}" in op.path:
        # Cases on a group that exists, so they get past "group not exists" (a group of its own: a
        # fuzzed remove may take it away, and the tests below rely on g1).
        strategies.append(op.as_strategy(GenerationMode.POSITIVE, path_parameters={"group_id": "fz"}))

    @FUZZ
    @given(case=st.one_of(strategies))
    def run(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=server.url)
        prepared = requests.Request(**{k: v for k, v in kwargs.items() if k in _REQUEST_KEYS}).prepare()
        body = prepared.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
        # Sign what goes on the wire: the prepared URL, body and headers (schemathesis' own included).
        path = prepared.url[len(server.url):] if prepared.url else "/"
        resp = server.send(prepared.method or "GET", path, body, headers)
        sent[op.label] = sent.get(op.label, 0) + 1
        check_response(resp, (op.label, prepared.method, path[:200], body[:200]))

    run()


def test_openapi_operations_never_answer_500(server: Server) -> None:
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    sent: dict[str, int] = {}
    for op in operations:
        fuzz_operation(server, op, sent)
    assert len(sent) == len(operations), sent
    assert "g1" in server.client.get("/v1/image/group").json()["result"]


# --- Hypothesis on parsers, through HTTP ---------------------------------------------------------------
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=200
).map(str.strip)


@FUZZ_MANY
@given(junk=header_text)
def test_junk_authorization_is_401(server: Server, junk: str) -> None:
    for value in (junk, f"Qiniu {junk}", f"QBox {junk}", f"Qiniu {server.ak}:{junk}", f"Qiniu {junk}:{junk}"):
        resp = server.send("GET", "/v1/image/group", headers={"Authorization": value}, sign=False)
        assert resp.status_code == 401, (value, resp.status_code)
        check_response(resp, value)


@FUZZ
@given(date=header_text)
def test_junk_signed_date_is_403_or_accepted(server: Server, date: str) -> None:
    # The date is signed, so the request reaches the freshness check with a valid signature.
    url = server.url + "/v1/image/group"
    hdrs = sign_qiniu(server.ak, server.sk, "GET", url, headers={"X-Qiniu-Date": date}, add_date=False)
    resp = server.session.get(url, headers=hdrs, timeout=30)
    assert resp.status_code in (200, 403), (date, resp.status_code, resp.text)
    check_response(resp, date)


data_uri_junk = st.one_of(
    st.text(max_size=300).map(lambda s: "data:" + s),
    st.builds(lambda t, p: f"data:{t};base64,{p}", st.text(max_size=30),
              st.text(alphabet="ABCDEFabcdef0123456789+/=-_%\n \t", max_size=200)),
    st.binary(max_size=200).map(lambda b: data_uri(b)),
)


@FUZZ_MANY
@given(uri=data_uri_junk)
def test_data_uri_parser_only_raises_image_errors(uri: str) -> None:
    try:
        parse_data_uri(uri)
    except ImageError as exc:
        assert 400 <= exc.code < 500 and exc.message


@FUZZ
@given(uri=data_uri_junk)
def test_junk_data_uris_over_http(server: Server, uri: str) -> None:
    search = {"data": {"uri": uri}, "params": {"groups": ["g1"]}}
    resp = server.client.post("/v1/image/groups/search", search)
    check_response(resp, uri[:200])
    assert resp.status_code < 500
    added = server.client.post("/v1/image/group/g1/add", {"data": [{"uri": uri, "attribute": {"id": "x"}}]})
    check_response(added, uri[:200])
    if added.status_code == 200 and added.json()["images"] == ["x"]:
        server.client.post("/v1/image/group/g1/delete", {"images": ["x"]})  # keep g1 small


@FUZZ_MANY
@given(marker=st.text(max_size=60))
def test_junk_markers_are_400_invalid_marker(server: Server, marker: str) -> None:
    resp = server.send("GET", "/v1/image/group/g1?" + urlencode({"marker": marker, "limit": 10}))
    check_response(resp, marker)
    # Markers are authenticated (tusou.store.markers): no junk string is one, only "" (the first page) is.
    if marker == "":
        assert resp.status_code == 200, (marker, resp.text)
    else:
        assert resp.status_code == 400 and resp.json() == {"error": "invalid marker"}, (marker, resp.text)


group_junk = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", ".", "%2F", "a%2Fb", "%2e%2e", "..%2F..", "\x00", "\x1f", "\u202e", "\ufeff",
                     "a" * 129, "a" * 5000, "图" * 129, "%", "%zz", "?", "#", "\\"]),
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=5),
)


@FUZZ_MANY
@given(group=group_junk, raw=st.booleans())
def test_junk_group_ids_are_4xx(server: Server, group: str, raw: bool) -> None:
    # Percent-encoded always (control characters cannot go on the request line); sometimes with the
    # dangerous ones ('%', '/', '.') left as they are, to reach the router with them.
    safe = "%/." if raw else ""
    segment = quote(group, safe=safe) or "%20"
    for method, suffix, body in (
        ("GET", "/info", b""),
        ("GET", "", b""),
        ("POST", "/add", json.dumps({"data": []}).encode()),
        ("POST", "/image", json.dumps({"id": "i1"}).encode()),
        ("POST", "/delete", json.dumps({"images": ["nope"]}).encode()),
    ):
        headers = {"Content-Type": "application/json"} if body else {}
        resp = server.send(method, f"/v1/image/group/{segment}{suffix}", body, headers)
        check_response(resp, (group, method, suffix))
        if group != "g1":
            assert 400 <= resp.status_code < 500, (group, method, suffix, resp.status_code, resp.text)


# --- non-finite JSON numbers --------------------------------------------------------------------------------
# Python's json module reads NaN, Infinity and -Infinity (not JSON, but clients' json libraries send them),
# while Starlette's JSONResponse refuses to write them (allow_nan=False). Each one must be refused or
# normalised where it comes in, or it turns into a 500 later.
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]  # 1e999 parses as inf


JSON = {"Content-Type": "application/json"}


def with_number(body: Any, number: str) -> bytes:
    """``body`` as JSON with the string "N" replaced by the bare token ``number`` (not valid JSON)."""
    return json.dumps(body).replace('"N"', number).encode()


@pytest.mark.parametrize("number", NON_FINITE)
def test_non_finite_search_params_are_refused(server: Server, number: str) -> None:
    image = data_uri(jpeg(imagegen_scene(2)))
    for param in ("limit", "threshold"):
        raw = with_number({"data": {"uri": image}, "params": {"groups": ["g1"], param: "N"}}, number)
        resp = server.send("POST", "/v1/image/groups/search", raw, JSON)
        check_response(resp, (param, number))
        # 400 (not JSON: refused with the body) or 406 (a bad parameter); either way never a 500.
        assert resp.status_code in (400, 406), (param, number, resp.status_code, resp.text)


@pytest.mark.parametrize("number", NON_FINITE)
def test_non_finite_desc_never_poisons_the_group(server: Server, number: str) -> None:
    image = data_uri(jpeg(imagegen_scene(3)))
    group = f"nf{NON_FINITE.index(number)}"
    assert server.client.post(f"/v1/image/group/{group}/new", {"data": []}).status_code == 200
    raw = with_number({"data": [{"uri": image, "attribute": {"id": "n", "desc": {"x": "N"}}}]}, number)
    resp = server.send("POST", f"/v1/image/group/{group}/add", raw, JSON)
    check_response(resp, number)
    # Refused per image, or stored: then every read of it must still answer.
    search = {"data": {"uri": image}, "params": {"groups": [group]}}
    check_response(server.client.get(f"/v1/image/group/{group}"), ("list", number))
    check_response(server.client.post(f"/v1/image/group/{group}/image", {"id": "n"}), ("image", number))
    check_response(server.client.post("/v1/image/groups/search", search), ("search", number))


def imagegen_scene(seed: int) -> Any:
    from tests import imagegen

    return imagegen.scene(seed, (64, 48))
