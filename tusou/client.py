"""A small typed client for tusou and any Qiniu-compatible image search server.

    from tusou.client import Client, Image, data_uri

    with Client("http://127.0.0.1:8000", access_key, secret_key) as api:
        api.new_group("shop", [Image(data_uri("shoe.jpg"), id="1", label="shoes")])
        for hit in api.search(["shop"], data_uri("photo.jpg"), limit=5):
            print(hit.id, hit.score)

Every Qiniu endpoint has a method, and so do tusou's additions (``update_image``, search by a stored
image's id, the ``labels`` filter, ``health`` and ``metrics``). Requests are signed with ``Qiniu <AK>:<Sign>``
by tusou's own signer (``tusou.api.auth.sign_qiniu``, byte-compatible with Qiniu's SDK), so nothing of
Qiniu's SDK is needed. Answers of 429 and 503, and connections refused before a request was sent, are
retried with exponential backoff (honouring ``Retry-After``); any other failure raises :class:`TusouError`
with the HTTP status and the server's message.
"""

from __future__ import annotations

import base64
import email.utils
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from tusou.api.auth import sign_qiniu
from tusou.duplicates import Cluster, Pair, clusters

__all__ = [
    "BatchResult",
    "Client",
    "Cluster",
    "Hit",
    "Image",
    "ImagePage",
    "StoredImage",
    "TusouError",
    "data_uri",
]

# Statuses that mean "not now": the request was not carried out and may be sent again as it is.
RETRY_STATUSES = frozenset({429, 503})
_KEEP: Any = object()  # update_image: leave this field as it is


