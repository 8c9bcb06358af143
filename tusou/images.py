"""Turn image bytes into a validated RGB image, or a precise :class:`ImageError`.

Bytes come from a ``data:<type>;base64,<payload>`` uri (:func:`parse_data_uri`) or from a download
(``tusou.fetch``). Everything here handles untrusted input, including image files crafted to exhaust memory:
a few KB of PNG can claim 4999x4999 pixels. Decoding is bounded by :class:`PixelBudget` (pixels decoded at
once, server-wide) and shrinks each image right away to the size the model needs (``min_short``).

Qiniu's rules (文件适用规格): at most 10 MB; 30x30 up to 4999x4999 pixels; png, jpg/jpeg, bmp, webp or gif.
Qiniu also says "no alpha channel"; we are more lenient and composite alpha onto white instead of refusing.

The error table (kind, code, message, what to do) lives in ``docs/errors.md``; keep both in sync
(``tests/test_images.py`` checks it).
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from tusou.errors import QiniuError

# --- limits (Qiniu's) --------------------------------------------------------------------------------
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MIN_SIDE = 30
MAX_SIDE = 4999
MAX_URL_CHARS = 8192
# Base64 of MAX_IMAGE_BYTES, padded. A payload longer than this cannot decode to an acceptable image.
MAX_B64_CHARS = 4 * ((MAX_IMAGE_BYTES + 2) // 3)

# Pillow warns above MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that, both from the
# header alone. Our own dimension check refuses anything above MAX_SIDE x MAX_SIDE right after the header
# anyway; lowering Pillow's guard to the same figure means the hard stop (2x) also protects any code path
# that opens an image without going through decode_image. Never loosen a stricter guard set elsewhere.
_RULE_PIXELS = MAX_SIDE * MAX_SIDE
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > _RULE_PIXELS:
    Image.MAX_IMAGE_PIXELS = _RULE_PIXELS

# Pillow plugins we let open untrusted bytes. The JPEG plugin also returns "MPO" images (the multi-picture
# JPEGs phones write); those are jpeg too.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF")

# kind -> code. Codes are HTTP-like (the service reuses them as the status of a failed search).
CODES: dict[str, int] = {
    "uri_invalid": 400,
    "data_uri_invalid": 400,
    "image_empty": 400,
    "image_dimensions_invalid": 406,
    "image_too_large": 413,
    "image_format_unsupported": 415,
    "image_unrecognized": 415,
    "image_corrupt": 422,
    "fetch_refused": 403,
    "fetch_http_status": 424,
    "fetch_redirects": 508,
    "fetch_error": 502,
    "fetch_busy": 503,
    "fetch_timeout": 504,
    "image_busy": 503,
}


class ImageError(QiniuError):
    """A uri that cannot become an image. ``status`` (also ``code``) and ``message`` go to the client."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(CODES[kind], message)
        self.kind = kind

    @property
    def code(self) -> int:
        return self.status

    def __repr__(self) -> str:
        return f"ImageError({self.kind!r}, {self.code}, {self.message!r})"


