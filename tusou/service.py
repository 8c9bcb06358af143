"""The use cases of tusou: what each API call does, independent of HTTP.

The HTTP layer (``tusou.api``) parses requests and calls these methods from worker threads; they validate
input, turn URIs into images (``tusou.images``), images into vectors (``tusou.embed``) and keep or search
them (``tusou.store``). Errors the client caused are raised as :class:`tusou.errors.QiniuError` with
Qiniu's status and message; per-image failures in a batch become ``errors[]`` entries instead.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tusou.batching import Batcher
from tusou.config import Settings
from tusou.embed.base import Embedder
from tusou.errors import QiniuError
from tusou.images import Fetcher, ImageError, load_image
from tusou.store.base import KEEP, ImageInfo, ItemError, NewImage, Store

# Group ids travel in URL paths: no separators, dot-segments or control characters.
GROUP_ID_RE = re.compile(r"^[^\x00-\x1f\x7f/\\?#%]{1,128}$")
IMAGE_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
LABEL_MAX_CHARS = 1024


class Observer:
    """What the service reports as it works (metrics hook). The default does nothing."""

    def embedded(self, purpose: str, count: int, seconds: float) -> None:
        """``count`` images went through the model in one call (``purpose``: "index" or "query")."""

    def image_failed(self, error: ImageError) -> None:
        """An image could not be fetched or decoded (a per-image error, or a failed search query)."""


@dataclass
class BatchResult:
    images: list[str]
    errors: list[dict[str, Any] | None]


@dataclass
class _Item:
    """One entry of a new/add request, validated."""

    id: str
    label: str
    desc: Any
    uri: str


def check_group_id(group: str) -> str:
    if not isinstance(group, str) or not GROUP_ID_RE.match(group) or group in (".", ".."):
        raise QiniuError(400, "invalid group id")
    return group


def _id_text(value: Any) -> str | None:
    """An image id as its string, or None if it is no id at all.

    Clients often send numeric ids and Qiniu echoed them as strings; bool is an int to Python, but true
    is not an id.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _required_id(value: Any) -> str:
    text = _id_text(value)
    if not text:
        raise QiniuError(400, "invalid id")
    return text


def _label_ok(label: Any) -> bool:
    return isinstance(label, str) and len(label) <= LABEL_MAX_CHARS


def _desc_bytes(desc: Any) -> int:
    """Size of a desc as stored (compact JSON); a plain string counts its own bytes, not the quotes."""
    if isinstance(desc, str):
        return len(desc.encode())
    return len(json.dumps(desc, ensure_ascii=False, separators=(",", ":")).encode())


