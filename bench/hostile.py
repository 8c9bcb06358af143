"""Hostile tenants: each attack of issue 10 against a real server, with its figure and its bound.

    python bench/hostile.py [--only NAME ...] [--images 16] [--searches 4]

Starts ``python -m tusou serve`` on loopback on a scratch data folder (two access keys: the attacker's and
another tenant's), runs each attack bounded in time and request count, and prints one row per attack: the
figure measured, the bound from the issue's "Done when", and whether it holds. Memory is the server
process's RSS, sampled every 5 ms with psutil, as growth over its level before the attack. Exits 1 if any
bound is exceeded. ``tests/test_hostile_tenants.py`` runs short versions of the same attacks.

Nothing leaves the machine: the only servers are the tusou under test and loopback helpers started here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tusou`, `bench` and `tests` importable
    sys.path.insert(0, str(ROOT))

from bench.crash import ServeProcess, SignedClient, free_port  # noqa: E402
from bench.load import RssSampler  # noqa: E402

MB = 1024 * 1024
SIDE = 4999  # Qiniu's largest allowed side


# --- payloads: small files that decode big ------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes) -> bytes:
    """A valid PNG whose every row is ``row`` (filter byte included): megapixels in a few KB of zlib."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    packer = zlib.compressobj(9)
    parts = [packer.compress(row) for _ in range(height)]
    parts.append(packer.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=8)
def big_rgb_png(side: int = SIDE, shade: int = 0) -> bytes:
    """side x side 8-bit RGB (the issue's ~95 KB file that decodes to ~100 MB in Pillow)."""
    pixel = bytes(((37 + shade) % 256, (101 + shade) % 256, (211 + shade) % 256))
    return _png(side, side, 8, 2, b"\x00" + pixel * side)


@lru_cache(maxsize=8)
def big_grey16_png(side: int = SIDE, shade: int = 0) -> bytes:
    """side x side 16-bit grey (the issue's ~48 KB file whose old 16-bit path made 64-bit copies)."""
    value = struct.pack(">H", (0x9ABC + 97 * shade) % 65536)
    return _png(side, side, 16, 0, b"\x00" + value * side)


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


# --- a slow image host ------------------------------------------------------------------------------------
class DribbleServer:
    """A loopback HTTP server: ``/slow/...`` sends its headers, then one byte every ``every_s`` until
    :meth:`release` (then it hangs up); ``/fast/...`` answers a small JPEG at once.

    ``slow_started`` counts slow downloads begun: until the release none ends, so it is also how many
    run at once."""

    def __init__(self, every_s: float = 0.5) -> None:
        import http.server
        import io

        from tests import imagegen

        out = io.BytesIO()
        imagegen.scene(5, (96, 72)).save(out, "JPEG", quality=90)
        jpeg = out.getvalue()
        self.released = threading.Event()
        self.slow_started = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.startswith("/fast/"):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(jpeg)))
                    self.end_headers()
                    self.wfile.write(jpeg)
                    return
                with owner._lock:
                    owner.slow_started += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(jpeg)))
                self.end_headers()
                try:
                    for byte in jpeg:
                        if owner.released.wait(every_s):
                            break
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


# --- the server under attack --------------------------------------------------------------------------------
@dataclass
class Tenants:
    server: ServeProcess
    attacker: SignedClient
    other: SignedClient
    attacker_key: tuple[str, str]
    other_key: tuple[str, str]

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)