class TusouError(Exception):
    """A request that failed: ``status`` is the HTTP status (0 when no answer came), ``message`` the
    server's ``error`` text (or the transport error), ``reqid`` the ``X-Reqid`` to quote in a report."""

    def __init__(self, status: int, message: str, reqid: str | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.reqid = reqid

    def __str__(self) -> str:
        return f"{self.status} {self.message}" if self.status else self.message


def data_uri(source: bytes | str | PathLike[str]) -> str:
    """A ``data:`` URI for an image given as bytes or as a file path (what new/add/search accept)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Image:
    """One image to add: a ``uri`` (http(s) URL or data URI) and its attributes (all optional)."""

    uri: str
    id: str | None = None
    label: str | None = None
    desc: Any = None

    def to_json(self) -> dict[str, Any]:
        attribute: dict[str, Any] = {}
        if self.id is not None:
            attribute["id"] = self.id
        if self.label is not None:
            attribute["label"] = self.label
        if self.desc is not None:
            attribute["desc"] = self.desc
        entry: dict[str, Any] = {"uri": self.uri}
        if attribute:
            entry["attribute"] = attribute
        return entry


@dataclass(frozen=True)
class BatchResult:
    """The answer of new/add, index for index with the request: ``images[i]`` is the stored id or ``""``,
    ``errors[i]`` is ``None`` or ``{"code": ..., "message": ...}``."""

    images: list[str]
    errors: list[dict[str, Any] | None]

    @property
    def failed(self) -> list[tuple[int, dict[str, Any]]]:
        """(index, error) of each image that was not stored."""
        return [(i, err) for i, err in enumerate(self.errors) if err is not None]


@dataclass(frozen=True)
class StoredImage:
    id: str
    label: str
    desc: Any


@dataclass(frozen=True)
class ImagePage:
    images: list[StoredImage]
    marker: str  # "" on the last page


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    label: str
    desc: Any
    group: str | None = None  # absent from the legacy single-group search
    uri: str | None = None  # tusou extension: the URL the image was added from
    extra: dict[str, Any] = field(default_factory=dict)  # fields a server sends beyond these

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Hit:
        known = {"id", "score", "label", "desc", "group", "uri"}
        return cls(
            id=entry.get("id", ""),
            score=float(entry.get("score", 0.0)),
            label=entry.get("label", ""),
            desc=entry.get("desc", ""),
            group=entry.get("group"),
            uri=entry.get("uri"),
            extra={k: v for k, v in entry.items() if k not in known},
        )


def _image_json(image: Image | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(image, Image):
        return image.to_json()
    if isinstance(image, str):
        return {"uri": image}
    return image


class Client:
    """Signed calls to one server. Thread-safe (one ``httpx.Client`` underneath): share it across threads.

    ``retries`` is how many times a 429/503 answer or a refused connection is tried again; the wait doubles
    from ``backoff_s`` up to ``max_backoff_s`` (with jitter), or is what the server's ``Retry-After`` asks
    (capped at ``max_backoff_s``). ``on_retry(why, wait_s)``, if given, is called before each wait (the
    ``tusou`` command uses it to say that it is still trying).
    """

    def __init__(
        self,
        server: str,
        access_key: str,
        secret_key: str,
        *,
        timeout: float = 120.0,
        retries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        if not self.server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s) URL, not {server!r}")
        self.access_key = access_key
        self._secret_key = secret_key
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_retry = on_retry
        self._http = httpx.Client(timeout=timeout, transport=transport, follow_redirects=False)

    def __repr__(self) -> str:  # never the secret
        return f"Client({self.server!r}, access_key={self.access_key!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------------------
    def _url(self, path: str, params: dict[str, Any] | None = None) -> str:
        url = self.server + path
        if params:
            url += "?" + urlencode(params)
        return url

    @staticmethod
    def _group_path(group: str, suffix: str = "") -> str:
        # Group ids may hold any character but / \ ? # %; spaces, CJK etc. go percent-encoded.
        return "/v1/image/group/" + quote(group, safe="") + suffix

    def _wait_s(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = response.headers.get("retry-after")
            if after:
                try:
                    return min(max(float(after), 0.0), self.max_backoff_s)
                except ValueError:
                    when = email.utils.parsedate_to_datetime(after) if after else None
                    if when is not None:
                        return min(max(when.timestamp() - time.time(), 0.0), self.max_backoff_s)
        base = min(self.backoff_s * 2**attempt, self.max_backoff_s)
        return base / 2 + random.uniform(0, base / 2)

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        """One signed call; the decoded JSON answer, or :class:`TusouError`. ``path`` as on the wire."""
        url = self._url(path, params)
        raw = b"" if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        attempt = 0
        while True:
            # Signed again on every try: X-Qiniu-Date must stay fresh across a long backoff.
            signed = sign_qiniu(self.access_key, self._secret_key, method, url, headers=headers, body=raw)
            response: httpx.Response | None = None
            try:
                response = self._http.request(method, url, content=raw or None, headers=signed)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing reached the server: safe to send again whatever the method.
                why = f"cannot connect to {self.server}: {exc}"
                if attempt >= self.retries:
                    raise TusouError(0, why) from exc
            except httpx.HTTPError as exc:
                raise TusouError(0, f"{type(exc).__name__}: {exc}") from exc
            if response is not None:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    return self._answer(response)
                why = f"{response.status_code} {response.reason_phrase}"
            wait_s = self._wait_s(attempt, response)
            if self.on_retry is not None:
                self.on_retry(why, wait_s)
            time.sleep(wait_s)
            attempt += 1

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        reqid = response.headers.get("x-reqid")
        try:
            payload = response.json() if response.content else {}
        except ValueError:
            payload = None
        if response.status_code != 200:
            message = payload.get("error") if isinstance(payload, dict) else None
            raise TusouError(response.status_code, str(message or response.reason_phrase or "error"), reqid)
        if payload is None:
            raise TusouError(response.status_code, "answer is not JSON", reqid)
        return payload

    # --- groups ---------------------------------------------------------------------------------------
    def new_group(self, group: str, images: Sequence[Image | str | dict[str, Any]] = ()) -> BatchResult:
        """Create ``group`` with ``images`` (maybe none). 400 "group already exists" if it does."""
        answer = self.request(
            "POST", self._group_path(group, "/new"), {"data": [_image_json(i) for i in images]}
        )
        return BatchResult(answer.get("images", []), answer.get("errors", []))

    def remove_group(self, group: str) -> None:
        self.request("POST", self._group_path(group, "/remove"))

    def list_groups(self) -> list[str]:
        return list(self.request("GET", "/v1/image/group").get("result") or [])

    def count(self, group: str) -> int:
        """The number of images in ``group`` (``/info``)."""
        return int(self.request("GET", self._group_path(group, "/info"))["count"])

    def group_exists(self, group: str) -> bool:
        return group in self.list_groups()

    # --- images ---------------------------------------------------------------------------------------
    def add_images(self, group: str, images: Sequence[Image | str | dict[str, Any]]) -> BatchResult:
        """Add ``images`` to ``group``; one bad image fails only its own ``errors[i]``."""
        answer = self.request(
            "POST", self._group_path(group, "/add"), {"data": [_image_json(i) for i in images]}
        )
        return BatchResult(answer.get("images", []), answer.get("errors", []))

    def delete_images(self, group: str, ids: Iterable[str]) -> None:
        self.request("POST", self._group_path(group, "/delete"), {"images": list(ids)})

    def list_images(self, group: str, marker: str = "", limit: int = 1000) -> ImagePage:
        """One page of ``group``; pass the returned ``marker`` for the next ("" after the last)."""
        params: dict[str, Any] = {"limit": limit}
        if marker:
            params["marker"] = marker
        answer = self.request("GET", self._group_path(group), params=params)
        images = [
            StoredImage(e["id"], e.get("value", {}).get("label", ""), e.get("value", {}).get("desc", ""))
            for e in answer.get("result") or []
        ]
        return ImagePage(images, answer.get("marker") or "")

    def iter_images(self, group: str, page_size: int = 1000) -> Iterator[StoredImage]:
        """Every image of ``group``, a page at a time."""
        marker = ""
        while True:
            page = self.list_images(group, marker, page_size)
            yield from page.images
            if not page.marker or not page.images:
                return
            marker = page.marker

    def get_image(self, group: str, image_id: str) -> StoredImage:
        answer = self.request("POST", self._group_path(group, "/image"), {"id": image_id})
        return StoredImage(image_id, answer.get("label", ""), answer.get("desc", ""))

    def update_image(
        self, group: str, image_id: str, *, label: str = _KEEP, desc: Any = _KEEP
    ) -> StoredImage:
        """tusou extension: change a stored image's label and/or desc (what is not passed stays)."""
        body: dict[str, Any] = {"id": image_id}
        if label is not _KEEP:
            body["label"] = label
        if desc is not _KEEP:
            body["desc"] = desc
        answer = self.request("POST", self._group_path(group, "/update"), body)
        return StoredImage(image_id, answer.get("label", ""), answer.get("desc", ""))

    # --- search ---------------------------------------------------------------------------------------
    def search(
        self,
        groups: Sequence[str] | str,
        uri: str | None = None,
        *,
        limit: int | None = None,
        threshold: float | None = None,
        labels: Sequence[str] | None = None,
        image_id: str | None = None,
        image_group: str | None = None,
        text: str | None = None,
        where: dict[str, Any] | None = None,
        tags: bool = False,
    ) -> list[Hit]:
        """The best matches in ``groups`` (at most 2) for the image at ``uri``, best first.

        tusou extensions: ``image_id`` (with ``image_group``, default the first group) searches with a stored
        image instead of ``uri``; ``text`` searches by a word (English or Chinese; docs/words.md);
        ``labels`` keeps only hits with one of these labels; ``where`` is ``params.filter`` (conditions on
        label and desc keys); ``tags`` asks for each hit's automatic tags (in ``Hit.extra["tags"]``).
        """
        if sum(x is not None for x in (uri, image_id, text)) != 1:
            raise ValueError("give one of uri, image_id or text")
        data: dict[str, Any] = (
            {"uri": uri} if uri is not None else {"id": image_id} if image_id is not None else {"text": text}
        )
        if image_group is not None:
            data["group"] = image_group
        params: dict[str, Any] = {"groups": [groups] if isinstance(groups, str) else list(groups)}
        if limit is not None:
            params["limit"] = limit
        if threshold is not None:
            params["threshold"] = threshold
        if labels is not None:
            params["labels"] = list(labels)
        if where is not None:
            params["filter"] = where
        if tags:
            params["tags"] = True
        answer = self.request("POST", "/v1/image/groups/search", {"data": data, "params": params})
        return [Hit.from_json(e) for e in answer.get("result") or []]

    def search_group(
        self, group: str, uri: str, *, limit: int | None = None, threshold: float | None = None
    ) -> list[Hit]:
        """Qiniu's older single-group search (``/v1/image/group/<group>/search``); hits carry no group."""
        params: dict[str, Any] = {}
        if limit is not None:
            params["limit"] = limit
        if threshold is not None:
            params["threshold"] = threshold
        answer = self.request(
            "POST", self._group_path(group, "/search"), {"data": {"uri": uri}, "params": params}
        )
        return [Hit.from_json(e) for e in answer.get("result") or []]

    def duplicates(
        self,
        group: str,
        *,
        threshold: float | None = None,
        page_size: int = 200,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Cluster]:
        """tusou extension: clusters of near-duplicates in ``group`` (pairs scoring at least ``threshold``,
        default 0.85), the largest first. Walks the group ``page_size`` images a call, joining the pairs of
        every page; ``progress(scanned, total)`` after each call."""
        total = self.count(group) if progress is not None else 0
        body: dict[str, Any] = {"limit": page_size}
        if threshold is not None:
            body["threshold"] = threshold
        pairs: list[Pair] = []
        scanned = 0
        while True:
            answer = self.request("POST", self._group_path(group, "/duplicates"), body)
            for cluster in answer.get("clusters") or []:
                pairs += [Pair(p["ids"][0], p["ids"][1], float(p["score"])) for p in cluster["pairs"]]
            scanned += int(answer.get("scanned", 0))
            if progress is not None:
                progress(scanned, max(total, scanned))
            if not answer.get("marker"):
                return clusters(pairs)
            body["marker"] = answer["marker"]

    # --- operations (tusou only, unsigned) -----------------------------------------------------------
    def _get_unsigned(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """One GET without retries; a transport failure is a :class:`TusouError` with status 0 like any."""
        try:
            return self._http.get(self.server + path, headers=headers or {})
        except httpx.HTTPError as exc:
            raise TusouError(0, f"cannot reach {self.server}: {type(exc).__name__}: {exc}") from exc

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", ...}``; 503 while starting or if the store fails."""
        return self._answer(self._get_unsigned("/healthz"))  # type: ignore[no-any-return]

    def metrics(self, token: str | None = None) -> str:
        """``GET /metrics`` (Prometheus text); ``token`` when the server sets ``TUSOU_METRICS_TOKEN``."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self._get_unsigned("/metrics", headers)
        if response.status_code != 200:
            self._answer(response)
        return response.text