def _item_error(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


class Service:
    def __init__(self, settings: Settings, store: Store, embedder: Embedder, fetcher: Fetcher) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.fetcher = fetcher
        self.observer = Observer()
        # Fetching and decoding overlap well across images (network waits, Pillow releases the GIL).
        self._loader = ThreadPoolExecutor(
            max_workers=settings.fetch_max_concurrent, thread_name_prefix="load"
        )
        # Indexing runs one worker per core (throughput); queries one worker whose calls use every core.
        self._embed_images = Batcher(
            self._timed(embedder.embed_images, "index"),
            max(1, settings.embed_batch // 2),
            "embed-index",
            workers=os.cpu_count() or 1,
        )
        self._embed_queries = Batcher(
            self._timed(embedder.embed_queries, "query"), settings.embed_batch, "embed-query"
        )
        self.default_threshold = (
            settings.default_threshold
            if settings.default_threshold is not None
            else float(embedder.default_threshold)
        )

    def _timed(
        self, fn: Callable[[list[Any]], np.ndarray], purpose: str
    ) -> Callable[[list[Any]], np.ndarray]:
        def run(items: list[Any]) -> np.ndarray:
            start = time.perf_counter()
            result = fn(items)
            self.observer.embedded(purpose, len(items), time.perf_counter() - start)
            return result

        return run

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._embed_images.close()
        self._embed_queries.close()

    # --- writes --------------------------------------------------------------------------------------
    def new_group(self, tenant: str, group: str, data: Any) -> BatchResult:
        check_group_id(group)
        items = self._check_batch(data, allow_empty=True)
        if group in self.store.list_groups(tenant):
            raise QiniuError(400, "group already exists")
        return self._write(items, lambda images: self.store.create_group(tenant, group, images))

    def add_images(self, tenant: str, group: str, data: Any) -> BatchResult:
        check_group_id(group)
        items = self._check_batch(data, allow_empty=True)
        self.store.count(tenant, group)  # fail fast on an unknown group, before fetching
        return self._write(items, lambda images: self.store.add_images(tenant, group, images))

    def _check_batch(self, data: Any, allow_empty: bool) -> list[_Item | dict[str, Any]]:
        if not isinstance(data, list):
            raise QiniuError(400, "invalid data")
        if not data and not allow_empty:
            raise QiniuError(400, "empty data")
        if len(data) > self.settings.max_batch_images:
            raise QiniuError(400, f"too many images, at most {self.settings.max_batch_images}")
        return [self._check_item(entry) for entry in data]

    def _check_item(self, entry: Any) -> _Item | dict[str, Any]:
        """A valid item, or the ``errors[]`` entry explaining why it is not."""
        if not isinstance(entry, dict):
            return _item_error(400, "invalid image entry")
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri.strip():
            return _item_error(400, "empty uri")
        attribute = entry.get("attribute") or {}
        if not isinstance(attribute, dict):
            return _item_error(400, "invalid attribute")
        raw_id = attribute.get("id")
        image_id = uuid.uuid4().hex if raw_id is None or raw_id == "" else _id_text(raw_id)
        if image_id is None or not IMAGE_ID_RE.match(image_id):
            return _item_error(400, "invalid id")
        label = attribute.get("label")
        if label is None:
            label = ""
        if not _label_ok(label):
            return _item_error(400, "invalid label")
        desc = attribute.get("desc")
        if desc is not None:
            if _desc_bytes(desc) > self.settings.desc_max_bytes:
                return _item_error(406, "desc too long")
        return _Item(image_id, label, desc, uri.strip())

    def _write(self, items: list[_Item | dict[str, Any]], commit: Any) -> BatchResult:
        images = self._load_all([it.uri if isinstance(it, _Item) else None for it in items])
        errors: list[dict[str, Any] | None] = [None] * len(items)
        ready: list[int] = []
        for i, (item, loaded) in enumerate(zip(items, images, strict=True)):
            if isinstance(item, dict):
                errors[i] = item
            elif isinstance(loaded, ImageError):
                errors[i] = _item_error(loaded.code, loaded.message)
            else:
                ready.append(i)
        vectors = self._embed_images([images[i] for i in ready]) if ready else np.zeros((0, 0))
        new_images = []
        for row, i in enumerate(ready):
            item = items[i]
            assert isinstance(item, _Item)
            uri = item.uri if not item.uri.startswith("data:") else None
            new_images.append(NewImage(item.id, item.label, item.desc, uri, vectors[row]))
        results: list[ItemError | None] = commit(new_images)
        ids = [""] * len(items)
        for i, new_image, result in zip(ready, new_images, results, strict=True):
            if result is None:
                ids[i] = new_image.id
            else:
                errors[i] = _item_error(result.code, result.message)
        return BatchResult(ids, errors)

    def _load_all(self, uris: list[str | None]) -> list[Image.Image | ImageError | None]:
        def load(uri: str | None) -> Image.Image | ImageError | None:
            if uri is None:
                return None
            try:
                return load_image(uri, self.fetcher, self.embedder.prepare)
            except ImageError as exc:
                self.observer.image_failed(exc)
                return exc

        if len(uris) == 1:
            return [load(uris[0])]
        return list(self._loader.map(load, uris))

    def remove_group(self, tenant: str, group: str) -> None:
        self.store.remove_group(tenant, check_group_id(group))

    def delete_images(self, tenant: str, group: str, ids: Any) -> int:
        check_group_id(group)
        texts = [_id_text(i) for i in ids] if isinstance(ids, list) else [None]
        if any(text is None for text in texts):
            raise QiniuError(400, "invalid images")
        return self.store.delete_images(tenant, group, texts)

    # --- reads ---------------------------------------------------------------------------------------
    def list_groups(self, tenant: str) -> list[str]:
        return self.store.list_groups(tenant)

    def group_count(self, tenant: str, group: str) -> int:
        return self.store.count(tenant, check_group_id(group))

    def list_images(self, tenant: str, group: str, marker: str, limit: int) -> tuple[list[ImageInfo], str]:
        if not 1 <= limit <= 1000:
            raise QiniuError(400, "invalid limit")
        return self.store.list_images(tenant, check_group_id(group), marker, limit)

    def get_image(self, tenant: str, group: str, image_id: Any) -> ImageInfo:
        return self.store.get_image(tenant, check_group_id(group), _required_id(image_id))

    def search(
        self,
        tenant: str,
        groups: Any,
        uri: Any,
        limit: Any = None,
        threshold: Any = None,
        *,
        by_id: Any = None,
        labels: Any = None,
    ) -> list[dict[str, Any]]:
        """Qiniu's search: the best ``limit`` images over ``groups`` scoring at least the threshold.

        Beyond Qiniu (additive): ``by_id`` = (group, image id) searches with a stored image's vector
        instead of an uploaded one; ``labels`` keeps only hits with one of these labels.
        """
        if by_id is None and (not isinstance(uri, str) or not uri.strip()):
            raise QiniuError(406, "empty uri")
        groups = self._check_groups(groups)
        limit = self._check_limit(limit)
        floor = self._check_threshold(threshold)
        wanted_labels = self._check_labels(labels)
        for group in groups:
            self.store.count(tenant, group)
        if by_id is not None:
            source_group, image_id = by_id
            source_group = check_group_id(source_group if source_group is not None else groups[0])
            if not isinstance(image_id, str) or not image_id:
                raise QiniuError(406, "invalid id")
            queries = self.store.get_vector(tenant, source_group, image_id)[None, :]
        else:
            try:
                image = load_image(uri.strip(), self.fetcher, self.embedder.prepare)
            except ImageError as exc:
                self.observer.image_failed(exc)
                raise
            queries = self._embed_queries([image])[0]
        min_cosine = self.embedder.cosine_for_score(floor)
        # A label filter applies to every match (exact), then the limit.
        hits = self.store.search(tenant, groups, queries, -1 if wanted_labels else limit, min_cosine)
        if wanted_labels:
            hits = [hit for hit in hits if hit.label in wanted_labels][:limit]
        scores = self.embedder.score(np.asarray([hit.cosine for hit in hits], dtype=np.float32))
        result = []
        for hit, score in zip(hits, scores.tolist(), strict=True):
            if score < floor:
                continue  # the inverse map is approximate at the boundary; the score decides
            entry: dict[str, Any] = {
                "desc": hit.desc,
                "group": hit.group,
                "id": hit.id,
                "label": hit.label,
                "score": round(float(score), 7),
            }
            if hit.uri:
                entry["uri"] = hit.uri
            result.append(entry)
        return result

    def _check_groups(self, groups: Any) -> list[str]:
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list) or not groups:
            raise QiniuError(406, "empty groups")
        if len(groups) > self.settings.search_max_groups:
            raise QiniuError(406, f"too many groups, at most {self.settings.search_max_groups}")
        if not all(isinstance(g, str) for g in groups):
            raise QiniuError(406, "invalid groups")
        return list(dict.fromkeys(check_group_id(g) for g in groups))

    def _check_limit(self, limit: Any) -> int:
        if limit is None:
            return 1
        if isinstance(limit, bool) or not isinstance(limit, int | float | str):
            raise QiniuError(406, "invalid limit")
        try:
            value = int(float(limit)) if isinstance(limit, str) else int(limit)
            whole = value == float(limit)
        except (ValueError, OverflowError) as exc:  # 1e999, or an int too large for a float
            raise QiniuError(406, "invalid limit") from exc
        if not whole or value < -1 or value > self.settings.search_max_limit:
            raise QiniuError(406, "invalid limit")
        if value == 0:
            return 1
        # -1 is "every match"; Qiniu capped that at the maximum limit too.
        return self.settings.search_max_limit if value == -1 else value

    @staticmethod
    def _check_labels(labels: Any) -> set[str] | None:
        if labels is None or labels == []:
            return None
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise QiniuError(406, "invalid labels")
        return set(labels)

    def update_image(self, tenant: str, group: str, image_id: Any, label: Any, desc: Any) -> ImageInfo:
        """Change a stored image's label and/or desc (beyond Qiniu); its vector stays."""
        image_id = _required_id(image_id)
        if label is not None and not _label_ok(label):
            raise QiniuError(400, "invalid label")
        if desc is not KEEP and desc is not None:
            if _desc_bytes(desc) > self.settings.desc_max_bytes:
                raise QiniuError(406, "desc too long")
        return self.store.update_image(tenant, check_group_id(group), image_id, label=label, desc=desc)

    def _check_threshold(self, threshold: Any) -> float:
        if threshold is None or threshold == "":
            return self.default_threshold
        if isinstance(threshold, bool):
            raise QiniuError(406, "invalid threshold")
        try:
            value = float(threshold)
        except (TypeError, ValueError, OverflowError) as exc:
            raise QiniuError(406, "invalid threshold") from exc
        if not 0.0 <= value <= 1.0:
            raise QiniuError(406, "invalid threshold")
        return max(value, self.default_threshold)


def build_service(settings: Settings) -> Service:
    """Wire the real pieces together: model, store and fetcher from ``settings``."""
    from tusou.embed import create_embedder
    from tusou.store import open_store

    settings.data.mkdir(parents=True, exist_ok=True)
    embedder = create_embedder(settings)
    store = open_store(settings, model_id=embedder.model_id, dim=embedder.dim)
    return Service(settings, store, embedder, Fetcher(settings))
