"""tusou.images: uri -> validated RGB image, with real bytes and real loopback HTTP servers.

Network rule for these tests: traffic only to 127.0.0.1 servers started here. Private and metadata
addresses (10.0.0.1, 169.254.169.254) must be refused by the guard before any socket is opened; the
``no_connect`` fixture fails the test if one is.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image

from tusou import fetch, images
from tusou.config import Settings
from tusou.fetch import Fetcher, load_image, read_uri_bytes
from tusou.images import CODES, MAX_IMAGE_BYTES, ImageError, decode_image, parse_data_uri

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


# --- helpers ------------------------------------------------------------------------------------------------
def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int] = (64, 48), seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_padding(total: int) -> bytes:
    """A valid 40x40 PNG of exactly ``total`` bytes: a private ancillary chunk pads it (Pillow skips it)."""
    base = encode(Image.new("RGB", (40, 40), (10, 200, 30)), "PNG")
    pad = total - len(base) - 12
    assert pad >= 0
    ihdr_end = 8 + 25  # signature + IHDR chunk
    return base[:ihdr_end] + png_chunk(b"prVt", b"\0" * pad) + base[ihdr_end:]


def expect(kind: str, fn: Callable[..., object], *args: object) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args)
    err = info.value
    assert err.kind == kind, f"{err!r}"
    assert err.code == CODES[kind]
    assert err.message and err.message == str(err)
    return err


def px(im: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    value = im.getpixel(xy)
    assert isinstance(value, tuple)
    return value[0], value[1], value[2]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- decoding: every allowed format --------------------------------------------------------------------
RED = (220, 20, 30)


@pytest.mark.parametrize(
    "fmt,kw,tol",
    [("PNG", {}, 0), ("JPEG", {"quality": 95}, 6), ("BMP", {}, 0), ("WEBP", {"lossless": True}, 0),
     ("GIF", {}, 12)],
)
def test_allowed_formats_decode(fmt: str, kw: dict[str, object], tol: int) -> None:
    data = encode(Image.new("RGB", (40, 32), RED), fmt, **kw)
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == (40, 32)
    assert close(px(im, (20, 16)), RED, tol)
    # decoded image is independent of the source file: usable after decode returns
    assert im.resize((8, 8)).size == (8, 8)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    im = decode_image(buf.getvalue())
    assert im.mode == "RGB" and close(px(im, (5, 5)), (255, 0, 0))


def test_animated_webp_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert close(px(decode_image(buf.getvalue()), (5, 5)), (255, 0, 0))


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95)
    im = decode_image(data)
    assert im.mode == "RGB"
    assert close(px(im, (20, 20)), (255, 0, 0), 8)


def test_16bit_grey_png_is_scaled_not_clipped() -> None:
    arr = np.full((40, 40), 0x8000, dtype=np.uint16)
    arr[:, 20:] = 0xFFFF
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    im = decode_image(data)
    assert px(im, (5, 5)) == (128, 128, 128)
    assert px(im, (30, 5)) == (255, 255, 255)


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("LA", (0, 0), (255, 255, 255)),       # fully transparent black -> white background
    ("LA", (0, 255), (0, 0, 0)),           # opaque black stays black
    ("RGBA", (255, 0, 0, 128), (255, 127, 127)),  # half-transparent red over white
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
])
def test_modes_to_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    data = encode(Image.new(mode, (40, 40), value), "PNG")  # type: ignore[arg-type]
    im = decode_image(data)
    assert im.mode == "RGB"
    assert close(px(im, (10, 10)), expected, 1)


def test_palette_with_transparency_onto_white() -> None:
    im = Image.new("P", (40, 40), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    for x in range(20, 40):
        for y in range(40):
            im.putpixel((x, y), 1)
    data = encode(im, "PNG", transparency=0)
    out = decode_image(data)
    assert px(out, (5, 5)) == (255, 255, 255)
    assert px(out, (30, 5)) == (255, 0, 0)
    # the same in a GIF
    assert px(decode_image(encode(im, "GIF", transparency=0)), (5, 5)) == (255, 255, 255)


def test_rgba_webp_onto_white() -> None:
    data = encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "WEBP", lossless=True)
    assert px(decode_image(data), (3, 3)) == (255, 255, 255)


def test_exif_orientation_applied() -> None:
    stored = Image.new("RGB", (60, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (30, 0, 60, 40))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    im = decode_image(data)
    assert im.size == (40, 60)
    # stored left edge becomes the top, stored right edge the bottom
    assert close(px(im, (20, 5)), (255, 0, 0), 10)
    assert close(px(im, (20, 55)), (0, 0, 255), 10)


# --- decoding: every bad input has its own error -------------------------------------------------------
def test_zero_bytes() -> None:
    expect("image_empty", decode_image, b"")


def test_text_named_jpg() -> None:
    err = expect("image_unrecognized", decode_image, b"hello, this is not a jpeg\n" * 10)
    assert "not an image" in err.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_truncated(fmt: str) -> None:
    data = encode(noise((200, 150)), fmt)
    expect("image_corrupt", decode_image, data[: len(data) // 2])


@pytest.mark.parametrize("offset", [20, 40, 200])  # IHDR, a chunk type, inside IDAT
def test_png_damaged(offset: int) -> None:
    data = bytearray(encode(noise(), "PNG"))
    data[offset] ^= 0xFF
    expect("image_corrupt", decode_image, bytes(data))


@pytest.mark.parametrize("fmt,name", [("TIFF", "tiff"), ("ICO", "ico"), ("PPM", "netpbm"), ("PDF", "pdf")])
def test_other_formats_unsupported(fmt: str, name: str) -> None:
    data = encode(Image.new("RGB", (40, 40), RED), fmt)
    err = expect("image_format_unsupported", decode_image, data)
    assert name in err.message


def test_svg_unsupported() -> None:
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"/>'
    expect("image_format_unsupported", decode_image, svg)


@pytest.mark.parametrize("size", [(29, 29), (29, 100), (100, 29), (5000, 1), (1, 5000), (5000, 30)])
def test_dimensions_refused(size: tuple[int, int]) -> None:
    err = expect("image_dimensions_invalid", decode_image, encode(Image.new("L", size), "PNG"))
    assert f"{size[0]}x{size[1]}" in err.message


def test_dimension_bounds_accepted() -> None:
    assert decode_image(encode(Image.new("RGB", (30, 30), RED), "PNG")).size == (30, 30)
    big = decode_image(encode(Image.new("L", (4999, 4999), 200), "PNG"))
    assert big.size == (4999, 4999) and big.mode == "RGB"


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + png_chunk(b"IEND", b"")


def _gif_header_only(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x08\x02\x02\x44\x01\x00\x3b")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused right after it
@pytest.mark.parametrize("make", [_png_header_only, _gif_header_only])
@pytest.mark.parametrize("side", [6000, 50000, 65535])
def test_decompression_bomb_refused_quickly(make: Callable[[int, int], bytes], side: int) -> None:
    t0 = time.perf_counter()
    expect("image_dimensions_invalid", decode_image, make(side, side))
    assert time.perf_counter() - t0 < 0.2


def test_exactly_max_bytes_accepted_one_more_refused() -> None:
    ok = png_with_padding(MAX_IMAGE_BYTES)
    assert len(ok) == MAX_IMAGE_BYTES
    assert decode_image(ok).size == (40, 40)
    over = png_with_padding(MAX_IMAGE_BYTES + 1)
    expect("image_too_large", decode_image, over)


def test_max_bytes_via_data_uri() -> None:
    ok = png_with_padding(MAX_IMAGE_BYTES)
    uri = "data:application/octet-stream;base64," + base64.b64encode(ok).decode()
    assert parse_data_uri(uri) == ok
    over = png_with_padding(MAX_IMAGE_BYTES + 1)
    expect("image_too_large", parse_data_uri, "data:image/png;base64," + base64.b64encode(over).decode())


def test_jpeg_padded_with_comment_segment() -> None:
    base = encode(Image.new("RGB", (40, 40), RED), "JPEG")
    com = b"\xff\xfe" + struct.pack(">H", 65535) + b"x" * 65533
    data = base[:2] + com * 3 + base[2:]
    assert decode_image(data).size == (40, 40)


# --- data: URIs ----------------------------------------------------------------------------------------
PNG_SMALL = encode(Image.new("RGB", (32, 32), RED), "PNG")


@pytest.mark.parametrize("uri", [
    "data:application/octet-stream;base64," + base64.b64encode(PNG_SMALL).decode(),
    "data:image/png;base64," + base64.b64encode(PNG_SMALL).decode(),
    "DATA:IMAGE/PNG;BASE64," + base64.b64encode(PNG_SMALL).decode(),
    "data:;base64," + base64.b64encode(PNG_SMALL).decode(),
    "data:image/png;name=a.png;base64," + base64.b64encode(PNG_SMALL).decode(),
    "data:image/png;base64," + base64.b64encode(PNG_SMALL).decode().rstrip("="),
    "data:image/png;base64," + base64.urlsafe_b64encode(PNG_SMALL).decode(),
    "data:image/png;base64," + base64.encodebytes(PNG_SMALL).decode(),  # 76-column lines
    "data:image/png;base64,\r\n " + " ".join(base64.b64encode(PNG_SMALL).decode()) + "\n",
    "data:image/png;base64," + base64.b64encode(PNG_SMALL).decode().replace("+", "%2B").replace("/", "%2F"),
])
def test_data_uri_variants(uri: str) -> None:
    assert parse_data_uri(uri) == PNG_SMALL
    assert load_image("  " + uri + "\n", None).size == (32, 32)  # type: ignore[arg-type]


@pytest.mark.parametrize("uri,kind", [
    ("data:image/png," + "hello", "data_uri_invalid"),  # not base64
    ("data:text/plain;charset=utf-8,%89PNG", "data_uri_invalid"),
    ("data:image/png;base64", "data_uri_invalid"),  # no comma
    ("data:image/png;base64,", "image_empty"),
    ("data:image/png;base64,  \n ", "image_empty"),
    ("data:image/png;base64,====", "data_uri_invalid"),
    ("data:image/png;base64,!!!!", "data_uri_invalid"),
    ("data:image/png;base64,abcde", "data_uri_invalid"),  # impossible length
    ("data:image/png;base64,ab=cd", "data_uri_invalid"),
    ("data:image/png;base64,ÄÖÜ", "data_uri_invalid"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "image_unrecognized"),  # valid base64, not an image
])
def test_data_uri_refused(uri: str, kind: str) -> None:
    expect(kind, load_image, uri, None)


def test_huge_data_uri_refused_cheaply() -> None:
    uri = "data:application/octet-stream;base64," + "A" * (40 * 1024 * 1024)
    t0 = time.perf_counter()
    expect("image_too_large", parse_data_uri, uri)
    assert time.perf_counter() - t0 < 0.05
    # just over the limit after whitespace is removed: still refused before decoding
    uri = "data:;base64," + "A" * (images.MAX_B64_CHARS + 8)
    expect("image_too_large", parse_data_uri, uri)


@hyp_settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(),
    st.text().map(lambda s: "data:" + s),
    st.text(alphabet="ABCxyz019+/-_=% \n\t,;:").map(lambda s: "data:image/png;base64," + s),
    st.from_regex(r"data:[a-z/]{0,12}(;[a-z=]{0,8}){0,3},.{0,40}", fullmatch=True),
))
def test_data_uri_property_only_image_error(uri: str) -> None:
    try:
        out = parse_data_uri(uri)
    except ImageError as err:
        assert err.kind in CODES
    else:
        assert isinstance(out, bytes) and out


@hyp_settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.booleans(), st.booleans(), st.integers(0, 80))
def test_data_uri_property_roundtrip(data: bytes, urlsafe: bool, strip_pad: bool, wrap: int) -> None:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    if strip_pad:
        text = text.rstrip("=")
    if wrap:
        text = "\n".join(text[i:i + wrap] for i in range(0, len(text), wrap))
    assert parse_data_uri("data:application/octet-stream;base64," + text) == data


@pytest.mark.parametrize("uri", ["", "   ", "ftp://example.com/a.png", "file:///etc/passwd", "/tmp/a.png",
                                 "gopher://x", "javascript:alert(1)"])
def test_uri_invalid(uri: str) -> None:
    expect("uri_invalid", read_uri_bytes, uri, None)


def test_uri_not_a_string() -> None:
    expect("uri_invalid", read_uri_bytes, 42, None)


# --- fetching: loopback servers ----------------------------------------------------------------------------
GOOD_PNG = encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str | None, str | None]] = []  # (path, Host, User-Agent)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: C901 - a routing table
        type(self).seen.append((self.path, self.headers.get("Host"), self.headers.get("User-Agent")))
        path = self.path
        if path == "/ok.png":
            self._send(200, GOOD_PNG)
        elif path in ("/404", "/403", "/500"):
            self._send(int(path[1:]), b"nope", "text/plain")
        elif path == "/text":
            self._send(200, b"<html>hello</html>", "text/html")
        elif path.startswith("/r/"):
            n = int(path[3:])
            self._send(302, Location="/ok.png" if n == 0 else f"/r/{n - 1}")
        elif path == "/loop-a":
            self._send(301, Location="/loop-b")
        elif path == "/loop-b":
            self._send(307, Location="/loop-a")
        elif path.startswith("/to?"):
            self._send(302, Location=path[4:])
        elif path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                while True:
                    self.wfile.write(chunk)
            except OSError:
                return
        elif path == "/biglen":
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
            try:
                self.wfile.write(b"\0" * 1024)
            except OSError:
                pass
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                return
        elif path == "/gzip":
            body = zlib.compress(GOOD_PNG, wbits=31)
            self._send(200, body, Content_Encoding="gzip")
        elif path == "/gzip-bomb":
            body = zlib.compress(b"\0" * (20 * 1024 * 1024), wbits=31)
            self._send(200, body, Content_Encoding="gzip")
        elif path == "/empty":
            self._send(200, b"")
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def make_settings(**kw: object) -> Settings:
    base: dict[str, object] = {
        "fetch_timeout_s": 1.0, "fetch_connect_timeout_s": 0.5, "fetch_max_bytes": 1_000_000,
        "fetch_max_redirects": 3, "fetch_allow": ["127.0.0.1"], "fetch_user_agent": "tusou-test/1",
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    with Fetcher(make_settings()) as f:
        yield f


@pytest.fixture
def guarded() -> Iterator[Fetcher]:
    """No allow-list: the production default."""
    with Fetcher(make_settings(fetch_allow=[])) as f:
        yield f


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records every socket connect to a non-loopback address and refuses it."""
    attempts: list[object] = []
    real = socket.create_connection

    def guarded_create(address: tuple[str, int], *a: object, **kw: object) -> socket.socket:
        if address[0] not in ("127.0.0.1",):
            attempts.append(address)
            raise OSError("test: connection to a non-loopback address")
        return real(address, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "create_connection", guarded_create)
    return attempts


