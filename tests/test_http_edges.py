"""The HTTP boundary under careless or hostile clients: what the wire may carry and what the server answers.

Each test drives a real server over a real socket with requests signed like Qiniu's SDK signs them.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import uvicorn
from schemathesis import checks as st_checks

from tests import imagegen
from tests.conftest import QiniuClient, Tusou, data_uri, free_port, jpeg
from tusou.api import guard
from tusou.api.app import create_app
from tusou.api.auth import sign_qiniu
from tusou.config import Settings
from tusou.embed.base import Embedder
from tusou.fetch import Fetcher
from tusou.images import ImageError

IMAGE_ROUTE = "/v1/image/group/{group_id}/image"


def requests_counted(tusou: Tusou, route: str) -> dict[str, float]:
    """Requests the server counted for ``route``, by status (its /metrics)."""
    text = requests.get(tusou.server.url + "/metrics", timeout=10).text
    found: dict[str, float] = {}
    pattern = (
        r'tusou_http_requests_total\{method="POST",route="' + re.escape(route) + r'",status="(\d+)"\} (\S+)'
    )
    for status, count in re.findall(pattern, text):
        found[status] = float(count)
    return found


def signed_head(client: QiniuClient, path: str, body: bytes) -> bytes:
    headers = sign_qiniu(
        client.access_key,
        client.secret_key,
        "POST",
        client.base + path,
        headers={"Content-Type": "application/json"},
        body=body,
    )
    host = client.base.removeprefix("http://")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n").encode()


def test_a_client_that_hangs_up_mid_body_is_no_server_error(
    tusou: Tusou, client: QiniuClient, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that times out or is cancelled while uploading (a big batch on a slow link) leaves the server
    # a body shorter than its Content-Length. Nothing failed on the server: no 500 in the metrics (operators
    # alert on those), no "unexpected error" traceback in the log.
    assert client.post("/v1/image/group/g/new", {"data": []}).status_code == 200
    body = b'{"id": "x"}'
    head = signed_head(client, "/v1/image/group/g/image", body)
    with socket.create_connection(("127.0.0.1", tusou.server.port)) as sock:
        sock.sendall(head + b"Content-Length: 1000\r\n\r\n" + body[:5])
        time.sleep(0.2)  # let the server start reading the body before the hang-up
    deadline = time.monotonic() + 30
    while not requests_counted(tusou, IMAGE_ROUTE) and time.monotonic() < deadline:
        time.sleep(0.05)
    counted = requests_counted(tusou, IMAGE_ROUTE)
    assert counted and "500" not in counted, counted
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    # The server still answers that client's next request.
    assert client.post("/v1/image/group/g/image", {"id": "x"}).json() == {"error": "image x not exists"}


def test_a_huge_delete_reaches_the_store_a_chunk_at_a_time(tusou: Tusou, client: QiniuClient) -> None:
    # One delete may carry millions of ids (a 20 MB body holds 2 million). The store deletes under its one
    # write lock, and thumbnails and keypoints under theirs: sent to them whole, such a delete held every
    # other tenant's add/delete for its whole length (measured: another key's add of one image took 10 s
    # instead of 0.1 s behind a 2-million-id delete; 256 MB bodies hold ~13 times that). In chunks, the other
    # writers go in between; the delete still removes every id it names.
    image = data_uri(jpeg(imagegen.scene(3, (64, 48))))
    entries = [{"uri": image, "attribute": {"id": f"keep-{i}"}} for i in range(2)]
    entries += [{"uri": image, "attribute": {"id": f"gone-{i}"}} for i in range(3)]
    assert client.post("/v1/image/group/g/new", {"data": entries}).json()["errors"] == [None] * 5
    sizes: list[int] = []
    store_delete = tusou.store.delete_images

    def spy(tenant: str, group: str, ids: Sequence[str]) -> int:
        sizes.append(len(ids))
        return store_delete(tenant, group, ids)

    tusou.store.delete_images = spy  # type: ignore[method-assign]
    ids = ["gone-0", *(f"absent-{i}" for i in range(10_000)), "gone-1", "gone-2"]
    assert client.post("/v1/image/group/g/delete", {"images": ids}).status_code == 200
    assert sum(sizes) == len(ids) and max(sizes) <= 1000, sizes
    listed = client.get("/v1/image/group/g").json()["result"]
    assert sorted(item["id"] for item in listed) == ["keep-0", "keep-1"]
    # An unknown group is still the usual error, and an empty list still checks the group.
    for some in (ids, []):
        answer = client.post("/v1/image/group/nope/delete", {"images": some}).json()
        assert answer == {"error": "group nope not exists"}


def test_bodies_of_more_values_than_any_request_needs_are_refused_before_parsing(
    tmp_path: Path, embedder: Embedder
) -> None:
    # Parsed, a JSON value costs the server 20-70 bytes against 2-4 on the wire: a 20 MB body of "{}," grew
    # the server by 530 MB, so one signed request of the allowed 256 MB would take ~7 GB and bring down
    # the server with every tenant on it. A body is refused unparsed when it holds more values than a
    # new/add of max_batch_images entries, each with the longest id, label and desc, could.
    # A delete may name a whole group's ids: group_max_images small here, so the new/add bound decides.
    running = Tusou(Settings(data=tmp_path / "data", max_batch_images=4, group_max_images=1000), embedder)
    running.server.__enter__()
    try:
        client = running.client("a")
        image = data_uri(jpeg(imagegen.scene(5, (64, 48))))
        # The largest legitimate request still goes through: each desc packed with values, each label
        # and id full of the characters that separate JSON values.
        desc = [0] * 2000
        assert len(json.dumps(desc, separators=(",", ":"))) <= 4096
        entries = [
            {"uri": image, "attribute": {"id": f"{i}" + "," * 250, "label": ",[{" * 341, "desc": desc}}
            for i in range(4)
        ]
        resp = client.post("/v1/image/group/g/new", {"data": entries})
        assert resp.status_code == 200 and resp.json()["errors"] == [None] * 4, resp.text[:300]
        for body in ({"images": ["x"] * 30_000}, {"data": [{}] * 30_000}):
            for path in ("/v1/image/group/g/delete", "/v1/image/group/g/add", "/v1/image/groups/search"):
                resp = client.post(path, body)
                assert (resp.status_code, resp.json()) == (400, {"error": "invalid body: too many values"})
        # Form bodies (the Python SDK's) count their fields the same way.
        form = "&".join(["images=x"] * 30_000)
        resp = client.session.post(
            client.base + "/v1/image/group/g/delete",
            data=form,
            auth=client.auth,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=60,
        )
        assert (resp.status_code, resp.json()) == (400, {"error": "invalid body: too many values"})
        assert client.get("/v1/image/group/g/info").json() == {"count": 4}
    finally:
        running.close()


def test_a_delete_of_a_whole_groups_ids_is_not_refused_for_its_values(
    tmp_path: Path, embedder: Embedder
) -> None:
    """The bound on a body's values also admits a delete naming group_max_images ids, however small
    max_batch_images is set (it once followed new/add alone: 54,400 values at 10 images a request)."""
    running = Tusou(Settings(data=tmp_path / "data", max_batch_images=1, group_max_images=30_000), embedder)
    running.server.__enter__()
    try:
        client = running.client("a")
        assert client.post("/v1/image/group/g/new", {"data": []}).status_code == 200
        resp = client.post("/v1/image/group/g/delete", {"images": [f"id{i}" for i in range(30_000)]})
        assert resp.status_code == 200, resp.text[:200]
    finally:
        running.close()


def test_form_fields_that_are_not_utf8_are_refused_not_mangled(tusou: Tusou, client: QiniuClient) -> None:
    # A client that form-encodes in another charset (GBK, common in Chinese stacks) sends %D6%D0 for "中".
    # Read as UTF-8 with replacement it became "\ufffd\ufffd": stored as the label or id without a word,
    # and every such label the same. The body is refused instead, as a JSON body that is not UTF-8 is.
    image = data_uri(jpeg(imagegen.scene(6, (64, 48))))
    assert client.post("/v1/image/group/g/new", {"data": [{"uri": image, "attribute": {"id": "a"}}]}).ok
    form = "/v1/image/group/g/update", b"id=a&label=%D6%D0%CE%C4"
    resp = client.session.post(
        client.base + form[0],
        data=form[1],
        auth=client.auth,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert (resp.status_code, resp.json()) == (400, {"error": "invalid body"})
    assert client.post("/v1/image/group/g/image", {"id": "a"}).json()["label"] == ""
    # UTF-8, percent-encoded as the SDK sends it, is read as ever.
    resp = client.session.post(
        client.base + form[0],
        data="id=a&label=%E4%B8%AD%E6%96%87",
        auth=client.auth,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert resp.status_code == 200 and resp.json()["label"] == "中文", resp.text


def test_one_key_cannot_take_every_thread_of_the_shared_pool(tusou: Tusou) -> None:
    # Requests that are not image work (delete, list, info, image, update, remove, thumbs, and the parsing of
    # every body) run on one thread pool shared by all tenants (anyio's: 40 threads). One key's 45 deletes
    # of 100,000 ids each held another key's `info` for 23 s. Here the store blocks every delete until
    # released, so without a per-key share the other key's request could not run at all.
    attacker, other = tusou.client("attacker"), tusou.client("other")
    assert attacker.post("/v1/image/group/a/new", {"data": []}).status_code == 200
    assert other.post("/v1/image/group/b/new", {"data": []}).status_code == 200
    release = threading.Event()
    store_delete = tusou.store.delete_images

    def blocking(tenant: str, group: str, ids: Sequence[str]) -> int:
        release.wait(120)
        return store_delete(tenant, group, ids)

    tusou.store.delete_images = blocking  # type: ignore[method-assign]
    statuses: list[int] = []

    def delete() -> None:
        statuses.append(
            QiniuClient(attacker.base, attacker.access_key, attacker.secret_key)
            .post("/v1/image/group/a/delete", {"images": ["x"]})
            .status_code
        )

    threads = [threading.Thread(target=delete) for _ in range(48)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1)  # let them all arrive (if some have not, the check below is only easier)
        try:
            answer = other.session.get(other.base + "/v1/image/group/b/info", auth=other.auth, timeout=20)
        except requests.Timeout:
            pytest.fail("another key's info waited behind one key's deletes")
        assert answer.json() == {"count": 0}
        assert not statuses  # the deletes were all still held
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    assert statuses == [200] * 48


def test_the_openapi_document_lists_the_statuses_the_server_answers(
    tmp_path: Path, embedder: Embedder
) -> None:
    # Checked by schemathesis against real answers of every operation: a stale X-Qiniu-Date (403), a body
    # over the limit (413), the rate limit (429), and a search whose image is corrupt (422, in Qiniu's error
    # shape). The document listed only 200/400/401 (and 406 for search), plus, for every operation, a 422
    # in FastAPI's validation shape, which tusou never sends.
    settings = Settings(
        data=tmp_path / "data", max_body_bytes=64 * 1024, rate_limit_per_s=0.001, rate_limit_burst=3
    )
    running = Tusou(settings, embedder)
    running.server.__enter__()
    try:
        spec = requests.get(running.server.url + "/openapi.json", timeout=30).json()
        assert "HTTPValidationError" not in json.dumps(spec)
        # A body too slow (408) and a full disk (507) are not provoked here; listed for every operation.
        for path in spec["paths"].values():
            for op in path.values():
                if op.get("security"):
                    assert {"408", "507"} <= set(op["responses"]), op.get("summary")
        schema = schemathesis.openapi.from_dict(spec)
        checks = [st_checks.status_code_conformance, st_checks.response_schema_conformance]

        def send(client: QiniuClient, op: Any, body: bytes, date: datetime | None = None) -> int:
            path = op.path.replace("{group_id}", "g")
            headers = {"Content-Type": "application/json"} if body else {}
            headers = sign_qiniu(
                client.access_key,
                client.secret_key,
                op.method.upper(),
                client.base + path,
                headers=headers,
                body=body,
                date=date,
            )
            resp = client.session.request(
                op.method.upper(), client.base + path, data=body or None, headers=headers, timeout=60
            )
            path_parameters = {"group_id": "g"} if "{group_id}" in op.path else None
            op.Case(path_parameters=path_parameters).validate_response(resp, checks=checks)
            return resp.status_code

        operations = [result.ok() for result in schema.get_all_operations()]
        search = next(op for op in operations if op.path == "/v1/image/groups/search")
        owner = running.client("owner")
        image = data_uri(jpeg(imagegen.scene(7, (64, 48))))
        assert owner.post("/v1/image/group/g/new", {"data": [{"uri": image}]}).ok
        corrupt = {"data": {"uri": data_uri(b"\xff\xd8\xff\xe0" + b"\0" * 64)}, "params": {"groups": ["g"]}}
        assert send(owner, search, json.dumps(corrupt).encode()) == 422
        stale = datetime(2020, 1, 1, tzinfo=UTC)
        for op in operations:
            client = running.client(op.label)  # a bucket of its own: 3 requests, then 429
            body = b"{}" if "requestBody" in op.definition.raw else b""
            assert send(client, op, body, stale) == 403, op.label
            assert send(client, op, b"{}" + b" " * (64 * 1024)) == 413, op.label
            assert [send(client, op, body) for _ in range(4)][-1] == 429, op.label
    finally:
        running.close()


class OneRequestPerConnection:
    """An image server that answers one request per connection without saying ``Connection: close``, and
    hangs up when a second request arrives on it: what any server does that drops an idle keep-alive
    connection at the moment the client reuses it (Apache's 5 s KeepAliveTimeout against the fetcher's 5 s
    keep-alive expiry, a CDN edge recycling connections)."""

    def __init__(self, body: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.body = body
        self.answered = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            seen = b""
            while b"\r\n\r\n" not in seen:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                seen += chunk
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(
                self.body
            )
            with self._lock:  # counted before the answer leaves: the client may read it before we go on
                self.answered += 1
            conn.sendall(head + self.body)
            conn.recv(65536)  # the next request on this connection: hang up on it, unanswered
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset

    def close(self) -> None:
        self.listener.close()


def test_a_keep_alive_connection_the_server_dropped_is_not_a_failed_image(tmp_path: Path) -> None:
    # Each fetch after the first went out on the kept-alive connection, the server hung up, and the image
    # failed with 502 "fetch failed: connection error". A GET that got no answer on a reused connection
    # is sent again, once, on a new one (as urllib3 does).
    image = jpeg(imagegen.scene(8, (64, 48)))
    server = OneRequestPerConnection(image)
    try:
        with Fetcher(Settings(data=tmp_path / "data", fetch_allow=["127.0.0.1"])) as fetcher:
            for _ in range(3):
                assert fetcher.fetch(f"http://127.0.0.1:{server.port}/a.jpg") == image
    finally:
        server.close()
    assert server.answered == 3


def test_a_request_head_that_trickles_in_does_not_hold_a_connection(
    tusou: Tusou, client: QiniuClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slowloris: uvicorn waited for a request head without limit, its keep-alive timeout restarting with
    # every byte, so a client with no key at all held a file descriptor per connection for as long as it
    # liked. `tusou serve`'s protocol closes a connection whose head is not complete in time.
    monkeypatch.setattr(guard, "HEAD_TIMEOUT_S", 1.0)
    config = uvicorn.Config(
        create_app(tusou.settings, tusou.service, tusou.keys),
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        **guard.uvicorn_options(),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        port = config.port
        with (
            socket.create_connection(("127.0.0.1", port)) as slow,
            socket.create_connection(("127.0.0.1", port)) as idle,
        ):
            slow.settimeout(0.3)
            closed = False
            for byte in b"GET /v1/image/group HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    slow.sendall(bytes([byte]))
                    closed = slow.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                if closed:
                    break
            assert closed, "a trickled request head held its connection"
            idle.settimeout(30)
            assert idle.recv(1) == b"", "a connection that never sent a byte was kept"
        # A request that is answered in time is unaffected, and its connection serves the next one.
        with requests.Session() as session:
            for _ in range(2):
                resp = session.get(f"http://127.0.0.1:{port}/v1/image/group", auth=client.auth, timeout=30)
                assert resp.json()["result"] == []
    finally:
        server.should_exit = True
        thread.join(10)


def test_names_that_never_resolve_do_not_hold_up_other_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fetch stops waiting for a name lookup at its deadline, but the lookup itself runs on until the
    # resolver gives up (glibc: 5 s x 2 tries x up to 3 name servers). They ran on a shared pool of 8
    # threads: one key's URLs on a domain whose name server never answers (anyone can register one) kept
    # all 8 busy, and every other key's downloads failed with "timeout resolving host". Here such lookups
    # never end while the test runs.
    image = jpeg(imagegen.scene(9, (64, 48)))
    server = OneRequestPerConnection(image)
    never = threading.Event()
    real = socket.getaddrinfo

    def resolver(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".never.test"):
            never.wait(120)
            raise socket.gaierror("no answer")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    settings = Settings(data=tmp_path / "data", fetch_allow=["127.0.0.1", "localhost"], fetch_timeout_s=0.5)
    try:
        with Fetcher(settings) as fetcher:
            for i in range(9):  # more than the old pool's 8 threads
                with pytest.raises(ImageError, match="timeout resolving host"):
                    fetcher.fetch(f"http://n{i}.never.test/a.jpg")
            assert fetcher.fetch(f"http://localhost:{server.port}/a.jpg") == image
    finally:
        never.set()
        server.close()


def test_a_body_that_trickles_in_is_cut_off(
    tusou: Tusou, client: QiniuClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After its head, a request's body came at whatever pace the client chose: a known access key (keys
    # are not secrets: every client sends its own) holding many connections open with a byte now and then
    # was never cut off. Past a grace period the body must keep a minimum average rate (1 KB/s; here the
    # grace is cut to 1 s).
    monkeypatch.setattr(guard, "BODY_GRACE_S", 1.0)
    assert client.post("/v1/image/group/g/new", {"data": []}).status_code == 200
    body = b'{"id": "x"' + b" " * 990 + b"}"
    head = signed_head(client, "/v1/image/group/g/image", body)
    with socket.create_connection(("127.0.0.1", tusou.server.port)) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        sock.settimeout(0.2)
        answer = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if b"\r\n\r\n" in answer:
                break
        sock.settimeout(30)
        head_end = answer.find(b"\r\n\r\n") + 4
        declared = re.search(rb"content-length: (\d+)", answer[:head_end].lower())
        length = int(declared.group(1)) if declared else 0
        while len(answer) < head_end + length:  # the body may come in a packet of its own
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert answer.endswith(b'{"error":"request body too slow"}'), answer[-200:]
    # A body sent at once is read as ever.
    assert client.post("/v1/image/group/g/image", {"id": "x"}).json() == {"error": "image x not exists"}


def test_large_bodies_held_at_once_are_bounded_server_wide(
    tmp_path: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A verified body is held whole in memory until its request ends, and an add of 1000 images takes its
    # time: nothing bounded the bodies in flight, so one key within its burst (100 requests of up to 256 MB)
    # could hold 25 GB. Bodies larger than pre_auth_body_bytes now share a server-wide budget of four
    # largest bodies, one key at most half of it; a body that cannot get its share in time answers 503
    # (clients retry), small ones never wait. Here the budget is 4 x 64 KB and big deletes are held in the
    # store.
    monkeypatch.setattr(guard, "BODY_WAIT_S", 1.0)
    settings = Settings(data=tmp_path / "data", max_body_bytes=64 * 1024, pre_auth_body_bytes=1024)
    running = Tusou(settings, embedder)
    running.server.__enter__()
    release = threading.Event()
    busy = (503, {"error": "server busy: too many large requests, retry later"})
    try:
        a, b, c = (running.client(name) for name in "abc")
        for client in (a, b, c):
            for group in ("g", "h"):
                assert client.post(f"/v1/image/group/{group}/new", {"data": []}).status_code == 200
        store_delete = running.store.delete_images
        entered: list[int] = []

        def blocking(tenant: str, group: str, ids: Sequence[str]) -> int:
            entered.append(len(ids))
            release.wait(120)
            return store_delete(tenant, group, ids)

        running.store.delete_images = blocking  # type: ignore[method-assign]
        big = {"images": ["x" * 200] * 290}  # ~60 KB
        statuses: list[int] = []

        def delete(client: QiniuClient, group: str) -> None:
            fresh = QiniuClient(client.base, client.access_key, client.secret_key)
            statuses.append(fresh.post(f"/v1/image/group/{group}/delete", big).status_code)

        def hold_two(client: QiniuClient) -> list[threading.Thread]:
            """Two big deletes of ``client``, held in the store with their bodies (one group each: deletes of
            one group wait for each other)."""
            held = len(entered) + 2
            threads = [threading.Thread(target=delete, args=(client, group)) for group in ("g", "h")]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while len(entered) < held and time.monotonic() < deadline:
                time.sleep(0.05)
            return threads

        threads = hold_two(a)  # a holds ~120 KB, its half
        big_image = {"id": "y", "pad": "p" * 50_000}
        resp = a.post("/v1/image/group/g/image", big_image)
        assert (resp.status_code, resp.json()) == busy  # a's own share is used up
        assert b.post("/v1/image/group/g/image", big_image).status_code == 400  # b's is not
        threads += hold_two(b)  # together ~240 KB of 256 KB
        resp = c.post("/v1/image/group/g/image", big_image)
        assert (resp.status_code, resp.json()) == busy
        assert c.post("/v1/image/group/g/image", {"id": "y"}).status_code == 400  # small: no wait
        release.set()
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * 4
        # The budget came back: the big request goes through.
        assert c.post("/v1/image/group/g/image", big_image).status_code == 400
        deadline = time.monotonic() + 30  # given back once each request has ended, just after its answer
        while guard_budget_free(running) != 4 * 64 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard_budget_free(running) == 4 * 64 * 1024
    finally:
        release.set()
        running.close()


def guard_budget_free(running: Tusou) -> int:
    """Bytes of the server's body budget not held (all of it before the first large body)."""
    budget = getattr(running.server.server.config.app.state, "body_budget", None)
    return budget.free if budget is not None else 4 * 64 * 1024