@contextmanager
def serve(folder: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[Tenants]:
    """A real ``tusou serve`` on loopback with two tenants' keys, stopped afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    port = free_port()
    full_env = {"TUSOU_RATE_LIMIT_PER_S": "0", **(env or {})}
    server = ServeProcess(data, port, folder / "serve.log", env=full_env)
    try:
        server.wait_ready(timeout)
        attacker_key = server.first_key()
        out = subprocess.run(
            [sys.executable, "-m", "tusou", "keys", "create", "--name", "other", "--data", str(data)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, **full_env),
        ).stdout
        created = json.loads(out.strip().splitlines()[-1])
        other_key = (created["access_key"], created["secret_key"])
        yield Tenants(
            server,
            SignedClient(server.url, *attacker_key, timeout=timeout),
            SignedClient(server.url, *other_key, timeout=timeout),
            attacker_key,
            other_key,
        )
    finally:
        server.stop()


def warm_up(t: Tenants, group: str = "warm") -> None:
    """Create both tenants' groups and run one add and one search, so the model and the store are loaded."""
    from bench.crash import image_uri

    for client in (t.attacker, t.other):
        resp = client.post(
            f"/v1/image/group/{group}/new", {"data": [{"uri": image_uri(1), "attribute": {"id": "w"}}]}
        )
        assert resp.status_code == 200, resp.text
        resp = client.post(
            "/v1/image/groups/search", {"data": {"uri": image_uri(2)}, "params": {"groups": [group]}}
        )
        assert resp.status_code == 200, resp.text


# --- attacks ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    attack: str
    figure: float
    bound: float
    unit: str
    note: str = ""

    @property
    def holds(self) -> bool:
        return self.figure <= self.bound


def _peak_growth(t: Tenants, action: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``action`` while sampling the server's RSS; (peak growth in MB over the level before, result)."""
    before = t.rss()
    with RssSampler(t.pid) as sampler:
        result = action()
    return (sampler.peak - before) / MB, result


def attack_pixel_batch(
    t: Tenants, images: int = 16, group: str = "warm"
) -> tuple[Row, list[requests.Response]]:
    """One add with ``images`` PNGs of 4999x4999 pixels, ~95 KB each."""
    data = [
        {"uri": data_uri(big_rgb_png(shade=i % 4)), "attribute": {"id": f"big-{i}"}} for i in range(images)
    ]
    growth, resp = _peak_growth(t, lambda: t.attacker.post(f"/v1/image/group/{group}/add", {"data": data}))
    body = resp.json() if resp.status_code == 200 else {}
    ok = sum(1 for e in body.get("errors", []) if e is None)
    note = f"status {resp.status_code}, {ok}/{images} images added"
    return Row(f"{images} PNGs of 4999x4999 in one add: peak RSS growth", growth, 600, "MB", note), [resp]


def attack_grey16_searches(
    t: Tenants, searches: int = 4, group: str = "warm"
) -> tuple[Row, list[requests.Response]]:
    """``searches`` concurrent searches, each with one 16-bit grey 4999x4999 PNG."""
    bodies = [
        {"data": {"uri": data_uri(big_grey16_png(shade=i))}, "params": {"groups": [group]}}
        for i in range(searches)
    ]

    def run() -> list[requests.Response]:
        with ThreadPoolExecutor(searches) as pool:
            return list(pool.map(lambda b: t.attacker.post("/v1/image/groups/search", b), bodies))

    growth, responses = _peak_growth(t, run)
    statuses = sorted({r.status_code for r in responses})
    note = f"statuses {statuses}"
    return Row(
        f"{searches} concurrent 16-bit 4999x4999 searches: peak RSS growth", growth, 600, "MB", note
    ), responses


@dataclass
class Flood:
    """One tenant's slow-URL flood running in the background: one add with ``urls`` slow URLs and
    ``searches`` concurrent searches with one slow URL each."""

    threads: list[threading.Thread]
    responses: list[requests.Response]

    def alive(self) -> int:
        return sum(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)


def start_flood(
    t: Tenants, slow: DribbleServer, urls: int = 40, searches: int = 8, group: str = "warm"
) -> Flood:
    responses: list[requests.Response] = []

    def call(path: str, body: Any) -> None:
        try:
            responses.append(t.attacker.post(path, body))
        except requests.RequestException:
            pass  # the attacker's own timeouts are not a result

    add = {
        "data": [
            {"uri": slow.url(f"/slow/add-{i}.jpg"), "attribute": {"id": f"slow-{i}"}} for i in range(urls)
        ]
    }
    jobs = [(f"/v1/image/group/{group}/add", add)] + [
        (
            "/v1/image/groups/search",
            {"data": {"uri": slow.url(f"/slow/search-{i}.jpg")}, "params": {"groups": [group]}},
        )
        for i in range(searches)
    ]
    threads = [threading.Thread(target=call, args=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    return Flood(threads, responses)


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def other_tenant_calls(
    t: Tenants, slow: DribbleServer, group: str = "warm"
) -> dict[str, tuple[float, requests.Response]]:
    """The other tenant's inline add (two base64 images), inline search and URL add, each timed."""
    from bench.crash import image_uri

    calls = {
        "inline add": (
            f"/v1/image/group/{group}/add",
            {
                "data": [
                    {"uri": image_uri(11), "attribute": {"id": "inline-1"}},
                    {"uri": image_uri(12), "attribute": {"id": "inline-2"}},
                ]
            },
        ),
        "inline search": (
            "/v1/image/groups/search",
            {"data": {"uri": image_uri(11)}, "params": {"groups": [group]}},
        ),
        "URL add": (
            f"/v1/image/group/{group}/add",
            {"data": [{"uri": slow.url("/fast/1.jpg"), "attribute": {"id": "url-1"}}]},
        ),
    }
    out = {}
    for name, (path, body) in calls.items():
        start = time.perf_counter()
        resp = t.other.post(path, body)
        out[name] = (time.perf_counter() - start, resp)
    return out


def attack_slow_flood(
    t: Tenants, urls: int = 40, searches: int = 8
) -> tuple[list[Row], list[requests.Response]]:
    """While the attacker floods slow URLs, the other tenant's inline add/search and URL add (<= 3 s, 200)."""
    slow = DribbleServer()
    try:
        flood = start_flood(t, slow, urls, searches)
        wait_for(lambda: slow.slow_started >= min(urls + searches, 4), 30)
        time.sleep(0.5)
        timed = other_tenant_calls(t, slow)
        rows = []
        for name, (seconds, resp) in timed.items():
            errors = resp.json().get("errors") if resp.status_code == 200 else None
            note = f"status {resp.status_code}" + (f", errors {errors}" if errors and any(errors) else "")
            ok = resp.status_code == 200 and not (errors and any(errors))
            rows.append(
                Row(
                    f"other tenant's {name} during a slow-URL flood",
                    seconds if ok else float("inf"),
                    3,
                    "s",
                    note,
                )
            )
        rows.append(
            Row(
                "attacker's slow downloads at once (its share)",
                float(slow.slow_started),
                4,
                "",
                f"{flood.alive()} of its {len(flood.threads)} requests still waiting",
            )
        )
        slow.release()
        flood.join(60)
        return rows, [resp for _, resp in timed.values()] + flood.responses
    finally:
        slow.close()


def send_big_body(port: int, access_key: str, megabytes: int, path: str = "/v1/image/group/g/add") -> bytes:
    """POST ``megabytes`` MB of JSON-looking body under a known access key with a wrong signature, streamed
    in 1 MB writes; returns the raw response."""
    import socket

    size = megabytes * MB
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Qiniu {access_key}:{'A' * 27}=\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    chunk = b" " * MB
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head)
        try:
            for _ in range(megabytes):
                sock.sendall(chunk)
        except OSError:
            pass  # the server may answer and hang up before it all arrived
        out = b""
        while b"\r\n\r\n" not in out:
            got = sock.recv(65536)
            if not got:
                break
            out += got
        return out


def attack_big_body(t: Tenants, megabytes: int = 250) -> tuple[list[Row], list[tuple[int, bool]]]:
    """A known access key, a wrong signature and a ``megabytes`` MB body, while /healthz is polled."""
    stop = threading.Event()
    worst = [0.0]
    health: list[requests.Response] = []

    def poll() -> None:
        session = requests.Session()
        while not stop.is_set():
            start = time.perf_counter()
            health.append(session.get(t.server.url + "/healthz", timeout=30))
            worst[0] = max(worst[0], time.perf_counter() - start)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    before = t.rss()
    with RssSampler(t.pid) as sampler:
        poller.start()
        answer = send_big_body(t.server.port, t.attacker_key[0], megabytes)
        stop.set()
        poller.join(30)
    growth = (sampler.peak - before) / MB
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
    reqid = b"\r\nx-reqid:" in answer.split(b"\r\n\r\n", 1)[0].lower()
    rows = [
        Row(f"{megabytes} MB body, wrong signature: peak RSS growth", growth, 150, "MB", f"status {status}"),
        Row(
            f"/healthz while the {megabytes} MB body arrives: slowest answer",
            worst[0],
            0.5,
            "s",
            f"{len(health)} polls, statuses {sorted({r.status_code for r in health})}",
        ),
    ]
    code = int(status) if status.isdigit() else 0
    return rows, [*[(r.status_code, "X-Reqid" in r.headers) for r in health], (code, reqid)]


RAW_REQUESTS = {
    "bad request line": b"GARBAGE\r\n\r\n",
    "no Host": b"GET /healthz HTTP/1.1\r\n\r\n",
    "NUL in the path": b"GET /v1/image/group/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad Content-Length": b"POST /v1/image/group/g/add HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    "two Content-Lengths": b"POST /v1/image/group/g/add HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
    "raw byte 0xff in the path": b"GET /v1/image/group/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "space in the path": b"GET /v1/image /group HTTP/1.1\r\nHost: x\r\n\r\n",
    "Host-built redirect": b"GET /v1/image/group/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    "encoded slash in a group id": b"GET /v1/image/group/shop%2Finfo HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-UTF-8 group id": b"GET /v1/image/group/%FE HTTP/1.1\r\nHost: x\r\n\r\n",
}


def raw_http(port: int, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection; the response head (and what followed it in the same reads)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


def raw_answer(answer: bytes) -> tuple[int, bool]:
    """(status, has X-Reqid) of a raw response; (0, False) for none."""
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    parts = head.split(b" ", 2)
    status = int(parts[1]) if head.startswith(b"http/") and len(parts) > 1 and parts[1].isdigit() else 0
    return status, b"\r\nx-reqid: " in head


def post_form(
    base: str, access_key: str, secret_key: str, path: str, fields: dict[str, str]
) -> requests.Response:
    """A Qiniu-signed form-encoded POST, as the Python SDK sends nested values (their str())."""
    from urllib.parse import urlencode

    from tusou.api.auth import sign_qiniu

    url = base + path
    body = urlencode(fields).encode()
    headers = sign_qiniu(
        access_key,
        secret_key,
        "POST",
        url,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=body,
    )
    return requests.post(url, data=body, headers=headers, timeout=60)


def surrogate_cases(group: str) -> list[tuple[str, dict[str, str]]]:
    """Form-encoded Python literals holding a lone surrogate, in every field that takes one."""
    from bench.crash import image_uri

    lone = "'\\ud800'"  # a valid Python literal for a str no UTF-8 database or response can hold
    uri = repr(image_uri(2))
    return [
        (f"/v1/image/group/{group}/add", {"data": f"[{{'uri': {uri}, 'attribute': {{'id': {lone}}}}}]"}),
        (f"/v1/image/group/{group}/add", {"data": f"[{{'uri': {uri}, 'attribute': {{'label': {lone}}}}}]"}),
        (
            f"/v1/image/group/{group}/add",
            {"data": f"[{{'uri': {uri}, 'attribute': {{'desc': {{'k': {lone}}}}}}}]"},
        ),
        ("/v1/image/groups/search", {"data": f"{{'uri': {uri}}}", "params": f"{{'groups': [{lone}]}}"}),
        (f"/v1/image/group/{group}/delete", {"images": f"[{lone}]"}),
        (f"/v1/image/group/{group}/update", {"id": "w", "desc": f"{{'k': {lone}}}"}),
        (f"/v1/image/group/{group}/image", {"id": f"[{lone}]"}),
    ]


def attack_edges(t: Tenants, group: str = "warm") -> tuple[list[Row], list[tuple[int, bool]]]:
    """Malformed raw HTTP, bad markers, lone surrogates, hidden separators: none may 500 or lack X-Reqid."""
    answers: dict[str, tuple[int, bool]] = {}
    for name, data in RAW_REQUESTS.items():
        answers[name] = raw_answer(raw_http(t.server.port, data))

    def answer(call: Callable[[], requests.Response]) -> tuple[int, bool]:
        try:
            resp = call()
        except requests.RequestException:
            return 0, False  # no answer at all: the connection was dropped
        return resp.status_code, "X-Reqid" in resp.headers

    for marker in ("gAAAAAAAAAA", "_" * 19, "garbage!"):
        answers[f"marker {marker}"] = answer(
            lambda m=marker: t.attacker.get(f"/v1/image/group/{group}", {"marker": m, "limit": 1})  # type: ignore[misc]
        )
    ak, sk = t.attacker_key
    for i, (path, fields) in enumerate(surrogate_cases(group)):
        answers[f"lone surrogate {i}"] = answer(
            lambda p=path, f=fields: post_form(t.server.url, ak, sk, p, f)  # type: ignore[misc]
        )
    not_4xx = sorted(name for name, (status, _) in answers.items() if not 400 <= status < 500)
    no_reqid = sorted(name for name, (_, reqid) in answers.items() if not reqid)
    rows = [
        Row(
            f"{len(answers)} malformed/edge requests: answers not 4xx",
            len(not_4xx),
            0,
            "",
            ", ".join(not_4xx),
        ),
        Row(
            f"{len(answers)} malformed/edge requests: without X-Reqid",
            len(no_reqid),
            0,
            "",
            ", ".join(no_reqid),
        ),
    ]
    return rows, list(answers.values())


# --- the table ----------------------------------------------------------------------------------------------
def print_table(rows: list[Row], extra: list[str] | None = None) -> None:
    width = max(len(r.attack) for r in rows)
    print(f"{'attack'.ljust(width)} | {'figure':>10} | {'bound':>8} | holds | note")
    print(f"{'-' * width}-|-{'-' * 10}-|-{'-' * 8}-|-------|------")
    for r in rows:
        fig = f"{r.figure:.2f} {r.unit}"
        bnd = f"{r.bound:g} {r.unit}"
        print(f"{r.attack.ljust(width)} | {fig:>10} | {bnd:>8} | {'yes' if r.holds else 'NO':>5} | {r.note}")
    for line in extra or []:
        print(line)


ATTACKS = ("pixels", "grey16", "flood", "body", "edges")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=ATTACKS, help="Run only these attacks.")
    parser.add_argument("--images", type=int, default=16, help="PNGs in the pixel-batch add.")
    parser.add_argument("--searches", type=int, default=4, help="Concurrent 16-bit searches.")
    args = parser.parse_args()
    chosen = set(args.only or ATTACKS)
    rows: list[Row] = []
    seen: list[tuple[int, bool]] = []  # (status, has X-Reqid) of every response the attacks got

    def saw(responses: list[requests.Response]) -> None:
        seen.extend((r.status_code, "X-Reqid" in r.headers) for r in responses)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tusou-hostile-") as tmp:
        folder = Path(tmp)
        # Memory attacks each on a fresh server, so one's leftovers do not hide the next one's growth.
        if "pixels" in chosen:
            with serve(folder / "pixels") as t:
                warm_up(t)
                row, got = attack_pixel_batch(t, args.images)
                rows.append(row)
                saw(got)
        if "grey16" in chosen:
            with serve(folder / "grey16") as t:
                warm_up(t)
                row, got = attack_grey16_searches(t, args.searches)
                rows.append(row)
                saw(got)
        if "flood" in chosen:
            with serve(folder / "flood", env={"TUSOU_FETCH_ALLOW": '["127.0.0.1"]'}) as t:
                warm_up(t)
                got_rows, got = attack_slow_flood(t)
                rows += got_rows
                saw(got)
        if "body" in chosen or "edges" in chosen:
            with serve(folder / "body") as t:
                warm_up(t)
                if "body" in chosen:
                    got_rows, answers = attack_big_body(t)
                    rows += got_rows
                    seen.extend(answers)
                if "edges" in chosen:
                    got_rows, answers = attack_edges(t)
                    rows += got_rows
                    seen.extend(answers)
    rows.append(Row(f"responses with status 500 (of {len(seen)})", sum(s == 500 for s, _ in seen), 0, ""))
    rows.append(Row(f"responses without X-Reqid (of {len(seen)})", sum(not r for _, r in seen), 0, ""))
    print(
        f"tusou hostile-tenant bench: {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores, "
        f"{time.monotonic() - started:.0f} s"
    )
    print_table(rows)
    sys.exit(0 if all(r.holds for r in rows) else 1)


if __name__ == "__main__":
    main()