def test_fetch_ok_sends_user_agent(server: str, fetcher: Fetcher) -> None:
    Handler.seen.clear()
    assert fetcher.fetch(server + "/ok.png") == GOOD_PNG
    assert Handler.seen[-1][2] == "tusou-test/1"
    im = load_image(server + "/ok.png", fetcher)
    assert im.size == (40, 40) and px(im, (1, 1)) == (1, 2, 3)


def test_fetch_reuses_connection(server: str, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(3):
        fetcher.fetch(server + "/ok.png")
    assert len(calls) == 1


@pytest.mark.parametrize("status", [404, 403, 500])
def test_fetch_http_status(server: str, fetcher: Fetcher, status: int) -> None:
    err = expect("fetch_http_status", fetcher.fetch, f"{server}/{status}")
    assert err.message == f"fetch failed: http {status}"


def test_fetch_non_image(server: str, fetcher: Fetcher) -> None:
    expect("image_unrecognized", load_image, server + "/text", fetcher)
    expect("image_empty", load_image, server + "/empty", fetcher)


def test_redirect_chain_within_cap(server: str, fetcher: Fetcher) -> None:
    assert fetcher.fetch(server + "/r/2") == GOOD_PNG  # 3 redirects, cap 3


def test_too_many_redirects(server: str, fetcher: Fetcher) -> None:
    err = expect("fetch_redirects", fetcher.fetch, server + "/r/3")
    assert "too many redirects" in err.message


def test_redirect_loop(server: str, fetcher: Fetcher) -> None:
    err = expect("fetch_redirects", fetcher.fetch, server + "/loop-a")
    assert "loop" in err.message


def test_redirect_to_other_scheme(server: str, fetcher: Fetcher) -> None:
    expect("uri_invalid", fetcher.fetch, server + "/to?file:///etc/passwd")


def test_endless_body_capped(server: str, fetcher: Fetcher) -> None:
    t0 = time.perf_counter()
    err = expect("image_too_large", fetcher.fetch, server + "/endless")
    assert "1000000" in err.message and time.perf_counter() - t0 < 1.0


def test_content_length_over_cap_refused_early(server: str, fetcher: Fetcher) -> None:
    expect("image_too_large", fetcher.fetch, server + "/biglen")


def test_gzip_body_decoded_and_bounded(server: str, fetcher: Fetcher) -> None:
    assert fetcher.fetch(server + "/gzip") == GOOD_PNG
    expect("image_too_large", fetcher.fetch, server + "/gzip-bomb")


def test_trickling_server_hits_overall_deadline(server: str, fetcher: Fetcher) -> None:
    t0 = time.perf_counter()
    err = expect("fetch_timeout", fetcher.fetch, server + "/trickle")
    elapsed = time.perf_counter() - t0
    assert 0.9 <= elapsed < 2.0, elapsed
    assert "timeout" in err.message


def test_connection_refused(fetcher: Fetcher) -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    expect("fetch_error", fetcher.fetch, f"http://127.0.0.1:{port}/x.png")


def test_concurrency_bound(server: str) -> None:
    with Fetcher(make_settings(fetch_max_concurrent=2, fetch_timeout_s=0.3)) as f:
        # Stand in for two slow downloads holding both slots: a third waits fetch_timeout_s, then gives up.
        assert f._sem.acquire(blocking=False) and f._sem.acquire(blocking=False)
        t0 = time.perf_counter()
        expect("fetch_busy", f.fetch, server + "/ok.png")
        assert 0.25 < time.perf_counter() - t0 < 0.5
        f._sem.release()
        assert f.fetch(server + "/ok.png") == GOOD_PNG  # one slot is free again
        f._sem.release()


# --- SSRF guard ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/ok.png",
    "http://[::1]:{port}/ok.png",
    "http://localhost:{port}/ok.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/x.png",
    "http://192.168.1.1/x.png",
    "http://172.16.0.1/x.png",
    "http://100.64.0.1/x.png",
    "http://0.0.0.0:{port}/x.png",
    "http://[::ffff:127.0.0.1]:{port}/x.png",
    "http://[::ffff:a9fe:a9fe]/x.png",
    "http://[fe80::1]/x.png",
    "http://[fd00::1]/x.png",
    "http://224.0.0.1/x.png",
    "http://2130706433:{port}/x.png",  # 127.0.0.1 as a decimal integer
])
def test_guard_refuses_private(server: str, guarded: Fetcher, no_connect: list[object], url: str) -> None:
    port = server.rsplit(":", 1)[1]
    Handler.seen.clear()
    err = expect("fetch_refused", guarded.fetch, url.format(port=port))
    assert "not a public address" in err.message
    assert no_connect == [] and Handler.seen == []
    if "localhost" in url:
        # Where a name points stays in the server's log: answers would map the internal network for tenants.
        assert err.message.startswith("fetch refused: localhost resolves to an address that is not")
        assert "127.0.0.1" not in err.message and "::1" not in err.message


