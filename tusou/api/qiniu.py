"""Qiniu's wire format, in one place: request bodies in, typed requests out; domain results in, JSON out.

Bodies come as JSON or form-encoded (Qiniu's Python SDK sends nested values as ``str(dict)``). Each field is
coerced with the status and message Qiniu answers for it, in the order Qiniu checks them, into the typed
requests of :mod:`tusou.domain`; the service never sees a wire dict. The renderers write the exact JSON
Qiniu's clients parse (key order included). Limits come from :class:`tusou.config.Settings`, and the
OpenAPI request models (:func:`request_models`) are built from the same limits.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Sequence
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from pydantic import BaseModel, Field, create_model

from tusou.config import Settings
from tusou.domain import (
    BatchResult,
    DeleteImages,
    DuplicatePage,
    FindDuplicates,
    ImageInfo,
    ImageRef,
    ItemError,
    ListImages,
    Match,
    Matches,
    NewImages,
    NewItem,
    Page,
    SearchQuery,
    UpdateImage,
)
from tusou.embed import concepts
from tusou.errors import QiniuError
from tusou.store.filters import parse_filter

# Group ids travel in URL paths: no separators, dot-segments or control characters.
GROUP_ID_RE = re.compile(r"^[^\x00-\x1f\x7f/\\?#%]{1,128}$")
IMAGE_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
IMAGE_ID_MAX_CHARS = 256  # IMAGE_ID_RE's
LABEL_MAX_CHARS = 1024
LIST_MAX_LIMIT = 1000  # images in one page of GET /v1/image/group/<id>
LIST_LIMIT_ERROR = f"invalid limit: must be 1-{LIST_MAX_LIMIT}"  # Qiniu's message first, then the range
DUPLICATES_PAGE = 200  # images scanned by one duplicates call unless it asks for another number
TEXT_MAX_CHARS = 256  # a keyword query (data.text)
# Largest form value read as a Python literal (the SDK's str(dict) form encoding of nested values).
FORM_LITERAL_MAX = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"

Body = dict[str, Any]  # a parsed request body: untrusted until coerced below


# --- bodies ---------------------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise.
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf, which no JSON response can carry back
        raise ValueError(f"{text} is out of range")
    return value


def loads(text: str | bytes) -> Any:
    """Strict JSON: no NaN, no Infinity, no float that overflows, no unpaired surrogate."""
    value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if re.search(rb"\\u[dD][89a-fA-F]", raw):  # only pay for the check when surrogate escapes appear
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # "\ud800" alone parses to a str that no UTF-8 database or response can hold.
            raise ValueError("unpaired surrogate") from None
    return value


def _form_value(value: str) -> Any:
    # requests form-encodes nested values with str(): '{"uri": ...}' or "{'uri': ...}".
    if value[:1] in "{[":
        try:
            return loads(value)
        except (ValueError, RecursionError):
            if len(value) > FORM_LITERAL_MAX:
                return value  # literal_eval is slow and memory-hungry on big input: never on untrusted bulk
            try:
                parsed = ast.literal_eval(value)
                # Only what JSON could have carried, and no lone surrogate ('\ud800' is a valid literal).
                json.dumps(parsed, allow_nan=False, ensure_ascii=False).encode("utf-8")
                return parsed
            except UnicodeEncodeError:
                raise QiniuError(400, "invalid body") from None
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return value
    return value


def _too_many_values(body: bytes, form: bool, max_values: int | None) -> bool:
    """Whether ``body`` may hold more than ``max_values`` values: every JSON value but the first of its array
    or object follows a comma, every container opens with a bracket, every form field but the first
    follows an ampersand. Counted only for a body longer than the bound (a shorter one cannot exceed it)."""
    if max_values is None or len(body) <= max_values:
        return False
    if form:
        return body.count(b"&") > max_values
    return body.count(b",") + body.count(b"{") + body.count(b"[") > max_values


def parse_body(content_type: str, body: bytes, max_values: int | None = None) -> Body:
    """A request body as a dict, read by its Content-Type (JSON, or form-encoded as the Python SDK sends).

    ``max_values`` (:attr:`Wire.max_body_values`): a body that may hold more values is refused unparsed.
    Parsed, a value costs 20-70 bytes against its 2-4 on the wire: a body of "{}," within the size limit
    (256 MB) would have grown the server by ~7 GB.
    """
    if not body.strip():
        return {}
    media = content_type.split(";", 1)[0].strip().lower()
    if _too_many_values(body, media == FORM_TYPE, max_values):
        raise QiniuError(400, "invalid body: too many values")
    if media == FORM_TYPE:
        try:
            # errors="strict": a field percent-encoded in another charset is refused, not turned into U+FFFD.
            pairs = parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, errors="strict"
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise QiniuError(400, "invalid body") from exc
        parsed: Body = {}
        for key, value in pairs:
            item = _form_value(value)
            if key.endswith("[]"):
                key = key[:-2]
                parsed.setdefault(key, [])
            if key in parsed:
                existing = parsed[key]
                parsed[key] = [*existing, item] if isinstance(existing, list) else [existing, item]
            else:
                parsed[key] = item
        return parsed
    try:
        parsed = loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise QiniuError(400, "invalid body") from exc
    if not isinstance(parsed, dict):
        raise QiniuError(400, "invalid body")
    return parsed


# --- fields ---------------------------------------------------------------------------------------------
def group_id(group: object) -> str:
    if not isinstance(group, str) or not GROUP_ID_RE.match(group) or group in (".", ".."):
        raise QiniuError(400, "invalid group id")
    return group


def _id_text(value: object) -> str | None:
    """An image id as its string, or None if it is no id at all.

    Clients often send numeric ids and Qiniu echoed them as strings; bool is an int to Python, but true
    is not an id.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _required_id(value: object) -> str:
    text = _id_text(value)
    if not text:
        raise QiniuError(400, "invalid id")
    return text