# --- data: URIs ----------------------------------------------------------------------------------------
_WHITESPACE = re.compile(r"\s+")
_B64_OK = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def parse_data_uri(uri: str) -> bytes:
    """Decode ``data:[<type>][;param]*;base64,<payload>`` (RFC 2397; base64 only).

    Lenient where real clients are sloppy: whitespace and line breaks, missing padding, the url-safe
    alphabet, a percent-encoded payload. Strict about everything else.
    """
    if not isinstance(uri, str) or uri[:5].lower() != "data:":
        raise ImageError("data_uri_invalid", "invalid data uri: must start with data:")
    # Refuse a huge string before any copy of it is made. Whitespace is tolerated, so allow up to one
    # whitespace character per payload character plus a generous header; the exact check follows.
    if len(uri) > 2 * MAX_B64_CHARS + 4096:
        raise ImageError("image_too_large", f"image too large: max {MAX_IMAGE_BYTES} bytes")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageError("data_uri_invalid", "invalid data uri: missing comma")
    params = [p.strip().lower() for p in header.split(";")]
    if len(params) < 2 or params[-1] != "base64":
        raise ImageError("data_uri_invalid", "invalid data uri: must be base64 (data:<type>;base64,...)")
    if len(payload) > MAX_B64_CHARS + 4:
        return _parse_lenient(payload)  # whitespace may make up the difference; it checks the length
    try:
        # The common case, a plain padded base64 payload, decoded and checked in one C pass. Anything this
        # refuses (whitespace, the url-safe alphabet, missing padding, percent-encoding, junk) goes through
        # the lenient path below, which gives the same bytes wherever both accept. The whitespace removal
        # alone used to cost ~0.8 ms per 100 KB image.
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        return _parse_lenient(payload)
    if not data:
        raise ImageError("image_empty", "image is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError("image_too_large", f"image too large: {len(data)} bytes, max {MAX_IMAGE_BYTES}")
    return data


def _parse_lenient(payload: str) -> bytes:
    """The base64 payload of a data: uri as real clients send it: whitespace and line breaks, missing
    padding, the url-safe alphabet, percent-encoding."""
    if "%" in payload:
        # Some clients URL-encode the whole uri; '%' is never part of base64, so unquoting is unambiguous.
        payload = urllib.parse.unquote(payload)
    payload = _WHITESPACE.sub("", payload)
    if not payload:
        raise ImageError("image_empty", "image is empty")
    if len(payload) > MAX_B64_CHARS + 4:
        raise ImageError("image_too_large", f"image too large: max {MAX_IMAGE_BYTES} bytes")
    if not payload.isascii():
        raise ImageError("data_uri_invalid", "invalid data uri: bad base64")
    payload = payload.replace("-", "+").replace("_", "/")
    if not _B64_OK.fullmatch(payload):
        raise ImageError("data_uri_invalid", "invalid data uri: bad base64")
    payload = payload.rstrip("=")
    if len(payload) % 4 == 1:  # no byte string encodes to this length
        raise ImageError("data_uri_invalid", "invalid data uri: bad base64 length")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("data_uri_invalid", "invalid data uri: bad base64") from exc
    if not data:
        raise ImageError("image_empty", "image is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError("image_too_large", f"image too large: {len(data)} bytes, max {MAX_IMAGE_BYTES}")
    return data


# --- decoding ------------------------------------------------------------------------------------------
# Formats we can name but do not accept, by magic bytes, so the client learns "tiff is not supported"
# rather than "not an image". Sniffing is done by us, not by Pillow's plugins: no untrusted parsing needed.
_OTHER_FORMATS: tuple[tuple[bytes, int, str], ...] = (
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"\x00\x00\x01\x00", 0, "ico"),
    (b"\x00\x00\x02\x00", 0, "cur"),
    (b"8BPS", 0, "psd"),
    (b"%PDF", 0, "pdf"),
    (b"\x00\x00\x00\x0cjP  ", 0, "jpeg 2000"),
    (b"\xffO\xffQ", 0, "jpeg 2000"),
    (b"\x00\x00\x00\x0cJXL ", 0, "jpeg xl"),
    (b"\xff\x0a", 0, "jpeg xl"),
    (b"qoif", 0, "qoi"),
    (b"icns", 0, "icns"),
    (b"DDS ", 0, "dds"),
    (b"gimp xcf", 0, "xcf"),
    (b"\x76\x2f\x31\x01", 0, "openexr"),
    (b"#?RADIANCE", 0, "hdr"),
)
_FTYP_BRANDS = {
    b"heic": "heic",
    b"heix": "heic",
    b"mif1": "heif",
    b"msf1": "heif",
    b"avif": "avif",
    b"avis": "avif",
}


def _sniff_other(data: bytes) -> str | None:
    for magic, offset, name in _OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return _FTYP_BRANDS[data[8:12]]
    if len(data) >= 3 and data[0:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "netpbm"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "svg"
    return None


def _dimensions_error(size: tuple[int, int] | None) -> ImageError:
    rule = f"{MIN_SIDE}x{MIN_SIDE}..{MAX_SIDE}x{MAX_SIDE}"
    if size is None:
        return ImageError("image_dimensions_invalid", f"image size outside {rule}")
    return ImageError("image_dimensions_invalid", f"image size {size[0]}x{size[1]} outside {rule}")


class PixelBudget:
    """How many decoded pixels the whole server may hold at once (``Settings.decode_max_pixels``).

    A PNG of 95 KB can decode to 4999x4999 pixels (100 MB as RGB, more while converting); a request may
    carry a thousand of them. Each decode reserves its pixel count from the header before a pixel is
    decoded and gives it back once the image is shrunk to what the model needs, so concurrent decodes, of
    one request or of many, cannot add up past the budget. One image larger than the whole budget still
    decodes, alone. A decode that cannot get its share within ``wait_s`` fails with ``image_busy`` (503).
    """

    def __init__(self, pixels: int, wait_s: float) -> None:
        self.total = max(1, int(pixels))
        self.wait_s = wait_s
        self._free = self.total
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.total - self._free

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = min(max(0, int(pixels)), self.total)
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self._free < need:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left) and self._free < need:
                    raise ImageError(
                        "image_busy", "server busy: too many large images being decoded, retry later"
                    )
            self._free -= need
        try:
            yield
        finally:
            with self._cond:
                self._free += need
                self._cond.notify_all()


_UNLIMITED = PixelBudget(1 << 62, 0.0)


def decode_image(data: bytes, min_short: int | None = None, budget: PixelBudget | None = None) -> Image.Image:
    """Bytes -> RGB image following Qiniu's rules, or ImageError. Dimensions are checked from the header,
    before any pixel is decoded; the decode itself runs inside ``budget``.

    ``min_short``: the shorter side the caller needs (the model's resize target). A large JPEG then decodes
    straight at a reduced scale (DCT scaling, nearly free), any other image is shrunk by a whole factor
    right after decoding, in its own mode, keeping the shorter side at least twice ``min_short`` (what
    Pillow's ``reducing_gap=2`` keeps: the model's own resize is unaffected). Without it, full size.
    """
    if not data:
        raise ImageError("image_empty", "image is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError("image_too_large", f"image too large: {len(data)} bytes, max {MAX_IMAGE_BYTES}")
    im = _open(data)
    with im:
        w, h = im.size
        if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
            raise _dimensions_error((w, h))
        try:
            if min_short is not None and isinstance(im, JpegImagePlugin.JpegImageFile):
                scale = min_short / min(w, h)
                im.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        except Exception as exc:
            raise ImageError("image_corrupt", "image is corrupt or truncated") from exc
        with (budget or _UNLIMITED).hold(im.size[0] * im.size[1]):
            try:
                # Only the first frame of an animated gif/webp: a freshly opened image sits on frame 0.
                im.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _dimensions_error(None) from exc
            except Exception as exc:  # truncated data, bad checksums, broken streams: never a half-grey image
                raise ImageError("image_corrupt", "image is corrupt or truncated") from exc
            try:
                out = to_rgb(_orient(_shrink(im, min_short)))
                # The result must not share pixels with `im`, which the with-block closes.
                return out.copy() if out is im else out
            except Exception as exc:
                raise ImageError("image_corrupt", "image is corrupt or truncated") from exc


def _open(data: bytes) -> Image.Image:
    try:
        # formats= keeps every other Pillow plugin (and its parser) away from untrusted bytes.
        return Image.open(BytesIO(bytes(data)), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception only where warnings are errors (python -W error).
        raise _dimensions_error(None) from exc
    except Image.UnidentifiedImageError as exc:
        if (
            data[:8] == b"\x89PNG\r\n\x1a\n"
            or data[:3] in (b"\xff\xd8\xff", b"GIF")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
            or data[:2] == b"BM"
        ):
            # One of our formats by its signature, but its plugin gave up on the header.
            raise ImageError("image_corrupt", "image is corrupt or truncated") from exc
        other = _sniff_other(bytes(data[:4096]))
        if other is not None:
            raise ImageError(
                "image_format_unsupported",
                f"unsupported image format: {other} (use png, jpeg, bmp, webp or gif)",
            ) from exc
        raise ImageError("image_unrecognized", "not an image: unknown format") from exc
    except Exception as exc:  # a recognised header that its plugin could not parse
        raise ImageError("image_corrupt", "image is corrupt or truncated") from exc


# Modes Image.reduce() works in directly; others are brought to one of them first.
_REDUCIBLE = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "PA", "I", "F", "CMYK", "YCbCr"}


def _shrink(im: Image.Image, min_short: int | None) -> Image.Image:
    """``im`` reduced by a whole factor so that its shorter side stays >= 2 * min_short; 16-bit grey becomes
    8-bit first (half the memory, no 32- or 64-bit copy of the full image)."""
    if im.mode.startswith("I;16"):
        im = _sixteen_to_l(im)
    if min_short is None:
        return im
    factor = min(im.size) // (2 * max(1, min_short))
    if factor < 2:
        return im
    if im.mode not in _REDUCIBLE:
        has_alpha = (
            "transparency" in im.info
            or im.mode == "P"
            and im.palette is not None
            and (im.palette.mode == "RGBA")
        )
        im = im.convert("RGBA" if has_alpha else "RGB")
    return im.reduce(factor)


def _sixteen_to_l(im: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit grey, keeping the high byte (Pillow's convert() would clip at 255 instead)."""
    arr = np.asarray(im)  # uint16 in native byte order
    high = (arr >> 8).astype(np.uint8)
    del arr
    return Image.fromarray(high, "L")


def _orient(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:
        # A malformed EXIF block should not cost the image: keep the stored orientation.
        return im
    return out if out is not None else im


_WHITE = (255, 255, 255)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image -> RGB, transparency flattened onto white (what a viewer shows), 16-bit grey scaled
    to 8 bits. The one such conversion in tusou: decoding, the model's preprocessing and its views use it."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16"):
        return _sixteen_to_l(im).convert("RGB")
    if mode == "I":
        # 32-bit grey holding 16-bit values (png): scale like 16-bit grey, in C, without a numpy copy.
        return im.point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in im.info or im.palette is not None and im.palette.mode == "RGBA"
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        im = im.convert("RGBA")
    elif mode in ("L", "1", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        if im.getchannel("A").getextrema() == (255, 255):
            return im.convert("RGB")
        # Qiniu refuses alpha; we composite onto white, what a viewer shows for a transparent background.
        bg = Image.new("RGB", im.size, _WHITE)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")