@pytest.mark.parametrize("target", ["http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/",
                                    "http://[::1]:{port}/ok.png", "http://192.168.0.1/"])
def test_guard_on_redirect_hop(server: str, no_connect: list[object], target: str) -> None:
    # The first hop is allowed by CIDR; the redirect target is not.
    port = server.rsplit(":", 1)[1]
    with Fetcher(make_settings(fetch_allow=["127.0.0.1/32"])) as f:
        expect("fetch_refused", f.fetch, f"{server}/to?{target.format(port=port)}")
    assert no_connect == []


def test_public_name_resolving_private(monkeypatch: pytest.MonkeyPatch, guarded: Fetcher,
                                       no_connect: list[object], caplog: pytest.LogCaptureFixture) -> None:
    def fake(host: str, *a: object, **kw: object) -> list[tuple[object, ...]]:
        assert host == "images.example.com"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with caplog.at_level(logging.DEBUG, logger="tusou.fetch"):
        err = expect("fetch_refused", guarded.fetch, "http://images.example.com/a.png")
    # The tenant learns that the name is refused, the operator's log where it points.
    assert "10.1.2.3" not in err.message and "images.example.com resolves to an address" in err.message
    assert "images.example.com resolves to 10.1.2.3" in caplog.text
    assert no_connect == []