def _label_ok(label: object) -> bool:
    return isinstance(label, str) and len(label) <= LABEL_MAX_CHARS


def desc_bytes(desc: object) -> int:
    """Size of a desc as stored (compact JSON); a plain string counts its own bytes, not the quotes."""
    if isinstance(desc, str):
        return len(desc.encode())
    return len(json.dumps(desc, ensure_ascii=False, separators=(",", ":")).encode())


class Wire:
    """Coerces request bodies into typed requests under ``settings``' limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The most values a body needs: a new/add of max_batch_images entries, each with the longest id,
        # label and desc made only of value separators, and a margin for the entry's own structure.
        # A delete (or thumbs) request names up to a whole group's ids, one value each plus a separator.
        per_entry = settings.desc_max_bytes + LABEL_MAX_CHARS + IMAGE_ID_MAX_CHARS + 64
        self.max_body_values = max(
            max(1, settings.max_batch_images) * per_entry, 2 * settings.group_max_images + 64
        )

    # --- new / add ------------------------------------------------------------------------------------
    def new_images(self, group: str, body: Body) -> NewImages:
        group = group_id(group)
        data = body.get("data", [])
        if isinstance(data, dict):  # a form-encoded list of one entry arrives as that entry
            data = [data]
        if not isinstance(data, list):
            raise QiniuError(400, "invalid data")
        if len(data) > self.settings.max_batch_images:
            raise QiniuError(400, f"too many images, at most {self.settings.max_batch_images}")
        items = [self._item(entry) for entry in data]
        params = body.get("params")
        if not isinstance(params, dict):  # Qiniu has no params here: anything else is ignored, as before
            return NewImages(group, items)
        # Beyond Qiniu: params.duplicates ("report" | "refuse") and params.duplicate_threshold.
        mode = params.get("duplicates")
        if mode is not None and mode not in ("report", "refuse"):
            raise QiniuError(400, "invalid duplicates: must be report or refuse")
        threshold = params.get("duplicate_threshold")
        if threshold is not None:
            try:
                threshold = self._threshold(threshold)
            except QiniuError:
                raise QiniuError(400, "invalid duplicate_threshold") from None
        return NewImages(group, items, duplicates=mode, duplicate_threshold=threshold)

    def _item(self, entry: object) -> NewItem | ItemError:
        """A valid item, or the ``errors[]`` entry explaining why it is not."""
        if not isinstance(entry, dict):
            return ItemError(400, "invalid image entry")
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri.strip():
            return ItemError(400, "empty uri")
        attribute = entry.get("attribute") or {}
        if not isinstance(attribute, dict):
            return ItemError(400, "invalid attribute")
        raw_id = attribute.get("id")
        image_id = None
        if raw_id is not None and raw_id != "":
            image_id = _id_text(raw_id)
            if image_id is None or not IMAGE_ID_RE.match(image_id):
                return ItemError(400, "invalid id")
        label = attribute.get("label")
        if label is None:
            label = ""
        if not _label_ok(label):
            return ItemError(400, "invalid label")
        desc = attribute.get("desc")
        if desc is not None and desc_bytes(desc) > self.settings.desc_max_bytes:
            return ItemError(406, "desc too long")
        return NewItem(image_id, label, desc, uri.strip())

    # --- delete, list, image, update ------------------------------------------------------------------
    def delete_images(self, group: str, body: Body) -> DeleteImages:
        group = group_id(group)
        images = body.get("images")
        if isinstance(images, str | int):
            images = [images]
        texts = [_id_text(i) for i in images] if isinstance(images, list) else [None]
        ids = [text for text in texts if text is not None]
        if len(ids) != len(texts):
            raise QiniuError(400, "invalid images")
        return DeleteImages(group, ids)

    def list_images(self, group: str, marker: str, limit: str, tags: str = "") -> ListImages:
        try:
            count = int(limit) if limit != "" else LIST_MAX_LIMIT
        except ValueError as exc:
            raise QiniuError(400, LIST_LIMIT_ERROR) from exc
        if not 1 <= count <= LIST_MAX_LIMIT:
            raise QiniuError(400, LIST_LIMIT_ERROR)
        if tags not in ("", "0", "1", "true", "false"):
            raise QiniuError(400, "invalid tags")
        return ListImages(group_id(group), marker, count, with_tags=tags in ("1", "true"))

    def image_ref(self, group: str, body: Body) -> ImageRef:
        group = group_id(group)
        return ImageRef(group, _required_id(body.get("id")), with_tags=_flag(body.get("tags"), 400))

    def update_image(self, group: str, body: Body) -> UpdateImage:
        image_id = _required_id(body.get("id"))
        label = body.get("label")
        if label is not None and not _label_ok(label):
            raise QiniuError(400, "invalid label")
        keep_desc = "desc" not in body
        desc = body.get("desc")
        if desc is not None and desc_bytes(desc) > self.settings.desc_max_bytes:
            raise QiniuError(406, "desc too long")
        return UpdateImage(group_id(group), image_id, label, desc, keep_desc)

    def duplicates(self, group: str, body: Body) -> FindDuplicates:
        """Beyond Qiniu: ``{"marker"?, "limit"? (1-1000, default 200), "threshold"?}``."""
        group = group_id(group)
        marker = body.get("marker", "")
        if not isinstance(marker, str):
            raise QiniuError(400, "invalid marker")
        limit = body.get("limit", DUPLICATES_PAGE)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_MAX_LIMIT:
            raise QiniuError(400, f"invalid limit: must be 1-{LIST_MAX_LIMIT}")
        try:
            threshold = self._threshold(body.get("threshold"))
        except QiniuError:
            raise QiniuError(400, "invalid threshold") from None
        return FindDuplicates(group, marker, limit, threshold)

    # --- search ---------------------------------------------------------------------------------------
    def search(self, body: Body, group: str | None = None) -> SearchQuery:
        """Both searches: the multi-group one names its groups in params, the legacy one in its path."""
        data = body.get("data") or {}
        params = body.get("params") or {}
        if not isinstance(data, dict) or not isinstance(params, dict):
            raise QiniuError(400, "invalid body")
        uri = data.get("uri")
        text = data.get("text")
        # Beyond Qiniu: {"data": {"id": ..., "group": ...}} searches with a stored image, and
        # {"data": {"text": ...}} with a word (keyword search over the automatic tags).
        stored = not uri and data.get("id") is not None
        by_text = not uri and not stored and text is not None
        if by_text and (not isinstance(text, str) or not text.strip() or len(text) > TEXT_MAX_CHARS):
            raise QiniuError(406, "invalid text")
        if not stored and not by_text and (not isinstance(uri, str) or not uri.strip()):
            raise QiniuError(406, "empty uri")
        groups = self._groups(params.get("groups") if group is None else [group])
        limit = self._search_limit(params.get("limit"))
        threshold = self._threshold(params.get("threshold"))
        labels = self._labels(params.get("labels"))
        extra: dict[str, Any] = {}
        if "filter" in params:
            extra["where"] = parse_filter(params["filter"])
        if "tags" in params:
            extra["with_tags"] = _flag(params["tags"], 406)
        if (by_text or stored) and data.get("box") is not None:
            raise QiniuError(400, "box needs an image uri")
        if by_text:
            assert isinstance(text, str)
            return SearchQuery(groups, limit, threshold, labels=labels, text=text.strip(), **extra)
        if stored:
            source = data.get("group")
            source_group = group_id(source if source is not None else groups[0])
            # The same ids as everywhere else: a JSON integer is its decimal string, true is no id.
            image_id = _id_text(data.get("id"))
            if not image_id:
                raise QiniuError(406, "invalid id")
            return SearchQuery(
                groups, limit, threshold, by_id=ImageRef(source_group, image_id), labels=labels, **extra
            )
        assert isinstance(uri, str)
        box = data.get("box")
        if box is not None:
            extra["box"] = _box(box)
        return SearchQuery(groups, limit, threshold, uri=uri.strip(), labels=labels, **extra)

    def _groups(self, groups: object) -> list[str]:
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list) or not groups:
            raise QiniuError(406, "empty groups")
        if len(groups) > self.settings.search_max_groups:
            raise QiniuError(406, f"too many groups, at most {self.settings.search_max_groups}")
        if not all(isinstance(g, str) for g in groups):
            raise QiniuError(406, "invalid groups")
        return list(dict.fromkeys(group_id(g) for g in groups))

    def _search_limit(self, limit: object) -> int:
        if limit is None:
            return 1
        # Qiniu's message first (clients match on it), then the range.
        bad = f"invalid limit: must be 1-{self.settings.search_max_limit}, or -1 for all"
        if isinstance(limit, bool) or not isinstance(limit, int | float | str):
            raise QiniuError(406, bad)
        try:
            value = int(float(limit)) if isinstance(limit, str) else int(limit)
            whole = value == float(limit)
        except (ValueError, OverflowError) as exc:  # 1e999, or an int too large for a float
            raise QiniuError(406, bad) from exc
        if not whole or value < -1 or value > self.settings.search_max_limit:
            raise QiniuError(406, bad)
        if value == 0:
            return 1
        # -1 is "every match"; Qiniu capped that at the maximum limit too.
        return self.settings.search_max_limit if value == -1 else value

    @staticmethod
    def _threshold(threshold: object) -> float | None:
        if threshold is None or threshold == "":
            return None
        if isinstance(threshold, bool) or not isinstance(threshold, int | float | str):
            raise QiniuError(406, "invalid threshold")
        try:
            value = float(threshold)
        except (ValueError, OverflowError) as exc:
            raise QiniuError(406, "invalid threshold") from exc
        if not 0.0 <= value <= 1.0:
            raise QiniuError(406, "invalid threshold")
        return value

    @staticmethod
    def _labels(labels: object) -> frozenset[str] | None:
        if labels is None or labels == []:
            return None
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise QiniuError(406, "invalid labels")
        return frozenset(labels)


def _box(box: object) -> tuple[float, float, float, float]:
    """data.box: [x0, y0, x1, y1], fractions when every value is <= 1, else pixels (beyond Qiniu)."""
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
    ):
        raise QiniuError(400, "invalid box: [x0, y0, x1, y1] expected")
    x0, y0, x1, y1 = (float(v) for v in box)
    if min(x0, y0) < 0 or x0 >= x1 or y0 >= y1:
        raise QiniuError(400, "invalid box: need 0 <= x0 < x1 and 0 <= y0 < y1")
    return x0, y0, x1, y1


def _flag(value: object, status: int) -> bool:
    """A yes/no request field (beyond Qiniu): absent, true/false, 1/0 or their strings."""
    if value is None or value is False or value in (0, "0", "false", ""):
        return False
    if value is True or value in (1, "1", "true"):
        return True
    raise QiniuError(status, "invalid tags")


# --- responses ------------------------------------------------------------------------------------------
def tags(stored: list[list[float]] | None) -> list[dict[str, Any]]:
    """Stored tags as answered when asked for: [{"id", "name", "name_zh"?, "score"}, ...], best first."""
    return concepts.load().describe(stored or [])

def item_error(error: ItemError | None) -> dict[str, Any] | None:
    return None if error is None else {"code": error.code, "message": error.message}


def batch(result: BatchResult) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": [item_error(e) for e in result.errors], "images": result.images}
    if result.duplicates is not None:  # only when the request asked (beyond Qiniu)
        out["duplicates"] = [
            None if d is None else {"id": d.id, "score": round(float(d.score), 7)} for d in result.duplicates
        ]
    return out


def groups(names: list[str]) -> dict[str, Any]:
    return {"code": 0, "message": "", "result": names}


def count(n: int) -> dict[str, Any]:
    return {"count": n}


def page(result: Page, with_tags: bool = False) -> dict[str, Any]:
    listed: list[dict[str, Any]] = [
        {"id": img.id, "value": {"desc": img.desc, "label": img.label}} for img in result.images
    ]
    if with_tags:
        for entry, img in zip(listed, result.images, strict=True):
            entry["value"]["tags"] = tags(img.tags)
    return {"code": 0, "marker": result.marker, "message": "", "result": listed}


def image(info: ImageInfo, with_tags: bool = False) -> dict[str, Any]:
    if with_tags:
        return {"desc": info.desc, "label": info.label, "tags": tags(info.tags)}
    return {"desc": info.desc, "label": info.label}


def hits(matches: Sequence[Match], *, with_group: bool = True) -> dict[str, Any]:
    """Search results; the legacy single-group search leaves ``group`` out. (The search routes write the
    same JSON from the answer's columns: :func:`hits_body`.)"""
    result: list[dict[str, Any]] = []
    append = result.append
    for match, score in zip(matches, _round7([match.score for match in matches]), strict=True):
        entry: dict[str, Any] = (
            {"desc": match.desc, "group": match.group, "id": match.id, "label": match.label, "score": score}
            if with_group
            else {"desc": match.desc, "id": match.id, "label": match.label, "score": score}
        )
        if match.uri:
            entry["uri"] = match.uri
        if match.tags is not None:  # only when the query asked for them (beyond Qiniu)
            entry["tags"] = tags(match.tags)
        append(entry)
    return {"code": 0, "message": "", "result": result}


def _round7(values: list[float]) -> list[float]:
    """``[round(float(v), 7) for v in values]``, the same floats, in numpy (:func:`_rounded7`)."""
    if len(values) < 64:
        return [round(float(v), 7) for v in values]
    return _rounded7(np.asarray(values, dtype=np.float64)).tolist()  # type: ignore[no-any-return]


def _rounded7(x: np.ndarray) -> np.ndarray:
    """``round(float(v), 7)`` of each float64 in ``x``, in numpy: ``rint(v * 1e7) / 1e7`` is the float
    nearest the decimal Python's ``round`` picks (the division of two exact integers is correctly rounded)
    wherever ``v * 1e7`` is not within float error of a half-way point; those values, and any beyond 1e3
    (where that error grows), take Python's ``round``. 10,000 scores: 5.7 -> 2 ms."""
    with np.errstate(invalid="ignore", over="ignore"):  # nan and inf: doubted, below
        scaled = x * 1e7
        out = np.rint(scaled) / 1e7
        doubt = ~(np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) >= 1e-6) | ~(np.abs(x) <= 1e3)
    for i in np.flatnonzero(doubt).tolist():
        out[i] = round(float(x[i]), 7)
    return out


def _render(value: Any) -> str:
    """``value`` as Starlette's ``JSONResponse`` writes it (compact, UTF-8 text, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _interleave(columns: list[Sequence[str] | str], n: int) -> list[str]:
    """Row by row, ``columns[0][i], columns[1][i], ...`` for i < n in one list (a ``str`` column: that text in
    every row; neighbouring ones are joined first), filled a column at a time by slice assignment: no Python
    step per row."""
    merged: list[Sequence[str] | str] = []
    for column in columns:
        if isinstance(column, str) and merged and isinstance(merged[-1], str):
            merged[-1] += column
        else:
            merged.append(column)
    columns = merged
    width = len(columns)
    out: list[str] = [""] * (width * n)
    for k, column in enumerate(columns):
        out[k::width] = [column] * n if isinstance(column, str) else column
    return out


def _floats(values: np.ndarray) -> list[str]:
    """Each float64 as ``json`` writes it (``float.__repr__``), finite values assumed: orjson writes the
    same shortest digits for 1e-4 <= |v| < 1e16 and for 0 (one call for the whole array, split at its
    commas: 10,000 scores 3.5 -> 0.4 ms); the others (``1e-05`` in Python, ``1e-5`` in orjson) take repr."""
    out = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY).decode()[1:-1].split(",")
    x = np.abs(values)
    for i in np.flatnonzero(((x < 1e-4) & (x != 0)) | (x >= 1e16)).tolist():
        out[i] = float.__repr__(float(values[i]))
    return out


def _strings(column: Sequence[Any]) -> list[Sequence[str] | str]:
    """A column of strings as the pieces of their JSON texts: where no string has a character to escape (the
    usual ids, labels and uris), the strings themselves between quote pieces (which join the neighbouring
    constant pieces: no work per string); else each one escaped. The check escapes the column's strings
    joined, in one call: an escape only ever lengthens, so an unchanged length means none was needed
    (10,000 uris ~1 ms; a regular expression took twice that, escaping each uri ~3 ms)."""
    try:
        joined = "".join(column)
    except TypeError:  # not all strings (no store answers so): each value as the renderer writes it
        return [[_render(value) for value in column]]
    if len(encode_basestring(joined)) == len(joined) + 2:
        return ['"', column, '"']
    return [list(map(encode_basestring, column))]


_EMPTY_HITS = b'{"code":0,"message":"","result":[]}'


def hits_body(matches: Matches, *, with_group: bool = True) -> bytes:
    """:func:`hits` as the response body, written from the answer's columns: exactly the bytes Starlette's
    ``JSONResponse`` renders for ``hits(matches)`` (key order, compact separators, UTF-8), with no dict or
    ``Match`` per hit. Each string is escaped by ``json``'s own encoder (``encode_basestring``: what
    ``json.dumps(ensure_ascii=False)`` calls) unless no string of its column has a character to escape,
    each score written as ``json`` writes a float, and a stored desc's JSON text is used as it is: the
    store wrote it with the renderer's own options (``Hits.json``), and ``json.dumps`` writes back byte
    for byte the text it wrote. Tags (when asked for) are rendered per hit. A 10,000-hit answer: ~4-5 ms
    (Match objects, dicts and orjson before: ~15 ms)."""
    n = len(matches)
    if not n:
        return _EMPTY_HITS
    found = matches.hits
    scores = _rounded7(np.asarray(matches.scores, dtype=np.float64))
    if not np.isfinite(scores).all():
        _render(scores.tolist())  # raises ValueError as the renderer would (scores are 0..1: never here)
    enc = encode_basestring
    if found.json:
        descs: Sequence[str] = [d or '""' for d in found.descs]
    else:
        descs = [enc(d) if type(d) is str else _render(d) for d in found.descs]
    groups: Sequence[str] | str = ""
    if with_group:
        names = set(found.groups)
        groups = enc(next(iter(names))) if len(names) == 1 else list(map(enc, found.groups))
    tails: list[Sequence[str] | str] = ["}"]
    if matches.with_tags or any(found.uris):
        if not matches.with_tags and all(found.uris):  # every hit has a uri (as in most catalogues)
            tails = [',"uri":', *_strings(found.uris), "}"]
        else:
            tails = [[',"uri":' + enc(u) + "}" if u else "}" for u in found.uris]]
        if matches.with_tags:
            listed = [tags(found.tag_list(i) or []) for i in range(n)]
            tails = [[t[:-1] + ',"tags":' + _render(x) + "}" for t, x in zip(tails[0], listed, strict=True)]]
    # Each row from its desc to the next row's opening: the first row's opening is in the head, the last
    # row's comma and opening become the array's and the object's ends.
    columns: list[Sequence[str] | str] = [descs]
    if with_group:
        columns += [',"group":', groups]
    columns += [',"id":', *_strings(found.ids), ',"label":', *_strings(found.labels)]
    columns += [',"score":', _floats(scores), *tails, ',{"desc":']
    parts = _interleave(columns, n)
    parts[0] = '{"code":0,"message":"","result":[{"desc":' + parts[0]
    parts[-1] = parts[-1][: -len(',{"desc":')] + "]}"
    return "".join(parts).encode()


def duplicates(result: DuplicatePage) -> dict[str, Any]:
    clusters = [
        {
            "images": cluster.images,
            "pairs": [{"ids": [p.a, p.b], "score": round(p.score, 7)} for p in cluster.pairs],
        }
        for cluster in result.clusters
    ]
    return {"clusters": clusters, "marker": result.marker, "scanned": result.scanned}


EMPTY: dict[str, Any] = {}


# --- OpenAPI --------------------------------------------------------------------------------------------
def maybe(model: type[BaseModel]) -> Any:
    """``model | None`` for create_model (a type built at run time, which a type checker cannot follow)."""
    return model | None


def request_models(settings: Settings) -> list[type[BaseModel]]:
    """The request bodies for the OpenAPI document, with the limits this server enforces."""
    attribute = create_model(
        "Attribute",
        id=(str | None, Field(default=None, description="Image id; generated when empty.")),
        label=(str | None, Field(default=None, description=f"At most {LABEL_MAX_CHARS} characters.")),
        desc=(
            Any,
            Field(default=None, description=f"Any JSON value, at most {settings.desc_max_bytes} bytes."),
        ),
    )
    entry = create_model(
        "ImageEntry",
        uri=(str, Field(description="http(s) URL or data:application/octet-stream;base64,... URI.")),
        attribute=(maybe(attribute), None),
    )
    batch_request = create_model(
        "BatchRequest",
        data=(list[entry], Field(description=f"At most {settings.max_batch_images} images.")),  # type: ignore[valid-type]
        params=(
            dict[str, Any] | None,
            Field(
                default=None,
                description='tusou extension: {"duplicates": "report" | "refuse", "duplicate_threshold"?: '
                "0..1 (default 0.85)} answers duplicates[] index for index (docs/score.md).",
            ),
        ),
    )
    search_data = create_model(
        "SearchData",
        uri=(str | None, Field(default=None, description="The query image (required unless id is given).")),
        id=(str | None, Field(default=None, description="tusou extension: search with this stored image.")),
        text=(
            str | None,
            Field(default=None, description="tusou extension: search by a word, English or Chinese."),
        ),
        group=(
            str | None,
            Field(default=None, description="With id: its group (default: the first searched)."),
        ),
        box=(
            list[float] | None,
            Field(
                default=None,
                description="tusou extension: search with part of the uri image, [x0, y0, x1, y1]: "
                "fractions of width and height when every value is <= 1, else pixels.",
            ),
        ),
    )
    limit_doc = f"1..{settings.search_max_limit}, or -1 for every match."
    threshold_doc = "0..1; raised to the system default."
    labels_doc = "tusou extension: only hits with these labels."
    filter_doc = "tusou extension: conditions on label and desc.<key> (eq, in, gt, gte, lt, lte)."
    tags_doc = "tusou extension: answer each hit's automatic tags."
    search_params = create_model(
        "SearchParams",
        groups=(list[str], Field(description=f"At most {settings.search_max_groups} groups.")),
        limit=(int | None, Field(default=1, description=limit_doc)),
        threshold=(float | None, Field(default=None, description=threshold_doc)),
        labels=(list[str] | None, Field(default=None, description=labels_doc)),
        filter=(dict[str, Any] | None, Field(default=None, description=filter_doc)),
        tags=(bool | None, Field(default=None, description=tags_doc)),
    )
    legacy_params = create_model(
        "LegacySearchParams",
        limit=(int | None, Field(default=1, description=limit_doc)),
        threshold=(float | None, Field(default=None, description=threshold_doc)),
        labels=(list[str] | None, Field(default=None, description=labels_doc)),
        filter=(dict[str, Any] | None, Field(default=None, description=filter_doc)),
        tags=(bool | None, Field(default=None, description=tags_doc)),
    )
    return [
        batch_request,
        create_model("DeleteRequest", images=(list[str], ...)),
        create_model("ImageRequest", id=(str, ...), tags=(bool | None, None)),
        create_model("SearchRequest", data=(search_data, ...), params=(search_params, ...)),
        create_model(
            "DuplicatesRequest",
            __doc__="tusou extension: near-duplicate clusters among a page of a group's images; walk the "
            "pages with marker until it comes back empty.",
            marker=(str | None, Field(default=None, description="From the previous answer.")),
            limit=(
                int | None,
                Field(default=DUPLICATES_PAGE, description=f"Images scanned, 1-{LIST_MAX_LIMIT}."),
            ),
            threshold=(
                float | None,
                Field(default=None, description="Least score of a pair (default 0.85)."),
            ),
        ),
        create_model("LegacySearchRequest", data=(search_data, ...), params=(maybe(legacy_params), None)),
        create_model(
            "UpdateRequest",
            __doc__="tusou extension: change a stored image's label and/or desc; "
            "absent fields stay as they are.",
            id=(str, ...),
            label=(str | None, None),
            desc=(Any, None),
        ),
    ]