def test_connects_to_the_checked_address(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One resolution per connection, and the socket goes to that answer (no second lookup to rebind)."""
    port = int(server.rsplit(":", 1)[1])
    lookups: list[str] = []

    def fake(host: str, *a: object, **kw: object) -> list[tuple[object, ...]]:
        lookups.append(host)
        if host == "127.0.0.1":  # socket.create_connection's own numeric lookup
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        assert host == "pinned.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    Handler.seen.clear()
    with Fetcher(make_settings(fetch_allow=["127.0.0.0/8"])) as f:
        assert f.fetch(f"http://pinned.test:{port}/ok.png") == GOOD_PNG
    assert lookups.count("pinned.test") == 1
    assert Handler.seen[-1][1] == f"pinned.test:{port}"  # Host header keeps the name


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """An HTTPS server on 127.0.0.1 whose self-signed certificate names only ``tls.test``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=tls.test",
         "-addext", "subjectAltName=DNS:tls.test"],
        check=True, capture_output=True,
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], cert
    httpd.shutdown()
    httpd.server_close()


def _resolve_to_loopback(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = socket.getaddrinfo

    def fake(host: str, port: object, *a: object, **kw: object) -> object:
        if host == name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_https_pinned_address_keeps_sni_and_cert_check(tls_server: tuple[int, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket goes to the checked IP, yet TLS still verifies the certificate against the host name."""
    port, cert = tls_server
    _resolve_to_loopback(monkeypatch, "tls.test")
    monkeypatch.setattr(fetch.httpx, "create_ssl_context",
                        lambda **kw: ssl.create_default_context(cafile=cert))
    with Fetcher(make_settings(fetch_allow=["127.0.0.1"])) as f:
        assert f.fetch(f"https://tls.test:{port}/ok.png") == GOOD_PNG
        # the same server under a name its certificate does not carry: refused by the hostname check
        _resolve_to_loopback(monkeypatch, "other.test")
        err = expect("fetch_error", f.fetch, f"https://other.test:{port}/ok.png")
        assert err.message == "fetch failed: tls error"


def test_https_untrusted_certificate(tls_server: tuple[int, str], monkeypatch: pytest.MonkeyPatch) -> None:
    port, _cert = tls_server
    _resolve_to_loopback(monkeypatch, "tls.test")
    with Fetcher(make_settings(fetch_allow=["127.0.0.1"])) as f:
        err = expect("fetch_error", f.fetch, f"https://tls.test:{port}/ok.png")
        assert err.message == "fetch failed: tls error"


def test_allow_by_host_name(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = server.rsplit(":", 1)[1]
    with Fetcher(make_settings(fetch_allow=["localhost"])) as f:
        # localhost may resolve to ::1 first; the test server listens on 127.0.0.1 only, and the
        # fetcher tries every checked address in turn.
        assert f.fetch(f"http://localhost:{port}/ok.png") == GOOD_PNG


def test_is_blocked_table() -> None:
    import ipaddress

    blocked = ["127.0.0.1", "10.0.0.1", "172.31.255.255", "192.168.0.1", "169.254.169.254", "100.64.0.1",
               "0.0.0.0", "255.255.255.255", "224.0.0.1", "240.0.0.1", "198.18.0.1", "::", "::1",
               "fe80::1", "fc00::1", "fd12::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
               "2002:0a00:0001::1", "64:ff9b::a00:1", "::a00:1", "2001:db8::1"]
    public = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8",
              "64:ff9b::808:808"]
    for a in blocked:
        assert fetch._is_blocked(ipaddress.ip_address(a)), a
    for a in public:
        assert not fetch._is_blocked(ipaddress.ip_address(a)), a


# --- docs stay in sync ---------------------------------------------------------------------------------
def test_error_table_documents_every_kind() -> None:
    text = DOCS.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\|\s*`(\w+)`\s*\|\s*(\d+)\s*\|", text, flags=re.M))
    assert {k: int(v) for k, v in rows.items()} == CODES


def test_malformed_idna_hosts_are_a_bad_uri_not_a_crash() -> None:
    # httpx decodes IDNA lazily; these raised idna's own ValueError past the fetcher (found in review).
    from tusou.config import Settings as _Settings

    with Fetcher(_Settings()) as fetcher:
        for url in ("http://xn--ls8h.la/", "http://xn--zz-.com/a.jpg", "http://xn--/"):
            with pytest.raises(ImageError) as err:
                load_image(url, fetcher)
            assert err.value.kind == "uri_invalid"


def test_a_hanging_name_lookup_ends_at_the_fetch_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading
    import time as _time

    from tusou.config import Settings as _Settings

    release = threading.Event()
    real = socket.getaddrinfo

    def slow(host: str, *args: object, **kwargs: object) -> object:
        if host == "slow-dns.example":
            release.wait(10)  # an authoritative server that never answers
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        with Fetcher(_Settings(fetch_timeout_s=0.5, fetch_connect_timeout_s=0.5)) as fetcher:
            started = _time.monotonic()
            with pytest.raises(ImageError) as err:
                load_image("http://slow-dns.example/a.jpg", fetcher)
            assert err.value.kind == "fetch_timeout"
            assert _time.monotonic() - started < 5  # not the resolver's own 10 s
    finally:
        release.set()
